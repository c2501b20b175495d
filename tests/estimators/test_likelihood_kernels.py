"""The compiled, fused Bernoulli log-density equals Pyro's, and log_likelihood uses it safely."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lvm import VAE
from pyro_lvm import likelihoods
from pyro_lvm.diagnostics import log_likelihood
from pyro_lvm.likelihoods import BernoulliLikelihood, IndependentBernoulli, compiled_log_prob

torch.set_num_threads(1)


def _eager(logits, x, event_shape):
    return dist.Bernoulli(logits=logits).to_event(len(event_shape)).log_prob(x)


@pytest.mark.parametrize("event_shape", [(20,), (784,), (1, 28, 28), (3,)], ids=str)
def test_compiled_log_prob_equals_pyros(event_shape):
    torch.manual_seed(0)
    n = torch.Size(event_shape).numel()
    # logits from tiny to saturated: the max(l, 0) + log(1 + e^-|l|) split must hold everywhere
    h = torch.randn(4, 5, n) * torch.tensor([0.01, 1.0, 10.0, 60.0]).repeat_interleave(n // 4 + 1)[:n]
    x = torch.bernoulli(torch.full((5,) + event_shape, 0.4))
    lik = BernoulliLikelihood(event_shape)
    d = lik(h)
    assert isinstance(d, IndependentBernoulli) and d.event_shape == event_shape
    expected = _eager(h.reshape((4, 5) + event_shape), x, event_shape)
    with compiled_log_prob(strict=True), torch.no_grad():
        got = lik(h).log_prob(x)
    assert got.shape == (4, 5)
    assert torch.allclose(got, expected, rtol=0, atol=2e-6 * float(expected.abs().max()) + 1e-5)
    # where a gradient is needed, the eager kernel runs: the same numbers and autograd's graph
    h.requires_grad_()
    with compiled_log_prob(strict=True):
        with_grad = lik(h).log_prob(x)
    assert torch.equal(with_grad, _eager(h.reshape((4, 5) + event_shape), x, event_shape)) and with_grad.requires_grad


def test_outside_the_block_the_log_prob_is_pyros_bit_for_bit():
    h, x = torch.randn(3, 7), torch.bernoulli(torch.full((3, 7), 0.5))
    assert torch.equal(BernoulliLikelihood(7)(h).log_prob(x), _eager(h, x, (7,)))
    # the block restores the previous mode, also on an error
    with pytest.raises(KeyError):
        with compiled_log_prob():
            raise KeyError
    assert not likelihoods.bernoulli._Kernels.compiled


def test_compiled_log_likelihood_matches_the_eager_one():
    vae = VAE(data_shape=784, latent_dim=8, hidden_dims=[32])
    x = torch.bernoulli(torch.full((30, 784), 0.3))
    pyro.set_rng_seed(1)
    eager = log_likelihood(vae, x, num_particles=50, chunk_size=20, batch_size=16, compile=False)
    pyro.set_rng_seed(1)
    fused = log_likelihood(vae, x, num_particles=50, chunk_size=20, batch_size=16, compile=True)
    assert torch.allclose(fused.per_point, eager.per_point, rtol=0, atol=1e-3)
    assert not torch.equal(fused.per_point, eager.per_point)  # really another kernel: float32 rounding differs


def test_a_failed_compilation_falls_back_or_raises(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(likelihoods.bernoulli._Kernels, "fns", {})
    monkeypatch.setattr(likelihoods.bernoulli._Kernels, "failed", None)
    monkeypatch.setattr(torch, "compile", broken)
    vae = VAE(data_shape=12, latent_dim=2, hidden_dims=[8])
    x = torch.bernoulli(torch.full((6, 12), 0.5))
    pyro.set_rng_seed(2)
    expected = log_likelihood(vae, x, num_particles=10, compile=False).per_point
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler.*compile=False"):
        log_likelihood(vae, x, num_particles=10, compile=True)
    pyro.set_rng_seed(2)
    with compiled_log_prob():  # not strict: the eager kernel, the same numbers
        fallback = log_likelihood(vae, x, num_particles=10, compile=False).per_point
        assert torch.equal(fallback, expected)
        h = torch.zeros(2, 12)
        assert torch.equal(BernoulliLikelihood(12)(h).log_prob(x[:2]), _eager(h, x[:2], (12,)))
    assert "no C++ compiler" in likelihoods.bernoulli._Kernels.failed


def test_compile_argument_is_checked():
    vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8])
    with pytest.raises(ValueError, match="compile must be True, False or 'auto'"):
        log_likelihood(vae, torch.ones(2, 4), num_particles=2, compile="yes")


def test_every_batch_of_data_is_still_validated():
    """Pyro's checks are skipped only for a batch's later chunks: bad data in any batch is caught."""

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=z.sum(-1, keepdim=True).expand(z.shape[:-1] + (4,))).to_event(1),
                        obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    x = torch.bernoulli(torch.full((8, 4), 0.5))
    x[6, 1] = 0.5  # in the second batch of 4
    with pyro.validation_enabled(True):
        with pytest.raises(ValueError, match="support"):
            log_likelihood(model, guide, x, num_particles=6, chunk_size=2, batch_size=4)
        assert pyro.infer.util.is_validation_enabled()
