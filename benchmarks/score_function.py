"""Training-step time of the score-function estimator against the reparameterized one and stock Pyro.

One process, interleaved rounds: each round times every variant once (``--steps`` steps
of forward, backward and Adam on the same batches, in an order that rotates from round
to round), so that a slow patch of the machine hits all variants alike. Reported per
model and batch size: the median ms/step over rounds, examples/s, and the median over
rounds of the paired ratio to pyro_lvm's reparameterized step.

Variants, on the digits VAE (``pyro_lvm.VAE(data_shape=64, hidden_dims=(256, 128))``,
scikit-learn's 8x8 digits thresholded at 0.5):

* ``pyro_lvm reparam``: :class:`pyro_lvm.LVMModule` with ``estimator="reparam"``;
* ``pyro_lvm score_function``: the same with ``estimator="score_function"`` (its default
  baseline), whatever the current implementation is;
* ``Pyro SVI TraceGraph_ELBO``: stock :class:`pyro.infer.SVI` with
  :class:`~pyro.infer.TraceGraph_ELBO`, the guide's ``z`` made non-reparameterized
  (``has_rsample_(False)``) with a decaying-average baseline (``infer={"baseline":
  {"use_decaying_avg_baseline": True}}``): Pyro's own score-function recipe;
* ``Pyro SVI Trace_ELBO``: stock SVI with the reparameterized :class:`~pyro.infer.Trace_ELBO`.

pyro_lvm's steps use :class:`torch.optim.Adam` on ``module(batch)``, SVI its
``pyro.optim.Adam``. Pyro's validation is off for every variant.

The project's target: a pyro_lvm score-function step takes at most 1.5 times a pyro_lvm
reparameterized step. The script prints whether each configuration meets it, and exits
with status 1 if one does not.

    python benchmarks/score_function.py                       # about a minute
    python benchmarks/score_function.py --steps 50 --rounds 11 --batch-size 128 --threads 2
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from typing import Callable

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO
from pyro.poutine.messenger import Messenger
from sklearn.datasets import load_digits

from pyro_lvm import VAE, LVMModule

TARGET = 1.5
REFERENCE = "pyro_lvm reparam"
CANDIDATE = "pyro_lvm score_function"


class _Reinforce(Messenger):
    """Pyro's stock score-function recipe for a guide: latents without rsample, a decaying-average baseline.

    Applied outside the guide, so it sees each site after ``pyro.plate`` has broadcast it.
    """

    def _pyro_sample(self, msg) -> None:
        if not msg["is_observed"]:
            fn = msg["fn"]
            while isinstance(fn, torch.distributions.Independent):  # its has_rsample is its base's
                fn = fn.base_dist
            fn.has_rsample_(False)
            msg["infer"] = {**msg["infer"], "baseline": {"use_decaying_avg_baseline": True}}


def digits_batches(batch_size: int) -> list[torch.Tensor]:
    x = torch.as_tensor(load_digits().data / 16.0 > 0.5, dtype=torch.float32)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return [x[order[i : i + batch_size]] for i in range(0, len(x) - batch_size + 1, batch_size)]


def make_vae(latent_dim: int) -> VAE:
    return VAE(data_shape=64, latent_dim=latent_dim, hidden_dims=(256, 128))


def pyro_lvm_step(estimator: str, latent_dim: int, batch: torch.Tensor) -> Callable[[torch.Tensor], None]:
    module = LVMModule(make_vae(latent_dim), estimator=estimator)
    module.initialize(batch)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)

    def step(x: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        module(x).backward()
        optimizer.step()

    return step


def svi_step(elbo: str, latent_dim: int, batch: torch.Tensor) -> Callable[[torch.Tensor], None]:
    vae = make_vae(latent_dim)
    state = {"params": {}, "constraints": {}}  # a private param store, as LVMModule has
    if elbo == "TraceGraph_ELBO":
        guide, loss = _Reinforce()(vae.guide), TraceGraph_ELBO()
        with pyro.get_param_store().scope(state):
            trace = pyro.poutine.trace(guide).get_trace(batch)
        assert not trace.nodes["z"]["fn"].has_rsample, "the stock score-function guide must not reparameterize"
    else:
        guide, loss = vae.guide, Trace_ELBO()
    svi = SVI(vae.model, guide, pyro.optim.Adam({"lr": 1e-3}), loss)

    def step(x: torch.Tensor) -> None:
        with pyro.get_param_store().scope(state):
            svi.step(x)

    return step


VARIANTS = {
    REFERENCE: lambda d, b: pyro_lvm_step("reparam", d, b),
    CANDIDATE: lambda d, b: pyro_lvm_step("score_function", d, b),
    "Pyro SVI TraceGraph_ELBO": lambda d, b: svi_step("TraceGraph_ELBO", d, b),
    "Pyro SVI Trace_ELBO": lambda d, b: svi_step("Trace_ELBO", d, b),
}


def time_steps(step: Callable[[torch.Tensor], None], batches: list[torch.Tensor], steps: int) -> float:
    """Seconds per step over ``steps`` steps, with the garbage collector paused (as timeit does)."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for i in range(steps):
            step(batches[i % len(batches)])
        return (time.perf_counter() - start) / steps
    finally:
        gc.enable()


