"""Flows on discrete data: dequantization inside :class:`FlowModel`, bits/dim, and the fit/test path."""

import json
import math
from pathlib import Path

import pyro
import pyro.poutine as poutine
import pytest
import torch
from torch import nn

import pyro_lvm
from flow_checks import perturb
from pyro_lvm.cli import main
from pyro_lvm.data import DigitsDataModule
from pyro_lvm.flows import NICE, RealNVP
from pyro_lvm.models.flow import FlowModel

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def perturbed(flow: FlowModel, seed: int = 0, size: float = 0.3) -> FlowModel:
    return perturb(flow, size, seed)


def grid_data(levels: int, n: int, dim: int = 2) -> torch.Tensor:
    return torch.randint(0, levels, (n, dim)).float() / (levels - 1)


def test_model_observes_a_dequantized_point_in_the_bin_of_its_level_and_adds_minus_d_log_k():
    k = 5
    flow = perturbed(FlowModel(RealNVP(2, hidden=(8,), init="identity"), dequantize=k, logit_alpha=0.01))
    x = grid_data(k, 64)
    trace = poutine.trace(flow.model).get_trace(x)
    trace.compute_log_prob()
    y = trace.nodes["x"]["value"]
    levels = torch.round(x * (k - 1))
    assert torch.equal(torch.floor(y * k), levels)  # y lies in [level / K, (level + 1) / K)
    assert torch.allclose(trace.nodes["x"]["log_prob"], flow.log_prob(y))
    assert torch.allclose(trace.nodes["dequantization"]["log_prob"], torch.full((64,), -2 * math.log(k)))
    # fresh noise every call
    y2 = poutine.trace(flow.model).get_trace(x).nodes["x"]["value"]
    assert not torch.equal(y, y2)


def exact_log_mass(flow: FlowModel, x: torch.Tensor, k: int, points: int = 100) -> torch.Tensor:
    """log P(x) = log of the integral of p over the bin of x, by the midpoint rule."""
    t = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    u = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    out = []
    for level in torch.round(x * (k - 1)):
        y = (level + u) / k
        out.append(torch.logsumexp(flow.log_prob(y), 0) - math.log(len(u)) - 2 * math.log(k))
    return torch.stack(out)


def test_dequantization_bounds_the_exact_discrete_log_likelihood_and_the_discrete_model_normalizes():
    torch.manual_seed(0)
    k = 4
    cells = torch.cartesian_prod(torch.arange(k), torch.arange(k)).double() / (k - 1)
    with torch.no_grad():
        # with alpha > 0 the logit-space mass beyond logit(alpha) is lost: P sums to less than one
        squeezed = perturbed(FlowModel(RealNVP(2, hidden=(8,), init="identity"), dequantize=k, logit_alpha=0.05), size=0.15).double()
        assert exact_log_mass(squeezed, cells, k).exp().sum().item() < 0.99
    flow = perturbed(FlowModel(RealNVP(2, hidden=(8,), init="identity"), dequantize=k, logit_alpha=0.0), size=0.15).double().eval()
    with torch.no_grad():
        log_mass = exact_log_mass(flow, cells, k)
        # alpha = 0: the discrete model P(x) sums to one over the K^D cells
        assert abs(log_mass.exp().sum().item() - 1.0) < 2e-3
        # the bounds hold for any density; the squeezed one is smooth up to the bin edges
        flow, log_mass = squeezed.eval(), exact_log_mass(squeezed, cells, k)
        one_draw = torch.stack([flow.log_likelihood(cells) for _ in range(400)])
        many = flow.log_likelihood(cells, num_samples=4000)
    # Jensen: E_u[log p(y)] - D log K <= log P(x), strictly for a non-constant density
    gap = log_mass - one_draw.mean(0)
    stderr = one_draw.std(0) / math.sqrt(len(one_draw))
    assert bool((gap > -4 * stderr).all()) and gap.max() > 10 * stderr.max(), (gap, stderr)
    # the importance-weighted bound closes the gap as the number of draws grows
    print("Jensen gap per cell", gap, "importance-weighted error", many - log_mass)
    assert (many - log_mass).abs().max() < 0.06 and (many - log_mass).abs().mean() < 0.2 * gap.mean()
    bpd = flow.bits_per_dim(cells, num_samples=4000)
    assert ((bpd + many / (2 * math.log(2))).abs() < 0.06).all()


def test_dequantized_digits_training_lowers_the_held_out_bits_per_dim():
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    data = DigitsDataModule(binarize="none", flatten=False, batch_size=64)
    flow = FlowModel(RealNVP((1, 8, 8), num_layers=2, hidden=(16,), actnorm=True), dequantize=17, logit_alpha=0.01)
    val = data.datasets["val"].x
    flow.initialize(data.datasets["train"].x[:256])
    with torch.no_grad():
        before = flow.eval().bits_per_dim(val, num_samples=4).mean().item()
    module = pyro_lvm.fit(
        flow, data=data, estimator="reparam", lr=2e-3, max_epochs=4, latent_monitor=False,
        enable_progress_bar=False, logger=False, enable_checkpointing=False, enable_model_summary=False,
    )
    with torch.no_grad():
        after = flow.eval().bits_per_dim(val, num_samples=4).mean().item()
    logged = module.trainer.callback_metrics
    print(f"held-out bits/dim: {before:.3f} -> {after:.3f} (uniform: {math.log2(17):.3f})")
    assert after < before - 0.5 and after < math.log2(17) - 1.0, (before, after)
    # the logged bits/dim is the logged log-likelihood bound in other units
    assert torch.allclose(logged["val/bits_per_dim"], -logged["val/elbo"] / (64 * math.log(2)), rtol=1e-5)
    assert abs(logged["val/bits_per_dim"].item() - after) < 0.1


def test_errors_name_the_problem_and_the_fix():
    with pytest.raises(ValueError, match="number of levels"):
        FlowModel(RealNVP(2), dequantize=1)
    with pytest.raises(ValueError, match="logit_alpha"):
        FlowModel(RealNVP(2), logit_alpha=0.7)
    with pytest.raises(TypeError, match="unexpected keyword argument 'actnorm'"):
        NICE(4, actnorm=True)  # NICE's additive couplings have no scale to normalize
    with pytest.raises(TypeError, match="Transforms; got Identity"):
        FlowModel([nn.Identity()], event_shape=2)
    flow = FlowModel(RealNVP(2, hidden=(4,)), dequantize=256)
    with pytest.raises(ValueError, match=r"grid level / 255.*binarize='none'"):
        flow.model(torch.rand(8, 2))
    with pytest.raises(ValueError, match="NaN"):
        flow.model(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="dequantizes 256 levels itself"):
        flow.bits_per_dim(torch.zeros(3, 2), num_levels=17)


@pytest.mark.filterwarnings("ignore:.*log_every_n_steps.*")
def test_fit_with_test_after_fit_reports_test_bits_per_dim(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["pyro-lvm"])
    monkeypatch.chdir(tmp_path)
    main([
        "fit", f"--config={REPO / 'configs' / 'realnvp_digits.yaml'}", "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4", "--model.model.init_args.transform.init_args.hidden=[8]", *QUIET,
    ])
    run = tmp_path / "runs" / "realnvp_digits" / "version_0"
    assert (run / "samples.png").is_file() and not (run / "reconstructions.png").exists()
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert math.isclose(metrics["test/bits_per_dim"], -metrics["test/elbo"] / (64 * math.log(2)), rel_tol=1e-5)
    out = capsys.readouterr().out
    assert "test bits/dim" in out and "validation bits/dim" in out
