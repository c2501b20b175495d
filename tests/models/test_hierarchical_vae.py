"""The hierarchical VAE (Burda et al. 2015): its factorization, its bounds, its size, and training it."""

import math
from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine

import pyro_lvm
from pyro_lvm.cli import main
from pyro_lvm.data import DigitsDataModule
from pyro_lvm.estimators import latent_sites, make_elbo
from pyro_lvm.models.hierarchical_vae import HierarchicalVAE

REPO = Path(__file__).resolve().parents[2]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(autouse=True)
def few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: threads only add overhead
    pyro.clear_param_store()
    yield
    torch.set_num_threads(threads)


def binary(n, d=10, seed=0):
    return torch.bernoulli(torch.full((n, d), 0.3), generator=torch.Generator().manual_seed(seed))


def small(**kwargs):
    torch.manual_seed(0)
    return HierarchicalVAE(**{"data_shape": 10, "latent_dims": [4, 2], "hidden_dims": [[8], [6]], **kwargs})


def traces(hvae, x):
    guide_trace = poutine.trace(hvae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(hvae.model, trace=guide_trace)).get_trace(x)
    return model_trace, guide_trace


# densities written out, independent of torch.distributions
def log_normal(z, loc, scale):
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


def log_bernoulli(x, logits):
    return (x * logits - torch.nn.functional.softplus(logits)).sum(-1)


def gaussian_head(net, h):
    loc, log_scale = net(h).chunk(2, dim=-1)
    return loc, log_scale.exp()


# ----- the pair ------------------------------------------------------------------------------
@pytest.mark.parametrize("latent_dims, hidden_dims", [([3], [[8]]), ([4, 2], [[8], [6]]), ([5, 4, 3], [[8], [6], []])])
def test_one_site_per_stochastic_layer_inside_the_data_plate(latent_dims, hidden_dims):
    hvae = small(latent_dims=latent_dims, hidden_dims=hidden_dims)
    model_trace, guide_trace = traces(hvae, binary(5))
    names = [f"z{l}" for l in range(1, len(latent_dims) + 1)]
    assert list(hvae.latent_sites) == names
    assert list(latent_sites(guide_trace)) == names  # the guide goes up the chain
    assert list(latent_sites(model_trace)) == names[::-1]  # the model comes down it
    for name, d in zip(names, latent_dims):
        site = model_trace.nodes[name]
        assert site["value"].shape == (5, d) and site["fn"].event_shape == (d,)
        assert hvae.latent_sites[name] == (d,)
        assert [f.name for f in site["cond_indep_stack"]] == ["data"]
        assert torch.equal(site["value"], guide_trace.nodes[name]["value"])
    assert hvae.latent_shape == (latent_dims[-1],)


def test_log_joint_is_log_p_z2_plus_log_p_z1_given_z2_plus_log_p_x_given_z1():
    hvae, x = small(), binary(5)
    model_trace, guide_trace = traces(hvae, x)
    z1, z2 = (guide_trace.nodes[n]["value"] for n in ("z1", "z2"))
    log_p_z2 = log_normal(z2, torch.zeros(2), torch.ones(2))
    log_p_z1 = log_normal(z1, *gaussian_head(hvae.decoder[1], z2))
    log_p_x = log_bernoulli(x, hvae.decoder[0](z1))
    model_trace.compute_log_prob()
    for name, expected in [("z2", log_p_z2), ("z1", log_p_z1), ("x", log_p_x)]:
        torch.testing.assert_close(model_trace.nodes[name]["log_prob"], expected)
    torch.testing.assert_close(model_trace.log_prob_sum(), (log_p_z2 + log_p_z1 + log_p_x).sum())
    # and the guide is the bottom-up chain q(z1 | x) q(z2 | z1)
    log_q = log_normal(z1, *gaussian_head(hvae.encoder[0], x)) + log_normal(z2, *gaussian_head(hvae.encoder[1], z1))
    torch.testing.assert_close(guide_trace.log_prob_sum(), log_q.sum())


