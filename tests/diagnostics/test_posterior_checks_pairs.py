"""Amortization gap, NUTS and SBC on a user's own two-site pair with a closed-form posterior, and on the
built-in models with several latent sites, a conditional prior or a flow posterior.

The pair: z2 ~ N(0, I), z1 | z2 ~ N(A z2, s1^2 I), x | z1, z2 ~ N(W z1 + V z2 + b, s^2 I). Its log joint is
-1/2 z^T Lambda z + z^T eta + const with, for z = (z1, z2),

    Lambda_11 = I / s1^2 + W^T W / s^2,   Lambda_22 = I + A^T A / s1^2 + V^T V / s^2,
    Lambda_12 = -A / s1^2 + W^T V / s^2,  eta = (W^T (x - b), V^T (x - b)) / s^2,

so p(z | x) = N(Lambda^-1 eta, Lambda^-1) and p(x) = N(b, M C M^T + s^2 I), M = [W V], C the prior
covariance of (z1, z2). With W's columns orthogonal, A diagonal and V = W (W^T W)^-1 A s^2 / s1^2 the
cross-precision Lambda_12 vanishes and Lambda is diagonal: the exact posterior is a diagonal Gaussian per
site, a guide of the refined family, and a guide N(m + delta, (c sd)^2) is off by the closed-form
KL = sum_d [delta_d^2 / (2 sd_d^2) + (c_d^2 - 1) / 2 - log c_d].
"""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.distributions import MultivariateNormal  # noqa: E402

from pyro_lvm import VAE  # noqa: E402
from pyro_lvm.diagnostics import log_likelihood  # noqa: E402
from pyro_lvm.models import ConditionalVAE, HierarchicalVAE  # noqa: E402
from pyro_lvm.diagnostics import amortization_gap, compare_with_nuts, plot_sbc, sbc  # noqa: E402

torch.set_num_threads(1)

K1, K2, D = 2, 2, 5
S, S1 = 0.7, 0.6


