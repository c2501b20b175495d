"""The convolutional VAE: shapes on any divisible image size, the KL map, bounds, training, CLI."""

from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import pytorch_lightning as pl
import torch
from pyro import poutine
from torch.distributions import kl_divergence

import pyro_lvm
from pyro_lvm.cli import main
from pyro_lvm.data import DigitsDataModule
from pyro_lvm.estimators import make_elbo
from pyro_lvm.guides import PerDatapointGuide, SemiAmortizedGuide
from pyro_lvm.models.conv_vae import ConvVAE

REPO = Path(__file__).resolve().parents[2]
QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
CLI_QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
SMALL = dict(channels=[4, 8], hidden_dim=16)


@pytest.fixture(autouse=True)
def fresh_param_store_and_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: more threads only add overhead
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
    torch.set_num_threads(threads)


def binary(*shape, seed=0):
    return torch.bernoulli(torch.full(shape, 0.3), generator=torch.Generator().manual_seed(seed))


def small_vae(shape=(1, 8, 8), latent="spatial", **kwargs):
    torch.manual_seed(0)
    return ConvVAE(list(shape), latent=latent, latent_channels=3, latent_dim=5, **{**SMALL, **kwargs})


def guide_and_prior(vae, x):
    """The guide's q(z | x) and the model's p(z) at site "z", from one run of the pair."""
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    return guide_trace.nodes["z"], model_trace.nodes["z"]


