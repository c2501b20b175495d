"""Pareto k-hat of the importance weights against the Gaussian theory, and the ArviZ export.

One-dimensional linear-Gaussian model z ~ N(0, 1), x | z ~ N(w z, s^2): the posterior is
N(sigma_p^2 w x / s^2, sigma_p^2) with sigma_p^2 = 1 / (1 + w^2 / s^2). A guide with the
posterior's mean and variance sigma_q^2 = sigma_p^2 / c has weights
w(z) ~ exp(z^2 (1/sigma_q^2 - 1/sigma_p^2) / 2), z ~ N(0, sigma_q^2), whose tail is
P(w > t) ~ t^(-1/k) (up to a slowly varying factor) with k = 1 - sigma_q^2 / sigma_p^2 = 1 - 1/c
for c > 1 (too narrow), and bounded weights (k <= 0) for c <= 1. What the tests rely on: the
PSIS estimate at 2000 draws tracks this k on average over 20 data points to within 0.15
(it runs low for heavy tails: the slowly varying factor), with a spread of about 0.2 per point.
"""

import warnings

import matplotlib

matplotlib.use("Agg")

import arviz as az  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from pyro_lvm.diagnostics import psis_khat, psislw, to_inference_data  # noqa: E402

torch.set_num_threads(1)

W, S = 1.3, 0.8
VAR_P = 1 / (1 + W**2 / S**2)


def model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        pyro.sample("x", dist.Normal(W * z, S), obs=x)


def guide_for(c):
    """The posterior's mean with variance VAR_P / c (c = 1: the exact posterior)."""

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(VAR_P * W * x / S**2, (VAR_P / c) ** 0.5))

    return guide


@pytest.fixture(scope="module")
def x():
    return torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def test_psislw_shim_matches_arviz_023(x):
    assert int(az.__version__.split(".")[0]) == 0  # the path tested here
    lw = np.random.default_rng(0).standard_normal((3, 500)) * 2
    smoothed, khat = psislw(lw)
    expected_lw, expected_k = az.psislw(lw, reff=1.0)
    np.testing.assert_allclose(khat, expected_k)
    np.testing.assert_allclose(smoothed, expected_lw)
    assert khat.shape == (3,)


def test_exact_posterior_gives_khat_below_half(x):
    pyro.set_rng_seed(0)
    khat = psis_khat(model, guide_for(1.0), x, num_particles=1000)
    assert khat.shape == (20,)
    assert (khat < 0.5).all()


def test_psislw_of_equal_weights_is_minus_infinity():
    lw = np.stack([np.full(200, -3.0), np.random.default_rng(1).standard_normal(200)])
    smoothed, khat = psislw(lw)
    assert khat[0] == -np.inf and np.isfinite(khat[1])
    np.testing.assert_allclose(np.exp(smoothed).sum(-1), 1.0)


@pytest.mark.parametrize("c", [1.25, 2.0, 10.0])
def test_khat_of_too_narrow_guide_follows_gaussian_theory(x, c):
    pyro.set_rng_seed(0)
    khat = psis_khat(model, guide_for(c), x, num_particles=2000, chunk_size=700, batch_size=8)
    theory = 1 - 1 / c
    assert float(khat.mean()) == pytest.approx(theory, abs=0.15)
    if theory > 0.7:  # the guide misses posterior mass: flagged
        assert float(khat.mean()) > 0.7 and float(khat.median()) > 0.7
    if theory < 0.5:
        assert float(khat.mean()) < 0.5


def test_too_wide_guide_gives_bounded_weights(x):
    pyro.set_rng_seed(0)
    assert (psis_khat(model, guide_for(0.5), x, num_particles=1000) < 0).all()


def test_psis_khat_rejects_one_particle(x):
    with pytest.raises(ValueError, match="num_particles >= 2"):
        psis_khat(model, guide_for(1.0), x, num_particles=1)


