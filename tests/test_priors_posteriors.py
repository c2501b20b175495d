"""Priors and posterior families as parts: densities against direct computations, samples against densities,
every combination with every estimator that applies, configurations that rebuild the model."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from jsonargparse import ArgumentParser
from pyro.distributions.transforms import conditional_affine_coupling, spline_coupling
from pyro.infer import SVI, Trace_ELBO

from pyro_lvm import VAE, diagnostics
from pyro_lvm.diagnostics.likelihood import log_likelihood
from pyro_lvm.estimators import make_elbo
from pyro_lvm.parts import CUSTOM, build_part
from pyro_lvm.posteriors import (
    DiagonalGaussian, FlowPosterior, FullGaussian, IAFPosterior, LowRankGaussian, Posterior, make_posterior)
from pyro_lvm.priors import FlowPrior, GaussianMixture, MixturePrior, Prior, StandardNormalPrior, VampPrior, make_prior

torch.set_num_threads(1)


def _perturb(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ----- priors ------------------------------------------------------------------------------------------------
def test_vamp_prior_is_the_mixture_of_the_posteriors_at_its_pseudo_inputs():
    torch.manual_seed(0)
    vae = VAE(data_shape=6, latent_dim=3, hidden_dims=[8], prior=VampPrior(num_pseudo_inputs=5)).double()
    _perturb(vae)
    z = torch.randn(7, 3, dtype=torch.float64)
    u = vae.prior_part.pseudo_inputs()
    assert u.shape == (5, 6) and float(u.detach().min()) >= 0 and float(u.detach().max()) <= 1  # hardtanh to the data's range
    by_hand = torch.stack([dist.Normal(*vae.encode(u[k:k + 1])).to_event(1).log_prob(z) for k in range(5)], -1)
    expected = torch.logsumexp(by_hand, -1) - math.log(5)
    torch.testing.assert_close(vae.prior(torch.Size([7])).log_prob(z), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(vae.written_out_prior()(z), expected, rtol=1e-10, atol=1e-10)
    # the pseudo-inputs are the prior's only own parameters, and they learn
    assert [n for n, _ in vae.prior_part.named_parameters()] == ["weight"]
    vae.prior(torch.Size([7])).log_prob(z).sum().backward()
    assert float(vae.prior_part.weight.grad.abs().sum()) > 0


def test_vamp_prior_over_a_flow_posterior_mixes_the_flow_posteriors():
    torch.manual_seed(1)
    vae = VAE(data_shape=5, latent_dim=2, hidden_dims=[8], prior=VampPrior(num_pseudo_inputs=3),
              posterior=IAFPosterior(num_layers=2, hidden=[8], context_dim=3)).double()
    _perturb(vae)
    z = torch.randn(4, 2, dtype=torch.float64)
    u = vae.prior_part.pseudo_inputs()
    by_hand = torch.stack([vae.posterior(u[k:k + 1].expand(4, 5)).log_prob(z) for k in range(3)], -1)
    torch.testing.assert_close(vae.prior(torch.Size([4])).log_prob(z), torch.logsumexp(by_hand, -1) - math.log(3))
    assert vae.written_out_prior() is None  # not a diagonal Gaussian posterior: through the distributions
    draws = vae.prior(torch.Size([2])).sample((3,))
    assert draws.shape == (3, 2, 2)
    # components="base": the mixture of the Gaussians before the flow
    vae.prior_part.components = "base"
    loc, scale, _ = vae.posterior_part.base(vae.encoder_output(u))
    by_hand = torch.stack([dist.Normal(loc[k], scale[k]).to_event(1).log_prob(z) for k in range(3)], -1)
    torch.testing.assert_close(vae.prior(torch.Size([4])).log_prob(z), torch.logsumexp(by_hand, -1) - math.log(3))
    with pytest.raises(ValueError, match="components='posterior'"):
        VAE(data_shape=5, latent_dim=2, posterior="full", prior=VampPrior(3, components="base")).prior()


def test_mixture_prior_matches_torchs_mixture_and_its_samples_its_moments():
    torch.manual_seed(2)
    prior = MixturePrior(num_components=3).bind(2, 4).double()
    _perturb(prior)
    mixture = prior.distribution(None)
    scale = torch.nn.functional.softplus(prior.raw_scale)
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=prior.logits),
        torch.distributions.Independent(torch.distributions.Normal(prior.loc, scale), 1))
    z = 3 * torch.randn(50, 2, dtype=torch.float64)
    torch.testing.assert_close(mixture.log_prob(z), reference.log_prob(z))
    torch.testing.assert_close(prior.log_density(None, z), reference.log_prob(z))
    draws = mixture.sample((200_000,))
    torch.testing.assert_close(draws.mean(0), reference.mean, atol=0.02, rtol=0)
    torch.testing.assert_close(draws.var(0), reference.variance, atol=0.05, rtol=0.02)


def test_gaussian_mixture_keeps_float32_precision_for_narrow_components_and_chunks_many_draws():
    # a trained encoder's posteriors are narrow (sigma ~ 0.005): the density must not lose nats to rounding
    g = torch.Generator().manual_seed(0)
    loc = 2 * torch.randn(500, 50, generator=g)
    scale = torch.empty(500, 50).uniform_(0.002, 0.01, generator=g)
    z = loc[torch.randint(500, (64,), generator=g)] + scale[:64] * torch.randn(64, 50, generator=g)
    exact = torch.logsumexp(dist.Normal(loc.double(), scale.double()).log_prob(z.double()[:, None]).sum(-1), -1)
    mixture = GaussianMixture(loc, scale)
    torch.testing.assert_close(mixture.log_prob(z).double(), exact - math.log(500), atol=2e-3, rtol=1e-5)
    mixture.chunk_elements = 500 * 50 * 3  # three draws at a time: the same numbers
    torch.testing.assert_close(mixture.log_prob(z).double(), exact - math.log(500), atol=2e-3, rtol=1e-5)


def test_gaussian_mixture_has_the_batch_shapes_pyro_expects():
    m = GaussianMixture(torch.zeros(3, 2), torch.ones(3, 2), batch_shape=torch.Size([4]))
    assert m.batch_shape == (4,) and m.event_shape == (2,)
    assert m.log_prob(torch.zeros(5, 1, 2)).shape == (5, 4)
    assert m.expand(torch.Size([2, 4])).sample().shape == (2, 4, 2)
    assert m.sample((6,)).shape == (6, 4, 2)


def test_flow_prior_takes_pyros_own_transforms():
    torch.manual_seed(3)
    flow = spline_coupling(2, hidden_dims=[8])
    vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8], prior=FlowPrior(flow))
    assert vae.prior_flow is flow and vae.config["prior"] == CUSTOM
    x = torch.bernoulli(torch.full((6, 4), 0.5))
    loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in flow.parameters())
    # the density is the change of variables through Pyro's spline
    z = torch.randn(5, 2)
    u = flow.inv(z)
    expected = dist.Normal(0.0, 1.0).log_prob(u).sum(-1) - flow.log_abs_det_jacobian(u, z)
    torch.testing.assert_close(vae.prior(torch.Size([5])).log_prob(z), expected, atol=1e-5, rtol=1e-5)


# ----- posteriors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", [LowRankGaussian(rank=2), FullGaussian()], ids=["low_rank", "full"])
def test_gaussian_posteriors_draw_from_their_stated_covariance(family):
    torch.manual_seed(4)
    q = family.bind(3)
    h = torch.randn(q.head_dim, dtype=torch.float64)
    d = q.distribution(h)
    draws = d.rsample((200_000,))
    cov = torch.cov(draws.T)
    torch.testing.assert_close(draws.mean(0), d.loc, atol=0.02, rtol=0)
    torch.testing.assert_close(cov, d.covariance_matrix, atol=0.03, rtol=0.03)
    loc, spread = q.summary(h)
    torch.testing.assert_close(spread, d.covariance_matrix.diagonal().sqrt())
    # the density integrates the draws' histogram: the mean log-density is minus the entropy
    assert float(d.log_prob(draws).mean()) == pytest.approx(-float(d.entropy()), abs=0.02)


@pytest.mark.parametrize("family", [LowRankGaussian(rank=1), FullGaussian()], ids=["low_rank", "full"])
def test_kl_of_correlated_gaussians_to_the_standard_normal_is_registered_in_closed_form(family):
    torch.manual_seed(5)
    q = family.bind(3).distribution(torch.randn(4, family.head_dim, dtype=torch.float64))
    p = dist.Normal(torch.zeros(4, 3, dtype=torch.float64), 1.0).to_event(1)
    reference = torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(q.loc, q.covariance_matrix),
        torch.distributions.MultivariateNormal(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)))
    torch.testing.assert_close(pyro.distributions.kl.kl_divergence(q, p), reference)
    # and against a diagonal Gaussian that is not standard
    p2 = dist.Normal(torch.ones(4, 3, dtype=torch.float64), 2.0).to_event(1)
    reference2 = torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(q.loc, q.covariance_matrix),
        torch.distributions.MultivariateNormal(torch.ones(3, dtype=torch.float64), 4 * torch.eye(3, dtype=torch.float64)))
    torch.testing.assert_close(pyro.distributions.kl.kl_divergence(q, p2), reference2)


def test_a_flow_posterior_takes_pyros_conditional_and_plain_transforms():
    torch.manual_seed(6)
    x = torch.bernoulli(torch.full((6, 4), 0.5))
    conditional = conditional_affine_coupling(2, context_dim=5, hidden_dims=[8])
    vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8], posterior=FlowPosterior(conditional, context_dim=5))
    assert vae.posterior_part.head_dim == 9 and vae.config["posterior"] == CUSTOM
    Trace_ELBO().differentiable_loss(vae.model, vae.guide, x).backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in conditional.parameters())
    shared = spline_coupling(2, hidden_dims=[8])  # not conditioned on x: one flow after every Gaussian
    vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8], posterior=FlowPosterior(shared))
    assert vae.posterior_part.head_dim == 4
    q = vae.posterior(x)
    z = q.rsample()
    u = shared.inv(z)
    loc, scale, _ = vae.posterior_part.base(vae.encoder_output(x))
    expected = dist.Normal(loc, scale).to_event(1).log_prob(u) - shared.log_abs_det_jacobian(u, z)
    torch.testing.assert_close(q.log_prob(z), expected, atol=1e-5, rtol=1e-5)


def test_a_wrong_encoder_size_is_named_with_the_fix():
    vae = VAE(data_shape=4, latent_dim=2, posterior="full", encoder=torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match="needs 5 encoder outputs per data point; the encoder gives 3.*out_dim=5"):
        vae.posterior(torch.zeros(1, 4))


# ----- every combination with every estimator that applies ---------------------------------------------------
PRIORS = {"standard_normal": StandardNormalPrior, "vamp": lambda: VampPrior(num_pseudo_inputs=4),
          "mixture": lambda: MixturePrior(num_components=3), "realnvp": lambda: FlowPrior("realnvp", 2, [8])}
POSTERIORS = {"diagonal": DiagonalGaussian, "low_rank": LowRankGaussian, "full": FullGaussian,
              "iaf": lambda: IAFPosterior(num_layers=2, hidden=[8], context_dim=4)}
ESTIMATORS = ["reparam", "analytic_kl", "stl", "iwae", "dreg", "score_function"]


def _applies(prior: str, posterior: str, estimator: str) -> bool:
    return estimator != "analytic_kl" or (prior == "standard_normal" and posterior != "iaf")


@pytest.mark.parametrize("posterior", POSTERIORS)
@pytest.mark.parametrize("prior", PRIORS)
def test_every_prior_and_posterior_trains_with_every_estimator_that_applies(prior, posterior):
    x = torch.bernoulli(torch.full((8, 6), 0.4), generator=torch.Generator().manual_seed(0))
    for estimator in ESTIMATORS:
        pyro.clear_param_store()
        torch.manual_seed(0)
        vae = VAE(data_shape=6, latent_dim=2, hidden_dims=[8], prior=PRIORS[prior](), posterior=POSTERIORS[posterior]())
        options = {"num_particles": 3} if estimator in ("iwae", "dreg") else {}
        elbo = make_elbo(estimator, **options)
        if not _applies(prior, posterior, estimator):
            with pytest.raises(ValueError, match="analytic_kl"):
                elbo.check(vae.model, vae.guide, x)
            continue
        elbo.check(vae.model, vae.guide, x)
        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
        before = {n: p.detach().clone() for n, p in vae.named_parameters()}
        losses = [svi.step(x) for _ in range(3)]
        assert all(math.isfinite(v) for v in losses), (estimator, losses)
        moved = {n for n, p in vae.named_parameters() if not torch.equal(before[n], p)}
        for part in ("prior_part", "posterior_part", "encoder", "decoder"):
            owned = {n for n in before if n.startswith(part)}
            assert owned <= moved, (estimator, part, owned - moved)


@pytest.mark.parametrize("prior, posterior", [("vamp", "diagonal"), ("mixture", "full"), ("standard_normal", "iaf")])
def test_diagnostics_take_the_parts(prior, posterior):
    torch.manual_seed(0)
    vae = VAE(data_shape=6, latent_dim=2, hidden_dims=[8], prior=PRIORS[prior](), posterior=POSTERIORS[posterior]())
    x = torch.bernoulli(torch.full((5, 6), 0.4), generator=torch.Generator().manual_seed(1))
    result = log_likelihood(vae, x=x, num_particles=64, compile=False)
    elbo = -Trace_ELBO(num_particles=200, vectorize_particles=True).loss(vae.model, vae.guide, x) / len(x)
    assert float(result.mean) >= elbo - 0.1  # the importance-sampled bound lies above the ELBO
    # and every diagnostic that reads a pair reads this one
    assert diagnostics.evaluate(vae, x, num_particles=16).num_points == len(x)
    assert diagnostics.psis_khat(vae, x=x, num_particles=32).shape == (len(x),)
    assert len(diagnostics.amortization_gap(vae, x=x, num_steps=3, eval_particles=16).table) == len(x)
    assert "z" in diagnostics.to_inference_data(vae, x=x, num_samples=5).posterior
    assert diagnostics.sbc(vae, num_simulations=4, num_draws=19, x=x).ranks.shape == (4, 2)


# ----- configurations ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("prior", ["standard_normal", "vamp", "mixture", "realnvp", "nice"])
@pytest.mark.parametrize("posterior", ["diagonal", "low_rank", "full", "iaf", "coupling"])
def test_every_part_round_trips_through_its_configuration(prior, posterior):
    vae = VAE(data_shape=6, latent_dim=2, hidden_dims=[8], prior=prior, posterior=posterior, flow_layers=2)
    twin = VAE(**vae.config)
    assert type(twin.prior_part) is type(vae.prior_part) and type(twin.posterior_part) is type(vae.posterior_part)
    assert twin.prior_part.config == vae.prior_part.config and twin.posterior_part.config == vae.posterior_part.config
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in vae.state_dict().items()}


def test_parts_are_built_from_yaml_by_class_path():
    parser = ArgumentParser()
    parser.add_class_arguments(VAE, "model")
    config = parser.parse_string("""
