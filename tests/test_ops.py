"""pyro_lvm.ops, the shared maths, against torch's own distributions and direct formulas."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from pyro_lvm import ops


def test_log_mean_exp_is_stable_and_matches_the_direct_formula():
    v = torch.randn(7, 3, dtype=torch.float64)
    assert torch.allclose(ops.log_mean_exp(v, 0, keepdim=False), v.exp().mean(0).log())
    assert ops.log_mean_exp(v, 1).shape == (7, 1)
    big = torch.tensor([1000.0, 1000.0])  # exp overflows; the log-mean-exp does not
    assert float(ops.log_mean_exp(big, 0, keepdim=False)) == pytest.approx(1000.0)


def test_effective_sample_size_and_the_importance_stderr():
    k = 50
    assert float(ops.effective_sample_size(torch.zeros(k))) == pytest.approx(k)  # equal weights: all count
    assert float(ops.effective_sample_size(torch.tensor([0.0] + [-1e3] * (k - 1)))) == pytest.approx(1.0)
    log_w = torch.randn(k, 4, dtype=torch.float64)
    w = log_w.exp()
    assert torch.allclose(ops.effective_sample_size(log_w, 0), w.sum(0) ** 2 / (w**2).sum(0))
    streamed = ops.effective_sample_size_from_log_sums(torch.logsumexp(log_w, 0), torch.logsumexp(2 * log_w, 0))
    assert torch.allclose(streamed, ops.effective_sample_size(log_w, 0))
    ess = ops.effective_sample_size(log_w, 0)
    assert torch.allclose(ops.importance_stderr(ess, k), (1 / ess - 1 / k).sqrt())
    assert float(ops.importance_stderr(torch.tensor(float(k)), k)) == 0.0  # equal weights: no error


def test_gaussian_densities_and_kl_match_torch():
    x, loc, scale = torch.randn(5, 3), torch.randn(5, 3), torch.rand(5, 3) + 0.1
    assert torch.allclose(ops.normal_log_prob(x, loc, scale), Normal(loc, scale).log_prob(x), atol=1e-6)
    assert torch.allclose(ops.standard_normal_log_prob(x), Normal(0.0, 1.0).log_prob(x), atol=1e-6)
    assert torch.allclose(ops.standard_normal_kl(loc, scale), kl_divergence(Normal(loc, scale), Normal(0.0, 1.0)),
                          atol=1e-6)
    assert ops.HALF_LOG_2PI == pytest.approx(0.5 * math.log(2 * math.pi))


def test_surrogate_loss_has_one_value_and_the_others_gradient():
    a = torch.tensor(2.0, requires_grad=True)
    loss = ops.surrogate_loss(a**2, 3 * a)  # the loss -a^2, differentiated as -3a
    assert float(loss.detach()) == pytest.approx(-4.0)
    (grad,) = torch.autograd.grad(loss, a)
    assert float(grad) == pytest.approx(-3.0)


def test_sum_except_keeps_one_dimension():
    v = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(ops.sum_except(v, -2), v.sum((0, 2), keepdim=True))  # kept as size-1 dimensions
    assert torch.equal(ops.sum_except(v, -3), v.sum((1, 2), keepdim=True))
    assert torch.equal(ops.sum_except(v[0, 0], -1), v[0, 0])


def test_minimize_cosine_decays_the_rate_and_touches_no_other_gradient():
    target = torch.tensor([1.0, -2.0])
    w = torch.zeros(2, requires_grad=True)
    other = torch.ones(2, requires_grad=True)  # in the loss, not a leaf being optimized
    seen = []
    with torch.no_grad():  # autograd is on inside, whatever the caller's mode
        ops.minimize_cosine([w], lambda: ((w - target * other) ** 2).sum(), num_steps=400, lr=0.1,
                            before_step=seen.append)
    assert torch.allclose(w, target, atol=1e-3)
    assert other.grad is None
    assert seen == list(range(401))  # before every step and once after the last