def benchmark(latent_dim: int, batch_size: int, steps: int, rounds: int, warmup: int) -> dict[str, dict]:
    batches = digits_batches(batch_size)
    variants = {}
    for name, build in VARIANTS.items():
        pyro.set_rng_seed(0)
        variants[name] = build(latent_dim, batches[0])
        time_steps(variants[name], batches, warmup)  # first-call work: plate guesses, allocations
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(time_steps(variants[name], batches, steps))
    return {
        name: {
            "seconds": statistics.median(times[name]),
            "ratio": statistics.median(t / ref for t, ref in zip(times[name], times[REFERENCE])),
            "spread": (min(times[name]), max(times[name])),
        }
        for name in names
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=25, help="timed steps per variant and round (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64, 128], help="default: %(default)s")
    parser.add_argument("--latent-dim", type=int, nargs="+", default=[2, 8], help="default: %(default)s")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per variant first (default: %(default)s)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch.set_num_threads; one thread keeps timings of this small model steady on a "
        "shared machine, where more threads contend (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        parser.error(f"--steps and --rounds must be at least 1; got {args.steps} and {args.rounds}")

    if args.threads < 1:
        parser.error(f"--threads must be at least 1; got {args.threads}")
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    print(
        f"torch {torch.__version__}, pyro {pyro.__version__}, CPU with {args.threads} thread"
        f"{'s' if args.threads > 1 else ''}; "
        f"pyro.enable_validation(False) for all variants; {args.rounds} interleaved rounds of "
        f"{args.steps} steps (forward + backward + Adam) per variant; medians over rounds."
    )
    failures = []
    for latent_dim in args.latent_dim:
        for batch_size in args.batch_size:
            results = benchmark(latent_dim, batch_size, args.steps, args.rounds, args.warmup)
            print(f"\nVAE latent_dim={latent_dim}, hidden_dims=(256, 128), batch {batch_size}")
            print(f"  {'variant':<26} {'ms/step':>8} {'(min-max)':>15} {'examples/s':>11} {'ratio':>6}")
            for name, r in results.items():
                low, high = (1e3 * t for t in r["spread"])
                print(
                    f"  {name:<26} {1e3 * r['seconds']:8.2f} {f'({low:.2f}-{high:.2f})':>15} "
                    f"{batch_size / r['seconds']:11.0f} {r['ratio']:6.2f}"
                )
            ratio = results[CANDIDATE]["ratio"]
            met = ratio <= TARGET
            print(f"  target {CANDIDATE} <= {TARGET}x {REFERENCE}: {'met' if met else 'NOT met'} ({ratio:.2f}x)")
            if not met:
                failures.append(f"latent_dim={latent_dim}, batch {batch_size}: {ratio:.2f}x")
    print()
    if failures:
        print(f"Target NOT met ({CANDIDATE} <= {TARGET}x {REFERENCE}) for: {'; '.join(failures)}.")
        return 1
    print(f"Target met: {CANDIDATE} <= {TARGET}x {REFERENCE} in every configuration.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
