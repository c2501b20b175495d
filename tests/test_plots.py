"""Pictures: traversal and interpolation codes, the manifold grid, PNG layout, and the run report."""

import math
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import pyro.distributions as dist
import pytest
import torch
from matplotlib.figure import Figure

import pyro_lvm
from pyro_lvm.cli import main
from pyro_lvm.cli.fit import RunReport
from pyro_lvm.diagnostics.report import kl_section
from pyro_lvm.plots import (
    interpolation_latents,
    kl_per_dim,
    manifold_latents,
    plot_completions,
    plot_interpolation,
    plot_latent_space,
    plot_latent_usage,
    plot_loss_curves,
    plot_manifold,
    plot_reconstructions,
    plot_samples,
    plot_traversals,
    traversal_latents,
)

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


class LinearModel(torch.nn.Module):
    """encode(x) = (x A, exp(log_scale)), decode(z) = sigmoid(W z) on 4x4 images; records every z it decodes."""

    def __init__(self, latent_shape=(3,), log_scale=None):
        super().__init__()
        self.latent_shape = torch.Size(latent_shape)
        size = math.prod(latent_shape)
        self.A = torch.nn.Parameter(torch.randn(16, size))
        self.W = torch.nn.Parameter(torch.randn(size, 16))
        self.log_scale = torch.nn.Parameter(torch.zeros(size) if log_scale is None else log_scale)
        self.decoded = []

    def encode(self, x):
        loc = (x.flatten(1) @ self.A).reshape(-1, *self.latent_shape)
        return loc, self.log_scale.exp().reshape(self.latent_shape).expand_as(loc)

    def decode(self, z):
        self.decoded.append(z.clone())
        return torch.sigmoid(z.flatten(z.dim() - len(self.latent_shape)) @ self.W).reshape(*z.shape[:-len(self.latent_shape)], 1, 4, 4)

    def prior(self):
        return dist.Normal(torch.zeros(self.latent_shape), 1.0).to_event(len(self.latent_shape))


class Completer:
    """A conditional stand-in: predicts the hidden pixels (-1 in x) as 0.5 plus noise."""

    def __init__(self):
        self.calls = []

    def predict(self, x, num_samples=1, mean=True):
        self.calls.append(num_samples)
        guess = 0.5 + 0.1 * torch.randn(num_samples, *x.shape)
        return torch.where(x < 0, guess, x)


def png_size(path):
    """(height, width) in pixels of a PNG, as matplotlib reads it back."""
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.size > 0
    return image.shape[:2]


def visible_tick_labels(axis):
    """The tick labels that a saved figure shows on one axis (those inside its view)."""
    low, high = sorted(axis.get_view_interval())
    return [label.get_text() for loc, label in zip(axis.get_ticklocs(), axis.get_ticklabels()) if low <= loc <= high]