def test_to_inference_data_groups_dims_and_summary_match_the_guide():
    loc = torch.tensor([[0.5, -1.0], [2.0, 0.0], [-0.3, 0.3]], dtype=torch.float64)
    scale = torch.tensor([0.2, 0.7], dtype=torch.float64)

    def model2(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide2(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x, scale).to_event(1))  # q(z | x) = N(x, diag scale^2)

    x = loc
    pyro.set_rng_seed(0)
    num, chains = 2000, 4
    idata = to_inference_data(model2, guide2, x, num_samples=num // chains, num_chains=chains, chunk_size=600,
                              batch_size=2)
    assert set(idata.groups()) == {"posterior", "log_likelihood", "sample_stats", "observed_data"}
    assert dict(idata.posterior["z"].sizes) == {"chain": chains, "draw": num // chains, "obs": 3, "z_dim": 2}
    assert dict(idata.log_likelihood["x"].sizes) == {"chain": chains, "draw": num // chains, "obs": 3}
    assert dict(idata.sample_stats["log_weight"].sizes) == {"chain": chains, "draw": num // chains, "obs": 3}
    assert dict(idata.sample_stats["khat"].sizes) == {"obs": 3}
    np.testing.assert_array_equal(idata.observed_data["x"].values, x.numpy())
    # log_weight = log p(x | z) + log p(z) - log q(z | x), draw by draw
    z = torch.as_tensor(idata.posterior["z"].values.reshape(num, 3, 2))
    log_prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_q = dist.Normal(loc, scale).log_prob(z).sum(-1)
    log_lik = torch.as_tensor(idata.log_likelihood["x"].values.reshape(num, 3))
    log_weight = torch.as_tensor(idata.sample_stats["log_weight"].values.reshape(num, 3))
    assert torch.allclose(log_weight, log_lik + log_prior - log_q)
    assert torch.allclose(log_lik, dist.Normal(z, 1.0).log_prob(x).sum(-1))
    assert not torch.allclose(log_lik, log_prior)

    summary = az.summary(idata, round_to="none")
    # independent draws in independent chains: R-hat near 1, ESS near the number of draws
    assert (np.abs(summary["r_hat"].to_numpy() - 1) < 0.01).all()
    assert (summary["ess_bulk"].to_numpy() > 0.7 * num).all()
    means = summary["mean"].to_numpy().reshape(3, 2)
    sds = summary["sd"].to_numpy().reshape(3, 2)
    se = scale.numpy() / num**0.5
    assert (np.abs(means - loc.numpy()) < 4 * se).all()
    np.testing.assert_allclose(sds, np.broadcast_to(scale.numpy(), (3, 2)), rtol=0.1)

    with warnings.catch_warnings():
        # arviz 0.23 calls a matplotlib API that matplotlib 3.11 deprecates: not ours
        warnings.simplefilter("ignore", matplotlib.MatplotlibDeprecationWarning)
        az.plot_posterior(idata, var_names=["z"], coords={"obs": [0]})
        az.plot_khat(idata.sample_stats["khat"].values)
    plt.close("all")
    with warnings.catch_warnings():
        # the harmonic-mean use of PSIS-LOO (see to_inference_data): its k-hat may warn
        warnings.simplefilter("ignore", UserWarning)
        loo = az.loo(idata, pointwise=True)
    assert loo["loo_i"].shape == (3,)


def test_exact_guide_in_float32_has_equal_weights_not_a_noise_tail(x):
    # the weights of the exact posterior differ by float32 rounding only: k-hat is -inf (bounded
    # weights), not a Pareto fit to the rounding noise
    pyro.set_rng_seed(0)
    khat = psis_khat(model, guide_for(1.0), x.float(), num_particles=1000)
    assert torch.isneginf(khat).all()
    # a guide only 1% too narrow is not exact: its weights have a real (light) tail
    assert torch.isfinite(psis_khat(model, guide_for(1.01), x.float(), num_particles=1000)).all()
