"""Amortization gap, NUTS comparison and SBC against the linear-Gaussian model's exact posterior.

z ~ N(0, I_K), x | z ~ N(W z + b, s^2 I_D): the posterior is N(A (x - b), Sigma) with precision
Lambda = I + W^T W / s^2, Sigma = Lambda^-1, A = Sigma W^T / s^2, and p(x) = N(b, W W^T + s^2 I).
With orthogonal columns of W, Sigma is diagonal: the exact posterior is in the mean-field
family, the approximation gap is 0 and the amortization gap of an encoder N(m + delta, c^2 Sigma)
is KL(q || posterior) = sum_d [delta_d^2 / (2 Sigma_dd) + (c^2 - 1) / 2 - log c]. Otherwise the
best mean-field Gaussian has the exact means and variances 1 / Lambda_dd, and the approximation
gap is KL = (sum_d log Lambda_dd - log det Lambda) / 2.
"""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from linear_gaussian import LinearGaussian as Exact  # noqa: E402

from pyro_lvm import VAE  # noqa: E402
from pyro_lvm.models import DiscreteVAE  # noqa: E402
from pyro_lvm.likelihoods import GaussianLikelihood  # noqa: E402
from pyro_lvm.models.base import LatentVariableModel  # noqa: E402
from pyro_lvm.diagnostics import (  # noqa: E402
    amortization_gap, compare_with_nuts, plot_sbc, sbc, wasserstein_1d,
)

torch.set_num_threads(1)

K, D, S = 2, 4, 0.6


class LinearGaussian(LatentVariableModel):
    """z ~ N(0, I), x | z ~ N(W z + b, S^2 I); encoder N(A (x - b) + shift, (c * sd)^2), sd the exact posterior's."""

    def __init__(self, W, b, shift=0.0, c=1.0):
        super().__init__()
        self.latent_shape, self.event_shape = torch.Size([K]), torch.Size([D])
        self.likelihood = GaussianLikelihood(D, scale=S).double()
        self.likelihood.fixed_scale.fill_(S)  # the float32 0.6 is not the float64 one
        self.decoder = nn.Linear(K, D).double()
        self.encoder = nn.Linear(D, K).double()
        exact = Exact(W, b, S)
        self.cov, self.precision, self.marginal = exact.post_cov, exact.precision, exact.marginal
        A = self.cov @ W.T / S**2
        with torch.no_grad():
            self.decoder.weight.copy_(W)
            self.decoder.bias.copy_(b)
            self.encoder.weight.copy_(A)
            self.encoder.bias.copy_(-A @ b + shift)
        self.register_buffer("enc_scale", c * self.cov.diagonal().sqrt())
        self.W, self.b = W, b

    def encode(self, x):
        loc = self.encoder(x)
        return loc, self.enc_scale.expand_as(loc)

    def decoder_output(self, z):
        return self.decoder(z)

    def posterior_mean(self, x):
        return (x - self.b) @ (self.cov @ self.W.T / S**2).T


def weights(orthogonal):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(D, K, dtype=torch.float64, generator=g)
    if orthogonal:
        q, _ = torch.linalg.qr(W)
        W = q * torch.tensor([1.5, 0.8], dtype=torch.float64)
    else:  # nearly parallel columns: a strongly correlated posterior
        W = torch.stack([W[:, 0], 0.9 * W[:, 0] + 0.3 * W[:, 1]], 1)
    b = torch.randn(D, dtype=torch.float64, generator=g)
    return W, b


def data(model, n, seed=2):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, D, dtype=torch.float64, generator=g)
    return noise @ torch.linalg.cholesky(model.marginal.covariance_matrix).T + model.b


# ----- amortization gap ------------------------------------------------------------------