@pytest.fixture
def saved_figures(monkeypatch):
    """Every matplotlib Figure saved while the test runs, drawn as written (its tick labels set)."""
    figures, save = [], Figure.savefig

    def record(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.rand(6, 1, 4, 4)


# ----- traversals ------------------------------------------------------------------------------
def test_traversal_latents_replace_one_coordinate_per_row():
    loc = torch.tensor([0.5, -1.0, 2.0, 0.25])
    values = torch.linspace(-3, 3, 5)
    z = traversal_latents(loc, dims=[2, 0], values=values)
    assert z.shape == (2, 5, 4)
    for row, d in enumerate([2, 0]):
        expected = loc.repeat(5, 1)
        expected[:, d] = values
        assert torch.equal(z[row], expected)


def test_traversal_rows_decode_the_posterior_mean_with_one_coordinate_replaced(x, tmp_path):
    model = LinearModel(latent_shape=(3,))
    path = plot_traversals(model, x, tmp_path / "t.png", dims=[1, 2], num_steps=5, span=2.0)
    z = model.decoded[-1].reshape(2, 5, 3)
    loc = model.encode(x[:1])[0][0]
    values = torch.linspace(-2, 2, 5)
    for row, d in enumerate([1, 2]):
        for k, v in enumerate(values):
            expected = loc.clone()
            expected[d] = v
            torch.testing.assert_close(z[row, k], expected)
    assert png_size(path)[1] > 2 * png_size(path)[0]  # 6 columns of tiles, 2 rows


def test_kl_per_dim_is_the_closed_form_gaussian_kl():
    loc, scale = torch.randn(7, 3), torch.rand(7, 3) + 0.1
    expected = torch.distributions.kl_divergence(dist.Normal(loc, scale), dist.Normal(0.0, 1.0)).mean(0)
    torch.testing.assert_close(kl_per_dim(loc, scale), expected)


def test_default_traversal_dims_are_those_with_the_largest_kl(x, tmp_path):
    # posterior sd e^{-3}, e^0, e^{-1}, e^{-2}, e^0 per coordinate: with small means the KL
    # grows as the sd shrinks, so the order of use is 0, 3, 2 (then 1 and 4, nearly unused)
    model = LinearModel(latent_shape=(5,), log_scale=torch.tensor([-3.0, 0.0, -1.0, -2.0, 0.0]))
    with torch.no_grad():
        model.A.mul_(0.01)
    plot_traversals(model, x, tmp_path / "t.png", num_steps=4, max_dims=3)
    z = model.decoded[-1].reshape(3, 4, 5)
    swept = [int((row.std(0) > 0).nonzero()) for row in z]  # the one coordinate varying along a row
    assert swept == [0, 3, 2]


def test_spatial_latent_traversal_sweeps_the_flat_index(x, tmp_path):
    model = LinearModel(latent_shape=(2, 2, 2))
    path = plot_traversals(model, x, tmp_path / "t.png", dims=[5], num_steps=3)
    z = model.decoded[-1]
    assert z.shape == (3, 2, 2, 2)
    varying = (z.std(0) > 0).nonzero().tolist()
    assert varying == [[1, 0, 1]]  # flat index 5 of a (2, 2, 2) latent is (c, i, j) = (1, 0, 1)
    png_size(path)


def test_traversal_of_a_discrete_latent_is_refused(tmp_path):
    vae = pyro_lvm.DiscreteVAE(data_shape=16, num_latents=2, num_categories=3, hidden_dims=[8])
    with pytest.raises(ValueError, match=r"needs a Gaussian q\(z \| x\).*DiscreteVAE.encode returns one tensor"):
        plot_traversals(vae, torch.rand(4, 16), tmp_path / "t.png")


# ----- interpolation -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_interpolation_starts_and_ends_at_the_two_codes(method):
    z_a, z_b = torch.randn(2, 2, 2), torch.randn(2, 2, 2)
    z = interpolation_latents(z_a, z_b, 7, method)
    assert z.shape == (7, 2, 2, 2)
    torch.testing.assert_close(z[0], z_a)
    torch.testing.assert_close(z[-1], z_b)


def test_linear_interpolation_is_the_straight_line():
    z_a, z_b = torch.randn(4), torch.randn(4)
    z = interpolation_latents(z_a, z_b, 5, "linear")
    torch.testing.assert_close(z[2], (z_a + z_b) / 2)
    torch.testing.assert_close(z[1:] - z[:-1], ((z_b - z_a) / 4).expand(4, 4))


def test_slerp_keeps_the_norm_of_equal_norm_codes_where_the_line_shrinks():
    z_a, z_b = torch.randn(16), torch.randn(16)
    z_b = z_b * z_a.norm() / z_b.norm()
    slerp = interpolation_latents(z_a, z_b, 9, "slerp").norm(dim=1)
    line = interpolation_latents(z_a, z_b, 9, "linear").norm(dim=1)
    torch.testing.assert_close(slerp, z_a.norm().expand(9))
    assert line[4] < 0.99 * z_a.norm()


def test_interpolation_decodes_between_the_two_posterior_means(x, tmp_path):
    model = LinearModel(latent_shape=(3,))
    path = plot_interpolation(model, x[:2], x[2:4], tmp_path / "i.png", num_steps=5)
    z = model.decoded[-1].reshape(2, 5, 3)
    torch.testing.assert_close(z[:, 0], model.encode(x[:2])[0])
    torch.testing.assert_close(z[:, -1], model.encode(x[2:4])[0])
    assert png_size(path)[1] > 2.5 * png_size(path)[0]  # 7 columns, 2 rows (and margins)


def test_unknown_interpolation_method_is_named():
    with pytest.raises(ValueError, match="'cubic'.*'linear' or 'slerp'"):
        interpolation_latents(torch.zeros(2), torch.ones(2), 3, "cubic")


# ----- the 2-D manifold and latent space ---------------------------------------------------------
def test_manifold_codes_are_standard_normal_quantiles():
    grid = manifold_latents(7)
    z1, z2 = grid[0, :, 0], grid[:, 0, 1]
    torch.testing.assert_close(z1, -z1.flip(0))  # symmetric
    assert z1[3] == 0  # median at the centre
    probabilities = torch.distributions.Normal(0.0, 1.0).cdf(z1)
    torch.testing.assert_close(probabilities, (torch.arange(7) + 0.5) / 7)
    torch.testing.assert_close(z2, z1.flip(0))  # z2 grows upwards, z1 to the right
    assert torch.equal(grid[..., 0], z1.expand(7, 7)) and torch.equal(grid[..., 1], z2[:, None].expand(7, 7))


def test_manifold_of_a_2d_vae_is_a_square_grid(tmp_path):
    vae = pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[16])
    small, large = (png_size(plot_manifold(vae, tmp_path / f"m{n}.png", num=n)) for n in (3, 5))
    # two more codes per side add the same number of pixels down and across: square tiles
    assert large[0] - small[0] == large[1] - small[1] > 0