# ----- shapes --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 28, 28), (1, 32, 32), (3, 32, 32)], ids=str)
@pytest.mark.parametrize("latent", ["spatial", "flat"])
def test_encode_decode_sample_reconstruct_shapes_on_28x28_and_32x32(shape, latent):
    vae = small_vae(shape, latent)
    size = (shape[1] // 4, shape[2] // 4)  # two stages: downsampling by 4
    expected = (3, *size) if latent == "spatial" else (5,)
    assert vae.latent_shape == expected and vae.event_shape == shape
    x = binary(2, *shape)
    loc, scale = vae.encode(x)
    assert loc.shape == scale.shape == (2, *expected) and (scale > 0).all()
    probs = vae.decode(torch.randn(2, *expected))
    assert probs.shape == (2, *shape) and ((probs > 0) & (probs < 1)).all()
    assert vae.reconstruct(x).shape == vae.reconstruct(x, sample=True).shape == (2, *shape)
    assert vae.sample(3).shape == (3, *shape)
    assert set(vae.sample(3, mean=False).unique().tolist()) <= {0.0, 1.0}
    q, p = guide_and_prior(vae, x)
    assert q["fn"].event_shape == p["fn"].event_shape == expected
    assert [f.name for f in p["cond_indep_stack"]] == ["data"]


@pytest.mark.parametrize("latent", ["spatial", "flat"])
def test_leading_particle_dims_decode_each_z_as_alone(latent):
    vae = small_vae(latent=latent)
    z = torch.randn(2, 3, *vae.latent_shape)
    out = vae.decode(z)
    assert out.shape == (2, 3, 1, 8, 8)
    torch.testing.assert_close(out[1, 2], vae.decode(z[1, 2:3])[0])
    x = binary(2, 3, 1, 8, 8)
    torch.testing.assert_close(vae.encode(x)[0][1], vae.encode(x[1])[0])


def test_gaussian_likelihood_on_colour_images():
    vae = small_vae((3, 16, 16), likelihood="gaussian", likelihood_scale=0.5)
    x = torch.rand(4, 3, 16, 16)
    loss = pyro.infer.Trace_ELBO().loss(vae.model, vae.guide, x)
    assert torch.isfinite(torch.tensor(loss))
    assert vae.decode(torch.randn(4, *vae.latent_shape)).shape == (4, 3, 16, 16)


def test_config_rebuilds_the_same_architecture():
    vae = small_vae((3, 32, 32), latent="flat")
    twin = ConvVAE(**vae.config)
    assert {k: v.shape for k, v in vae.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}
    assert vae.config["data_shape"] == [3, 32, 32] and vae.config["channels"] == [4, 8]


# ----- the KL map --------------------------------------------------------------------------
def test_kl_per_location_sums_to_the_kl_of_the_guide_against_the_prior():
    vae = small_vae((1, 28, 28))
    x = binary(4, 1, 28, 28)
    kl_map = vae.kl_per_location(x)
    assert kl_map.shape == (4, 7, 7) and (kl_map >= 0).all()
    q, p = guide_and_prior(vae, x)
    total = kl_divergence(q["fn"], p["fn"])  # over the whole C x H' x W' event
    assert total.shape == (4,)
    torch.testing.assert_close(kl_map.sum((-2, -1)), total, rtol=1e-5, atol=1e-5)
    # per scalar: the closed form of KL(N(mu, sigma^2) || N(0, 1))
    loc, scale = vae.encode(x)
    per_dim = kl_divergence(dist.Normal(loc, scale), dist.Normal(0.0, 1.0))
    torch.testing.assert_close(vae.kl_per_dimension(x), per_dim, rtol=1e-5, atol=1e-6)


def test_flat_kl_per_dimension_sums_to_the_kl_and_has_no_locations():
    vae = small_vae(latent="flat")
    x = binary(3, 1, 8, 8)
    q, p = guide_and_prior(vae, x)
    assert vae.kl_per_dimension(x).shape == (3, 5)
    torch.testing.assert_close(vae.kl_per_dimension(x).sum(-1), kl_divergence(q["fn"], p["fn"]))
    with pytest.raises(ValueError, match="kl_per_location needs a spatial latent.*latent='flat'"):
        vae.kl_per_location(x)


def test_analytic_kl_elbo_equals_log_likelihood_minus_the_kl_map():
    vae = small_vae((1, 16, 16))
    x = binary(4, 1, 16, 16)
    estimator = make_elbo("analytic_kl")
    estimator.check(vae.model, vae.guide, x)  # its first-use dry run draws random numbers
    pyro.set_rng_seed(1)
    elbo = -estimator.loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(1)
    q, _ = guide_and_prior(vae, x)  # the same draw of z
    with torch.no_grad():
        log_lik = vae.likelihood(vae.decoder_output(q["value"])).log_prob(x)
        expected = float(log_lik.sum() - vae.kl_per_location(x).sum())
    assert elbo == pytest.approx(expected, rel=1e-5)
    # and the Monte-Carlo ELBO at that z: log p(x | z) + log p(z) - log q(z)
    pyro.set_rng_seed(1)
    reparam = make_elbo("reparam")
    reparam.check(vae.model, vae.guide, x)
    pyro.set_rng_seed(1)
    mc = -reparam.loss(vae.model, vae.guide, x)
    with torch.no_grad():
        log_p_z = vae.prior().log_prob(q["value"])
        expected_mc = float((log_lik + log_p_z - q["fn"].log_prob(q["value"])).sum())
    assert mc == pytest.approx(expected_mc, rel=1e-5)


# ----- multi-sample bounds with vectorized particles -----------------------------------------
@pytest.mark.parametrize("latent", ["spatial", "flat"])
@pytest.mark.parametrize("name", ["iwae", "dreg"])
def test_iwae_and_dreg_bounds_are_the_log_mean_weight_over_vectorized_particles(name, latent):
    vae = small_vae(latent=latent)
    x = binary(4, 1, 8, 8)
    K = 3
    estimator = make_elbo(name, num_particles=K)
    estimator.check(vae.model, vae.guide, x)
    pyro.set_rng_seed(2)
    bound = -float(estimator.differentiable_loss(vae.model, vae.guide, x).detach())
    # the same K draws, each particle's log w computed on its own z
    pyro.set_rng_seed(2)
    with pyro.plate("particles", K, dim=-2):
        guide_trace = poutine.trace(vae.guide).get_trace(x)
    z = guide_trace.nodes["z"]["value"]
    assert z.shape == (K, 4, *vae.latent_shape)  # the particle dim left of the data plate
    with torch.no_grad():
        log_w = torch.stack([
            vae.likelihood(vae.decoder_output(z[k])).log_prob(x) + vae.prior().log_prob(z[k])
            - dist.Normal(*vae.encode(x)).to_event(len(vae.latent_shape)).log_prob(z[k])
            for k in range(K)
        ])
    expected = float((log_w.logsumexp(0) - torch.log(torch.tensor(float(K)))).sum())
    assert bound == pytest.approx(expected, rel=1e-5)
    # gradients reach both networks through the particle dimension
    loss = estimator.differentiable_loss(vae.model, vae.guide, x)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.decoder.parameters())


