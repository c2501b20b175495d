"""Training-step speed and memory of a Pyro VAE: pyro_lvm and stock Pyro against hand-written PyTorch.

One process, interleaved rounds: each round times every variant once (``--steps`` steps of
forward, backward and Adam on the same batches, in an order that rotates from round to
round), so that a slow patch of a shared machine hits all variants alike. Every variant
starts from the same initial weights (one seeded :class:`pyro_lvm.VAE`, copied) and sees
the same batches, and runs ``--warmup`` untimed steps first (JIT compilation, lazily
created optimizer state, allocations). Reported per configuration: the median ms/step
over rounds and examples/s, the median over rounds of the paired speed ratio to the
hand-written step (``t_torch / t_variant``: 1 is as fast as plain PyTorch, 0.5 half as
fast), and the peak memory of one training step relative to the hand-written one.

Configurations (an MLP VAE with one hidden layer in the encoder and in the decoder, ReLU,
diagonal Gaussian guide with scale ``softplus(raw) + 1e-5``, Bernoulli likelihood, Adam
with lr 1e-3):

* ``a``: batch 128, 784-400-20, MNIST training images binarized once (seed 0);
* ``b``: batch 1024, the same net and data;
* ``c``: batch 16, 16-8-2, MNIST downsampled to 4x4 (means of 7x7 blocks), binarized once;
* ``d``: the score-function estimator on ``a``;
* ``e``: the IWAE bound with ``K = 5`` particles on ``a``'s net and data, in mini-batches of 20
  (Burda et al.'s batch size, where the step's overhead matters most).

Without the MNIST files (``--mnist-root``) random binary data of the same shapes is used
and the script says so. Variants:

* ``torch``: a hand-written :class:`torch.nn.Module` with the same layers, the KL in closed
  form and ``F.binary_cross_entropy_with_logits(..., reduction="sum")``, stepped by
  :class:`torch.optim.Adam`. For ``d`` a hand-written REINFORCE step that computes what
  pyro_lvm's ``"score_function"`` estimator computes with its default baseline: with
  :math:`z_i = \\mu(x_i) + \\sigma(x_i)\\epsilon_i` drawn without gradient and the
  per-datapoint learning signal :math:`\\ell_i = \\log p(x_i \\mid z_i) + \\log p(z_i) -
  \\log q(z_i \\mid x_i)`, the loss is
  :math:`-\\frac1B \\sum_i \\big[\\ell_i + (\\bar\\ell_i - b)\\log q(z_i \\mid x_i)\\big]`
  in its gradient (:math:`\\bar\\ell` the detached signal) and :math:`-\\frac1B \\sum_i \\ell_i`
  in its value, and the baseline :math:`b` is the decaying
  average of the batch mean of :math:`\\bar\\ell`: 0 at the first step, then the average
  before the step, updated after use as ``b <- 0.9 b + 0.1 mean(l)``. For ``e`` a hand-written
  IWAE step: :math:`K` draws :math:`z_k = \\mu + \\sigma\\epsilon_k`, the loss
  :math:`-\\frac1B \\sum_i \\log \\frac1K \\sum_k w_{ik}` with
  :math:`\\log w_{ik} = \\log p(x_i \\mid z_{ik}) + \\log p(z_{ik}) - \\log q(z_{ik} \\mid x_i)`.
* ``pyro SVI Trace_ELBO``: stock :class:`pyro.infer.SVI` with :class:`~pyro.infer.Trace_ELBO`
  and ``pyro.optim.Adam`` on a copy of the VAE's ``model`` and ``guide``. For ``d``:
  ``pyro SVI TraceGraph_ELBO``, the guide's ``z`` made non-reparameterized
  (``has_rsample_(False)``) with ``infer={"baseline": {"use_decaying_avg_baseline": True}}``,
  Pyro's own score-function recipe.
* ``pyro SVI JitTrace_ELBO``: the same with :class:`~pyro.infer.JitTrace_ELBO`
  (``ignore_jit_warnings=True``); not for ``d`` and ``e``. For ``e``: ``pyro SVI RenyiELBO``,
  stock Pyro's :class:`~pyro.infer.RenyiELBO` with ``alpha=0`` (the IWAE bound) and
  ``K`` vectorized particles.
* ``pyro_lvm``: :class:`pyro_lvm.LVMModule` with ``estimator="analytic_kl"``
  (``"score_function"`` for ``d``), stepped by ``loss = module(x); loss.backward();
  optimizer.step()`` with the optimizer of ``module.configure_optimizers()``. For ``a``
  also ``pyro_lvm reparam`` (``estimator="reparam"``), and for ``a`` and ``c``
  ``pyro_lvm user pair``: the VAE's ``model`` and ``guide`` wrapped in two plain functions,
  as a user's own pair is, which has no fast path and runs through Pyro's ``Trace_ELBO``
  (compare it with ``pyro SVI Trace_ELBO``: the issue's target is no slower). For ``e``:
  ``estimator=IWAEELBO(num_particles=5)``, and ``pyro_lvm iwae, Pyro's path``, the same with
  ``fast_step=False`` (pyro_lvm's :class:`~pyro_lvm.estimators.IWAEELBO` through Pyro's traces).

Pyro's validation stays at its default (on) for every variant, since that is what users
get; the hand-written steps use no distributions and are not affected by it.

Memory: the peak of one training step (after warm-up) above the memory live when the step
starts: activations, gradients, temporaries. On CUDA from ``torch.cuda.max_memory_allocated``
(reset before the step). On a CPU from the allocator's own accounting in the PyTorch
profiler (``profile_memory=True``: every allocation and free of the CPU allocator in
order); two steps are profiled and the peak is taken over the second, relative to the level
at its start, so that gradients and buffers freed and reallocated each step are counted
like on CUDA.

    python benchmarks/svi_step.py                                 # all configurations, a few minutes
    python benchmarks/svi_step.py --configs a c --rounds 5         # a subset
    python benchmarks/svi_step.py --device cuda                    # the same on a GPU
    python benchmarks/svi_step.py --rst docs/benchmarks/svi_step.inc
    python benchmarks/svi_step.py --quick                          # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import pyro
import pyro.infer.util
import torch
import torch.nn.functional as F
from pyro.infer import SVI, JitTrace_ELBO, RenyiELBO, Trace_ELBO, TraceGraph_ELBO
from torch import nn

from pyro_lvm import VAE, LVMModule
from pyro_lvm.estimators import make_elbo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from score_function import _Reinforce  # noqa: E402  Pyro's stock score-function recipe, shared

REFERENCE = "torch"
CANDIDATE = "pyro_lvm"
MEMORY_TARGET = 1.1
LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class Config:
    """One configuration: the net, the batch, the estimator, the data and the issue's target."""

    key: str
    data_dim: int
    hidden: int
    latent: int
    batch_size: int
    score_function: bool
    target: float
    steps: int  # default timed steps per round
    data: str  # "mnist" (28x28) or "mnist4x4"
    iwae: int = 0  # K particles of the IWAE bound (0: a single-sample estimator)

    def title(self) -> str:
        estimator = f"IWAE k={self.iwae}" if self.iwae else "score function" if self.score_function else "analytic KL"
        return (
            f"({self.key}) batch {self.batch_size}, {self.data_dim}-{self.hidden}-{self.latent} MLP VAE, "
            f"Bernoulli, {estimator}"
        )