def test_subsampling_scales_every_layer_by_num_data_over_batch():
    hvae, x = small(), binary(8)
    pyro.set_rng_seed(0)
    batch = pyro.infer.Trace_ELBO().loss(hvae.model, hvae.guide, x)
    pyro.set_rng_seed(0)
    full = pyro.infer.Trace_ELBO().loss(hvae.model, hvae.guide, x, num_data=800)
    assert full == pytest.approx(100 * batch, rel=1e-5)


def test_encode_passes_means_up_and_decode_passes_means_down():
    hvae, x = small(), binary(5)
    m1, _ = gaussian_head(hvae.encoder[0], x)
    loc, scale = hvae.encode(x)
    torch.testing.assert_close((loc, scale), gaussian_head(hvae.encoder[1], m1))
    z2 = torch.randn(3, 7, 2)  # extra leading (particle) dims pass through
    mean_z1, _ = gaussian_head(hvae.decoder[1], z2)
    torch.testing.assert_close(hvae.decode(z2), torch.sigmoid(hvae.decoder[0](mean_z1)))
    # reconstruct scores x through z1 = the mean of q(z1 | x), as the ELBO's likelihood term does
    torch.testing.assert_close(hvae.reconstruct(x), torch.sigmoid(hvae.decoder[0](m1)))


def test_sample_is_ancestral_below_a_standard_normal_top():
    hvae = small()
    torch.manual_seed(1)
    means = hvae.sample(4)
    torch.manual_seed(1)
    z2 = torch.randn(4, 2)
    torch.testing.assert_close(means, hvae.decode(z2))
    draws = hvae.sample(2000, mean=False)
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    # the pixel frequencies of full ancestral draws estimate E[x] = E_{p(z1)}[sigmoid(decoder(z1))]
    torch.manual_seed(2)
    z1 = pyro.poutine.trace(hvae.model).get_trace(binary(20000)).nodes["z1"]["value"]
    expected = torch.sigmoid(hvae.decoder[0](z1)).mean(0)
    assert (draws.mean(0) - expected).abs().max() < 4 * 0.5 / math.sqrt(2000)


def test_image_shaped_data_keep_their_shape():
    hvae = HierarchicalVAE(data_shape=[1, 8, 8], latent_dims=[4, 2], hidden_dims=[[8], [8]])
    x = torch.bernoulli(torch.full((3, 1, 8, 8), 0.5))
    model_trace, _ = traces(hvae, x)
    assert model_trace.nodes["x"]["fn"].event_shape == (1, 8, 8)
    assert hvae.sample(2).shape == hvae.reconstruct(x)[:2].shape == (2, 1, 8, 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(latent_dims=[]), "latent_dims must be a non-empty list"),
        (dict(latent_dims=[4, 0]), "positive integers"),
        (dict(latent_dims=[4, 2], hidden_dims=[8, 8]), "one list of widths per stochastic layer; got \\[8, 8\\]"),
        (dict(latent_dims=[4, 2], hidden_dims=[[8]]), "2 for latent_dims=\\[4, 2\\]; got 1"),
        (dict(latent_dims=[4], hidden_dims=[[8, -1]]), "positive integer widths"),
    ],
)
def test_invalid_configuration_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HierarchicalVAE(data_shape=10, **{"hidden_dims": [[8], [8]], **kwargs})


# ----- bounds and size -----------------------------------------------------------------------
def log_weights(hvae, x):
    """log p(x, z) - log q(z | x) per row of x, for one draw z ~ q(z | x)."""
    model_trace, guide_trace = traces(hvae, x)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    log_p = model_trace.nodes["x"]["log_prob"] + sum(s["log_prob"] for s in latent_sites(model_trace).values())
    return log_p - sum(s["log_prob"] for s in latent_sites(guide_trace).values())


