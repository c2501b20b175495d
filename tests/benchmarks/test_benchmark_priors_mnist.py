"""Smoke test of benchmarks/priors_mnist.py: its four variants build, train a step and are scored."""

import runpy
from pathlib import Path
from types import SimpleNamespace

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "priors_mnist.py"


def test_the_variants_are_the_parts_they_name_and_take_the_fast_step_where_they_can():
    bench = SimpleNamespace(**runpy.run_path(str(SCRIPT)))
    x = torch.bernoulli(torch.full((4, 784), 0.2), generator=torch.Generator().manual_seed(0))
    kinds = {}
    for variant in bench.VARIANTS:
        vae = bench.build(variant)
        kinds[variant] = (type(vae.prior_part).__name__, type(vae.posterior_part).__name__)
        ll = bench.score(vae, x, particles=4)
        assert ll.shape == (4,) and torch.isfinite(ll).all()
    assert kinds == {"plain": ("StandardNormalPrior", "DiagonalGaussian"), "vamp": ("VampPrior", "DiagonalGaussian"),
                     "iaf": ("StandardNormalPrior", "IAFPosterior"), "vamp+iaf": ("VampPrior", "IAFPosterior")}
    assert bench.build("vamp").written_out_prior() is not None  # the VampPrior VAE trains with the fast step
