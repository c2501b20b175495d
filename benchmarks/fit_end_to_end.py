r"""End-to-end training time: ``pyro_lvm.fit`` against a hand-written PyTorch loop doing the same work.

The unit a user waits for is a run, not a step. For each recipe, in one process on one thread,
interleaved rounds time

* ``torch``: a hand-written loop, the reference: the same nets (deep copies of the model's encoder
  and decoder, so the same initial weights), Adam, the same batch size and number of epochs, a
  reparameterized ELBO with the closed-form KL, and after every epoch what the library's defaults
  compute: the validation ELBO and the KL per latent dimension (the latent monitor's numbers);
* ``pyro_lvm.fit (quiet)``: ``pyro_lvm.fit`` with no logger, checkpoints, progress bar or model
  summary (the work alone);
* ``pyro_lvm.fit (defaults)``: ``pyro_lvm.fit`` as a user calls it, writing its run folder
  (CSV logger, last and best checkpoints, progress bar off only because no terminal reads it here).

Recipes: ``digits`` (VAE 64-256-128-2, the default demo's network, on the binarized 8x8 digits, batch 64, 40 epochs), a
user's own pair (the README's factor-analysis model with an amortized guide, ``analytic_kl``, 30 epochs;
its hand-written twin writes the same ELBO in torch) and, with ``--mnist DIR``, ``mnist`` (VAE
784-400-20 on MNIST, batch 128, 3 epochs). ``--startup`` adds the
wall-clock of the default ``pyro-lvm fit`` process and of ``import pyro_lvm``, ``import pyro`` and
``import torch`` in fresh processes.

Targets (issue 23): ``pyro_lvm.fit`` / hand-written <= 1.2 on digits, <= 1.05 on MNIST.

    python benchmarks/fit_end_to_end.py                      # digits, 3 rounds
    python benchmarks/fit_end_to_end.py --mnist ../shared/data/mnist --startup
    python benchmarks/fit_end_to_end.py --quick              # one short round (the test suite's smoke test)
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F


@dataclass
class Recipe:
    name: str
    make_model: Callable[[], torch.nn.Module]
    make_data: Callable[[], object]
    batch_size: int
    epochs: int
    handwritten: Optional[Callable] = None  # (recipe, seed) -> seconds; default: the VAE loop below
    library: Optional[Callable] = None  # (recipe, seed, quiet) -> seconds; default: pyro_lvm.fit(vae, ...)


# ----- a user's own pair: the README's factor analysis, x = W z + noise, amortized q(z | x) -----
def _factor_analysis():
    import pyro
    import pyro.distributions as dist

    encoder = torch.nn.Linear(64, 8)

    def model(x):
        W = pyro.param("W", lambda: 0.1 * torch.randn(64, 4))
        s = pyro.param("s", torch.ones(64), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(4), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T, s).to_event(1), obs=x - 0.3)

    def guide(x):
        pyro.module("encoder", encoder)
        loc, raw = encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, F.softplus(raw)).to_event(1))

    return model, guide, encoder


def _factor_analysis_handwritten(recipe: "Recipe", seed: int) -> float:
    """The same pair written in torch: W, log s and the encoder, the ELBO with the closed-form KL."""
    torch.manual_seed(seed)
    encoder = torch.nn.Linear(64, 8)
    W = torch.nn.Parameter(0.1 * torch.randn(64, 4))
    log_s = torch.nn.Parameter(torch.zeros(64))  # Pyro's positive constraint: s = exp(unconstrained)
    data = recipe.make_data()
    optimizer = torch.optim.Adam([W, log_s, *encoder.parameters()], lr=0.01)
    generator = torch.Generator().manual_seed(seed)
    half_log_2pi = 0.5 * math.log(2 * math.pi)

    def terms(x):
        loc, raw = encoder(x).chunk(2, -1)
        scale = F.softplus(raw)
        z = loc + scale * torch.randn_like(loc)
        rec = (-0.5 * ((x - 0.3 - z @ W.T) / log_s.exp()) ** 2 - log_s - half_log_2pi).sum(-1)
        return rec, 0.5 * (loc * loc + scale * scale - 1) - scale.log()

    start = time.perf_counter()
    x_train, x_val, _ = _splits(data)
    for _ in range(recipe.epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(x_train), recipe.batch_size):
            rec, kl = terms(x_train[order[i:i + recipe.batch_size]])
            loss = -(rec - kl.sum(-1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            rec, kl = terms(x_val)
            _ = float((rec - kl.sum(-1)).mean()), kl.mean(0)
    return time.perf_counter() - start


def _factor_analysis_library(recipe: "Recipe", seed: int, quiet: bool) -> float:
    import pyro_lvm

    torch.manual_seed(seed)
    model, guide, _ = _factor_analysis()
    kwargs = dict(enable_progress_bar=False, enable_model_summary=False)
    with tempfile.TemporaryDirectory() as folder:
        if quiet:
            kwargs.update(logger=False, enable_checkpointing=False)
        start = time.perf_counter()
        pyro_lvm.fit(model, guide, data=recipe.make_data(), estimator="analytic_kl", lr=0.01,
                     max_epochs=recipe.epochs, seed=seed, default_root_dir=folder, **kwargs)
        return time.perf_counter() - start


def recipes(options) -> list[Recipe]:
    import pyro_lvm
    from pyro_lvm.data import DigitsDataModule, MNISTDataModule

    out = [Recipe(
        "digits (VAE 64-256-128-2, batch 64)",
        lambda: pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[256, 128]),
        lambda: DigitsDataModule(batch_size=64, binarize="static"),
        64, options.epochs or 40,
    )]
    out.append(Recipe(
        "user pair (README factor analysis, batch 64)", lambda: None,
        lambda: DigitsDataModule(batch_size=64, binarize="none"), 64, options.epochs or 30,
        handwritten=_factor_analysis_handwritten, library=_factor_analysis_library,
    ))
    if options.mnist:
        out.append(Recipe(
            "MNIST (VAE 784-400-20, batch 128)",
            lambda: pyro_lvm.VAE(data_shape=784, latent_dim=20, hidden_dims=[400]),
            lambda: MNISTDataModule(root=options.mnist, batch_size=128),
            128, options.mnist_epochs,
        ))
    return out


def _splits(datamodule) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The training and validation rows, and whether the training rows are binarized afresh at every draw
    (MNIST's dynamic binarization: the hand-written loop then draws them per batch too, as the data module does)."""
    datamodule.setup("fit")
    train, val = datamodule.datasets["train"], datamodule.datasets["val"]
    dynamic = getattr(train, "binarize", "none") == "dynamic"
    x_train = train.x if dynamic else train.__getitems__(list(range(len(train))))["x"]
    return x_train, val.__getitems__(list(range(len(val))))["x"], dynamic


