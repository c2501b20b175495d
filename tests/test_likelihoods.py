"""pyro_lvm.likelihoods against closed forms and direct computations."""

import copy
import json
import math
from typing import Union

import pyro
import pytest
import torch
from jsonargparse import ArgumentParser

from pyro_lvm import VAE, ConditionalVAE, ConvVAE, HierarchicalVAE, LVMModule
from pyro_lvm.likelihoods import (
    LIKELIHOOD_NAMES,
    BernoulliLikelihood,
    CategoricalLikelihood,
    ContinuousBernoulliLikelihood,
    DiscretizedLogisticMixture,
    DiscretizedLogisticMixtureLikelihood,
    GaussianLikelihood,
    GridCategorical,
    Likelihood,
    LikelihoodName,
    continuous_bernoulli_log_norm,
    likelihood_config,
    make_likelihood,
)
from pyro_lvm.training.fast_step import FastLoss
from pyro_lvm.estimators import make_elbo


@pytest.mark.parametrize("logit", [-30.0, -4.0, -0.5, -0.02, -1e-3, 0.0, 1e-5, 0.015, 0.3, 2.0, 12.0])
def test_continuous_bernoulli_integrates_to_one_over_the_unit_interval(logit):
    # the density C(l) s^x (1 - s)^(1 - x) integrated numerically on [0, 1] (Simpson's rule, 20001 points)
    lik = ContinuousBernoulliLikelihood(1)
    x = torch.linspace(0, 1, 20001, dtype=torch.float64)[:, None]
    h = torch.full_like(x, logit)
    density = lik.log_density(h, x).exp()[:, 0]
    weights = torch.ones_like(density)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    integral = float((weights * density).sum() / (3 * (len(x) - 1)))
    assert integral == pytest.approx(1.0, abs=1e-8)


def test_the_log_normalizer_is_smooth_across_its_series_and_matches_torch():
    logits = torch.linspace(-0.05, 0.05, 2001, dtype=torch.float64)
    values = continuous_bernoulli_log_norm(logits)
    assert float(values.diff().abs().max()) < 1e-6  # no jump where the series hands over to the exact form
    wide = torch.cat([torch.linspace(-20, -0.1, 50), torch.linspace(0.1, 20, 50)]).double()
    x = torch.rand(100, dtype=torch.float64)
    lik = ContinuousBernoulliLikelihood(100)
    ours = lik.log_density(wide[None], x[None]).sum()
    theirs = torch.distributions.ContinuousBernoulli(logits=wide).log_prob(x).sum()
    assert float(ours) == pytest.approx(float(theirs), rel=1e-9)


def test_continuous_bernoulli_accepts_grey_levels_and_refuses_values_outside_the_unit_interval():
    lik = make_likelihood("continuous_bernoulli", 4)
    lik.check(torch.tensor([[0.0, 0.25, 0.5, 1.0]]))
    with pytest.raises(ValueError, match=r"needs data in \[0, 1\].*max=1\.5"):
        lik.check(torch.tensor([[0.0, 0.25, 0.5, 1.5]]))
    with pytest.raises(ValueError, match="continuous_bernoulli"):  # the Bernoulli's message points to it
        make_likelihood("bernoulli", 4).check(torch.tensor([[0.0, 0.25, 0.5, 1.0]]))


@pytest.mark.parametrize("estimator", ["reparam", "analytic_kl", "iwae"])
def test_a_vae_with_it_has_the_fast_step_and_the_same_loss_as_pyros_path(estimator):
    torch.manual_seed(0)
    vae = VAE(data_shape=6, latent_dim=2, hidden_dims=[8], likelihood="continuous_bernoulli")
    x = torch.rand(5, 6)
    elbo = make_elbo(estimator, num_particles=3 if estimator == "iwae" else 1)
    fast = FastLoss(vae, elbo)
    assert fast.closed_form or fast.particles
    torch.manual_seed(1)
    through_fast = fast(x)
    elbo.differentiable_loss(vae.model, vae.guide, x)  # the first use runs the estimator's checks (and draws)
    torch.manual_seed(1)
    through_pyro = elbo.differentiable_loss(vae.model, vae.guide, x)
    assert torch.allclose(through_fast, through_pyro, rtol=1e-5, atol=1e-4)
    module = LVMModule(copy.deepcopy(vae), estimator=estimator if estimator != "iwae" else elbo)
    module.initialize(x)
    assert module.fast_path_blocker is None