CONFIGS = {
    "a": Config("a", 784, 400, 20, 128, False, 0.95, 40, "mnist"),
    "b": Config("b", 784, 400, 20, 1024, False, 0.98, 8, "mnist"),
    "c": Config("c", 16, 8, 2, 16, False, 0.80, 200, "mnist4x4"),
    "d": Config("d", 784, 400, 20, 128, True, 0.70, 40, "mnist"),
    "e": Config("e", 784, 400, 20, 20, False, 0.80, 100, "mnist", iwae=5),
}
QUICK = {
    "a": Config("a", 784, 32, 4, 32, False, 0.95, 3, "mnist"),
    "b": Config("b", 784, 32, 4, 64, False, 0.98, 3, "mnist"),
    "c": Config("c", 16, 8, 2, 16, False, 0.80, 3, "mnist4x4"),
    "d": Config("d", 784, 32, 4, 32, True, 0.70, 3, "mnist"),
    "e": Config("e", 784, 32, 4, 20, False, 0.80, 3, "mnist", iwae=5),
}


# ----------------------------------------------------------------------------- data


def load_images(root: str, count: int, seed: int) -> tuple[Optional[torch.Tensor], str]:
    """``count`` MNIST training images (a subset drawn with ``seed``) in [0, 1], or None and why not."""
    try:
        from pyro_lvm.data import MNISTDataModule

        x = MNISTDataModule(root=root, binarize="none", val_size=0).datasets["train"].x
    except Exception as err:  # missing files: the caller falls back to random data
        return None, f"{type(err).__name__}: {str(err).splitlines()[0]}"
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:count]
    return x[order].reshape(-1, 784).float(), ""


