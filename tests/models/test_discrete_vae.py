"""The VAE with a discrete latent: exact ELBOs by enumeration, site shapes, subsampling, training."""

import itertools
import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO, config_enumerate
from sklearn.datasets import load_digits
from torch.nn.functional import logsigmoid, log_softmax, one_hot

from pyro_lvm.models.discrete_vae import DiscreteVAE


def binary(n, d=6, seed=0):
    return torch.bernoulli(torch.full((n, d), 0.3), generator=torch.Generator().manual_seed(seed))


def small(latent, num_latents, num_categories=3, d=6, **kwargs):
    torch.manual_seed(0)
    return DiscreteVAE(
        data_shape=d, num_latents=num_latents, num_categories=num_categories,
        latent=latent, hidden_dims=[8], **kwargs,
    )


@torch.no_grad()
def exact_elbo_terms(vae, x):
    """Per data point: the ELBO as a sum over every z, and Var_q of log p(x, z) - log q(z | x).

    Uses only the encoder, the decoder and the likelihood; the site's distributions are
    rebuilt by hand: log q from log_softmax / logsigmoid, log p(z) = -M log K.
    """
    logits = vae.encode(x)
    M = vae.num_latents
    if vae.latent == "categorical":
        K = vae.num_categories
        log_q_table = log_softmax(logits, -1)  # (B, M, K)
    else:
        K = 2
        log_q_table = torch.stack([logsigmoid(-logits), logsigmoid(logits)], -1)  # (B, M, 2)
    combos = torch.tensor(list(itertools.product(range(K), repeat=M)))  # (K^M, M)
    if vae.latent == "categorical":
        z_flat = one_hot(combos, K).float().reshape(len(combos), M * K)
    else:
        z_flat = combos.float()
    # log q(z | x) = sum_m log q(z_m | x), for every combination and data point: (K^M, B)
    log_q = log_q_table[:, torch.arange(M), combos].sum(-1).T
    log_p_z = -M * math.log(K)
    log_lik = vae.likelihood(vae.decoder(z_flat[:, None, :])).log_prob(x)  # (K^M, B)
    f = log_lik + log_p_z - log_q
    q = log_q.exp()
    assert torch.allclose(q.sum(0), torch.ones(len(x)))
    elbo = (q * f).sum(0)
    variance = (q * (f - elbo) ** 2).sum(0)
    return elbo, variance


@pytest.mark.parametrize("latent", ["categorical", "bernoulli"])
def test_enumerated_elbo_equals_the_exact_sum_over_the_latent(latent):
    vae = small(latent, num_latents=1, num_categories=4)
    x = binary(5)
    assert vae.has_enumerable_latent
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    loss = elbo.loss(vae.model, config_enumerate(vae.guide, "parallel"), x)
    exact, _ = exact_elbo_terms(vae, x)
    assert loss == pytest.approx(-float(exact.sum()), abs=1e-5)


@pytest.mark.parametrize("latent, num_latents", [("categorical", 2), ("bernoulli", 3)])
def test_score_function_monte_carlo_elbo_matches_the_exact_sum(latent, num_latents):
    # M = 2, K = 3: nine joint values of z; M = 3 binary: eight
    vae = small(latent, num_latents=num_latents, num_categories=3)
    x = binary(4)
    exact, variance = exact_elbo_terms(vae, x)
    num_particles = 4000
    standard_error = float(variance.sum() / num_particles) ** 0.5
    pyro.set_rng_seed(0)
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.loss(vae.model, vae.guide, x)
    assert 0 < standard_error < 0.2
    assert abs(loss + float(exact.sum())) < 4 * standard_error


@pytest.mark.parametrize(
    "latent, num_latents, site_shape",
    [
        ("categorical", 2, (2, 3)),
        ("categorical", 1, (3,)),  # one latent: no Independent, so that Pyro can enumerate it
        ("bernoulli", 3, (3,)),
        ("bernoulli", 1, ()),
    ],
)
def test_latent_lives_in_the_data_plate_and_broadcasts_over_particles(latent, num_latents, site_shape):
    vae = small(latent, num_latents=num_latents, num_categories=3)
    x = binary(5)

    def particles(fn):
        def vectorized(*args, **kwargs):
            with pyro.plate("particles", 7, dim=-2):
                return fn(*args, **kwargs)

        return vectorized

    guide_trace = poutine.trace(particles(vae.guide)).get_trace(x)
    model_trace = poutine.trace(poutine.replay(particles(vae.model), guide_trace)).get_trace(x)
    model_trace.compute_log_prob()
    z = model_trace.nodes["z"]
    assert z["value"].shape == (7, 5) + site_shape
    assert z["fn"].event_shape == site_shape
    assert {f.name for f in z["cond_indep_stack"]} == {"data", "particles"}
    assert model_trace.nodes["x"]["log_prob"].shape == (7, 5)
    assert torch.equal(z["value"], guide_trace.nodes["z"]["value"])
    assert vae.latent_dist(vae.encode(x)).has_enumerate_support == vae.has_enumerable_latent


@pytest.mark.parametrize("latent, num_values", [("categorical", 3), ("bernoulli", 2)])
def test_enumerated_values_broadcast_through_the_decoder(latent, num_values):
    vae = small(latent, num_latents=1, num_categories=3)
    x = binary(5)
    guide = poutine.enum(config_enumerate(vae.guide, "parallel"), first_available_dim=-2)
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, guide_trace)).get_trace(x)
    model_trace.compute_log_prob()
    assert guide_trace.nodes["z"]["value"].shape[:2] == (num_values, 1)
    assert model_trace.nodes["x"]["log_prob"].shape == (num_values, 5)