# ----- likelihoods as parts: binding, parameters per value, configurations -----------------------------------

_NEW = {
    "dlm": lambda shape=None, **kw: DiscretizedLogisticMixtureLikelihood(shape, **{"num_components": 3, **kw}),
    "categorical": lambda shape=None, **kw: CategoricalLikelihood(shape, **kw),
}


def _grid_data(*shape, levels=256, seed=0):
    return torch.randint(0, levels, shape, generator=torch.Generator().manual_seed(seed)).double() / (levels - 1)


def _direct_dlm_probs(logits, locs, log_scales, levels):
    """P(k) for every level k, (levels, *batch), straight from the logistic CDF (no log-space tricks), float64."""
    y = 2 * torch.arange(levels, dtype=torch.float64) / (levels - 1) - 1
    y = y.reshape((levels,) + (1,) * logits.dim())
    cdf = lambda t: torch.sigmoid((t - locs) / log_scales.clamp(min=-7).exp())  # noqa: E731
    upper, lower = cdf(y + 1 / (levels - 1)), cdf(y - 1 / (levels - 1))
    upper[-1], lower[0] = 1.0, 0.0
    return ((upper - lower) * torch.softmax(logits, -1)).sum(-1)


@pytest.mark.parametrize("levels", [256, 17, 2])
def test_discretized_logistic_mixture_sums_to_one_and_matches_the_logistic_cdf(levels):
    g = torch.Generator().manual_seed(levels)
    logits, locs = 2 * torch.randn(7, 4, generator=g).double(), 1.5 * torch.randn(7, 4, generator=g).double()
    log_scales = 3 * torch.randn(7, 4, generator=g).double() - 3  # some below the floor of -7
    d = DiscretizedLogisticMixture(logits, locs, log_scales, levels=levels)
    grid = d.enumerate_support(expand=False)  # (levels, 1)
    log_p = d.log_prob(grid)
    assert torch.allclose(log_p.exp().sum(0), torch.ones(7, dtype=torch.float64), atol=1e-12)
    direct = _direct_dlm_probs(logits, locs, log_scales, levels)
    assert torch.allclose(log_p.exp(), direct, rtol=1e-9, atol=1e-15)
    big = direct > 1e-6  # where the direct difference of CDFs is itself accurate, the logs agree closely
    assert torch.allclose(log_p[big], direct[big].log(), rtol=1e-9)
    assert torch.allclose(d.mean, (direct * grid).sum(0), atol=1e-12)
    assert torch.allclose(d.probs.sum(-1), torch.ones(7, dtype=torch.float64))


def test_the_discretized_logistic_is_accurate_far_in_the_tails_where_pixelcnn_approximates():
    # a sharp logistic (log-scale at the floor) centred far from the pixel: the direct difference of CDFs
    # underflows to 0 in float64, but its logarithm is known: log F(c) + log(1 - F(a)) + log(e^(a-c) - 1)
    locs, log_scales = torch.tensor([[0.9]], dtype=torch.float64), torch.tensor([[-7.0]], dtype=torch.float64)
    d = DiscretizedLogisticMixture(torch.zeros(1, 1, dtype=torch.float64), locs, log_scales)
    x = torch.tensor([100 / 255], dtype=torch.float64)
    y, b, s = 2 * x - 1, 1 / 255, math.exp(-7.0)
    a, c = (y + b - 0.9) / s, (y - b - 0.9) / s
    expected = -torch.nn.functional.softplus(-c) - torch.nn.functional.softplus(a) + math.log(math.expm1(2 * b / s))
    assert float(d.log_prob(x)) == pytest.approx(float(expected), rel=1e-12)
    assert float(d.log_prob(x)) < -700  # far beyond float64's smallest probability