# ----- guides ---------------------------------------------------------------------------------
def test_per_datapoint_guide_has_a_latent_map_per_example():
    vae = small_vae()
    guide = PerDatapointGuide(num_data=10)
    module = pyro_lvm.LVMModule(vae, guide=guide)
    batch = {"x": binary(4, 1, 8, 8), "index": torch.tensor([0, 3, 5, 9])}
    module.initialize(batch)
    assert guide.locs["z"].shape == (10, *vae.latent_shape)
    assert guide(batch["x"], index=batch["index"])["z"].shape == (4, *vae.latent_shape)
    module(batch).backward()
    touched = guide.locs["z"].grad.flatten(1).abs().sum(-1) > 0
    assert touched.nonzero().flatten().tolist() == [0, 3, 5, 9]


def test_semi_amortized_refinement_keeps_the_latent_map_shape():
    vae = small_vae()
    guide = SemiAmortizedGuide(num_steps=2).attach(vae.model, vae)
    x = binary(4, 1, 8, 8)
    refined = guide.refine(x)["z"]
    assert refined.loc.shape == refined.scale.shape == (4, *vae.latent_shape)
    assert not torch.equal(refined.loc, vae.encode(x)[0])
    loss = pyro.infer.Trace_ELBO().differentiable_loss(vae.model, guide, x)
    loss.backward()
    assert vae.encoder[0][0].weight.grad.abs().sum() > 0


# ----- training ----------------------------------------------------------------------------
def test_training_raises_the_validation_elbo_on_8x8_digits_and_uses_the_latent_map():
    data = DigitsDataModule(flatten=False, batch_size=64)
    torch.manual_seed(0)
    vae = ConvVAE([1, 8, 8], latent_channels=4, channels=[16, 32])
    (before,) = pl.Trainer(**QUIET).validate(pyro_lvm.LVMModule(vae), datamodule=data, verbose=False)
    module = pyro_lvm.fit(vae, data=data, lr=3e-3, max_epochs=3, **QUIET)
    after = float(module.trainer.callback_metrics["val/elbo"])
    x = next(iter(data.val_dataloader()))["x"]
    with torch.no_grad():
        kl_map = vae.kl_per_location(x).mean(0)
    print(f"val/elbo {before['val/elbo']:.2f} -> {after:.2f}; KL per location (nats):\n{kl_map}")
    # an untrained decoder scores each of the 64 pixels at about log(1/2): -44 nats
    assert before["val/elbo"] < -40
    assert after > before["val/elbo"] + 10
    assert kl_map.shape == (2, 2) and kl_map.sum() > 0.5  # the code carries information: no collapse


# ----- errors ----------------------------------------------------------------------------------
def test_an_image_size_not_divisible_by_the_downsampling_factor_is_refused():
    with pytest.raises(ValueError, match=r"divisible by 2\*\*3 = 8; got 28x28.*channels=\[8, 16\].*32x32"):
        ConvVAE([1, 28, 28], channels=[8, 16, 32])
    with pytest.raises(ValueError, match=r"got 30x28"):
        ConvVAE([1, 30, 28], channels=[8, 16])
    with pytest.raises(ValueError, match=r"data_shape = \(channels, height, width\).*784"):
        ConvVAE(784)
    with pytest.raises(ValueError, match="latent must be 'spatial' or 'flat'"):
        ConvVAE(latent="grid")
    vae = small_vae()
    with pytest.raises(ValueError, match=r"shape \(batch, 1, 8, 8\); got \(4, 64\)"):
        vae.guide(binary(4, 64))


# ----- the command line ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "swap",
    [["--model.estimator=pyro_lvm.estimators.IWAEELBO", "--model.estimator.num_particles=2"], ["--model.guide=pyro_lvm.guides.SemiAmortizedGuide"]],
    ids=["iwae", "semi_amortized_guide"],
)
def test_estimator_and_guide_swap_on_the_command_line(swap, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["pyro-lvm"])
    main(["fit", f"--config={REPO / 'configs' / 'conv_vae_digits.yaml'}", *swap, "--trainer.max_epochs=1",
          "--trainer.limit_train_batches=3", "--trainer.log_every_n_steps=1", *CLI_QUIET])
    assert "validation ELBO" in capsys.readouterr().out
    run = tmp_path / "runs" / "conv_vae_digits" / "version_0"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["pyro_lvm"]["model"]["config"]["latent"] == "spatial"
    assert (run / "samples.png").is_file()
