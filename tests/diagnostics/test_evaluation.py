"""The importance-sampled log-likelihood and evaluate() against closed forms on a linear-Gaussian model.

z ~ N(0, I_k), x | z ~ N(W z + b, s^2 I_d): log p(x) = log N(x; b, W W^T + s^2 I) and the
posterior p(z | x) = N(Sigma W^T (x - b) / s^2, Sigma), Sigma = (I + W^T W / s^2)^-1, are known.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.poutine.runtime import get_plates

from linear_gaussian import linear_gaussian, make_model
from pyro_lvm import VAE, FlowModel
from pyro_lvm.data import DigitsDataModule
from pyro_lvm.flows import NICE
from pyro_lvm.estimators.particles import PARTICLES
from pyro_lvm.diagnostics import evaluate, log_likelihood

torch.set_num_threads(1)

K, D, S, N = 2, 3, 0.7, 5


@pytest.fixture(scope="module")
def lg():
    lg = linear_gaussian(K, D, S, N)
    lg["loc"], lg["cov"] = lg["post_loc"], lg["post_cov"]
    return lg


def exact_guide(lg):
    def guide(x):
        loc = (x - lg["b"]) @ lg["W"] @ lg["cov"] / S**2
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(loc, lg["cov"]))

    return guide


def wrong_guide(lg):
    """Shifted by 0.3 and 1.5 times wider than the posterior's marginals: weights with finite variance."""
    scale = 1.5 * lg["cov"].diagonal().sqrt()

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(lg["loc"] + 0.3, scale).to_event(1))

    return guide


def test_log_likelihood_within_three_standard_errors_and_error_shrinks_with_k(lg):
    model, guide = make_model(lg), wrong_guide(lg)
    pyro.set_rng_seed(0)
    errors = []
    for k in (1, 30, 1000):
        est = log_likelihood(model, guide, lg["x"], num_particles=k, chunk_size=500)
        errors.append(float((lg["log_px"] - est.per_point).abs().mean()))
    assert errors[0] > errors[1] > errors[2]
    big = log_likelihood(model, guide, lg["x"], num_particles=40000, chunk_size=5000)
    se = big.mc_stderr()
    assert se.max() < 0.02  # resolved: the test can fail
    assert ((big.per_point - lg["log_px"]).abs() < 3 * se).all()
    # the mean of the log weights is the ELBO: below log p(x) by KL(q || posterior) > 0
    assert (big.elbo < lg["log_px"] - 0.05).all()
    assert big.stderr == pytest.approx(float(big.per_point.std()) / math.sqrt(N))


def test_exact_posterior_gives_zero_variance_log_weights(lg):
    est = log_likelihood(make_model(lg), exact_guide(lg), lg["x"], num_particles=64, chunk_size=10)
    assert torch.allclose(est.per_point, lg["log_px"], atol=1e-8, rtol=0)
    assert torch.allclose(est.elbo, lg["log_px"], atol=1e-8, rtol=0)
    assert (est.log_weight_variance < 1e-16).all()
    assert torch.allclose(est.ess, torch.full((N,), 64.0, dtype=torch.float64))
    # the same through batches of 2 data points
    batched = log_likelihood(make_model(lg), exact_guide(lg), lg["x"], num_particles=8, batch_size=2)
    assert torch.allclose(batched.per_point, lg["log_px"], atol=1e-8, rtol=0)


def noise_guide(lg, noise):
    """A guide whose particles are consecutive rows of ``noise`` (K, N, k): chunked or not, the same z."""
    scale = 1.5 * lg["cov"].diagonal().sqrt()
    state = {"pos": 0, "max_particles": 0}

    def guide(x):
        size = next((f.size for f in get_plates() if f.name == PARTICLES), None)
        if size is None:  # the estimator's unvectorized dry run
            eps = noise[0]
        else:
            eps = noise[state["pos"]:state["pos"] + size]
            state["pos"] += size
            state["max_particles"] = max(state["max_particles"], size)
        q = dist.Normal(lg["loc"] + 0.3, scale).to_event(1)
        z = lg["loc"] + 0.3 + scale * eps
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(z, log_density=q.log_prob(z), event_dim=1))

    return guide, state