def test_grid_categorical_sums_to_one_and_its_mean_is_the_weighted_grid():
    logits = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(1)).double()
    d = GridCategorical(logits)
    grid = torch.arange(256, dtype=torch.float64) / 255
    probs = d.log_prob(d.enumerate_support(expand=False)).exp()  # (256, 3, 5)
    assert torch.allclose(probs.sum(0), torch.ones(3, 5, dtype=torch.float64))
    assert torch.allclose(probs.movedim(0, -1), torch.softmax(logits, -1))
    assert torch.allclose(d.mean, (torch.softmax(logits, -1) * grid).sum(-1))
    lik = CategoricalLikelihood((3, 5))
    h = logits.movedim(-1, 0).reshape(1, -1)  # the decoder's layout: (levels, *event_shape), flattened
    assert torch.allclose(lik.mean(h)[0], d.mean)


@pytest.mark.parametrize("kind", sorted(_NEW))
@pytest.mark.parametrize("shape", [(5,), (2, 3, 2)])
def test_log_density_equals_the_distributions_log_prob(kind, shape):
    lik = _NEW[kind](shape)
    g = torch.Generator().manual_seed(3)
    h = 3 * torch.randn(4, 6, lik.output_dim, generator=g)  # particles x batch x decoder output
    x = _grid_data(6, *shape).float()
    per_coordinate = lik.log_density(h, x)
    assert per_coordinate.shape == (4, 6, *shape)
    by_distribution = lik(h).log_prob(x)
    assert torch.allclose(per_coordinate.flatten(2).sum(-1), by_distribution, rtol=1e-5, atol=1e-4)
    assert torch.allclose(lik.log_density(h, x, reduce=True), by_distribution.sum(), rtol=1e-5)
    assert lik(h).batch_shape == (4, 6) and lik(h).event_shape == shape


@pytest.mark.parametrize("kind, levels", [("dlm", 256), ("dlm", 16), ("categorical", 256), ("categorical", 16)])
def test_samples_lie_on_the_grid_and_follow_the_probabilities(kind, levels):
    torch.manual_seed(0)
    lik = _NEW[kind](2, levels=levels)
    h = torch.randn(1, lik.output_dim, generator=torch.Generator().manual_seed(4))
    if kind == "dlm":  # broad enough logistics that many levels have mass
        h.view(1, 9, 2)[:, 6:] = -1.0
    fn = lik(h)
    n = 100_000
    draws = fn.sample((n,))[:, 0]  # (n, 2)
    assert draws.shape == (n, 2)
    level = draws * (levels - 1)
    assert torch.equal(level, level.round()) and draws.min() >= 0 and draws.max() <= 1
    probs = fn.base_dist.probs[0].double()  # (2, levels)
    for pixel in range(2):
        counts = torch.bincount(level[:, pixel].long(), minlength=levels).double()
        expected = n * probs[pixel]
        keep = expected >= 5
        chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
        df = int(keep.sum()) - 1
        assert chi2 < df + 5 * math.sqrt(2 * df), (pixel, chi2, df)
        assert float(counts[~keep].sum()) < max(20.0, 3 * float(expected[~keep].sum()) + 10)


def test_the_mixtures_mean_lies_within_half_a_level_of_the_exact_mean():
    lik = DiscretizedLogisticMixtureLikelihood((4, 3), num_components=5)
    g = torch.Generator().manual_seed(5)
    for spread in (0.1, 1.0, 4.0):
        h = spread * torch.randn(6, lik.output_dim, generator=g).double()
        exact = lik(h).base_dist.mean
        approx = lik.mean(h)
        assert approx.shape == exact.shape == (6, 4, 3)
        assert float((approx - exact).abs().max()) <= 0.5 / 255 + 1e-9
        assert approx.min() >= 0 and approx.max() <= 1


