"""Estimators for discrete latents against the exactly enumerated ELBO and IWAE bound.

c_i ~ Categorical(pi) (one-hot, C classes), x_i | c_i ~ N(mu . c_i, 1). With
q(c_i | x_i) = Categorical(softmax(theta_i)) the ELBO is a finite sum, so its gradient
is exact. The guide's logits are repeated R times along the data plate: one call
gives R independent gradient draws.
"""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lvm.estimators import make_elbo

C, N = 3, 2
PI = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
MU = torch.tensor([-2.0, 0.0, 2.5], dtype=torch.float64)
X = torch.tensor([0.7, -1.5], dtype=torch.float64)
THETA = torch.tensor([[0.3, -0.2, 0.5], [1.0, 0.1, -0.7]], dtype=torch.float64)


def model(x):
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.OneHotCategorical(PI))
        pyro.sample("x", dist.Normal(c @ MU, 1.0), obs=x)


def make_guide(theta):
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.OneHotCategorical(logits=theta))

    return guide


def log_joint():
    """log p(x_i, c) for every data point and class: (N, C)."""
    return PI.log() + dist.Normal(MU, 1.0).log_prob(X[:, None])


def exact_elbo(theta):
    log_q = theta.log_softmax(-1)
    return (log_q.exp() * (log_joint() - log_q)).sum()


def exact_iwae(theta, k):
    """E over all C**k tuples of particles of log mean_j w_j, summed over data points."""
    log_q = theta.log_softmax(-1)
    log_w = log_joint() - log_q
    total = 0.0
    for tup in itertools.product(range(C), repeat=k):
        idx = torch.tensor(tup)
        prob = log_q[:, idx].sum(-1).exp()
        total = total + (prob * (torch.logsumexp(log_w[:, idx], -1) - math.log(k))).sum()
    return total


def exact_gradient(objective):
    theta = THETA.clone().requires_grad_()
    (grad,) = torch.autograd.grad(objective(theta), theta)
    return grad


def gradient_draws(name, replicas, k=1, **options):
    theta = THETA.repeat(replicas, 1).requires_grad_()
    loss = make_elbo(name, num_particles=k, **options).differentiable_loss(
        model, make_guide(theta), X.repeat(replicas)
    )
    (grad,) = torch.autograd.grad(-loss, theta)
    grad = grad.reshape(replicas, N, C)
    return grad.mean(0), grad.std(0) / replicas**0.5


@pytest.mark.parametrize(
    "name, options",
    [
        ("score_function", {"baseline": "none"}),
        ("score_function", {"baseline": "decaying_average"}),
        ("score_function", {"baseline": "nvil"}),
        ("reparam", {}),  # Pyro's fallback to the score function for a discrete site
    ],
)
def test_score_function_gradients_are_unbiased(name, options):
    pyro.set_rng_seed(0)
    exact = exact_gradient(exact_elbo)
    mean, se = gradient_draws(name, 50_000, **options)
    z = (mean - exact) / se
    assert z.abs().max() < 4.5, z


def test_enumeration_is_exact():
    theta = THETA.clone().requires_grad_()
    loss = make_elbo("enum").differentiable_loss(model, make_guide(theta), X)
    assert float(-loss.detach()) == pytest.approx(float(exact_elbo(THETA)), rel=1e-12)
    (grad,) = torch.autograd.grad(-loss, theta)
    assert torch.allclose(grad, exact_gradient(exact_elbo), rtol=1e-10)


@pytest.mark.parametrize("k", [2, 4])
def test_vimco_gradient_is_unbiased_for_the_iwae_bound(k):
    pyro.set_rng_seed(1)
    exact = exact_gradient(lambda theta: exact_iwae(theta, k))
    mean, se = gradient_draws("vimco", 50_000, k=k)
    z = (mean - exact) / se
    assert z.abs().max() < 4.5, z
    # and the value is the IWAE bound
    pyro.set_rng_seed(2)
    values = torch.tensor(
        [-make_elbo("vimco", num_particles=k).loss(model, make_guide(THETA), X) for _ in range(400)]
    )
    se = values.std() / 20
    assert float(values.mean()) == pytest.approx(float(exact_iwae(THETA, k)), abs=4 * float(se))


def test_relaxed_gradient_bias_shrinks_with_the_temperature():
    pyro.set_rng_seed(3)
    exact = exact_gradient(exact_elbo)
    bias = {}
    for temperature in (2.0, 0.5, 0.1):
        mean, se = gradient_draws("relaxed", 50_000, temperature=temperature)
        bias[temperature] = float((mean - exact).norm())
    assert bias[0.1] < bias[0.5] < bias[2.0], bias
    assert bias[0.1] < 0.25 * bias[2.0], bias