model:
  data_shape: 6
  latent_dim: 3
  hidden_dims: [8]
  prior: {class_path: pyro_lvm.priors.VampPrior, init_args: {num_pseudo_inputs: 7}}
  posterior: {class_path: pyro_lvm.posteriors.IAFPosterior, init_args: {num_layers: 2, hidden: [8]}}
""")
    vae = parser.instantiate(config)["model"]
    assert isinstance(vae.prior_part, VampPrior) and vae.prior_part.num_pseudo_inputs == 7
    assert isinstance(vae.posterior_part, IAFPosterior) and len(list(vae.posterior_flow)) == 3
    assert vae.config["prior"] == {"class_path": "pyro_lvm.priors.VampPrior",
                                   "init_args": {"num_pseudo_inputs": 7, "init_mean": 0.05, "init_std": 0.01,
                                                 "lower": 0.0, "upper": 1.0, "components": "posterior"}}


def test_configurations_build_pyro_lvms_parts_only_and_name_the_problem():
    with pytest.raises(ValueError, match="pyro_lvm only"):
        build_part({"class_path": "os.system", "init_args": {}}, Prior, "prior", "pyro_lvm.priors.VampPrior")
    with pytest.raises(ValueError, match="is not a prior"):
        build_part({"class_path": "pyro_lvm.posteriors.FullGaussian"}, Prior, "prior", "pyro_lvm.priors.VampPrior")
    with pytest.raises(ValueError, match="no configuration rebuilds"):
        VAE(data_shape=4, prior=CUSTOM)
    with pytest.raises(ValueError, match="Unknown prior 'vampire'.*'vamp'"):
        make_prior("vampire")
    with pytest.raises(ValueError, match="Unknown posterior 'fullcov'.*'full'"):
        make_posterior("fullcov")
    with pytest.raises(ValueError, match="Give the prior once"):
        VAE(data_shape=4, prior="vamp", prior_flow="realnvp")
    shared = VampPrior(3)
    VAE(data_shape=4, latent_dim=2, prior=shared)
    with pytest.raises(ValueError, match="already part of a model"):
        VAE(data_shape=5, latent_dim=2, prior=shared)
    with pytest.raises(RuntimeError, match="not bound to a model"):
        VampPrior(3).pseudo_inputs()
    assert isinstance(make_posterior("iaf"), Posterior)