@pytest.mark.parametrize("latent_shape", [(3,), (2, 2, 2), (1,)])
def test_manifold_refuses_a_latent_that_is_not_2d(latent_shape, tmp_path):
    with pytest.raises(ValueError, match=r"exactly 2 coordinates.*latent_shape \(" + str(latent_shape[0])):
        plot_manifold(LinearModel(latent_shape=latent_shape), tmp_path / "m.png")


def test_manifold_refuses_a_discrete_prior(tmp_path):
    vae = pyro_lvm.DiscreteVAE(data_shape=16, num_latents=2, latent="bernoulli", hidden_dims=[8])
    with pytest.raises(ValueError, match="needs a Gaussian prior.*Bernoulli"):
        plot_manifold(vae, tmp_path / "m.png")


def test_latent_space_scatter(tmp_path):
    vae = pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[16])
    png_size(plot_latent_space(vae, torch.rand(30, 64), tmp_path / "s.png", labels=torch.arange(30) % 10))
    with pytest.raises(ValueError, match="exactly 2 coordinates"):
        plot_latent_space(LinearModel(latent_shape=(3,)), torch.rand(5, 16), tmp_path / "s.png")


# ----- whole-number axes ------------------------------------------------------------------------
def usage_history(num_epochs, kl_shape):
    return [{"epoch": e, "kl": 1.0 + e, "active_units": min(e, 2), "sites": {"z": {
        "kl": torch.full(kl_shape, 0.5 * e), "activity": torch.ones(kl_shape)}}} for e in range(num_epochs)]


@pytest.mark.parametrize("num_epochs, kl_shape, dims", [
    (1, (1,), ["0"]), (3, (2,), ["0", "1"]), (12, (3,), ["0", "1", "2"]), (40, (2,), ["0", "1"]),
    (5, (1, 2, 2), ["0", "1", "2", "3"]),  # a spatial map: its flattened coordinates
])
def test_latent_usage_labels_dimensions_epochs_and_units_with_whole_numbers(
        num_epochs, kl_shape, dims, saved_figures, tmp_path):
    plot_latent_usage(usage_history(num_epochs, kl_shape), tmp_path / "usage.png")
    heat_map, units = saved_figures[-1].axes[:2]
    assert visible_tick_labels(heat_map.yaxis) == dims
    for axis in (heat_map.xaxis, units.xaxis, units.yaxis):  # epochs and counts of units
        labels = visible_tick_labels(axis)
        assert labels and all(label.lstrip("−").isdigit() for label in labels), labels
    assert visible_tick_labels(heat_map.xaxis)[0] == "0"


def test_loss_curves_label_epochs_with_whole_numbers(saved_figures, tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,train/loss_epoch,val/elbo\n0,30.0,\n0,,-29.0\n1,25.0,\n1,,-24.5\n")
    plot_loss_curves(metrics, tmp_path / "loss.png")
    assert visible_tick_labels(saved_figures[-1].axes[0].xaxis) == ["0", "1"]


def test_diagnose_labels_the_kl_of_each_dimension_with_whole_numbers(saved_figures, tmp_path):
    vae = pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[8])
    kl_section(vae.model, vae.guide, torch.bernoulli(torch.full((6, 64), 0.5)), {},
               SimpleNamespace(batch_size=6), tmp_path)
    assert visible_tick_labels(saved_figures[-1].axes[0].xaxis) == ["0", "1"]


