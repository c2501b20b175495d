"""Beta and the KL term in training: free bits, capacity control, active units, posterior collapse."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch.distributions import kl_divergence

import pyro_lvm
from pyro_lvm.data import DigitsDataModule
from pyro_lvm.estimators import AnalyticKLELBO, Capacity, FreeBits, ReparamELBO, kl_per_variable, make_elbo
from pyro_lvm.estimators.kl_control import kl_per_variable_mc
from pyro_lvm.training import LatentMonitor, PosteriorCollapseWarning, latent_statistics
from pyro_lvm.schedules import LinearWarmup

QUIET = dict(enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)


def gaussian_pair(num_data=None):
    """x ~ N(z, I) with z ~ N(0, I) in 3 dims; q(z | x) = N(loc, scale) with free parameters."""

    def model(x):
        with pyro.plate("data", num_data or x.shape[0], subsample_size=x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor([[0.1, 1.5, 3.0]]).expand(x.shape[0], 3).clone())
        scale = pyro.param("scale", torch.full((x.shape[0], 3), 0.8), constraint=dist.constraints.positive)
        with pyro.plate("data", num_data or x.shape[0], subsample_size=x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return model, guide


def closed_form_kl():
    """KL(q(z_d | x_i) || N(0, 1)) per data point and dimension, from the guide's parameters."""
    return kl_divergence(dist.Normal(pyro.param("loc"), pyro.param("scale")), dist.Normal(0.0, 1.0))


def same_draws(elbo, model, guide, x, seed=0):
    """The loss at a fixed seed (after the one-off check, which draws too)."""
    elbo.check(model, guide, x)
    torch.manual_seed(seed)
    return elbo.differentiable_loss(model, guide, x)


@pytest.fixture(autouse=True)
def fresh_params():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def test_free_bits_replace_beta_kl_by_beta_times_the_clamped_batch_mean_per_dimension():
    x = torch.randn(4, 3)
    model, guide = gaussian_pair(num_data=10)
    plain = same_draws(make_elbo("analytic_kl", beta=2.0), model, guide, x)
    floored = same_draws(make_elbo("analytic_kl", beta=2.0, kl_control=FreeBits(nats=1.0)), model, guide, x)
    kl = closed_form_kl()
    # the plate scales the batch of 4 up to 10 data points, reconstruction and KL alike
    expected = plain - 2.0 * 10 / 4 * kl.sum() + 2.0 * 10 * kl.mean(0).clamp(min=1.0).sum()
    assert torch.allclose(floored, expected, rtol=1e-5)


def test_free_bits_of_zero_nats_is_the_analytic_elbo():
    x = torch.randn(5, 3)
    model, guide = gaussian_pair()
    plain = same_draws(make_elbo("analytic_kl", beta=0.5), model, guide, x)
    floored = same_draws(make_elbo("analytic_kl", beta=0.5, kl_control=FreeBits(nats=0.0)), model, guide, x)
    assert torch.allclose(plain, floored, rtol=1e-6)


def test_free_bits_remove_the_kl_gradient_of_dimensions_below_the_floor():
    x = torch.randn(6, 3)
    model, guide = gaussian_pair()
    loc = lambda: pyro.param("loc").unconstrained()  # noqa: E731
    (plain,) = torch.autograd.grad(same_draws(make_elbo("analytic_kl"), model, guide, x), [loc()])
    floored_loss = same_draws(make_elbo("analytic_kl", kl_control=FreeBits(nats=1.0)), model, guide, x)
    (floored,) = torch.autograd.grad(floored_loss, [loc()])
    kl = closed_form_kl().mean(0)
    assert kl[0] < 1.0 < kl[1]  # dim 0 carries 0.05 nats, dims 1 and 2 more than the floor
    # d KL / d loc = loc: gone for dim 0, kept for dims 1 and 2
    assert torch.allclose(floored[:, 0], plain[:, 0] - loc()[:, 0].detach(), atol=1e-5)
    assert torch.allclose(floored[:, 1:], plain[:, 1:], atol=1e-5)


def test_capacity_penalizes_the_absolute_deviation_of_the_kl_from_the_target():
    x = torch.randn(4, 3)
    model, guide = gaussian_pair()
    plain = same_draws(make_elbo("analytic_kl"), model, guide, x)
    capacity = Capacity(capacity=LinearWarmup(start=0.0, end=20.0, warmup_steps=100), gamma=3.0)
    elbo = make_elbo("analytic_kl", kl_control=capacity)
    kl = closed_form_kl().sum(-1)  # per data point, about 5.7 nats
    for step, target in ((0, 0.0), (50, 10.0), (100, 20.0)):
        elbo.set_step(step)
        assert capacity.state() == {"capacity": target}
        loss = same_draws(elbo, model, guide, x)
        expected = plain - kl.sum() + 4 * 3.0 * (kl.mean() - target).abs()
        assert torch.allclose(loss, expected, rtol=1e-5)


def test_monte_carlo_kl_per_dimension_averages_to_the_closed_form():
    q = dist.Normal(torch.tensor([[0.1, 1.5, 3.0]]), torch.tensor([[0.8, 0.5, 2.0]])).to_event(1)
    p = dist.Normal(torch.zeros(3), 1.0).to_event(1)
    z = q.sample((200_000,))
    mc = kl_per_variable_mc(q, p, z)
    assert mc.shape == (200_000, 1, 3)
    stderr = mc.std(0) / 200_000**0.5
    assert ((mc.mean(0) - kl_per_variable(q, p)).abs() < 4 * stderr).all()