@pytest.mark.parametrize("kind", sorted(_NEW))
def test_gradients_are_finite_at_extreme_parameters(kind):
    lik = _NEW[kind](4)
    x = torch.tensor([[0.0, 1 / 255, 128 / 255, 1.0]])
    for value in (1e4, -1e4, 300.0, -300.0, 30.0, -30.0):
        for group in range(3):  # the mixture's logits, locations or log-scales; a categorical's 3 draws of logits
            h = torch.zeros(1, lik.params_per_value, 4)
            if kind == "dlm":
                h[:, 3 * group:3 * group + 3] = value
            else:
                h[:] = value * torch.randn(h.shape, generator=torch.Generator().manual_seed(group))
            h = h.reshape(1, -1).requires_grad_(True)
            loss = -lik(h).log_prob(x).sum() - lik.log_density(h, x, reduce=True)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(h.grad).all(), (value, group)
            assert torch.isfinite(lik.mean(h)).all()


def test_the_distributions_expand_and_validate_like_pyros():
    d = DiscretizedLogisticMixture(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2))
    wide = d.expand((4, 3))
    assert wide.batch_shape == (4, 3) and wide.sample().shape == (4, 3) and wide.levels == 256
    c = GridCategorical(torch.zeros(3, 17)).expand((2, 3))
    assert c.batch_shape == (2, 3) and c.levels == 17 and c.enumerate_support().shape == (17, 2, 3)
    assert bool(d.support.check(torch.tensor(3 / 255))) and not bool(d.support.check(torch.tensor(0.5)))
    with pyro.validation_enabled(True):
        with pytest.raises(ValueError):
            DiscretizedLogisticMixture(torch.zeros(2), torch.zeros(2), torch.zeros(2), validate_args=True).log_prob(
                torch.tensor(0.5))


def test_an_unbound_likelihood_binds_once_and_refuses_to_be_used_before():
    lik = GaussianLikelihood()  # learned scale: its parameters wait for the shape
    assert lik.event_shape is None and not lik.is_bound and len(list(lik.parameters())) == 0
    for use in (lambda: lik.output_dim, lambda: lik(torch.zeros(1, 4)), lambda: lik.scale,
                lambda: lik.check(torch.zeros(1, 4))):
        with pytest.raises(ValueError, match="unbound.*bind"):
            use()
    assert lik.bind(4) is lik and lik.event_shape == (4,) and lik.data_dim == 4
    assert lik.raw_scale.shape == (4,)
    before = lik.raw_scale
    lik.bind([4])  # the same shape: nothing happens
    assert lik.raw_scale is before
    with pytest.raises(ValueError, match=r"bound to event_shape \(4,\).*\(1, 2, 2\).*Leave the likelihood's event_shape out"):
        lik.bind((1, 2, 2))
    with pytest.raises(ValueError, match="event_shape"):
        BernoulliLikelihood().bind([])
    # given at construction: bound at once, with the parameters and numbers of before
    assert torch.equal(GaussianLikelihood(3).raw_scale, torch.full((3,), math.log(math.expm1(1.0 - 1e-3))))
    assert [n for n, _ in GaussianLikelihood(3).named_parameters()] == ["raw_scale"]


def test_params_per_value_and_the_decoder_layout():
    dlm = DiscretizedLogisticMixtureLikelihood((1, 2, 2), num_components=5)
    assert (dlm.params_per_value, dlm.output_dim) == (15, 60)
    assert CategoricalLikelihood(784).output_dim == 256 * 784
    assert Likelihood.params_per_value == 1 and BernoulliLikelihood(6).output_dim == 6
    h = torch.arange(60.0)[None]
    groups = dlm.param_groups(h)
    assert groups.shape == (1, 15, 1, 2, 2) and float(groups[0, 1, 0, 0, 0]) == 4.0  # group p holds h[4p:4p+4]
    with pytest.raises(ValueError, match="output_dim = 15 x 4 = 60"):
        dlm(torch.zeros(1, 4))


