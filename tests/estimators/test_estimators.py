"""The estimators against closed forms on a linear-Gaussian model.

z ~ N(0, I_k), x | z ~ N(W z + b, s^2 I_d): log p(x) = log N(x | b, W W^T + s^2 I) and the
posterior is Gaussian, so the ELBO, its gap and its gradient are all known exactly.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from pyro_lvm.estimators import make_elbo

K, D, S = 2, 3, 0.7
# estimators of the ELBO itself (the others estimate the IWAE bound or a relaxation)
ELBO_FAMILY = ["analytic_kl", "reparam", "score_function", "stl"]


@pytest.fixture
def lg(linear_gaussian_model):
    torch.manual_seed(0)  # the Monte-Carlo estimates below are seeded by the test or by this
    model = linear_gaussian_model(K, D, S, seed=0)
    x = torch.randn(4, D, dtype=torch.float64)  # 4 data points in a plate
    return dict(W=model.W, b=model.b, x=x, model=model.model, log_px=model.log_evidence(x).sum(),
                posterior=model.posterior(x))


def diagonal_guide(loc, scale):
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return guide


def closed_form_elbo(lg, loc, scale, beta=1.0):
    """E_q[log p(x|z)] - beta KL(q || N(0, I)) for q = N(loc, diag scale^2), summed over data."""
    W, b, x = lg["W"], lg["b"], lg["x"]
    resid = x - loc @ W.T - b
    trace = ((W**2) @ (scale**2).T).T  # tr(W diag(v) W^T) per data point, summed over d below
    expected_loglik = (
        -0.5 * D * math.log(2 * math.pi * S**2) - 0.5 * ((resid**2).sum(-1) + trace.sum(-1)) / S**2
    )
    kl = 0.5 * (scale**2 + loc**2 - 1 - 2 * scale.log()).sum(-1)
    return (expected_loglik - beta * kl).sum(), kl.sum()


def mc_estimate(name, model, guide, x, repeats=20, num_particles=5000, **options):
    """Mean of independent ELBO estimates and its standard error."""
    elbo = make_elbo(
        name, num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1, **options
    )
    values = torch.tensor([-elbo.loss(model, guide, x) for _ in range(repeats)])
    return float(values.mean()), float(values.std() / repeats**0.5)


def random_guide_params():
    g = torch.Generator().manual_seed(1)
    loc = torch.randn(4, K, dtype=torch.float64, generator=g)
    scale = 0.3 + torch.rand(4, K, dtype=torch.float64, generator=g)
    return loc, scale


@pytest.mark.parametrize("name", ELBO_FAMILY)
def test_elbo_equals_log_evidence_minus_kl_to_posterior(lg, name):
    loc, scale = random_guide_params()
    q = MultivariateNormal(loc, torch.diag_embed(scale**2))
    gap = kl_divergence(q, lg["posterior"]).sum()
    pyro.set_rng_seed(0)
    estimate, se = mc_estimate(name, lg["model"], diagonal_guide(loc, scale), lg["x"])
    assert estimate < lg["log_px"]
    assert estimate == pytest.approx(float(lg["log_px"] - gap), abs=4 * se)
    assert float(gap) > 20 * se  # the gap is resolved, so the check is not vacuous


@pytest.mark.parametrize("name", ["reparam", "score_function", "stl", "iwae", "dreg", "vimco"])
def test_exact_posterior_guide_has_zero_gap(lg, name):
    posterior = lg["posterior"]

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(posterior.loc, posterior.covariance_matrix))

    # log p(x, z) - log q(z | x) = log p(x) for every z: one particle is exact
    estimate = -make_elbo(name, num_particles=3 if name == "vimco" else 1).loss(lg["model"], guide, lg["x"])
    assert estimate == pytest.approx(float(lg["log_px"]), abs=1e-8)


@pytest.mark.parametrize("name", ELBO_FAMILY)
def test_beta_scales_exactly_the_kl(lg, name):
    loc, scale = random_guide_params()
    guide = diagonal_guide(loc, scale)
    losses = {}
    for beta in (0.0, 1.0, 2.5):
        pyro.set_rng_seed(3)  # the same draws of z for every beta
        losses[beta] = make_elbo(name, beta=beta, num_particles=3).loss(lg["model"], guide, lg["x"])
    kl_hat = losses[1.0] - losses[0.0]
    assert losses[2.5] - losses[1.0] == pytest.approx(1.5 * kl_hat, rel=1e-9)
    _, kl = closed_form_elbo(lg, loc, scale)
    if name == "analytic_kl":
        assert kl_hat == pytest.approx(float(kl), rel=1e-9)
    # beta = 0 leaves only the reconstruction term: E_q log p(x|z)
    expected_loglik, _ = closed_form_elbo(lg, loc, scale, beta=0.0)
    pyro.set_rng_seed(3)
    estimate, se = mc_estimate(name, lg["model"], guide, lg["x"], beta=0.0)
    assert estimate == pytest.approx(float(expected_loglik), abs=4 * se)
    assert abs(float(expected_loglik) - float(closed_form_elbo(lg, loc, scale)[0])) > 20 * se


@pytest.mark.parametrize(
    "name, options",
    [
        ("reparam", {}),
        ("analytic_kl", {}),
        ("score_function", {"baseline": "none"}),
        ("score_function", {"baseline": "decaying_average"}),
        ("score_function", {"baseline": "nvil"}),
        ("stl", {}),
    ],
)
def test_gradient_is_unbiased_against_closed_form(lg, name, options):
    loc0, scale0 = random_guide_params()
    loc = loc0.clone().requires_grad_()
    log_scale = scale0.log().clone().requires_grad_()
    beta = 0.5

    exact, _ = closed_form_elbo(lg, loc, log_scale.exp(), beta=beta)
    exact_grad = torch.autograd.grad(-exact, [loc, log_scale])

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    elbo = make_elbo(
        name, beta=beta, num_particles=100_000, vectorize_particles=True, max_plate_nesting=1,
        **options,
    )
    grads = []
    for _ in range(2):  # the second call sees a non-zero decaying-average baseline
        loss = elbo.differentiable_loss(lg["model"], guide, lg["x"])
        grads.append(torch.autograd.grad(loss, [loc, log_scale]))
    for estimate in grads:
        for g, e in zip(estimate, exact_grad):
            # Monte-Carlo noise at 1e5 particles is ~1.5% of the gradient's norm here
            assert (g - e).norm() < 0.04 * e.norm(), (g, e)
    pyro.clear_param_store()


@pytest.mark.parametrize("name", ELBO_FAMILY)
def test_beta_scales_exactly_the_kl_gradient(lg, name):
    loc0, scale0 = random_guide_params()
    loc = loc0.clone().requires_grad_()
    guide = diagonal_guide(loc, scale0)
    options = {"baseline": "none"} if name == "score_function" else {}
    grads = {}
    for beta in (0.0, 1.0, 2.5):
        pyro.set_rng_seed(3)
        elbo = make_elbo(name, beta=beta, num_particles=3, **options)
        (grads[beta],) = torch.autograd.grad(elbo.differentiable_loss(lg["model"], guide, lg["x"]), [loc])
    kl_grad = grads[1.0] - grads[0.0]
    assert torch.allclose(grads[2.5] - grads[1.0], 1.5 * kl_grad, rtol=1e-8, atol=1e-10)
    if name == "analytic_kl":  # d/dloc KL(N(loc, s) || N(0, 1)) = loc
        assert torch.allclose(kl_grad, loc0, rtol=1e-8)


@pytest.mark.parametrize("name", ["score_function", "stl", "iwae", "dreg", "vimco"])
def test_loss_value_is_the_negative_bound(lg, name):
    # a point-mass guide makes every estimate deterministic: log p(x, z = loc) - log q; its constant density
    # (a Delta without one is refused by the score-function estimators: there is nothing to score)
    loc, _ = random_guide_params()

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(loc, log_density=torch.full(loc.shape, -0.5, dtype=loc.dtype)).to_event(1))

    elbo = make_elbo(name, num_particles=2)
    expected = make_elbo("reparam").loss(lg["model"], guide, lg["x"])
    assert float(elbo.differentiable_loss(lg["model"], guide, lg["x"])) == pytest.approx(expected, rel=1e-12)
    assert elbo.loss(lg["model"], guide, lg["x"]) == pytest.approx(expected, rel=1e-12)


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(ValueError, match="analytic_kl, dreg, enum, iwae, relaxed, reparam, score_function, stl, vimco"):
        make_elbo("reinforce")


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match="no option 'particles'.*num_particles"):
        make_elbo("reparam", particles=3)


def test_negative_beta_is_rejected():
    with pytest.raises(ValueError, match="beta must be >= 0"):
        make_elbo("reparam", beta=-0.1)