def test_chunked_streaming_equals_one_chunk_and_memory_is_bounded_by_the_chunk(lg):
    num = 1000
    noise = torch.randn(num, N, K, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    guide, state = noise_guide(lg, noise)
    one = log_likelihood(make_model(lg), guide, lg["x"], num_particles=num, chunk_size=num, vectorize_particles=True)
    assert state["max_particles"] == num
    guide, state = noise_guide(lg, noise)
    chunked = log_likelihood(make_model(lg), guide, lg["x"], num_particles=num, chunk_size=64, vectorize_particles=True)
    assert state["pos"] == num and state["max_particles"] == 64  # no tensor holds more than 64 particles
    assert torch.allclose(chunked.per_point, one.per_point, atol=1e-6, rtol=0)
    assert torch.allclose(chunked.ess, one.ess, rtol=1e-6)
    assert torch.allclose(chunked.log_weight_variance, one.log_weight_variance, rtol=1e-6)
    assert not torch.allclose(one.per_point, lg["log_px"], atol=1e-3)  # a wrong guide: not trivially equal


def test_flow_model_log_likelihood_is_exact():
    pyro.set_rng_seed(0)
    flow = FlowModel(NICE(4, num_layers=2, hidden=[8]))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))  # not the identity
    x = torch.randn(7, 4)
    result = log_likelihood(flow, x, batch_size=3)
    assert torch.allclose(result.per_point.float(), flow.log_prob(x).detach(), atol=1e-6)
    assert result.ess is None
    assert evaluate(flow, x).log_likelihood == pytest.approx(float(flow.log_prob(x).detach().mean()), abs=1e-5)


def test_module_pair_and_bad_input():
    vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8])
    x = torch.bernoulli(torch.full((3, 4), 0.5))
    pyro.set_rng_seed(0)
    a = log_likelihood(vae, x, num_particles=10)
    pyro.set_rng_seed(0)
    b = log_likelihood(vae.model, vae.guide, x, num_particles=10)
    assert torch.equal(a.per_point, b.per_point)
    with pytest.raises(ValueError, match="num_particles must be a positive integer; got 0"):
        log_likelihood(vae, x, num_particles=0)
    with pytest.raises(ValueError, match="module with model and guide"):
        log_likelihood(lambda x: None, x)


def test_global_latent_is_refused():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="do not factorize"):
        log_likelihood(model, guide, torch.zeros(3), num_particles=4)


@pytest.fixture(scope="module")
def digits_vae():
    pyro.set_rng_seed(0)
    dm = DigitsDataModule(batch_size=64, binarize="static")
    x = dm.datasets["train"].x[:512]
    vae = VAE(data_shape=64, latent_dim=4, hidden_dims=[64])
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 3e-3}), pyro.infer.Trace_ELBO())
    pyro.clear_param_store()
    for step in range(300):
        svi.step(x[(step * 64) % 512:(step * 64) % 512 + 64])
    return vae, dm


def test_evaluate_builtin_vae_on_digits_gives_sane_numbers(digits_vae):
    vae, dm = digits_vae
    pyro.set_rng_seed(0)
    result = evaluate(vae, dm, num_particles=200, chunk_size=100, batch_size=50)
    n = result.num_points
    assert n == len(dm.datasets["test"])
    ll_se = float(result.result.mc_stderr().mean())
    assert result.log_likelihood >= result.elbo - 3 * ll_se
    assert result.elbo == pytest.approx(result.reconstruction - result.kl)
    assert result.kl > 0
    kl_dim = result.kl_per_dim["z"]
    assert kl_dim.shape == (4,) and (kl_dim >= 0).all()
    # the closed-form KL per dim sums to the Monte-Carlo KL of the particles, within noise
    assert float(kl_dim.sum()) == pytest.approx(result.kl, rel=0.1)
    assert 0 < result.active_units <= result.num_units == 4
    assert 0.0 < result.mutual_information <= math.log(n)
    assert result.bits_per_dim == pytest.approx(-result.log_likelihood / (64 * math.log(2)))
    assert set(result.as_dict()) >= {"log_likelihood", "bits_per_dim", "mutual_information", "kl_per_dim"}


def test_mutual_information_is_zero_for_a_guide_that_ignores_x_and_log_n_for_separated_codes(lg):
    model = make_model(lg)

    def prior_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], K, dtype=x.dtype), 1.0).to_event(1))

    def separated_guide(x):  # codes 100 standard deviations apart: q(z_i | x_j) ~ 0 for i != j
        loc = 100 * torch.arange(x.shape[0], dtype=x.dtype)[:, None].expand(-1, K)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    x = lg["x"]
    assert evaluate(model, x, guide=prior_guide, num_particles=4).mutual_information == pytest.approx(0.0, abs=1e-12)
    assert evaluate(model, x, guide=separated_guide, num_particles=4).mutual_information == pytest.approx(math.log(N))


def test_progress_bar_counts_every_chunk_of_every_batch(lg, capsys):
    log_likelihood(make_model(lg), exact_guide(lg), lg["x"], num_particles=25, chunk_size=10, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "9/9" in err  # 3 batches x 3 chunks (10, 10, 5)


def test_per_point_keyword_tensors_are_batched_with_the_data():
    from pyro_lvm import ConditionalVAE

    cvae = ConditionalVAE()
    x = torch.rand(5, 1, 8, 8)
    y = torch.bernoulli(torch.full((5, 1, 8, 8), 0.4))
    pyro.set_rng_seed(0)
    result = log_likelihood(cvae, x, y=y, num_particles=6, batch_size=2)  # batches of 2, 2, 1
    assert result.per_point.shape == (5,) and torch.isfinite(result.per_point).all()