def test_exact_encoder_has_no_amortization_or_approximation_gap():
    model = LinearGaussian(*weights(orthogonal=True))
    x = data(model, 6)
    pyro.set_rng_seed(0)
    gaps = amortization_gap(model, x, num_steps=50, eval_particles=200, log_likelihood_particles=50)
    table = gaps.table
    exact = model.marginal.log_prob(x).numpy()
    # exact posterior: every log weight equals log p(x), for both guides
    np.testing.assert_allclose(table["elbo_amortized"], exact, atol=1e-8)
    np.testing.assert_allclose(table["log_likelihood_guide"], exact, atol=1e-8)
    # the refinement starts at the optimum; Adam's steps of about lr * g / (|g| + 1e-8) move it
    # by ~1e-4 (round-off gradients), a second-order change of the ELBO: zero within its MC error
    gap, stderr = table["amortization_gap"], table["amortization_gap_stderr"]
    assert (np.abs(gap) < 4 * stderr + 1e-8).all() and (np.abs(gap) < 1e-3).all()
    # log p(x) from the proposal with constant log weights: exact
    np.testing.assert_allclose(table["log_likelihood"], exact, atol=1e-8)
    np.testing.assert_allclose(table["log_likelihood_stderr"], 0.0, atol=1e-6)
    np.testing.assert_allclose(table["approximation_gap"], 0.0, atol=1e-3)
    assert gaps.same_family and torch.allclose(gaps.loc["z"], model.encode(x)[0], atol=1e-2)


def test_wrong_encoder_amortization_gap_is_its_kl_and_closes():
    W, b = weights(orthogonal=True)
    shift, c = torch.tensor([0.5, -0.3], dtype=torch.float64), 0.6
    model = LinearGaussian(W, b, shift=shift, c=c)
    x = data(model, 8)
    pyro.set_rng_seed(0)
    gaps = amortization_gap(model, x, num_steps=400, lr=0.02, eval_particles=2000, log_likelihood_particles=2000)
    table = gaps.table
    var = model.cov.diagonal()
    kl = float((shift**2 / (2 * var)).sum() + K * ((c**2 - 1) / 2 - np.log(c)))
    assert kl > 0.5
    # per point, the gap is KL(q || posterior), up to Monte-Carlo error and the finite optimization
    np.testing.assert_allclose(table["amortization_gap"], kl, atol=0.02 * kl + 4 * table["amortization_gap_stderr"].max())
    exact = model.marginal.log_prob(x).numpy()
    np.testing.assert_allclose(table["elbo_optimized"], exact, atol=0.01)
    np.testing.assert_allclose(table["approximation_gap"], 0.0, atol=0.01)
    np.testing.assert_allclose(table["log_likelihood"], exact, atol=0.01)
    assert (table["log_likelihood"] <= exact + 1e-3).all()
    # the optimized q_i is the exact posterior
    assert torch.allclose(gaps.loc["z"], model.posterior_mean(x), atol=0.02)
    assert torch.allclose(gaps.scale["z"], var.sqrt().expand_as(gaps.scale["z"]), rtol=0.03)
    # the curve: starts at the amortized gap, ends near zero, decreasing on the whole
    history = gaps.history
    assert history["step"].iloc[0] == 0 and history["step"].iloc[-1] == 400
    assert history["inference_gap"].iloc[0] == pytest.approx(kl, rel=0.15)
    assert history["inference_gap"].iloc[-1] < 0.02 * kl
    closing = history["inference_gap"].to_numpy()
    assert (np.diff(closing[:4]) < 0).all() and (closing[4:] < 0.1 * kl).all()


def test_correlated_posterior_has_the_mean_field_approximation_gap():
    # an encoder twice as wide as the marginals covers the posterior: its IWAE estimate is reliable
    model = LinearGaussian(*weights(orthogonal=False), c=2.0)
    x = data(model, 6)
    pyro.set_rng_seed(0)
    gaps = amortization_gap(model, x, num_steps=400, lr=0.05, eval_particles=2000, log_likelihood_particles=3000)
    lam = model.precision
    expected = 0.5 * float(lam.diagonal().log().sum() - torch.logdet(lam))
    assert expected > 0.1
    # the optimum: exact means, variances 1 / Lambda_dd
    assert torch.allclose(gaps.scale["z"], lam.diagonal().rsqrt().expand_as(gaps.scale["z"]), rtol=0.05)
    # (the means converge slowly along the posterior's long axis: the ELBO is flat there)
    assert torch.allclose(gaps.loc["z"], model.posterior_mean(x), atol=0.1)
    exact = model.marginal.log_prob(x).numpy()
    table = gaps.table
    # per point within the Monte-Carlo error of 2000 draws (log w varies here: sd about 0.5)
    np.testing.assert_allclose(exact - table["elbo_optimized"], expected, atol=0.06)
    assert float((exact - table["elbo_optimized"]).mean()) == pytest.approx(expected, abs=0.025)
    # the IWAE estimate of log p(x) is close to the truth, so the approximation gap is the KL
    error = np.abs(table["log_likelihood"] - exact)
    assert (error < 4 * table["log_likelihood_stderr"] + 1e-3).all() and (error < 0.1).all()
    np.testing.assert_allclose(table["approximation_gap"], expected, atol=0.15)
    assert float(table["approximation_gap"].mean()) == pytest.approx(expected, abs=0.05)


