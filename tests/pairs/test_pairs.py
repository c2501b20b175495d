"""The seam between a Pyro user's pair and pyro_lvm (pyro_lvm.pairs): arguments, particles, trace reading.

The linear-Gaussian model z ~ N(0, I), x | z ~ N(W z + b, s^2 I) (tests/linear_gaussian.py) gives closed forms: its
exact posterior as the guide makes every importance weight equal p(x), so the multi-sample bounds equal log p(x)
exactly, whichever way the particles run.
"""

import logging
import math

import pyro
import pyro.distributions as dist
import pytest
import pytorch_lightning as pl
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.autoguide import (
    AutoDelta, AutoDiagonalNormal, AutoGuideList, AutoLowRankMultivariateNormal, AutoNormal,
)

import pyro_lvm
from linear_gaussian import LinearGaussian, linear_gaussian
from pyro_lvm.estimators import make_elbo
from pyro_lvm.pairs import call_keys, check_vectorization, elbo_parts, later_dependencies, split_batch
from pyro_pairs.data import FactorData
from pyro_pairs.factor_analysis import FactorAnalysis

K, D, S, N = 2, 4, 0.8, 6
QUIET = dict(enable_progress_bar=False, logger=False, enable_checkpointing=False, enable_model_summary=False)


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)


@pytest.fixture
def lg():
    return linear_gaussian(K, D, S, N)


def masked_model(lg):
    """The linear-Gaussian model written for exactly one batch: it observes the entries where ``observe`` is
    true by boolean indexing, as Pyro's CVAE example does, so it does not broadcast over particles."""

    def model(x, observe):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(K), 1.0).to_event(1))
            loc = z @ lg["W"].T + lg["b"]
            pyro.sample("x", dist.Normal(loc[observe].view(x.shape[0], -1), lg["s"]).to_event(1),
                        obs=x[observe].view(x.shape[0], -1))

    return model


def broadcasting_model(lg):
    """The same model written with a mask that broadcasts: ``.mask`` instead of boolean indexing."""

    def model(x, observe):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(K), 1.0).to_event(1))
            loc = z @ lg["W"].T + lg["b"]
            pyro.sample("x", dist.Normal(loc, lg["s"]).mask(observe).to_event(1), obs=x)

    return model


def posterior_guide(lg, observe, shift=0.0, loc_param=False):
    """The exact posterior given the observed entries (each row observes the same columns), or shifted."""
    cols = observe[0]
    W, b, s = lg["W"][cols], lg["b"][cols], lg["s"]
    cov = torch.linalg.inv(torch.eye(K, dtype=torch.float64) + W.T @ W / s**2)
    loc = (lg["x"][:, cols] - b) @ W @ cov / s**2 + shift
    scale = cov.diagonal().sqrt()  # exact only when cov is diagonal; the bounds below use loc/scale as given

    def guide(x, observe):
        m = pyro.param("m", loc.clone()) if loc_param else loc
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(m, cov) if shift == 0.0 else dist.Normal(m, scale).to_event(1))

    return guide, cov


def marginal_log_px(lg, observe):
    cols = observe[0]
    W, b = lg["W"][cols], lg["b"][cols]
    return LinearGaussian(W, b, lg["s"]).log_evidence(lg["x"][:, cols])  # the observed columns' own model


def observed_columns(n=N):
    observe = torch.zeros(n, D, dtype=torch.bool)
    observe[:, :3] = True
    return observe


def test_the_vectorization_check_finds_boolean_indexing_and_names_the_site(lg):
    observe = observed_columns()
    guide, _ = posterior_guide(lg, observe)
    args, kwargs = (lg["x"],), {"observe": observe}
    masked = check_vectorization(masked_model(lg), guide, args, kwargs, max_plate_nesting=1)
    assert not masked and masked.site == "z" and "IndexError" in masked.reason
    assert check_vectorization(broadcasting_model(lg), guide, args, kwargs, max_plate_nesting=1)


def test_the_check_also_finds_a_model_that_silently_mixes_particles():
    # z @ W.T with W a global latent of shape (K, 1, d, k) inside the particle plate broadcasts (K, B) against
    # (K, 1): particle j's z meets particle k's W. No error, a wrong log-density: the check compares
    fa = FactorAnalysis(num_data=30)
    x = torch.randn(5, 6)
    result = check_vectorization(fa.model, fa.guide, (x,), {}, max_plate_nesting=1)
    assert not result and result.site == "x" and "does not broadcast" in result.reason


