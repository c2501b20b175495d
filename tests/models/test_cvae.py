"""The conditional VAE, its deterministic baseline, and the quadrant-completion task."""

import time
from pathlib import Path

import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive
from torch.nn.functional import logsigmoid

import pyro_lvm
from pyro_lvm.cli import main
from pyro_lvm.data import DigitsDataModule, QuadrantsDataModule
from pyro_lvm.models.cvae import ConditionalVAE, DeterministicBaseline, evaluate_conditional
from pyro_lvm.training import elbo_terms

REPO = Path(__file__).resolve().parents[2]
MNIST = REPO.parent / "shared" / "data" / "mnist"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture
def one_thread():
    # tiny networks: a second thread only waits at each op's barrier (twice the CPU time for no speed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def completion_task(n=6, shape=(1, 4, 4), seed=0):
    """Random binary images y, a random mask of pixels to predict, and x = y with them set to -1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.bernoulli(torch.full((n, *shape), 0.4), generator=g)
    mask = torch.rand((n, *shape), generator=g) < 0.6
    return y.masked_fill(mask, -1.0), y, mask


def bernoulli_log_prob_on(mask, logits, y):
    per_pixel = y * logsigmoid(logits) + (1 - y) * logsigmoid(-logits)
    return (per_pixel * mask).flatten(1).sum(1)


# ----- the model ----------------------------------------------------------------------------------
def test_masked_likelihood_sums_log_probs_over_the_masked_pixels_only():
    torch.manual_seed(0)
    cvae = ConditionalVAE(data_shape=(1, 4, 4), latent_dim=2, hidden_dims=[8])
    x, y, mask = completion_task()
    z = torch.randn(len(x), 2)
    trace = poutine.trace(poutine.condition(cvae.model, data={"z": z})).get_trace(x, y, mask)
    fn = trace.nodes["y"]["fn"]
    logits = cvae.decoder_output(z, x).reshape(y.shape)
    assert torch.allclose(fn.log_prob(y), bernoulli_log_prob_on(mask, logits, y), atol=1e-5)
    # changing the pixels outside the mask changes nothing; inside it does
    outside, inside = y.clone(), y.clone()
    outside[~mask] = 1 - outside[~mask]
    inside[mask] = 1 - inside[mask]
    assert torch.allclose(fn.log_prob(outside), fn.log_prob(y))
    assert not torch.allclose(fn.log_prob(inside), fn.log_prob(y))
    # the baseline's exact conditional likelihood is the same masked sum
    net = DeterministicBaseline(data_shape=(1, 4, 4), hidden_dims=[8])
    logits = net.net(x.flatten(1)).reshape(y.shape)
    assert torch.allclose(net.conditional_log_likelihood(x, y, mask), bernoulli_log_prob_on(mask, logits, y), atol=1e-5)


def test_standard_prior_is_unit_gaussian_and_learned_prior_depends_on_x():
    torch.manual_seed(0)
    x, y, mask = completion_task(n=2)
    x_other = torch.zeros_like(x)
    for prior in ("standard", "learned"):
        cvae = ConditionalVAE(data_shape=(1, 4, 4), latent_dim=3, hidden_dims=[8], prior=prior)
        priors = [
            poutine.trace(cvae.model).get_trace(inputs, y, mask).nodes["z"]["fn"].base_dist
            for inputs in (x, x_other)
        ]
        if prior == "standard":
            assert all(torch.equal(p.loc, torch.zeros(2, 3)) and torch.equal(p.scale, torch.ones(2, 3)) for p in priors)
            assert not any(name.startswith("prior_net") for name, _ in cvae.named_parameters())
        else:
            assert not torch.allclose(priors[0].loc, priors[1].loc)
            assert torch.allclose(priors[0].loc, cvae.encode(x)[0])  # encode without y is the prior


def test_guide_is_the_recognition_network_given_y_and_the_prior_without_it():
    torch.manual_seed(0)
    cvae = ConditionalVAE(data_shape=(1, 4, 4), latent_dim=2, hidden_dims=[8])
    x, y, mask = completion_task()
    q = poutine.trace(cvae.guide).get_trace(x, y, mask).nodes["z"]["fn"].base_dist
    assert torch.allclose(q.loc, cvae.encode(x, y)[0]) and not torch.allclose(q.loc, cvae.encode(x)[0])
    without_y = poutine.trace(cvae.guide).get_trace(x).nodes["z"]["fn"].base_dist
    assert torch.allclose(without_y.loc, cvae.conditional_prior(x).mean)
    # so the pair predicts under Predictive: z ~ p(z | x), y ~ p(y | x, z)
    draws = Predictive(cvae.model, guide=cvae.guide, num_samples=4)(x)
    assert draws["y"].shape == (4, *y.shape) and set(draws["y"].unique().tolist()) <= {0.0, 1.0}


def test_predictions_have_a_sample_dim_and_unconditional_sampling_is_refused():
    cvae = ConditionalVAE(data_shape=(1, 4, 4), latent_dim=2, hidden_dims=[8])
    x, y, _ = completion_task()
    probabilities = cvae.predict(x, num_samples=3)
    assert probabilities.shape == (3, *y.shape) and 0 < float(probabilities.min()) <= float(probabilities.max()) < 1
    assert cvae.predict(x, num_samples=2, mean=False).shape == (2, *y.shape)
    assert cvae.reconstruct(x).shape == y.shape
    assert DeterministicBaseline(data_shape=(1, 4, 4), hidden_dims=[8]).predict(x, num_samples=2).shape == (2, *y.shape)
    with pytest.raises(ValueError, match=r"use predict\(x"):
        cvae.sample(4)
    with pytest.raises(ValueError, match="pass the input x"):
        cvae.decode(torch.zeros(3, 2))


def test_bad_inputs_are_named():
    cvae = ConditionalVAE(data_shape=(1, 4, 4), latent_dim=2, hidden_dims=[8])
    x, y, mask = completion_task()
    with pytest.raises(ValueError, match="mask must be a boolean tensor"):
        cvae.model(x, y, mask.float())
    with pytest.raises(ValueError, match="input_shape"):
        cvae.model(x.flatten(1), y, mask)
    with pytest.raises(ValueError, match="Bernoulli likelihood needs data in"):
        cvae.model(x, x, mask)  # the input (with its -1s) given as the target
    with pytest.raises(ValueError, match="prior='gaussian'"):
        ConditionalVAE(prior="gaussian")


def test_importance_sampled_likelihood_rises_with_particles_from_the_elbo(one_thread):
    torch.manual_seed(0)
    cvae = ConditionalVAE(data_shape=(1, 4, 4), latent_dim=2, hidden_dims=[16])
    with torch.no_grad():  # a q away from the prior and a y that depends on z: gaps worth measuring
        cvae.encoder[-1].bias[:2] += 1.0
        cvae.decoder[0].weight[:, -2:] *= 5
    x, y, mask = completion_task(n=64)
    repeats = 40
    estimates = {
        k: float(torch.stack([cvae.conditional_log_likelihood(x, y, mask, num_particles=k) for _ in range(repeats)]).mean())
        for k in (1, 10, 100)
    }
    with torch.no_grad():
        elbo = float(torch.stack([elbo_terms(cvae.model, cvae.guide, x, y, mask)["elbo"] for _ in range(repeats)]).mean()) / 64
    # K = 1 is a one-sample ELBO (Monte-Carlo spread of these means: 0.02 and 0.04 nats);
    # more particles tighten the bound, E[log mean_K w] rises with K (measured -8.6, -7.5, -7.2)
    assert estimates[1] == pytest.approx(elbo, abs=0.2)
    assert estimates[1] + 0.5 < estimates[10] < estimates[100] - 0.1


def test_importance_sampling_in_chunks_equals_one_pass(monkeypatch):
    torch.manual_seed(0)
    cvae = ConditionalVAE(data_shape=(1, 4, 4), latent_dim=2, hidden_dims=[16])
    x, y, mask = completion_task(n=64)
    torch.manual_seed(1)
    one_pass = cvae.conditional_log_likelihood(x, y, mask, num_particles=100)
    monkeypatch.setattr("pyro_lvm.models.cvae._CHUNK_ELEMENTS", 3 * 64 * 16)  # 3 particles a chunk
    torch.manual_seed(1)
    chunked = cvae.conditional_log_likelihood(x, y, mask, num_particles=100)
    assert torch.allclose(chunked, one_pass, atol=1e-5)


# ----- the data -----------------------------------------------------------------------------------
@pytest.mark.parametrize("num_visible", [1, 2, 3])
def test_quadrant_mask_covers_exactly_the_hidden_quadrants(num_visible):
    dm = QuadrantsDataModule(source="digits", num_visible=num_visible, batch_size=50)
    batch = next(iter(dm.test_dataloader()))
    x, y, mask = batch["x"], batch["y"], batch["mask"]
    assert x.shape == y.shape == mask.shape == (50, 1, 8, 8) and mask.dtype == torch.bool
    quadrants = {"bottom-left": (slice(4, 8), slice(0, 4)), "top-left": (slice(0, 4), slice(0, 4)),
                 "top-right": (slice(0, 4), slice(4, 8)), "bottom-right": (slice(4, 8), slice(4, 8))}
    for k, (rows, cols) in enumerate(quadrants.values()):
        assert bool((~mask[:, :, rows, cols]).all() if k < num_visible else mask[:, :, rows, cols].all())
    assert int(mask[0].sum()) == 16 * (4 - num_visible)
    assert bool((x[mask] == -1).all()) and torch.equal(x[~mask], y[~mask])
    assert set(y.unique().tolist()) == {0.0, 1.0}
    # the images are those of the digits module, in the same splits
    digits = DigitsDataModule(flatten=False)
    assert dm.num_train == digits.num_train and torch.equal(y, digits.datasets["test"].x[:50])
    assert torch.equal(dm.source_index["test"], digits.source_index["test"])


def test_dynamic_binarization_happens_before_masking_and_flatten_gives_vectors():
    dm = QuadrantsDataModule(source="digits", binarize="dynamic", flatten=True, batch_size=32)
    assert dm.event_shape == (64,)
    batch = next(iter(dm.train_dataloader()))
    x, y, mask = batch["x"], batch["y"], batch["mask"]
    assert x.shape == y.shape == mask.shape == (32, 64)
    assert torch.equal(x[~mask], y[~mask]) and set(y.unique().tolist()) == {0.0, 1.0}
    assert sorted(batch) == ["index", "mask", "x", "y"]


def test_quadrant_data_errors_speak_to_the_user():
    with pytest.raises(ValueError, match="num_visible must be 1, 2 or 3"):
        QuadrantsDataModule(num_visible=4)
    with pytest.raises(ValueError, match="Unknown source='svhn'"):
        QuadrantsDataModule(source="svhn")
    with pytest.raises(ValueError, match="Drop root"):
        QuadrantsDataModule(source="digits", root="/data/mnist")
    with pytest.raises(ValueError, match="needs binary images"):
        QuadrantsDataModule(binarize="none")


# ----- the headline: the CVAE beats the deterministic network -------------------------------------
def _train_and_evaluate(model, data, estimator, **trainer_kwargs):
    torch.manual_seed(0)
    pyro_lvm.fit(
        model, data=data, estimator=estimator, lr=3e-3, seed=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **trainer_kwargs,
    )
    return evaluate_conditional(model, data, "test", num_particles=100)


def test_cvae_beats_the_deterministic_baseline_in_conditional_log_likelihood_on_digits(one_thread):
    # same architecture widths, data, optimizer, epochs and seed; 20 epochs of 22 batches each
    budget = dict(max_epochs=20, limit_val_batches=0)
    start = time.perf_counter()
    torch.manual_seed(0)
    cvae = ConditionalVAE(data_shape=(1, 8, 8), latent_dim=8, hidden_dims=[128, 128])
    cvae_ll = _train_and_evaluate(cvae, QuadrantsDataModule(source="digits", batch_size=64), "analytic_kl", **budget)
    torch.manual_seed(0)
    net = DeterministicBaseline(data_shape=(1, 8, 8), hidden_dims=[128, 128])
    net_ll = _train_and_evaluate(net, QuadrantsDataModule(source="digits", batch_size=64), "reparam", **budget)
    print(f"\ndigits quadrants, test log p(y | x): CVAE {cvae_ll:.2f}, baseline {net_ll:.2f}, "
          f"margin {cvae_ll - net_ll:.2f} nats ({time.perf_counter() - start:.0f} s)")
    # measured: CVAE -14.2, baseline -16.0 (margins 1.6 to 1.9 nats over seeds 0-2)
    assert cvae_ll > net_ll + 0.5


@pytest.mark.slow
@pytest.mark.skipif(not MNIST.is_dir(), reason="MNIST IDX files not available")
def test_cvae_beats_the_deterministic_baseline_on_mnist_quadrants():
    budget = dict(max_epochs=10, limit_val_batches=0)
    results = {}
    for name in ("cvae", "baseline"):
        start = time.perf_counter()
        torch.manual_seed(0)
        if name == "cvae":
            model = ConditionalVAE(data_shape=(1, 28, 28), latent_dim=32, hidden_dims=[500, 500])
        else:
            model = DeterministicBaseline(data_shape=(1, 28, 28), hidden_dims=[500, 500])
        data = QuadrantsDataModule(source="mnist", root=str(MNIST), binarize="dynamic", batch_size=128)
        ll = _train_and_evaluate(model, data, "analytic_kl" if name == "cvae" else "reparam", **budget)
        results[name] = ll
        print(f"\nMNIST quadrants, {name}: test log p(y | x) = {ll:.2f} nats ({time.perf_counter() - start:.0f} s)")
    # measured: CVAE -77.0, baseline -109.8 nats (Sohn et al. 2015, Table 1: -71.8 and -100.0)
    assert results["cvae"] > results["baseline"] + 10.0


# ----- the command line ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config, options",
    [
        ("cvae_digits_quadrants.yaml", ["--model.estimator=pyro_lvm.estimators.IWAEELBO", "--model.estimator.num_particles=2"]),
        ("cvae_digits_quadrants.yaml", ["--model.guide=pyro_lvm.guides.SemiAmortizedGuide",
                                        "--model.guide.num_steps=2"]),
        ("cvae_digits_quadrants.yaml", ["--model.guide=pyro_lvm.guides.PerDatapointGuide",
                                        "--model.guide.eval_steps=2"]),
        ("baseline_digits_quadrants.yaml", ["--model.estimator=pyro_lvm.estimators.IWAEELBO", "--model.estimator.num_particles=2"]),
    ],
    ids=["cvae-iwae", "cvae-semi-amortized", "cvae-per-datapoint", "baseline-iwae"],
)
def test_fit_from_the_config_swaps_estimator_and_guide(config, options, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["pyro-lvm"])
    main(["fit", f"--config={REPO / 'configs' / config}", *options, "--trainer.max_epochs=1",
          "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", *QUIET])
    run = tmp_path / "runs" / config.removesuffix(".yaml") / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["pyro_lvm"]["model"]["config"]["data_shape"] == [1, 8, 8]
    tables = [value for key, value in ckpt["state_dict"].items() if "locs" in key]
    if "PerDatapointGuide" in " ".join(options):  # a q(z_i) per training example of the quadrant data
        assert tables and all(t.shape == (1437, 8) for t in tables)