def test_amortization_gap_refuses_bad_arguments():
    with pytest.raises(ValueError, match="needs a guide: pass guide="):
        amortization_gap(lambda x: None, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="eval_particles >= 2; got 1"):
        amortization_gap(LinearGaussian(*weights(True)), torch.zeros(2, D, dtype=torch.float64), eval_particles=1)
    with pytest.raises(ValueError, match="lr="):
        amortization_gap(LinearGaussian(*weights(True)), torch.zeros(2, D, dtype=torch.float64), lr=0.0)


@pytest.mark.parametrize("check", [amortization_gap, compare_with_nuts])
def test_gap_and_nuts_refuse_a_discrete_latent_and_name_the_alternative(check):
    model = DiscreteVAE(data_shape=4, hidden_dims=[4])
    with pytest.raises(ValueError, match=r"DiscreteVAE has the discrete latent site\(s\) 'z' \(OneHotCategorical\)") as error:
        check(model, torch.zeros(2, 4))
    assert ("psis_khat" in str(error.value)) and ("sbc" in str(error.value) if check is compare_with_nuts else True)


def test_sbc_of_a_discrete_latent_breaks_ties_at_random():
    # the prior as the guide is the exact posterior of a model whose x does not depend on z
    model = DiscreteVAE(data_shape=3, num_latents=2, num_categories=3, hidden_dims=[4])
    with torch.no_grad():
        model.decoder[-1].weight.zero_()
    pyro.set_rng_seed(0)
    result = sbc(model, guide=lambda x: model.prior(torch.Size([len(x)])), num_simulations=1000, num_draws=19,
                 num_bins=5)
    # one-hot coordinates: without tie-breaking every rank would be 0 or #draws below a 1
    assert result.labels == [f"z[{d}]" for d in range(6)]
    assert (result.p_values > 1e-3).all()
    assert len(torch.unique(result.ranks[:, 0])) == 20


def test_amortization_gap_leaves_the_model_alone():
    model = LinearGaussian(*weights(orthogonal=True), shift=0.3)
    model.train()
    before = {name: p.clone() for name, p in model.named_parameters()}
    amortization_gap(model, data(model, 3), num_steps=5, eval_particles=20, log_likelihood_particles=20)
    assert model.training
    for name, p in model.named_parameters():
        assert p.grad is None and torch.equal(p, before[name])


# ----- NUTS ------------------------------------------------------------------------------

def test_wasserstein_1d_matches_the_closed_forms():
    a = torch.tensor([0.0, 1.0, 3.0])
    assert float(wasserstein_1d(a, a + 2.5)) == pytest.approx(2.5)
    # different sizes: integral of |F_a - F_b|; {0, 1} against {0}: F differs by 1/2 on [0, 1)
    assert float(wasserstein_1d(torch.tensor([0.0, 1.0]), torch.tensor([0.0]))) == pytest.approx(0.5)
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(50, generator=g), torch.randn(70, generator=g) * 2 + 1
    assert float(wasserstein_1d(u, v)) == pytest.approx(scipy_stats.wasserstein_distance(u.numpy(), v.numpy()), rel=1e-6)


