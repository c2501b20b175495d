"""The VAE as a Pyro model/guide pair."""

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from pyro_lvm import VAE


def binary(n, d=64, seed=0):
    return torch.bernoulli(torch.full((n, d), 0.3), generator=torch.Generator().manual_seed(seed))


def test_latent_lives_in_the_data_plate_with_the_right_shapes():
    vae = VAE(data_shape=64, latent_dim=3, hidden_dims=[16])
    x = binary(5)
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    z = model_trace.nodes["z"]
    assert z["value"].shape == (5, 3) and z["fn"].event_shape == (3,)
    assert [f.name for f in z["cond_indep_stack"]] == ["data"]
    assert model_trace.nodes["x"]["is_observed"]
    assert torch.equal(model_trace.nodes["z"]["value"], guide_trace.nodes["z"]["value"])


def test_subsampling_scales_the_elbo_by_num_data_over_batch():
    vae = VAE(data_shape=64, latent_dim=2, hidden_dims=[8])
    x = binary(8)
    pyro.set_rng_seed(0)
    batch = Trace_ELBO().loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(0)
    full = Trace_ELBO().loss(vae.model, vae.guide, x, num_data=800)
    assert full == pytest.approx(100 * batch, rel=1e-5)


def test_stock_pyro_svi_trains_the_pair():
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = VAE(data_shape=64, latent_dim=2, hidden_dims=[32])
    x = binary(256)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step(x) / len(x) for _ in range(150)]
    # from ~44 nats towards the entropy of Bernoulli(0.3) pixels, 64 * 0.611 = 39.1
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 2.0
    pyro.clear_param_store()


def test_gaussian_likelihood_learns_its_scale_and_fixed_scale_stays():
    learned = VAE(data_shape=4, latent_dim=1, hidden_dims=[4], likelihood="gaussian")
    fixed = VAE(data_shape=4, latent_dim=1, hidden_dims=[4], likelihood="gaussian", likelihood_scale=0.1)
    assert any(n.endswith("raw_scale") for n, _ in learned.named_parameters())
    assert not any("scale" in n for n, _ in fixed.named_parameters())
    assert torch.allclose(learned.likelihood.scale, torch.ones(4))
    assert float(fixed.likelihood.scale) == pytest.approx(0.1)


def test_image_shaped_data():
    vae = VAE(data_shape=(1, 8, 8), latent_dim=2, hidden_dims=[16])
    x = binary(4).reshape(4, 1, 8, 8)
    assert vae.reconstruct(x).shape == (4, 1, 8, 8)
    assert vae.sample(3).shape == (3, 1, 8, 8)
    assert vae.sample(3, mean=False).unique().tolist() in ([0.0, 1.0], [0.0], [1.0])
    assert Trace_ELBO().loss(vae.model, vae.guide, x) > 0


def test_encode_gives_a_positive_scale_and_decode_probabilities():
    vae = VAE(data_shape=64, latent_dim=2, hidden_dims=[8])
    loc, scale = vae.encode(binary(3))
    assert loc.shape == scale.shape == (3, 2) and (scale > 0).all()
    probs = vae.decode(torch.randn(3, 2))
    assert ((probs > 0) & (probs < 1)).all()


def test_invalid_configuration_is_rejected():
    with pytest.raises(ValueError, match="latent_dim"):
        VAE(latent_dim=0)
    with pytest.raises(ValueError, match="Unknown likelihood 'poisson'"):
        VAE(likelihood="poisson")
    with pytest.raises(ValueError, match="positive float or 'learned'"):
        VAE(likelihood="gaussian", likelihood_scale=-1.0)


@pytest.mark.parametrize(
    "likelihood, x, match",
    [
        ("bernoulli", torch.tensor([[0.0, 1.0, float("nan"), 1.0]]), "1 NaN/inf values"),
        ("bernoulli", torch.tensor([[0.0, 1.0, 2.0, 1.0]]), r"in \[0, 1\]; got min=0, max=2"),
        ("bernoulli", torch.tensor([[0.0, 1.0, 0.5, 1.0]]), "binary data"),
        ("gaussian", torch.tensor([[0.0, float("inf"), 0.5, 1.0]]), r"first at index \(0, 1\)"),
    ],
)
def test_model_refuses_data_outside_the_likelihood_support(likelihood, x, match):
    vae = VAE(data_shape=4, latent_dim=1, hidden_dims=[4], likelihood=likelihood)
    with pytest.raises(ValueError, match=match):
        vae.model(x)