def test_elbo_is_at_most_the_iwae_bound_which_rises_with_k():
    hvae, x = small(), binary(4)

    def bound(name, k, copies):  # the estimator's value per data point, averaged over copies of x
        xs = x.repeat(copies, 1)
        return -make_elbo(name, num_particles=k, vectorize_particles=True).loss(hvae.model, hvae.guide, xs) / len(xs)

    with torch.no_grad():
        elbos = log_weights(hvae, x.repeat(1000, 1))  # 1000 draws of the ELBO of each data point
        elbo, stderr = float(elbos.mean()), float(elbos.std() / math.sqrt(len(elbos)))
        iwae = {k: bound("iwae", k, copies) for k, copies in [(1, 1000), (10, 100), (1000, 5)]}
        reparam = bound("reparam", 1, 1000)
    # L_1 is the ELBO, whichever estimator computes it (independent draws: sqrt(2) standard errors)
    assert abs(iwae[1] - elbo) < 4 * math.sqrt(2) * stderr and abs(reparam - elbo) < 4 * math.sqrt(2) * stderr
    assert elbo + 4 * stderr < iwae[10] < iwae[1000]


def test_default_architecture_has_burdas_784_200_200_100_100_50_parameter_count():
    def linear(n_in, n_out):
        return n_in * n_out + n_out

    def gaussian(n_in, widths, d):  # tanh layers, then a mean head and a log-sigma head
        dims = [n_in, *widths]
        return sum(linear(a, b) for a, b in zip(dims, dims[1:])) + 2 * linear(dims[-1], d)

    q = gaussian(784, [200, 200], 100) + gaussian(100, [100, 100], 50)
    p = gaussian(50, [100, 100], 100) + linear(100, 200) + linear(200, 200) + linear(200, 784)
    hvae = HierarchicalVAE()
    assert sum(t.numel() for t in hvae.encoder.parameters()) == q == 267_700
    assert sum(t.numel() for t in hvae.decoder.parameters()) == p == 253_384
    assert sum(t.numel() for t in hvae.parameters()) == q + p == 521_084
    assert [type(m).__name__ for m in hvae.encoder[0]] == ["Linear", "Tanh", "Linear", "Tanh", "Linear"]


# ----- training ------------------------------------------------------------------------------
def held_out_elbo(hvae, loader, draws=5):
    with torch.no_grad():
        total = sum(pyro_lvm.elbo_terms(hvae.model, hvae.guide, b["x"])["elbo"] for b in loader for _ in range(draws))
    return float(total) / draws / len(loader.dataset)


def test_training_on_the_digits_raises_the_held_out_elbo():
    data = DigitsDataModule(batch_size=64, flatten=True)
    data.setup("fit")
    hvae = HierarchicalVAE(data_shape=64, latent_dims=[8, 4], hidden_dims=[[32], [16]])
    before = held_out_elbo(hvae, data.val_dataloader())
    module = pyro_lvm.fit(hvae, data=data, max_epochs=6, lr=3e-3, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, enable_checkpointing=False)
    after = held_out_elbo(hvae, data.val_dataloader())
    print(f"held-out ELBO per digit: {before:.2f} -> {after:.2f} nats; "
          f"val/elbo {float(module.trainer.callback_metrics['val/elbo']):.2f}")
    assert after > before + 10


@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_multi_sample_estimators_train_the_whole_chain(estimator):
    hvae, x = small(), binary(6)
    module = pyro_lvm.LVMModule(hvae, estimator=make_elbo(estimator, num_particles=3))
    module.initialize(x)
    loss = module(x)
    loss.backward()
    assert torch.isfinite(loss)
    for net in (*hvae.encoder, *hvae.decoder):  # every layer of q and of p gets a gradient
        assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0


# ----- the command line ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra",
    [
        ["--model.estimator=pyro_lvm.estimators.IWAEELBO", "--model.estimator.num_particles=2"],
        ["--model.guide=pyro_lvm.guides.SemiAmortizedGuide", "--model.guide.init_args.num_steps=2"],
        ["--model.guide=pyro_lvm.guides.PerDatapointGuide", "--model.guide.init_args.eval_steps=2"],
    ],
    ids=["iwae", "semi_amortized", "per_datapoint"],
)
def test_cli_swaps_estimator_and_guide(extra, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["pyro-lvm"])
    main(["fit", f"--config={REPO / 'configs' / 'hvae_digits.yaml'}", *extra, "--trainer.max_epochs=1",
          "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1", *QUIET])
    run = tmp_path / "runs" / "hvae_digits" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "samples.png").is_file()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["pyro_lvm"]["model"]["config"]["latent_dims"] == [16, 4]