def test_kl_control_is_refused_where_the_kl_is_not_separable():
    vae = pyro_lvm.VAE(data_shape=6, latent_dim=2, hidden_dims=[8])
    with pytest.raises(ValueError, match="'iwae' has no option 'kl_control'.*'reparam' and 'analytic_kl'"):
        make_elbo("iwae", kl_control=FreeBits(0.5))
    with pytest.raises(ValueError, match="Capacity control replaces beta"):
        pyro_lvm.LVMModule(vae, estimator=ReparamELBO(kl_control=Capacity(5.0)), beta=4.0)
    with pytest.raises(TypeError, match=r"LVMModule no longer takes kl_control.*AnalyticKLELBO\(kl_control="):
        pyro_lvm.LVMModule(vae, estimator="analytic_kl", kl_control=FreeBits(0.5))
    with pytest.raises(ValueError, match="nats must be >= 0"):
        FreeBits(-1.0)


def test_analytic_kl_refuses_a_guide_that_breaks_the_mean_field_condition():
    hvae = pyro_lvm.HierarchicalVAE(data_shape=6, latent_dims=(3, 2), hidden_dims=((8,), (4,)))
    with pytest.raises(ValueError, match="mean-field condition.*Use 'reparam'"):
        pyro_lvm.LVMModule(hvae, estimator="analytic_kl")


def test_active_units_are_the_units_whose_posterior_mean_varies_over_the_data():
    torch.manual_seed(0)
    vae = pyro_lvm.VAE(data_shape=6, latent_dim=4, hidden_dims=[8])
    x = torch.bernoulli(torch.full((50, 6), 0.5))
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    monitor = LatentMonitor(activity_threshold=0.01)
    monitor.update(model_trace, guide_trace)  # in two halves: the sums must add up
    summary = monitor.end_epoch(epoch=0, warn=False)
    loc, scale = vae.encode(x)
    activity = loc.var(0)
    assert torch.allclose(summary["sites"]["z"]["activity"], activity, rtol=1e-4)
    assert summary["active_units"] == int((activity > 0.01).sum())
    kl = kl_divergence(dist.Normal(loc, scale), dist.Normal(0.0, 1.0)).mean(0)
    assert torch.allclose(summary["sites"]["z"]["kl"], kl, rtol=1e-4)


def test_statistics_accumulate_over_batches_like_one_pass():
    stats = [(torch.randn(7, 3), torch.randn(7, 3)) for _ in range(3)]
    monitor = LatentMonitor()
    for kl, mean in stats:
        monitor.add("z", kl, mean, torch.Size([3]))
    summary = monitor.end_epoch(epoch=0, warn=False)["sites"]["z"]
    kl, mean = (torch.cat(t) for t in zip(*stats))
    assert torch.allclose(summary["kl"], kl.mean(0), atol=1e-6)
    assert torch.allclose(summary["activity"], mean.var(0), atol=1e-5)


def test_kl_per_location_of_a_spatial_latent_keeps_its_shape():
    def model():
        with pyro.plate("data", 5):
            pyro.sample("z", dist.Normal(torch.zeros(2, 3, 3), 1.0).to_event(3))

    def guide():
        with pyro.plate("data", 5):
            pyro.sample("z", dist.Normal(torch.randn(5, 2, 3, 3), 0.5).to_event(3))

    g = poutine.trace(guide).get_trace()
    m = poutine.trace(poutine.replay(model, trace=g)).get_trace()
    kl, mean, shape = latent_statistics(m, g)["z"]
    assert shape == (2, 3, 3) and kl.shape == (5, 18)
    assert torch.allclose(kl.sum(-1), kl_divergence(g.nodes["z"]["fn"], m.nodes["z"]["fn"]), rtol=1e-5)


def _train(beta, seed=0, epochs=12):
    torch.manual_seed(seed)
    vae = pyro_lvm.VAE(data_shape=64, latent_dim=8, hidden_dims=[64])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PosteriorCollapseWarning)
        module = pyro_lvm.fit(
            vae, data=DigitsDataModule(batch_size=64), estimator="analytic_kl", beta=beta, lr=3e-3,
            max_epochs=epochs, seed=seed, logger=False, **QUIET,
        )
    collapse = [w for w in caught if issubclass(w.category, PosteriorCollapseWarning)]
    return module, collapse


def test_large_beta_collapses_and_warns_while_a_warmup_keeps_units_active():
    collapsed, warned = _train(beta=8.0)
    warm, quiet = _train(beta=LinearWarmup(start=0.0, end=1.0, warmup_steps=200))
    last = collapsed.latent_monitor.history[-1]
    assert last["active_units"] == 0 and last["kl"] < 0.05
    assert len(warned) == 1 and "0 of 8 latent units active" in str(warned[0].message)
    assert warm.latent_monitor.history[-1]["active_units"] >= 6
    assert not quiet
    # the collapsed model explains the digits worse: reconstructions are the blurry average
    assert warm.trainer.callback_metrics["val/reconstruction"] > collapsed.trainer.callback_metrics["val/reconstruction"] + 5


def test_free_bits_keep_units_active_at_a_large_beta():
    torch.manual_seed(0)
    vae = pyro_lvm.VAE(data_shape=64, latent_dim=8, hidden_dims=[64])
    module = pyro_lvm.fit(
        vae, data=DigitsDataModule(batch_size=64), estimator=AnalyticKLELBO(kl_control=FreeBits(nats=0.5)), beta=8.0,
        lr=3e-3, max_epochs=12, logger=False, **QUIET,
    )
    assert module.latent_monitor.history[-1]["active_units"] >= 4