@pytest.mark.parametrize("kind", sorted(_NEW))
def test_the_checks_name_the_problem_and_the_fix(kind):
    lik = _NEW[kind](3)
    lik.check(torch.tensor([[0.0, 17 / 255, 1.0]]))
    with pytest.raises(ValueError, match=r"needs data in \[0, 1\].*max=2.*divide 8-bit pixels by 255"):
        lik.check(torch.tensor([[0.0, 0.5, 2.0]]))
    with pytest.raises(ValueError, match=r"levels=256\) needs data on the grid k/255.*index \(0, 1\).*Set levels"):
        lik.check(torch.tensor([[0.0, 0.5, 1.0]]))
    with pytest.raises(ValueError, match="NaN"):
        lik.check(torch.tensor([[0.0, float("nan"), 1.0]]))
    _NEW[kind](3, levels=17).check(torch.tensor([[0.0, 5 / 16, 1.0]]))  # the 8x8 digits' grid
    with pytest.raises(ValueError, match="levels"):
        _NEW[kind](3, levels=1)


def test_make_likelihood_takes_names_parts_and_configurations():
    assert set(LIKELIHOOD_NAMES) == {"bernoulli", "continuous_bernoulli", "gaussian", "discretized_logistic",
                                     "categorical"}
    assert type(make_likelihood("discretized_logistic", 4)) is DiscretizedLogisticMixtureLikelihood
    assert make_likelihood("categorical", (1, 2, 2)).output_dim == 1024
    part = CategoricalLikelihood(levels=16)
    assert make_likelihood(part, 3) is part and part.event_shape == (3,)
    with pytest.raises(ValueError, match="applies to likelihood='gaussian' only"):
        make_likelihood(GaussianLikelihood(), 3, scale=0.1)
    with pytest.raises(ValueError, match=r"'bernoulli', 'continuous_bernoulli', 'gaussian', 'discretized_logistic', "
                                          r"'categorical', or pass a pyro_lvm.likelihoods.Likelihood object"):
        make_likelihood("poisson", 3)
    config = likelihood_config(DiscretizedLogisticMixtureLikelihood(num_components=2))
    assert config == {"class_path": "pyro_lvm.likelihoods.DiscretizedLogisticMixtureLikelihood",
                      "init_args": {"event_shape": None, "num_components": 2, "levels": 256}}
    rebuilt = make_likelihood(config, 5)
    assert type(rebuilt) is DiscretizedLogisticMixtureLikelihood and rebuilt.output_dim == 30
    with pytest.raises(ValueError, match="pyro_lvm only"):
        make_likelihood({"class_path": "os.system", "init_args": {}}, 3)

    class Mine(BernoulliLikelihood):
        pass

    assert likelihood_config(Mine()) == "custom"
    with pytest.raises(ValueError, match="cannot rebuild"):
        make_likelihood("custom", 3)


def test_a_likelihood_round_trips_through_jsonargparse():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--likelihood", type=Union[LikelihoodName, Likelihood])
    config = parser.parse_args(['--likelihood={"class_path": "pyro_lvm.likelihoods.DiscretizedLogisticMixtureLikelihood",'
                                ' "init_args": {"num_components": 4, "levels": 17}}'])
    built = parser.instantiate(config).likelihood
    assert type(built) is DiscretizedLogisticMixtureLikelihood and built.event_shape is None
    assert built.config == {"event_shape": None, "num_components": 4, "levels": 17}
    assert parser.instantiate(parser.parse_args(["--likelihood=categorical"])).likelihood == "categorical"