def make_batches(config: Config, images: Optional[torch.Tensor], num_batches: int, seed: int,
                 device: torch.device) -> list[torch.Tensor]:
    """``num_batches`` binary batches, drawn once with a private generator (the same for every variant)."""
    generator = torch.Generator().manual_seed(seed)
    n = num_batches * config.batch_size
    if images is None:
        intensity = torch.full((n, config.data_dim), 0.5)
    else:
        intensity = images[torch.arange(n) % len(images)]
        if config.data == "mnist4x4":
            intensity = F.avg_pool2d(intensity.reshape(-1, 1, 28, 28), 7).reshape(-1, 16)
    x = torch.bernoulli(intensity, generator=generator).to(device)
    return list(x.split(config.batch_size))


# ----------------------------------------------------------------------------- variants

Step = Callable[[torch.Tensor], None]


class HandWrittenVAE(nn.Module):
    """The VAE in plain PyTorch, with pyro_lvm.VAE's layers (so that its weights load)."""

    def __init__(self, data_dim: int, hidden: int, latent: int):
        super().__init__()
        self.latent = latent
        self.encoder = nn.Sequential(nn.Linear(data_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, data_dim))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = self.encoder(x).split(self.latent, dim=-1)
        return loc, F.softplus(raw) + 1e-5  # pyro_lvm.VAE's parameterisation of the scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """-ELBO per data point: closed-form KL, one reparameterized draw for the reconstruction."""
        loc, scale = self.encode(x)
        z = loc + scale * torch.randn_like(loc)
        reconstruction = F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="sum")
        kl = 0.5 * (loc.pow(2) + scale.pow(2) - 1).sum() - scale.log().sum()
        return (reconstruction + kl) / x.shape[0]


class HandWrittenReinforce:
    """The REINFORCE surrogate of pyro_lvm's "score_function" estimator with its default baseline."""

    def __init__(self, net: HandWrittenVAE, baseline_beta: float = 0.9):
        self.net = net
        self.baseline_beta = baseline_beta
        self.average: Optional[torch.Tensor] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        loc, scale = self.net.encode(x)
        with torch.no_grad():
            z = loc + scale * torch.randn_like(loc)
        log_q = (-0.5 * ((z - loc) / scale).pow(2) - scale.log() - 0.5 * LOG_2PI).sum(-1)
        log_prior = (-0.5 * z.pow(2) - 0.5 * LOG_2PI).sum(-1)
        log_lik = -F.binary_cross_entropy_with_logits(self.net.decoder(z), x, reduction="none").sum(-1)
        signal = log_lik + log_prior - log_q
        detached = signal.detach()
        if self.average is None:
            baseline, self.average = torch.zeros_like(detached.mean()), detached.mean()
        else:
            baseline = self.average
            self.average = self.baseline_beta * baseline + (1 - self.baseline_beta) * detached.mean()
        score = ((detached - baseline) * log_q).sum()
        # value: -ELBO per data point; gradient: the surrogate's
        return -(signal.sum() + score - score.detach()) / x.shape[0]