def handwritten(recipe: Recipe, seed: int) -> float:
    """The reference loop; returns seconds of training (after the model and data exist)."""
    torch.manual_seed(seed)
    vae = recipe.make_model()
    encoder, decoder = copy.deepcopy(vae.encoder), copy.deepcopy(vae.decoder)
    latent = vae.latent_dim
    data = recipe.make_data()
    params = list(encoder.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)
    generator = torch.Generator().manual_seed(seed)

    def terms(x):
        loc, raw = encoder(x).split(latent, dim=-1)
        scale = F.softplus(raw) + 1e-5
        z = loc + scale * torch.randn_like(loc)
        rec = -F.binary_cross_entropy_with_logits(decoder(z), x, reduction="none").sum(-1)
        kl = 0.5 * (loc * loc + scale * scale - 1) - scale.log()
        return rec, kl

    start = time.perf_counter()  # reading the data counts, as it does inside fit
    x_train, x_val, dynamic = _splits(data)
    for _ in range(recipe.epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(x_train), recipe.batch_size):
            x = x_train[order[i:i + recipe.batch_size]]
            if dynamic:
                x = torch.bernoulli(x, generator=generator)
            rec, kl = terms(x)
            loss = -(rec - kl.sum(-1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():  # what the library's defaults compute each epoch
            total, kl_dims = 0.0, torch.zeros(latent)
            for i in range(0, len(x_val), recipe.batch_size):
                rec, kl = terms(x_val[i:i + recipe.batch_size])
                total += float((rec - kl.sum(-1)).sum())
                kl_dims += kl.sum(0)
            _ = total / len(x_val), kl_dims / len(x_val)
    return time.perf_counter() - start


def library(recipe: Recipe, seed: int, quiet: bool) -> float:
    """``pyro_lvm.fit``; returns seconds of ``fit`` (after the model and data module exist)."""
    import pyro_lvm

    torch.manual_seed(seed)
    vae, data = recipe.make_model(), recipe.make_data()
    kwargs = dict(enable_progress_bar=False, enable_model_summary=False)
    with tempfile.TemporaryDirectory() as folder:
        if quiet:
            kwargs.update(logger=False, enable_checkpointing=False)
        start = time.perf_counter()
        pyro_lvm.fit(vae, data=data, max_epochs=recipe.epochs, seed=seed, default_root_dir=folder, **kwargs)
        return time.perf_counter() - start


def process_seconds(command: list[str], env: Optional[dict] = None) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the digits recipe (default 40)")
    parser.add_argument("--mnist", default=None, help="a folder of MNIST IDX files: adds the MNIST recipe")
    parser.add_argument("--mnist-epochs", type=int, default=3)
    parser.add_argument("--startup", action="store_true", help="also time `pyro-lvm fit` and the imports")
    parser.add_argument("--quick", action="store_true", help="one round of 2 epochs (a smoke test)")
    options = parser.parse_args(argv)
    if options.quick:
        options.rounds, options.epochs = 1, 2
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    import pytorch_lightning  # noqa: F401  (it sets its loggers' level when imported: quiet them after)

    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, one thread, {options.rounds} interleaved rounds (median seconds)")
    rows = []
    for recipe in recipes(options):
        times = {"torch (hand-written)": [], "pyro_lvm.fit (quiet)": [], "pyro_lvm.fit (defaults)": []}
        for round_ in range(options.rounds):
            run_handwritten, run_library = recipe.handwritten or handwritten, recipe.library or library
            times["torch (hand-written)"].append(run_handwritten(recipe, round_))
            times["pyro_lvm.fit (quiet)"].append(run_library(recipe, round_, quiet=True))
            times["pyro_lvm.fit (defaults)"].append(run_library(recipe, round_, quiet=False))
        reference = statistics.median(times["torch (hand-written)"])
        print(f"\n{recipe.name}, {recipe.epochs} epochs")
        print(f"  {'':26s} {'seconds':>8s} {'/ torch':>8s}")
        for name, values in times.items():
            seconds = statistics.median(values)
            print(f"  {name:26s} {seconds:8.2f} {seconds / reference:8.2f}")
            rows.append((recipe.name, name, seconds, seconds / reference))
    if options.startup:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        print("\nstart-up (fresh processes, median seconds)")
        for label, command in (
            ("import torch", [sys.executable, "-c", "import torch"]),
            ("import pyro", [sys.executable, "-c", "import pyro"]),
            ("import pyro_lvm", [sys.executable, "-c", "import pyro_lvm"]),
        ):
            values = [process_seconds(command, env) for _ in range(options.rounds)]
            print(f"  {label:26s} {statistics.median(values):8.2f}")
        with tempfile.TemporaryDirectory() as folder:
            values = [process_seconds([sys.executable, "-m", "pyro_lvm.cli", "fit", "--trainer.enable_progress_bar=false",
                                       f"--trainer.logger.init_args.save_dir={folder}"], env)
                      for _ in range(max(1, options.rounds // 2))]
        print(f"  {'pyro-lvm fit (default)':26s} {statistics.median(values):8.2f}")
    return 0 if all(math.isfinite(r[2]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