# ----- layout: one tile per row and column -------------------------------------------------------
def test_pictures_grow_by_one_square_tile_per_row_and_column(x, tmp_path):
    vae = pyro_lvm.VAE(data_shape=64, latent_dim=3, hidden_dims=[16])
    flat = torch.rand(8, 64)
    one_row = png_size(plot_traversals(vae, flat, tmp_path / "a.png", dims=[0], num_steps=5))
    two_rows = png_size(plot_traversals(vae, flat, tmp_path / "b.png", dims=[0, 1], num_steps=5))
    more_steps = png_size(plot_traversals(vae, flat, tmp_path / "c.png", dims=[0], num_steps=9))
    tile = two_rows[0] - one_row[0]
    assert tile > 0 and two_rows[1] == one_row[1]
    assert more_steps == (one_row[0], one_row[1] + 4 * tile)

    pairs = [png_size(plot_interpolation(vae, flat[:n], flat[n : 2 * n], tmp_path / f"i{n}.png", num_steps=4))
             for n in (1, 3)]
    assert pairs[1] == (pairs[0][0] + 2 * tile, pairs[0][1])

    completer = Completer()
    y = torch.rand(6, 1, 4, 4)
    hidden = torch.where(torch.arange(16).reshape(1, 1, 4, 4) >= 8, -1.0, y)
    sizes = {(n, s): png_size(plot_completions(completer, hidden, y, tmp_path / f"c{n}{s}.png", num=n, num_samples=s))
             for n, s in [(4, 1), (4, 3), (6, 1)]}
    assert completer.calls == [1, 3, 1]
    assert sizes[4, 3] == (sizes[4, 1][0] + 2 * tile, sizes[4, 1][1])  # input, 3 completions, truth
    assert sizes[6, 1] == (sizes[4, 1][0], sizes[4, 1][1] + 2 * tile)


def test_reconstructions_and_samples_still_work(tmp_path):
    vae = pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[16])
    vae.train()
    png_size(plot_reconstructions(vae, torch.rand(5, 64), tmp_path / "r.png"))
    png_size(plot_samples(vae, tmp_path / "s.png", num=10))
    assert vae.training  # pictures are drawn in eval mode, and the mode is restored


# ----- the run report ----------------------------------------------------------------------------
@pytest.fixture
def command_line(monkeypatch, tmp_path):
    monkeypatch.setattr("sys.argv", ["pyro-lvm"])
    monkeypatch.chdir(tmp_path)


def test_fit_writes_traversals_interpolation_and_manifold(command_line, tmp_path, capsys):
    main(["fit", "--trainer.max_epochs=1", *QUIET])
    run = tmp_path / "runs" / "vae_digits" / "version_0"
    for name in ("traversals.png", "interpolation.png", "manifold.png", "latent_space.png",
                 "reconstructions.png", "samples.png", "loss_curves.png"):
        png_size(run / name)
    out = capsys.readouterr().out
    assert "manifold.png:" in out and "not drawn" not in out


def test_fit_of_a_discrete_vae_skips_what_it_cannot_draw(command_line, tmp_path, capsys):
    config = Path(__file__).resolve().parents[1] / "configs" / "discrete_vae_digits.yaml"
    main(["fit", f"--config={config}", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
          "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1", *QUIET])
    run = next((tmp_path / "runs").glob("*/version_0"))
    assert (run / "reconstructions.png").is_file() and (run / "samples.png").is_file()
    assert not (run / "traversals.png").exists()
    note = [line for line in capsys.readouterr().out.splitlines() if "not drawn" in line]
    assert len(note) == 1 and "traversals.png" in note[0] and "interpolation.png" in note[0]


def test_run_report_draws_completions_for_a_conditional_model(tmp_path, capsys):
    class ConditionalStandIn(torch.nn.Module, Completer):
        def __init__(self):
            torch.nn.Module.__init__(self)
            Completer.__init__(self)
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def sample(self, num_samples, mean=True):
            raise ValueError("a conditional model has no unconditional samples")

    y = torch.rand(8, 1, 4, 4)
    batch = {"x": torch.where(torch.rand_like(y) < 0.5, -1.0, y), "y": y, "mask": torch.ones_like(y, dtype=torch.bool)}
    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(val_dataloader=lambda: [batch]),
        checkpoint_callback=None, callback_metrics={},
    )
    model = ConditionalStandIn()
    RunReport()._report(trainer, SimpleNamespace(lvm=model), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["completions.png"]
    assert f"completions.png: {tmp_path / 'completions.png'}" in capsys.readouterr().out
    assert model.training