class HandWrittenIWAE:
    """The IWAE bound with ``k`` particles: ``-mean_i log mean_k w_ik``."""

    def __init__(self, net: HandWrittenVAE, k: int):
        self.net, self.k = net, k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        loc, scale = self.net.encode(x)
        eps = torch.randn((self.k,) + loc.shape, device=loc.device)
        z = loc + scale * eps
        log_lik = -F.binary_cross_entropy_with_logits(
            self.net.decoder(z), x.expand(self.k, *x.shape), reduction="none").sum(-1)
        log_w = log_lik + (0.5 * (eps.pow(2) - z.pow(2)) + scale.log()).sum(-1)  # log p(z) - log q(z)
        return -(torch.logsumexp(log_w, 0) - math.log(self.k)).sum() / x.shape[0]


def torch_step(config: Config, vae: VAE, lr: float) -> Step:
    net = HandWrittenVAE(config.data_dim, config.hidden, config.latent).to(next(vae.parameters()).device)
    net.encoder.load_state_dict(vae.encoder.state_dict())
    net.decoder.load_state_dict(vae.decoder.state_dict())
    loss_fn = (HandWrittenIWAE(net, config.iwae) if config.iwae else HandWrittenReinforce(net)
               if config.score_function else net)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)

    def step(x: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(x).backward()
        optimizer.step()

    return step


def _pyro_sample(self, msg) -> None:
        if not msg["is_observed"]:
            fn = msg["fn"]
            while isinstance(fn, torch.distributions.Independent):  # its has_rsample is its base's
                fn = fn.base_dist
            fn.has_rsample_(False)
            msg["infer"] = {**msg["infer"], "baseline": {"use_decaying_avg_baseline": True}}


def svi_step(elbo: str, vae: VAE, lr: float, num_particles: int = 1) -> Step:
    state: dict = {"params": {}, "constraints": {}}  # a private param store, as LVMModule has
    guide = vae.guide
    if elbo == "TraceGraph_ELBO":
        guide, loss = _Reinforce()(vae.guide), TraceGraph_ELBO()
    elif elbo == "JitTrace_ELBO":
        loss = JitTrace_ELBO(ignore_jit_warnings=True)
    elif elbo == "RenyiELBO":  # alpha = 0: the IWAE bound
        loss = RenyiELBO(alpha=0.0, num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    else:
        loss = Trace_ELBO()
    svi = SVI(vae.model, guide, pyro.optim.Adam({"lr": lr}), loss)

    def step(x: torch.Tensor) -> None:
        with pyro.get_param_store().scope(state):
            svi.step(x)

    return step


def pyro_lvm_step(estimator: str, vae: VAE, lr: float, batch: torch.Tensor, num_particles: int = 1,
                  fast_step: bool = True) -> Step:
    module = LVMModule(vae, estimator=make_elbo(estimator, num_particles=num_particles), lr=lr, latent_monitor=False,
                       fast_step=fast_step)
    module.initialize(batch)
    optimizer = module.configure_optimizers()
    if not isinstance(optimizer, torch.optim.Optimizer):  # e.g. a dict with a scheduler
        optimizer = torch.optim.Adam(module.parameters(), lr=lr)

    def step(x: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = module(x)
        loss.backward()
        optimizer.step()

    return step


def variants(config: Config) -> dict[str, Callable[[VAE, float, torch.Tensor], Step]]:
    """The variants of a configuration: name -> builder(vae copy, lr, first batch)."""
    if config.iwae:
        k = config.iwae
        return {
            REFERENCE: lambda vae, lr, batch: torch_step(config, vae, lr),
            "pyro SVI RenyiELBO": lambda vae, lr, batch: svi_step("RenyiELBO", vae, lr, k),
            "pyro_lvm iwae, Pyro's path": lambda vae, lr, batch: pyro_lvm_step("iwae", vae, lr, batch, k, False),
            CANDIDATE: lambda vae, lr, batch: pyro_lvm_step("iwae", vae, lr, batch, k),
        }
    if config.score_function:
        return {
            REFERENCE: lambda vae, lr, batch: torch_step(config, vae, lr),
            "pyro SVI TraceGraph_ELBO": lambda vae, lr, batch: svi_step("TraceGraph_ELBO", vae, lr),
            CANDIDATE: lambda vae, lr, batch: pyro_lvm_step("score_function", vae, lr, batch),
        }
    out = {
        REFERENCE: lambda vae, lr, batch: torch_step(config, vae, lr),
        "pyro SVI Trace_ELBO": lambda vae, lr, batch: svi_step("Trace_ELBO", vae, lr),
        "pyro SVI JitTrace_ELBO": lambda vae, lr, batch: svi_step("JitTrace_ELBO", vae, lr),
        CANDIDATE: lambda vae, lr, batch: pyro_lvm_step("analytic_kl", vae, lr, batch),
    }
    if config.key == "a":
        out["pyro_lvm reparam"] = lambda vae, lr, batch: pyro_lvm_step("reparam", vae, lr, batch)
    if config.key in ("a", "c"):
        out["pyro_lvm user pair"] = lambda vae, lr, batch: user_pair_step(vae, lr, batch)
    return out


def user_pair_step(vae: VAE, lr: float, batch: torch.Tensor) -> Step:
    """:class:`pyro_lvm.LVMModule` on the VAE's model and guide as two plain functions: a user's own
    pair, which has no fast path and runs through Pyro's ``Trace_ELBO`` (``estimator="reparam"``)."""

    def model(x):
        return vae.model(x)

    def guide(x):
        return vae.guide(x)

    module = LVMModule(model, guide, estimator="reparam", lr=lr, latent_monitor=False)
    module.initialize(batch)
    assert module._fast is None, "a user's pair must run through Pyro"
    optimizer = module.configure_optimizers()
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained >= {id(p) for p in vae.parameters()}, "the pair's modules must be trained"

    def step(x: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        module(x).backward()
        optimizer.step()

    return step


# ----------------------------------------------------------------------------- measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Step, batches: list[torch.Tensor], steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` steps, with the garbage collector paused (as timeit does)."""
    gc.collect()
    gc.disable()
    try:
        _sync(device)
        start = time.perf_counter()
        for i in range(steps):
            step(batches[i % len(batches)])
        _sync(device)
        return (time.perf_counter() - start) / steps
    finally:
        gc.enable()


def step_peak_memory(step: Step, batches: list[torch.Tensor], device: torch.device) -> int:
    """Bytes: the peak of one step above the memory live when it starts (see the module docstring)."""
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(batches[0])
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(batches[0])
        with record_function("measured step"):
            step(batches[1 % len(batches)])
    events = prof.profiler.kineto_results.events()
    marker = next(e for e in events if e.name() == "measured step")
    level, start_level, peak = 0, None, 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if start_level is None and e.start_ns() >= marker.start_ns():
            start_level = peak = level
        if e.start_ns() > marker.end_ns():
            break
        level += e.nbytes()
        if start_level is not None:
            peak = max(peak, level)
    return peak - (level if start_level is None else start_level)


def benchmark(config: Config, batches: list[torch.Tensor], steps: int, rounds: int, warmup: int,
              lr: float, seed: int, device: torch.device) -> dict[str, dict]:
    """Per variant: median seconds per step, their spread, the paired speed ratio and the step's peak memory."""
    pyro.set_rng_seed(seed)
    base = VAE(data_shape=config.data_dim, latent_dim=config.latent, hidden_dims=[config.hidden]).to(device)
    built: dict[str, Step] = {}
    for name, build in variants(config).items():
        pyro.set_rng_seed(seed)  # each variant draws the same noise in its first steps
        built[name] = build(copy.deepcopy(base), lr, batches[0])
        if warmup:
            time_steps(built[name], batches, warmup, device)  # untimed: compilation, optimizer state, allocations
    # what exists now lives to the end: out of the collector's sight, so that the collection
    # before each timed block is quick (a full one over torch's and Lightning's objects is not)
    gc.collect()
    gc.freeze()
    try:
        names = list(built)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                times[name].append(time_steps(built[name], batches, steps, device))
        memory = {name: step_peak_memory(built[name], batches, device) for name in names}
    finally:
        gc.unfreeze()
    return {
        name: {
            "seconds": statistics.median(times[name]),
            "spread": (min(times[name]), max(times[name])),
            "ratio": statistics.median(ref / t for t, ref in zip(times[name], times[REFERENCE])),
            "memory": memory[name],
            "memory_ratio": memory[name] / memory[REFERENCE] if memory[REFERENCE] > 0 else math.nan,
        }
        for name in names
    }


# ----------------------------------------------------------------------------- report


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def verdict(config: Config, results: dict[str, dict]) -> str:
    r = results[CANDIDATE]
    speed = "met" if r["ratio"] >= config.target else "NOT met"
    memory = "met" if r["memory_ratio"] <= MEMORY_TARGET else "NOT met"
    line = (
        f"({config.key}) speed target {CANDIDATE} >= {config.target:.2f}x {REFERENCE}: {speed} ({r['ratio']:.3f}x); "
        f"memory target <= {MEMORY_TARGET}x: {memory} ({r['memory_ratio']:.3f}x)"
    )
    pair, stock = results.get("pyro_lvm user pair"), results.get("pyro SVI Trace_ELBO")
    if pair is not None and stock is not None:
        relative = pair["ratio"] / stock["ratio"]
        line += (f"; a user's pair at {relative:.2f}x stock Pyro's speed "
                 f"({'no slower' if relative >= 0.98 else 'SLOWER'})")
    return line


def format_table(config: Config, results: dict[str, dict], plan: str) -> list[str]:
    lines = [
        f"{config.title()}; {plan}",
        f"  {'variant':<26} {'ms/step':>8} {'(min-max)':>17} {'examples/s':>11} {'ratio':>6} "
        f"{'peak KiB':>9} {'memory':>7}",
    ]
    for name, r in results.items():
        low, high = (1e3 * t for t in r["spread"])
        lines.append(
            f"  {name:<26} {1e3 * r['seconds']:8.3f} {f'({low:.3f}-{high:.3f})':>17} "
            f"{config.batch_size / r['seconds']:11.0f} {r['ratio']:6.2f} {r['memory'] / 2**10:9.1f} "
            f"{r['memory_ratio']:7.2f}"
        )
    lines.append("  " + verdict(config, results))
    return lines


def write_rst(path: str, header: list[str], command: str, tables: list[tuple[Config, dict, str]],
              wall: float) -> None:
    """The results as reStructuredText sections, to be included by docs/performance.rst."""
    text = [
        ".. Written by benchmarks/svi_step.py --rst; do not edit by hand.", "",
        # subsections ("~"): the page that includes this has its sections underlined with "-"
        "Machine and command", "~~~~~~~~~~~~~~~~~~~", "",
        *[f"* {line}" for line in header], "",
        ".. code-block:: bash", "", f"   {command}", "",
        f"Wall time of the whole run: {wall / 60:.1f} minutes.", "",
        "Numbers", "~~~~~~~", "",
        "Speed ratio: the median over rounds of the hand-written step's time over the variant's",
        "(1 is as fast as plain PyTorch, higher is faster). Memory: the peak of one step above the",
        "memory live when it starts, in KiB and relative to the hand-written step.", "",
    ]
    for config, results, plan in tables:
        text += [f"**{config.title()}** ({plan})", "", ".. list-table::", "   :header-rows: 1", "",
                 "   * - variant", "     - ms/step", "     - examples/s", "     - speed ratio to torch",
                 "     - step peak (KiB)", "     - memory ratio to torch"]
        for name, r in results.items():
            text += [
                f"   * - {name}", f"     - {1e3 * r['seconds']:.3f}", f"     - {config.batch_size / r['seconds']:.0f}",
                f"     - {r['ratio']:.2f}", f"     - {r['memory'] / 2**10:.1f}", f"     - {r['memory_ratio']:.2f}",
            ]
        text += ["", "Targets " + verdict(config, results) + ".", ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(text))


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default: %(default)s")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch.set_num_threads; one keeps timings steady on a shared machine (default: %(default)s)",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: 11; 2 with --quick)")
    parser.add_argument("--steps", type=int, help="timed steps per variant and round (default: per configuration)")
    parser.add_argument("--warmup", type=int, help="untimed steps per variant first (default: 10; 2 with --quick)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                        help="default: all of %(default)s")
    parser.add_argument("--quick", action="store_true", help="tiny nets and a few steps: seconds, for smoke tests")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="weights, data and noise (default: %(default)s)")
    parser.add_argument("--mnist-root", default="/work/shared/data/mnist", help="default: %(default)s")
    parser.add_argument("--rst", help="also write the results as reStructuredText to this path")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if a target is not met")
    args = parser.parse_args(argv)
    for flag in ("threads", "rounds", "steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be at least 1; got {value}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be at least 0; got {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device; use --device cpu")

    # process-wide settings, restored on the way out (main() is also called from the tests)
    threads, validation = torch.get_num_threads(), pyro.infer.util.is_validation_enabled()
    torch.set_num_threads(args.threads)
    pyro.enable_validation(True)  # Pyro's default: what users get
    try:
        with warnings.catch_warnings():
            # JitTrace_ELBO compiles with torch.jit.trace, which torch 2.9+ deprecates; it still works
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace` is deprecated", category=DeprecationWarning)
            return _run(args, argv)
    finally:
        torch.set_num_threads(threads)
        pyro.enable_validation(validation)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    wall = time.perf_counter()
    device = torch.device(args.device)
    configs = QUICK if args.quick else CONFIGS
    rounds = args.rounds or (2 if args.quick else 11)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 10)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model())
    header = [
        f"device: {args.device} ({machine}); torch.set_num_threads({args.threads}), {os.cpu_count()} cores visible",
        f"Python {platform.python_version()}, torch {torch.__version__}, pyro-ppl {pyro.__version__}",
        f"Pyro's validation on (its default) for every variant; Adam lr={args.lr}, seed {args.seed}; "
        f"{rounds} interleaved rounds after {warmup} warm-up steps per variant; medians over rounds",
    ]
    print("\n".join(header))
    images, why = load_images(args.mnist_root, 16 * 1024, args.seed)
    if images is None:
        print(f"note: MNIST not found in {args.mnist_root} ({why}); using random binary data of the same shapes")
    tables, failures = [], []
    for key in args.configs:
        config = configs[key]
        steps = args.steps or config.steps
        num_batches = max(1, min(8, (16 * 1024) // config.batch_size))
        batches = make_batches(config, images, num_batches, args.seed, device)
        data = "random binary data" if images is None else (
            "MNIST 4x4" if config.data == "mnist4x4" else "MNIST") + f", {num_batches} batches binarized once"
        plan = f"{data}; {rounds} rounds x {steps} steps"
        results = benchmark(config, batches, steps, rounds, warmup, args.lr, args.seed, device)
        print()
        print("\n".join(format_table(config, results, plan)), flush=True)
        tables.append((config, results, plan))
        if "NOT met" in verdict(config, results):
            failures.append(config.key)
    wall = time.perf_counter() - wall
    print(f"\ntargets NOT met in: {', '.join(failures)}" if failures else "\nall targets met")
    print(f"wall time {wall:.0f} s")
    if args.rst:
        command = "python benchmarks/svi_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write_rst(args.rst, header, command.strip(), tables, wall)
        print(f"wrote {args.rst}")
    return 1 if args.strict and failures else 0


if __name__ == "__main__":
    sys.exit(main())