def hierarchy(seed=3, skip=True):
    """The pair's matrices and closed forms; ``skip=False``: V = 0, a plain chain z2 -> z1 -> x whose
    posterior couples z1 and z2."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, K1, dtype=torch.float64, generator=g))
    W = q * torch.tensor([1.5, 0.8], dtype=torch.float64)
    A = torch.diag(torch.tensor([0.8, -0.5], dtype=torch.float64))
    V = W @ torch.linalg.inv(W.T @ W) @ A * S**2 / S1**2 if skip else torch.zeros(D, K2, dtype=torch.float64)
    b = torch.randn(D, dtype=torch.float64, generator=g)
    eye = torch.eye(K1, dtype=torch.float64)
    lam11 = eye / S1**2 + W.T @ W / S**2
    lam22 = eye + A.T @ A / S1**2 + V.T @ V / S**2
    lam12 = -A / S1**2 + W.T @ V / S**2
    prior = torch.cat([torch.cat([A @ A.T + S1**2 * eye, A], 1), torch.cat([A.T, eye], 1)])
    M = torch.cat([W, V], 1)
    marginal = MultivariateNormal(b, M @ prior @ M.T + S**2 * torch.eye(D, dtype=torch.float64))
    return dict(W=W, A=A, V=V, b=b, lam11=lam11, lam22=lam22, lam12=lam12, marginal=marginal)


def make_model(h):
    def model(x):
        with pyro.plate("data", len(x)):
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(K2), 1.0).to_event(1))
            z1 = pyro.sample("z1", dist.Normal(z2 @ h["A"].T, S1).to_event(1))
            pyro.sample("x", dist.Normal(z1 @ h["W"].T + z2 @ h["V"].T + h["b"], S).to_event(1), obs=x)

    return model


def exact_posterior(h, x):
    """Means (N, K) and standard deviations (K,) of p(z1 | x) and p(z2 | x)."""
    r = x - h["b"]
    m1 = r @ h["W"] / S**2 @ torch.linalg.inv(h["lam11"])
    m2 = r @ h["V"] / S**2 @ torch.linalg.inv(h["lam22"])
    return (m1, h["lam11"].diagonal().rsqrt()), (m2, h["lam22"].diagonal().rsqrt())


def make_guide(h, shift2=(0.0, 0.0), c1=1.0):
    """N(m1, (c1 sd1)^2) N(m2 + shift2, sd2^2): the exact posterior for shift2 = 0, c1 = 1."""
    shift2 = torch.tensor(shift2, dtype=torch.float64)

    def guide(x):
        (m1, sd1), (m2, sd2) = exact_posterior(h, x)
        with pyro.plate("data", len(x)):
            pyro.sample("z1", dist.Normal(m1, c1 * sd1).to_event(1))
            pyro.sample("z2", dist.Normal(m2 + shift2, sd2).to_event(1))

    return guide


def data(h, n, seed=4):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, D, dtype=torch.float64, generator=g)
    return noise @ torch.linalg.cholesky(h["marginal"].covariance_matrix).T + h["b"]


def test_the_construction_has_a_diagonal_posterior_precision():
    h = hierarchy()
    assert torch.allclose(h["lam12"], torch.zeros(K1, K2, dtype=torch.float64), atol=1e-12)
    for block in ("lam11", "lam22"):
        assert torch.allclose(h[block], torch.diag(h[block].diagonal()), atol=1e-12)
    # the closed form against the log joint: p(x) = p(x, z) / p(z | x) at any z
    x, model = data(h, 3), make_model(h)
    z1, z2 = torch.randn(3, K1, dtype=torch.float64), torch.randn(3, K2, dtype=torch.float64)
    joint = pyro.poutine.trace(pyro.poutine.condition(model, data={"z1": z1, "z2": z2})).get_trace(x)
    joint.compute_log_prob()
    log_joint = sum(site["log_prob"] for site in joint.nodes.values() if site["type"] == "sample")
    (m1, sd1), (m2, sd2) = exact_posterior(h, x)
    log_post = dist.Normal(m1, sd1).log_prob(z1).sum(-1) + dist.Normal(m2, sd2).log_prob(z2).sum(-1)
    assert torch.allclose(log_joint - log_post, h["marginal"].log_prob(x), atol=1e-10)


# ----- amortization gap ------------------------------------------------------------------

def test_exact_guide_of_a_two_site_pair_has_no_gap():
    h = hierarchy()
    x = data(h, 6)
    pyro.set_rng_seed(0)
    gaps = amortization_gap(make_model(h), x, guide=make_guide(h), num_steps=40, eval_particles=200,
                            log_likelihood_particles=50)
    table, exact = gaps.table, h["marginal"].log_prob(x).numpy()
    assert gaps.same_family and "the guide's own family" in gaps.family
    # the exact posterior: every log weight is log p(x)
    np.testing.assert_allclose(table["elbo_amortized"], exact, atol=1e-8)
    np.testing.assert_allclose(table["log_likelihood"], exact, atol=1e-8)
    gap, stderr = table["amortization_gap"], table["amortization_gap_stderr"]
    assert (np.abs(gap) < 4 * stderr + 1e-8).all() and (np.abs(gap) < 1e-3).all()
    np.testing.assert_allclose(table["approximation_gap"], 0.0, atol=1e-3)
    (m1, _), (m2, _) = exact_posterior(h, x)
    assert set(gaps.loc) == {"z1", "z2"}
    assert torch.allclose(gaps.loc["z1"], m1, atol=1e-2) and torch.allclose(gaps.loc["z2"], m2, atol=1e-2)


def test_wrong_guide_of_a_two_site_pair_has_its_kl_as_gap():
    h = hierarchy()
    x = data(h, 8)
    shift, c = torch.tensor([0.5, -0.3], dtype=torch.float64), 0.6
    pyro.set_rng_seed(0)
    gaps = amortization_gap(make_model(h), x, guide=make_guide(h, shift2=shift.tolist(), c1=c), num_steps=400,
                            lr=0.02, eval_particles=2000, log_likelihood_particles=2000)
    table = gaps.table
    (m1, sd1), (m2, sd2) = exact_posterior(h, x)
    kl = float((shift**2 / (2 * sd2**2)).sum() + K1 * ((c**2 - 1) / 2 - math.log(c)))
    assert kl > 0.5
    stderr = table["amortization_gap_stderr"].max()
    np.testing.assert_allclose(table["amortization_gap"], kl, atol=0.02 * kl + 4 * stderr)
    exact = h["marginal"].log_prob(x).numpy()
    np.testing.assert_allclose(table["elbo_optimized"], exact, atol=0.01)
    np.testing.assert_allclose(table["approximation_gap"], 0.0, atol=0.01)
    # both sites refined to the exact posterior
    assert torch.allclose(gaps.loc["z1"], m1, atol=0.02) and torch.allclose(gaps.loc["z2"], m2, atol=0.02)
    assert torch.allclose(gaps.scale["z1"], sd1.expand_as(m1), rtol=0.03)
    assert torch.allclose(gaps.scale["z2"], sd2.expand_as(m2), rtol=0.03)
    assert gaps.history["inference_gap"].iloc[0] == pytest.approx(kl, rel=0.15)
    assert gaps.history["inference_gap"].iloc[-1] < 0.02 * kl


def test_structured_exact_guide_of_a_coupled_chain_has_the_mean_field_gap_with_a_minus_sign():
    # z2 -> z1 -> x: the posterior couples z1 and z2; the exact guide draws z2 ~ p(z2 | x), then
    # z1 ~ p(z1 | z2, x), so its z1 is not a Gaussian of x alone: q_i (mean-field) is of a poorer family
    h = hierarchy(skip=False)
    lam = torch.cat([torch.cat([h["lam11"], h["lam12"]], 1), torch.cat([h["lam12"].T, h["lam22"]], 1)])
    cov = torch.linalg.inv(lam)
    mean_field_kl = 0.5 * float(lam.diagonal().log().sum() - torch.logdet(lam))
    assert mean_field_kl > 0.1

    def guide(x):
        eta = torch.cat([(x - h["b"]) @ h["W"], (x - h["b"]) @ h["V"]], 1) / S**2
        m2 = (eta @ cov)[:, K1:]
        with pyro.plate("data", len(x)):
            z2 = pyro.sample("z2", dist.MultivariateNormal(m2, cov[K1:, K1:]))
            loc1 = (eta[:, :K1] - z2 @ h["lam12"].T) @ torch.linalg.inv(h["lam11"])
            pyro.sample("z1", dist.Normal(loc1, h["lam11"].diagonal().rsqrt()).to_event(1))

    x = data(h, 6)
    pyro.set_rng_seed(0)
    gaps = amortization_gap(make_model(h), x, guide=guide, num_steps=400, lr=0.05, eval_particles=2000,
                            log_likelihood_particles=100)
    table, exact = gaps.table, h["marginal"].log_prob(x).numpy()
    assert not gaps.same_family and "z1 (Normal, depends on other latents)" in gaps.family
    assert "z2 (MultivariateNormal)" in gaps.family
    np.testing.assert_allclose(table["elbo_amortized"], exact, atol=1e-8)  # the exact posterior
    # the refined mean-field q_i is worse than the guide by KL(q_MF* || p): a negative "amortization gap"
    np.testing.assert_allclose(table["amortization_gap"], -mean_field_kl, atol=0.06)
    np.testing.assert_allclose(table["approximation_gap"], mean_field_kl, atol=0.06)
    # the mean-field optimum: exact means, variances 1 / Lambda_dd
    assert torch.allclose(gaps.scale["z2"], h["lam22"].diagonal().rsqrt().expand_as(gaps.scale["z2"]), rtol=0.05)


def test_a_global_latent_is_refused_with_the_fix():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    for check in (amortization_gap, compare_with_nuts):
        with pytest.raises(ValueError, match=r"inside pyro.plate\('data'\); site 'mu' is not.*data_plate="):
            check(model, torch.zeros(3), guide=guide)


# ----- NUTS ------------------------------------------------------------------------------

def test_nuts_on_both_sites_agrees_with_the_exact_posterior():
    h = hierarchy()
    x = data(h, 2)
    pyro.set_rng_seed(0)
    result = compare_with_nuts(make_model(h), x, guide=make_guide(h, shift2=[0.5, 0.0]), num_samples=100,
                               warmup_steps=60, num_chains=2, guide_samples=2000)
    table = result.table
    assert len(table) == 2 * (K1 + K2)  # one row per input, site and dimension
    assert list(table["site"][:4]) == ["z1", "z1", "z2", "z2"] and list(table["obs"][:4]) == [0] * 4
    assert tuple(result.samples["z1"].shape) == (2, 100, 2, K1)
    assert tuple(result.guide_samples["z2"].shape) == (2000, 2, K2)
    (m1, sd1), (m2, sd2) = exact_posterior(h, x)
    exact_mean = {"z1": m1, "z2": m2}
    exact_sd = {"z1": sd1, "z2": sd2}
    mean = np.array([float(exact_mean[s][o, d]) for o, s, d in zip(table["obs"], table["site"], table["latent"])])
    sd = np.array([float(exact_sd[s][d]) for s, d in zip(table["site"], table["latent"])])
    assert (table["r_hat"] < 1.05).all() and (table["ess"] > 80).all()
    assert (np.abs(table["nuts_mean"] - mean) < 4 * sd / np.sqrt(table["ess"])).all()
    np.testing.assert_allclose(table["nuts_sd"], sd, rtol=0.2)
    # the guide's shift of z2[0] shows as the distance to NUTS
    shifted = ((table["site"] == "z2") & (table["latent"] == 0)).to_numpy()
    error = 4 * table["nuts_sd"] / np.sqrt(table["ess"])
    assert (np.abs(table["wasserstein"] - np.where(shifted, 0.5, 0.0)) < 0.05 + error).all()


# ----- SBC -------------------------------------------------------------------------------

def test_sbc_ranks_of_both_sites_are_uniform_for_the_exact_guide():
    h = hierarchy()
    pyro.set_rng_seed(0)
    result = sbc(make_model(h), make_guide(h), num_simulations=2000, num_draws=99, num_bins=20, x=data(h, 10))
    assert result.labels == ["z1[0]", "z1[1]", "z2[0]", "z2[1]"]
    assert tuple(result.ranks.shape) == (2000, 4)
    assert (result.p_values > 1e-3).all()


def test_sbc_rejects_a_biased_or_overconfident_guide_of_a_two_site_pair():
    h = hierarchy()
    pyro.set_rng_seed(0)
    result = sbc(make_model(h), make_guide(h, shift2=[0.5, 0.0], c1=0.6), num_simulations=2000, num_draws=99,
                 num_bins=20, x=data(h, 10))
    p = dict(zip(result.labels, result.p_values.tolist()))
    assert p["z2[0]"] < 1e-3 and p["z1[0]"] < 1e-3 and p["z1[1]"] < 1e-3
    assert p["z2[1]"] > 1e-3  # the one exact dimension stays calibrated
    fig = plot_sbc(result, max_panels=3)  # the three least uniform dimensions
    assert sorted(ax.get_title().split()[0] for ax in fig.axes) == ["z1[0]", "z1[1]", "z2[0]"]
    plt.close(fig)
    with pytest.raises(ValueError, match="needs data rows x="):
        sbc(make_model(h), make_guide(h))


# ----- built-in models: several sites, a conditional prior, a flow posterior ------------

def hvae():
    return HierarchicalVAE(data_shape=6, latent_dims=[3, 2], hidden_dims=[[8], [8]])


def cvae_batch(n=4):
    g = torch.Generator().manual_seed(0)
    y = torch.bernoulli(torch.full((n, 6), 0.5), generator=g)
    mask = torch.tensor([False, False, False, True, True, True]).expand(n, 6)
    return y.masked_fill(mask, -1.0), dict(y=y, mask=mask)


def cvae():
    return ConditionalVAE(data_shape=6, input_shape=6, latent_dim=2, hidden_dims=[8])


def flow_vae():
    return VAE(data_shape=6, latent_dim=2, hidden_dims=[8], posterior_flow="coupling", flow_layers=2,
               flow_hidden=[8], flow_context_dim=4)


BUILT_IN = {
    "hierarchical": (hvae, {"z1": 3, "z2": 2}, False),
    "conditional": (cvae, {"z": 2}, True),
    "flow_posterior": (flow_vae, {"z": 2}, False),
}


def inputs(name, n=4):
    if name == "conditional":
        return cvae_batch(n)
    return torch.bernoulli(torch.full((n, 6), 0.5), generator=torch.Generator().manual_seed(0)), {}


@pytest.mark.parametrize("name", BUILT_IN)
def test_refinement_improves_the_elbo_of_built_in_models(name):
    make, sites, same = BUILT_IN[name]
    pyro.set_rng_seed(0)
    model = make()
    x, kwargs = inputs(name)
    gaps = amortization_gap(model, x, num_steps=60, lr=0.05, eval_particles=300, log_likelihood_particles=100,
                            **kwargs)
    table = gaps.table
    assert len(table) == len(x) and gaps.same_family is same
    assert ("differs" in gaps.family) is not same
    assert {k: v.shape[1:] for k, v in gaps.loc.items()} == {k: torch.Size([d]) for k, d in sites.items()}
    # an untrained guide is far from each posterior: refining per point raises the ELBO
    assert (table["amortization_gap"] >= -3 * table["amortization_gap_stderr"]).all()
    assert table["elbo_optimized"].mean() > table["elbo_amortized"].mean()
    assert np.isfinite(table.to_numpy()).all()
    # the amortized ELBO is the guide's, as log_likelihood (an independent code path) estimates it
    reference = log_likelihood(model, x, num_particles=600, **kwargs)
    # both are means of the guide's log weights: 600 of them here, 300 (eval_particles) there
    stderr = np.sqrt(reference.log_weight_variance.numpy() * (1 / 600 + 1 / 300))
    assert (np.abs(table["elbo_amortized"] - reference.elbo.numpy()) < 4 * stderr + 1e-6).all()


@pytest.mark.parametrize("name", BUILT_IN)
def test_nuts_and_sbc_tables_of_built_in_models_have_a_row_per_site_and_dimension(name):
    make, sites, _ = BUILT_IN[name]
    pyro.set_rng_seed(0)
    model = make()
    x, kwargs = inputs(name, n=2)
    result = compare_with_nuts(model, x, num_samples=8, warmup_steps=8, num_chains=1, guide_samples=20, **kwargs)
    assert len(result.table) == 2 * sum(sites.values())
    assert result.table.groupby("site").size().to_dict() == {k: 2 * d for k, d in sites.items()}
    assert {k: tuple(v.shape) for k, v in result.samples.items()} == {k: (1, 8, 2, d) for k, d in sites.items()}
    ranks = sbc(model, num_simulations=30, num_draws=9, num_bins=5, x=x, **kwargs)
    assert ranks.labels == [f"{k}[{d}]" for k, n in sites.items() for d in range(n)]
    assert tuple(ranks.ranks.shape) == (30, sum(sites.values()))
    assert int(ranks.ranks.min()) >= 0 and int(ranks.ranks.max()) <= 9


def test_sbc_of_a_conditional_model_keeps_the_unmodelled_pixels_and_needs_the_target():
    model = cvae()
    x, kwargs = cvae_batch(3)
    seen = []
    guide = model.guide

    def spy(x, y=None, mask=None):
        seen.append(y)
        return guide(x, y, mask)

    pyro.set_rng_seed(0)
    sbc(model.model, spy, num_simulations=6, num_draws=4, num_bins=5, batch_size=3, x=x, **kwargs)
    simulated = seen[-1]  # the guide's input in the second batch (rows 3..5 cycle to 0..2): y drawn on the mask only
    visible = ~kwargs["mask"]
    assert torch.equal(simulated[visible], kwargs["y"][visible])
    assert set(simulated[kwargs["mask"]].unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="observed nothing.*y=..., mask=..."):
        sbc(model, num_simulations=4, num_draws=4, num_bins=5, x=x)