def test_the_check_leaves_the_random_numbers_as_it_found_them(lg):
    observe = observed_columns()
    guide, _ = posterior_guide(lg, observe)
    torch.manual_seed(3)
    check_vectorization(broadcasting_model(lg), guide, (lg["x"],), {"observe": observe}, 1)
    after = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(3))


@pytest.mark.parametrize("name", ["iwae", "dreg", "stl", "vimco", "score_function"])
def test_particles_one_at_a_time_give_the_exact_bound_with_the_exact_posterior(name, lg):
    # every weight is p(x): the bound is log p(x) (of the observed entries) whatever K, for a model that
    # cannot run vectorized
    observe = observed_columns()
    guide, _ = posterior_guide(lg, observe)
    elbo = make_elbo(name, num_particles=5)
    value = -elbo.loss(masked_model(lg), guide, lg["x"], observe=observe)
    assert not elbo.vectorized and "IndexError" in elbo.vectorization.reason
    assert value == pytest.approx(float(marginal_log_px(lg, observe).sum()), abs=1e-8)


@pytest.mark.parametrize("name", ["iwae", "dreg"])
def test_sequential_particles_estimate_the_same_bound_and_gradient_as_vectorized_ones(name, lg):
    # a guide off the posterior: E[bound] and E[gradient] of the masked model, particles one at a time, equal
    # those of the broadcasting model, particles in one pass (within 4 standard errors over 150 draws)
    observe = observed_columns()
    stats = {}
    for model, vectorize in ((masked_model(lg), False), (broadcasting_model(lg), True)):
        guide, _ = posterior_guide(lg, observe, shift=0.4, loc_param=True)
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        values, grads = [], []
        for _ in range(150):
            elbo = make_elbo(name, num_particles=4, vectorize_particles=vectorize)
            loss = elbo.differentiable_loss(model, guide, lg["x"], observe=observe)
            (grad,) = torch.autograd.grad(loss, [pyro.param("m").unconstrained()])
            values.append(float(loss.detach()))
            grads.append(grad.flatten())
        grads = torch.stack(grads)
        stats[vectorize] = (torch.tensor(values), grads)
    (v0, g0), (v1, g1) = stats[False], stats[True]
    assert abs(v0.mean() - v1.mean()) < 4 * math.sqrt(v0.var() / 150 + v1.var() / 150)
    se = (g0.var(0) / 150 + g1.var(0) / 150).sqrt()
    assert ((g0.mean(0) - g1.mean(0)).abs() < 4 * se + 1e-9).all()
    assert (g1.mean(0).abs() > 4 * g1.std(0) / math.sqrt(150)).any()  # a gradient to compare: the test can fail


def test_vectorize_particles_true_on_a_model_that_cannot_says_what_to_change(lg):
    observe = observed_columns()
    guide, _ = posterior_guide(lg, observe)
    elbo = make_elbo("iwae", num_particles=3, vectorize_particles=True)
    with pytest.raises(ValueError, match="IndexError inside the particle plate.*boolean indexing.*vectorize_particles=False"):
        elbo.loss(masked_model(lg), guide, lg["x"], observe=observe)


def test_one_particle_adds_no_particle_dimension(lg):
    observe = observed_columns()
    guide, _ = posterior_guide(lg, observe)
    elbo = make_elbo("stl", num_particles=1)
    elbo.loss(masked_model(lg), guide, lg["x"], observe=observe)  # the masked model runs as written
    assert elbo.vectorization.reason == "one particle: no particle dimension"


# ----- arguments ---------------------------------------------------------------------------------
def test_an_autoguide_gets_what_its_model_takes_and_a_kwargs_guide_does_not_get_everything():
    def model(x, y=None):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide(x, **kwargs):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    assert call_keys(AutoNormal(model)) == {"x", "y"}
    assert call_keys(AutoGuideList(model)) == {"x", "y"}
    assert call_keys(guide, model) == {"x", "y"}  # not "index", which neither names
    assert call_keys(poutine.block(model, hide=["z"])) == {"x", "y"}
    # a per-datapoint guide of the local latents inside an autoguide of the global ones still gets "index"
    local = pyro_lvm.PerDatapointGuide(num_data=10).attach(model)
    assert call_keys(pyro_lvm.with_global_autoguide(model, local)) == {"x", "y", "index"}
    _, kwargs, n = split_batch({"x": torch.zeros(3, 1), "y": torch.ones(3), "index": torch.arange(3)}, {"y": "ys"})
    assert set(kwargs) == {"ys", "index"} and n == 3