def test_nuts_agrees_with_the_exact_posterior_and_finds_the_shifted_guide():
    shift = torch.tensor([0.4, 0.0], dtype=torch.float64)
    model = LinearGaussian(*weights(orthogonal=False), shift=shift)
    x = data(model, 2)
    pyro.set_rng_seed(0)
    result = compare_with_nuts(model, x, num_samples=200, warmup_steps=100, num_chains=2, guide_samples=4000,
                               full_mass=True)
    table = result.table
    assert tuple(result.samples["z"].shape) == (2, 200, 2, K) and set(table["site"]) == {"z"}
    mean = model.posterior_mean(x).reshape(-1).numpy()
    sd = model.cov.diagonal().sqrt().repeat(2).numpy()
    assert (table["r_hat"] < 1.05).all()
    assert (table["ess"] > 100).all()
    assert (np.abs(table["nuts_mean"] - mean) < 4 * sd / np.sqrt(table["ess"])).all()
    np.testing.assert_allclose(table["nuts_sd"], sd, rtol=0.15)
    # the guide: shifted by 0.4 in z[0], exact in z[1] (its sd is the exact marginal sd)
    shifted = table["latent"] == 0
    # up to the Monte-Carlo errors of both means
    error = 4 * table["nuts_sd"] / np.sqrt(table["ess"]) + 4 * table["guide_sd"] / np.sqrt(4000)
    assert (np.abs(table["guide_mean"] - table["nuts_mean"] - shift.numpy()[table["latent"]]) < error).all()
    # the distance between the samples: 0.4 and 0, up to the NUTS means' Monte-Carlo error (sd about 0.7)
    assert (np.abs(table["wasserstein"] - np.where(shifted, 0.4, 0.0)) < 0.05 + error).all()
    assert (error < 0.2).all()


# ----- SBC -------------------------------------------------------------------------------

def test_sbc_ranks_are_uniform_for_the_exact_guide_and_plot(tmp_path):
    model = LinearGaussian(*weights(orthogonal=True))
    pyro.set_rng_seed(0)
    result = sbc(model, num_simulations=2000, num_draws=99, num_bins=20)
    assert tuple(result.ranks.shape) == (2000, K)
    assert int(result.ranks.min()) >= 0 and int(result.ranks.max()) <= 99
    assert (result.p_values > 1e-3).all()
    fig = plot_sbc(result, tmp_path / "sbc.png")
    assert len(fig.axes) == K and (tmp_path / "sbc.png").stat().st_size > 0
    plt.close(fig)


@pytest.mark.parametrize("shift, c", [(0.5, 1.0), (0.0, 0.6)])
def test_sbc_rejects_a_biased_or_overconfident_guide(shift, c):
    model = LinearGaussian(*weights(orthogonal=True), shift=torch.tensor([shift, 0.0], dtype=torch.float64), c=c)
    pyro.set_rng_seed(0)
    result = sbc(model, num_simulations=2000, num_draws=99, num_bins=20)
    assert float(result.p_values[0]) < 1e-3
    if c != 1.0:  # too narrow: U-shaped ranks in both dimensions
        assert (result.p_values < 1e-3).all()
        counts = torch.bincount(result.ranks[:, 1] * 20 // 100, minlength=20)
        assert counts[0] + counts[-1] > 4 * counts[8:12].float().mean()


def test_sbc_with_a_user_guide_and_bad_bins():
    model = LinearGaussian(*weights(orthogonal=True))
    pyro.set_rng_seed(0)
    # the prior as the guide is calibrated too (SBC's blind spot)
    result = sbc(model, guide=lambda x: model.prior(torch.Size([len(x)])), num_simulations=1000, num_draws=19,
                 num_bins=5)
    assert (result.p_values > 1e-3).all()
    with pytest.raises(ValueError, match="not a multiple of num_bins"):
        sbc(model, num_draws=100, num_bins=20)


def test_sbc_simulates_binary_data_for_a_bernoulli_vae():
    vae = VAE(data_shape=5, latent_dim=2, hidden_dims=[8])
    pyro.set_rng_seed(0)
    result = sbc(vae, num_simulations=200, num_draws=19, num_bins=5)
    assert tuple(result.ranks.shape) == (200, 2)