def test_subsampling_scales_the_elbo_by_num_data_over_batch():
    x = binary(8)
    vae = small("categorical", num_latents=2)
    pyro.set_rng_seed(0)
    batch = Trace_ELBO().loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(0)
    full = Trace_ELBO().loss(vae.model, vae.guide, x, num_data=800)
    assert full == pytest.approx(100 * batch, rel=1e-5)

    enumerable = small("categorical", num_latents=1)
    guide = config_enumerate(enumerable.guide, "parallel")
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    exact = elbo.loss(enumerable.model, guide, x)
    assert elbo.loss(enumerable.model, guide, x, num_data=80) == pytest.approx(10 * exact, rel=1e-5)


def test_reconstruct_decodes_the_mode_of_the_guide():
    x = binary(5)
    categorical = small("categorical", num_latents=2, num_categories=3)
    logits = categorical.encode(x)
    assert logits.shape == (5, 2, 3)
    mode = one_hot(logits.argmax(-1), 3).float()
    assert torch.equal(categorical.reconstruct(x), categorical.decode(mode))

    bernoulli = small("bernoulli", num_latents=1)
    logits = bernoulli.encode(x)
    assert logits.shape == (5, 1)
    assert torch.equal(bernoulli.reconstruct(x), bernoulli.decode((logits[:, 0] > 0).float()))

    probs = bernoulli.reconstruct(x, sample=True)
    assert probs.shape == (5, 6) and ((probs > 0) & (probs < 1)).all()


def test_samples_example_batch_and_config():
    vae = DiscreteVAE(data_shape=(1, 8, 8), num_latents=3, num_categories=5, hidden_dims=[16])
    assert vae.sample(3).shape == (3, 1, 8, 8)
    assert vae.sample(3, mean=False).unique().tolist() in ([0.0, 1.0], [0.0], [1.0])
    x = vae.example_batch(4)
    assert x.shape == (4, 1, 8, 8) and vae.reconstruct(x).shape == (4, 1, 8, 8)
    assert TraceGraph_ELBO().loss(vae.model, vae.guide, x) > 0
    twin = DiscreteVAE(**vae.config)
    assert twin.config == vae.config
    assert [p.shape for p in twin.parameters()] == [p.shape for p in vae.parameters()]
    assert "latent='categorical', num_latents=3, num_categories=5" in repr(vae)


def test_gaussian_likelihood_and_ignored_num_categories_for_binary_latents():
    vae = DiscreteVAE(data_shape=4, num_latents=2, latent="bernoulli", num_categories=1,
                      hidden_dims=[4], likelihood="gaussian", likelihood_scale=0.5)
    assert vae.num_categories is None and "num_categories" not in repr(vae)
    x = torch.randn(3, 4)
    assert math.isfinite(TraceGraph_ELBO().loss(vae.model, vae.guide, x))


def test_invalid_configuration_is_rejected():
    with pytest.raises(ValueError, match="Unknown latent 'gaussian'; choose 'categorical' or 'bernoulli'"):
        DiscreteVAE(latent="gaussian")
    with pytest.raises(ValueError, match="num_latents must be a positive integer; got 0"):
        DiscreteVAE(num_latents=0)
    with pytest.raises(ValueError, match="num_categories must be an integer >= 2 .* got 1.*latent='bernoulli'"):
        DiscreteVAE(num_categories=1)
    with pytest.raises(ValueError, match="Unknown likelihood 'poisson'"):
        DiscreteVAE(likelihood="poisson")


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.zeros(5, 7), r"batch of shape \(batch, 6\); got \(5, 7\)"),
        (torch.zeros(6), r"batch of shape \(batch, 6\); got \(6,\)"),
        (torch.tensor([[0.0, 1.0, 0.5, 1.0, 0.0, 0.0]]), "binary data"),
        (torch.tensor([[0.0, 1.0, 2.0, 1.0, 0.0, 0.0]]), r"in \[0, 1\]; got min=0, max=2"),
    ],
)
def test_model_refuses_data_of_the_wrong_shape_or_outside_the_support(x, match):
    vae = small("categorical", num_latents=2)
    with pytest.raises(ValueError, match=match):
        vae.model(x)


def test_score_function_training_on_binarized_digits_lowers_the_exact_held_out_loss():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x = torch.as_tensor(load_digits().data >= 8, dtype=torch.float32)
    perm = torch.randperm(len(x))
    train, test = x[perm[:1500]], x[perm[1500:]]
    # one latent with ten classes: a mixture model whose held-out ELBO enumeration gives exactly
    vae = DiscreteVAE(data_shape=64, num_latents=1, num_categories=10, hidden_dims=[64])
    exact = TraceEnum_ELBO(max_plate_nesting=1)
    guide = config_enumerate(vae.guide, "parallel")

    def held_out_loss():
        return exact.loss(vae.model, guide, test) / len(test)

    before = held_out_loss()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), TraceGraph_ELBO())
    for _ in range(200):
        svi.step(train[torch.randint(len(train), (128,))])
    after = held_out_loss()
    # from ~44 nats (random decoder) to ~25 (independent pixels at their frequencies: 25.3)
    assert after < before - 10
    pyro.clear_param_store()