# ----- autoguides as the guide of fit ------------------------------------------------------------
def regression_model(x):
    """Bayesian linear regression of the last column on the others: global weights, noise scale."""
    features, target = x[..., :-1], x[..., -1]
    w = pyro.sample("w", dist.Normal(torch.zeros(features.shape[-1]), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal((features * w).sum(-1), sigma), obs=target)


def regression_data(n=240, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 3, generator=g)
    return torch.cat([features, (features @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(n, generator=g))[:, None]], -1)


AUTOGUIDES = {
    "AutoNormal": lambda m: AutoNormal(m),
    "AutoDelta": lambda m: AutoDelta(m),
    "AutoDiagonalNormal": lambda m: AutoDiagonalNormal(m),
    "AutoLowRankMultivariateNormal": lambda m: AutoLowRankMultivariateNormal(m, rank=2),
}


def held_out(module, guide, x) -> float:
    """The ELBO per data point of the regression on ``x`` (20 draws), with the module's parameters."""
    pyro.set_rng_seed(0)
    with torch.no_grad(), module._scope():
        return -pyro.infer.Trace_ELBO(num_particles=20).loss(regression_model, guide, x) / len(x)


@pytest.mark.parametrize("autoguide", list(AUTOGUIDES))
@pytest.mark.parametrize("estimator, particles", [("reparam", 1), ("analytic_kl", 1), ("stl", 1), ("iwae", 3),
                                                  ("dreg", 3), ("score_function", 2), ("vimco", 3)])
def test_autoguides_train_as_the_guide_of_fit_with_every_estimator(autoguide, estimator, particles):
    x = regression_data()
    torch.manual_seed(0)
    guide = AUTOGUIDES[autoguide](regression_model)
    data = pyro_lvm.data.TensorDataModule(x[:200], val=x[200:], batch_size=50)
    if autoguide == "AutoDelta" and estimator in ("score_function", "vimco"):  # a point mass has no score
        with pytest.raises(ValueError, match="point masses.*AutoDelta.*'reparam'"):
            pyro_lvm.fit(regression_model, guide, data=data, estimator=make_elbo(estimator, num_particles=particles),
                         max_steps=1, **QUIET)
        return
    untrained = pyro_lvm.LVMModule(regression_model, guide)
    untrained.initialize(x[:50])
    start = held_out(untrained, guide, x[200:])
    module = pyro_lvm.fit(regression_model, guide, data=data, estimator=make_elbo(estimator, num_particles=particles),
                          lr=0.05, max_steps=40, limit_val_batches=0, latent_monitor=False, **QUIET)
    assert held_out(module, guide, x[200:]) > start + 1.0


@pytest.mark.parametrize("autoguide", ["AutoNormal", "AutoDelta", "AutoLowRankMultivariateNormal"])
def test_autoguides_with_analytic_kl_recover_the_regression(autoguide):
    # the whole data set in one batch: the ELBO's global terms are counted once
    x = regression_data()
    torch.manual_seed(0)
    guide = AUTOGUIDES[autoguide](regression_model)
    module = pyro_lvm.fit(regression_model, guide, data=pyro_lvm.data.TensorDataModule(x[:200], val=x[200:], batch_size=200),
                          estimator="analytic_kl", lr=0.05, max_steps=300, limit_val_batches=0,
                          latent_monitor=False, **QUIET)
    features, target = x[:200, :-1], x[:200, -1]
    least_squares = torch.linalg.lstsq(features, target).solution  # the posterior mean, but for the prior
    with torch.no_grad(), module._scope():
        median = guide.median(x)
    assert torch.allclose(median["w"], least_squares, atol=0.05), (autoguide, median["w"], least_squares)
    residual = float((target - features @ least_squares).std())
    assert abs(float(median["sigma"]) - residual) < 0.05


def test_analytic_kl_with_an_autoguide_is_pyros_trace_mean_field_elbo():
    # AutoNormal returns Deltas over auxiliary draws: no closed-form KL, a Monte-Carlo term as in Pyro; the
    # loss is TraceMeanField_ELBO's for the same draws
    x = regression_data(50)
    guide = AutoNormal(regression_model)
    pyro.clear_param_store()
    guide(x)
    losses = []
    ours = make_elbo("analytic_kl")
    ours.check(regression_model, guide, x)  # its first use would check (and draw) first
    for elbo in (ours, TraceMeanField_ELBO()):
        pyro.set_rng_seed(4)
        losses.append(float(elbo.differentiable_loss(regression_model, guide, x).detach()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_autonormal_of_local_latents_takes_the_index_its_model_takes():
    # Pyro's way to an AutoNormal of local latents under minibatches: a plate of the full size, subsampled by
    # the batch's indices, and the same plate for the guide (create_plates)
    data = torch.randn(120, 2) * 2 + 1
    n = 100

    def plate(x, index):
        return pyro.plate("data", n, subsample=index)

    def model(x, index):
        with plate(x, index):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    guide = AutoNormal(model, create_plates=plate)
    module = pyro_lvm.fit(model, guide, data=pyro_lvm.data.TensorDataModule(data[:n], val=data[:25], batch_size=25),
                          lr=0.1, max_steps=400, latent_monitor=False, limit_val_batches=0, **QUIET)
    with torch.no_grad(), module._scope():
        loc = guide.median(data[:n], torch.arange(n))["z"]
    # the exact posterior of each point is N(x / 2, 1/2): each point's mean is learned from its own rows
    assert loc.shape == (n, 2)
    error = (loc - data[:n] / 2).abs()
    assert float(error.mean()) < 0.3 and float(torch.corrcoef(torch.stack([loc.flatten(), data[:n].flatten()]))[0, 1]) > 0.9


def test_with_global_autoguide_trains_with_analytic_kl():
    fa = FactorAnalysis(num_data=360)
    guide = pyro_lvm.with_global_autoguide(fa.model, pyro_lvm.AmortizedGuide(torch.nn.Linear(6, 4)))
    module = pyro_lvm.fit(fa.model, guide, data=FactorData(), estimator="analytic_kl", lr=0.02, max_steps=60,
                          limit_val_batches=1, **QUIET)
    assert math.isfinite(float(module.trainer.callback_metrics["val/elbo"]))


# ----- held-out numbers that do not depend on the batching -------------------------------------------
def test_the_held_out_elbo_of_a_global_latent_model_does_not_depend_on_the_batch_size():
    torch.manual_seed(0)
    fa = FactorAnalysis(num_data=360)
    module = pyro_lvm.fit(fa, data=FactorData(), lr=0.02, max_steps=150, limit_val_batches=0, **QUIET)
    values = {}
    for batch_size in (20, 60, 180):
        draws = []
        for seed in range(8):  # the ELBO's Monte-Carlo error: 8 evaluations of the 180 points
            pyro.set_rng_seed(seed)
            metrics = pl.Trainer(**QUIET).validate(module, datamodule=FactorData(batch_size=batch_size),
                                                   verbose=False)[0]
            draws.append(metrics["val/elbo"])
        values[batch_size] = torch.tensor(draws)
    means = {b: float(v.mean()) for b, v in values.items()}
    error = max(float(v.std()) for v in values.values()) / math.sqrt(8)
    assert max(means.values()) - min(means.values()) < 4 * error + 0.05, means
    # counted per batch, the global KL would shift the value by (180 / b - 1) KL_global / 180
    with torch.no_grad(), module._scope():
        tr = poutine.trace(fa.guide).get_trace(torch.zeros(1, 6))
        model_tr = poutine.trace(poutine.replay(fa.model, trace=tr)).get_trace(torch.zeros(1, 6))
        global_kl = float(elbo_parts(model_tr, tr)["global_kl"])
    assert (180 / 20 - 1) * global_kl / 180 > 3 * (4 * error + 0.05)  # the old error would show


# ----- the mean-field condition of analytic_kl ---------------------------------------------------------
def test_analytic_kl_tests_the_dependence_not_the_order():
    def model(x):
        with pyro.plate("data", len(x)):
            a = pyro.sample("a", dist.Normal(0.0, 1.0))
            b = pyro.sample("b", dist.Normal(0.0, 1.0))  # independent of a
            pyro.sample("x", dist.Normal(a + b, 1.0), obs=x)

    def guide(x):  # draws b first, as an M2 guide draws y before z
        with pyro.plate("data", len(x)):
            b = pyro.sample("b", dist.Normal(x / 3, 1.0))
            pyro.sample("a", dist.Normal(x / 3 + 0.1 * b, 1.0))

    x = torch.randn(4)
    assert later_dependencies(model, guide, (x,), {}) == ({}, [])
    make_elbo("analytic_kl").check(model, guide, x)  # accepted, without Pyro's order warning

    def dependent(x):
        with pyro.plate("data", len(x)):
            a = pyro.sample("a", dist.Normal(0.0, 1.0))
            b = pyro.sample("b", dist.Normal(a, 1.0))  # p(b | a), and the guide draws b before a
            pyro.sample("x", dist.Normal(a + b, 1.0), obs=x)

    assert later_dependencies(dependent, guide, (x,), {})[0] == {"b": ["a"]}
    with pytest.raises(ValueError, match="prior of 'b' depends on \\['a'\\]"):
        make_elbo("analytic_kl").check(dependent, guide, x)
