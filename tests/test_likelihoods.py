"""pyro_lvm.likelihoods against closed forms and direct computations."""

import copy

import pytest
import torch

from pyro_lvm import VAE, LVMModule
from pyro_lvm.likelihoods import ContinuousBernoulliLikelihood, continuous_bernoulli_log_norm, make_likelihood
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