def test_a_conv_vae_with_a_likelihood_part_round_trips_through_yaml_and_its_config():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ConvVAE, "model")
    config = parser.parse_string(
        "model:\n"
        "  data_shape: [1, 8, 8]\n"
        "  channels: [4]\n"
        "  latent_channels: 2\n"
        "  likelihood:\n"
        "    class_path: pyro_lvm.likelihoods.DiscretizedLogisticMixtureLikelihood\n"
        "    init_args: {num_components: 3}\n"
    )
    vae = parser.instantiate(config).model
    assert type(vae.likelihood) is DiscretizedLogisticMixtureLikelihood and vae.likelihood.num_components == 3
    assert vae.likelihood.event_shape == (1, 8, 8)
    assert vae.decoder_output(torch.zeros(2, *vae.latent_shape)).shape == (2, 9 * 64)
    assert vae.config["likelihood"] == {"class_path": "pyro_lvm.likelihoods.DiscretizedLogisticMixtureLikelihood",
                                        "init_args": {"event_shape": None, "num_components": 3, "levels": 256}}
    rebuilt = ConvVAE(**json.loads(json.dumps(vae.config)))  # what a checkpoint stores, and rebuilds from
    rebuilt.load_state_dict(vae.state_dict())
    assert rebuilt.config == vae.config
    named = ConvVAE([1, 8, 8], channels=[4], likelihood="categorical")
    assert named.config["likelihood"] == "categorical"


@pytest.mark.parametrize("kind", sorted(_NEW))
@pytest.mark.parametrize("model", ["conv", "conv_flat", "hierarchical"])
def test_models_with_the_new_likelihoods_train(kind, model):
    pyro.clear_param_store()
    torch.manual_seed(0)
    lik = _NEW[kind]()
    if model == "hierarchical":
        lvm = HierarchicalVAE([1, 8, 8], latent_dims=[4, 2], hidden_dims=[[16], [8]], likelihood=lik)
    else:
        lvm = ConvVAE([1, 8, 8], latent="spatial" if model == "conv" else "flat", latent_channels=2, latent_dim=4,
                      channels=[4], hidden_dim=16, likelihood=lik)
    assert lvm.likelihood is lik and lik.event_shape == (1, 8, 8)
    x = (torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) ** 2 * 255).round() / 255
    svi = pyro.infer.SVI(lvm.model, lvm.guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    losses = [svi.step(x) for _ in range(12)]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < losses[0]
    assert lvm.sample(2, mean=False).shape == (2, 1, 8, 8) and lvm.reconstruct(x[:2]).shape == (2, 1, 8, 8)


def test_a_conv_vaes_fast_step_with_the_mixture_gives_pyros_loss():
    torch.manual_seed(0)
    vae = ConvVAE([1, 8, 8], latent_channels=2, channels=[4], likelihood="discretized_logistic")
    x = _grid_data(5, 1, 8, 8).float()
    elbo = make_elbo("reparam")
    fast = FastLoss(vae, elbo)
    assert fast.closed_form or fast.particles
    torch.manual_seed(1)
    through_fast = fast(x)
    elbo.differentiable_loss(vae.model, vae.guide, x)
    torch.manual_seed(1)
    through_pyro = elbo.differentiable_loss(vae.model, vae.guide, x)
    assert torch.allclose(through_fast, through_pyro, rtol=1e-5, atol=1e-3)


def test_a_conditional_vae_scores_only_the_masked_pixels_with_the_new_likelihoods():
    y = _grid_data(3, 6).float()
    mask = torch.tensor([False, False, False, True, True, True]).expand(3, 6)
    x = y.masked_fill(mask, -1.0)
    for kind in ("discretized_logistic", "categorical"):
        cvae = ConditionalVAE(6, latent_dim=2, hidden_dims=[8], likelihood=kind)
        z = torch.zeros(3, 2)
        h = cvae.decoder_output(z, x)
        expected = cvae.likelihood.log_density(h, y)[:, 3:].sum(-1)
        assert torch.allclose(cvae._log_likelihood(x, y, mask, z), expected, atol=1e-5)
        assert cvae.predict(x, num_samples=2, mean=False).shape == (2, 3, 6)
