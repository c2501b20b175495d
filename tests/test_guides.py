"""Guides: per-datapoint (index bookkeeping, exact posteriors), semi-amortized refinement, global + local."""

import pyro
import pyro.distributions as dist
import pytest
import pytorch_lightning as pl
import torch
from pyro import poutine
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import pyro_lvm
from linear_gaussian import LinearGaussian
from pyro_lvm.data import DigitsDataModule, EpochShuffleSampler, TensorDictDataset, collate_batch
from pyro_lvm.guides import AmortizedGuide, PerDatapointGuide, SemiAmortizedGuide, with_global_autoguide

QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)


@pytest.fixture(autouse=True)
def few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these are tiny models: threads only add overhead
    pyro.clear_param_store()
    yield
    torch.set_num_threads(threads)


# ----- a linear-Gaussian model with a known posterior -------------------------------------
# z ~ N(0, I_K), x | z ~ N(W z + b, s^2 I_D):  p(z | x) = N(S W^T (x - b) / s^2, S),
# S = (I + W^T W / s^2)^{-1}. A mean-field Gaussian q is optimal at the exact means and at
# standard deviations 1 / sqrt(diag(S^{-1})).
K, D, S_NOISE = 2, 5, 0.5
LINEAR_GAUSSIAN = LinearGaussian.random(K, D, S_NOISE, seed=0, dtype=torch.float32)
lg_model, lg_data, lg_log_evidence = LINEAR_GAUSSIAN.model, LINEAR_GAUSSIAN.sample, LINEAR_GAUSSIAN.log_evidence
PRECISION = LINEAR_GAUSSIAN.precision  # of the posterior
posterior_mean = LINEAR_GAUSSIAN.posterior_loc


def mean_elbo(model, guide, *args, draws=100, **kwargs):
    """The ELBO per data point, averaged over many draws of z."""
    with torch.no_grad():
        total = sum(pyro_lvm.elbo_terms(model, guide, *args, **kwargs)["elbo"] for _ in range(draws))
    return float(total) / draws / args[0].shape[0]


class RecordLoss(pl.Callback):
    def __init__(self):
        self.loss = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.loss.append(float(trainer.callback_metrics["train/loss_epoch"]))


# ----- AmortizedGuide ------------------------------------------------------------------------
def test_amortized_guide_on_the_vae_encoder_is_the_vae_guide():
    vae = pyro_lvm.VAE(data_shape=6, latent_dim=3, hidden_dims=[8])
    guide = AmortizedGuide(vae.encoder)
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    for num_data in (None, 100):
        with pyro.poutine.block():
            ours = poutine.trace(guide).get_trace(x, num_data=num_data, index=torch.arange(5))
            theirs = poutine.trace(vae.guide).get_trace(x, num_data=num_data)
        a, b = ours.nodes["z"], theirs.nodes["z"]
        assert torch.allclose(a["fn"].base_dist.loc, b["fn"].base_dist.loc)
        assert torch.allclose(a["fn"].base_dist.scale, b["fn"].base_dist.scale)
        assert a["scale"] == b["scale"] == (1.0 if num_data is None else num_data / 5)


# ----- PerDatapointGuide ---------------------------------------------------------------------
def test_per_datapoint_guide_has_exactly_2_N_d_parameters():
    N, d = 100, 3
    vae = pyro_lvm.VAE(data_shape=6, latent_dim=d, hidden_dims=[8])
    guide = PerDatapointGuide(num_data=N)
    module = pyro_lvm.LVMModule(vae, guide=guide)
    batch = {"x": torch.bernoulli(torch.full((10, 6), 0.5)), "index": torch.randperm(N)[:10]}
    module.initialize(batch)
    count = lambda params: sum(p.numel() for p in params)
    assert count(guide.parameters()) == 2 * N * d
    theta = count(vae.decoder.parameters()) + count(vae.likelihood.parameters())
    # LVMModule holds the whole VAE (its unused encoder too) and the tables
    assert count(module.parameters()) == count(vae.parameters()) + 2 * N * d
    # the parameters the ELBO trains are the lecture's |theta| + (|mu_i| + |sigma_i|) N
    module(batch).backward()
    assert count(p for p in module.parameters() if p.grad is not None) == theta + 2 * N * d
    # only the rows of the batch get a gradient
    touched = guide.locs["z"].grad.abs().sum(-1) > 0
    assert set(touched.nonzero().flatten().tolist()) == set(batch["index"].tolist())


def test_per_datapoint_means_converge_to_the_exact_posterior_of_each_example():
    """Shuffled mini-batches: row i must end at the posterior of example i, found by its index."""
    torch.manual_seed(0)
    N, held_out = 64, lg_data(16, seed=2)
    x = lg_data(N, seed=1)
    guide = PerDatapointGuide(own_lr=0.05, eval_steps=200)
    module = pyro_lvm.LVMModule(lg_model, guide, estimator="analytic_kl")
    sampler = EpochShuffleSampler(N, seed=0)
    loader = DataLoader(TensorDictDataset(x), batch_size=16, sampler=sampler, collate_fn=collate_batch)
    guide.set_num_data(N)
    module.initialize(next(iter(loader)))
    optimizer = module.configure_optimizers()
    assert optimizer.param_groups[1]["lr"] == 0.05  # the tables' own rate
    epochs = 200
    for epoch in range(epochs):
        if epoch == 3 * epochs // 4:  # a smaller rate to let the stochastic iterates settle
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        sampler.set_epoch(epoch)
        for batch in loader:
            optimizer.zero_grad()
            module(batch).backward()
            optimizer.step()
    loc = guide.locs["z"].detach()
    scale = torch.nn.functional.softplus(guide.raw_scales["z"].detach())
    exact = posterior_mean(x)
    assert (loc - exact).abs().max() < 0.2, (loc - exact).abs().max()
    assert (loc - exact).abs().mean() < 0.05
    mean_field_sd = torch.diagonal(PRECISION).rsqrt()
    assert torch.allclose(scale.mean(0), mean_field_sd, rtol=0.1)
    # a wrong row would be off by the spread of the posterior means
    assert (loc - exact.roll(1, 0)).abs().mean() > 10 * (loc - exact).abs().mean()

    # held-out points have no rows: in eval mode q is fitted afresh, close to the exact posterior
    guide.eval()
    with torch.no_grad():
        fitted_loc, fitted_scale = guide.refit(held_out)["z"]
    assert (fitted_loc - posterior_mean(held_out)).abs().max() < 0.2
    assert torch.allclose(fitted_scale.mean(0), mean_field_sd, rtol=0.15)


def test_eval_refit_trains_no_model_parameter_and_works_under_no_grad():
    vae = pyro_lvm.VAE(data_shape=6, latent_dim=2, hidden_dims=[8])
    guide = PerDatapointGuide(num_data=10, eval_steps=5).attach(vae.model, vae).eval()
    x = torch.bernoulli(torch.full((4, 6), 0.5))
    with torch.no_grad():
        terms = pyro_lvm.elbo_terms(vae.model, guide, x)
    assert torch.isfinite(terms["elbo"])
    assert all(p.grad is None for p in vae.parameters())
    # with gradients on, the model still learns through log p(x, z) at the refitted q
    pyro_lvm.elbo_terms(vae.model, guide, x)["elbo"].backward()
    assert vae.decoder[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in guide.parameters())


def test_constrained_latents_are_gaussians_pushed_to_their_support():
    N = 20

    def model(x, index=None):
        with pyro.plate("data", x.shape[0]):
            rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))  # positive, scalar per example
            mix = pyro.sample("mix", dist.Dirichlet(torch.ones(3)))  # on the 3-simplex
            pyro.sample("x", dist.Normal(rate.unsqueeze(-1) * mix, 1.0).to_event(1), obs=x)

    guide = PerDatapointGuide(num_data=N).attach(model)
    x = torch.randn(5, 3)
    trace = poutine.trace(guide).get_trace(x, index=torch.arange(5))
    assert (trace.nodes["rate"]["value"] > 0).all()
    assert torch.allclose(trace.nodes["mix"]["value"].sum(-1), torch.ones(5))
    # unconstrained tables: 1 column for the rate, K - 1 = 2 for the simplex
    assert guide.locs["rate"].shape == (N,) and guide.locs["mix"].shape == (N, 2)
    loss = pyro.infer.Trace_ELBO().differentiable_loss(model, guide, x, index=torch.arange(5))
    assert torch.isfinite(loss)


def test_per_datapoint_guide_errors_speak_to_the_user():
    x = torch.randn(4, D)
    guide = PerDatapointGuide(num_data=8).attach(lg_model)
    with pytest.raises(ValueError, match="needs the example's index"):
        guide(x)
    with pytest.raises(ValueError, match="got index 9"):
        guide(x, index=torch.tensor([0, 1, 2, 9]))
    with pytest.raises(ValueError, match="number of training examples.*num_data=.*set_num_data"):
        PerDatapointGuide().attach(lg_model)(x, index=torch.arange(4))
    with pytest.raises(ValueError, match="does not know its model"):
        PerDatapointGuide(num_data=8)(x, index=torch.arange(4))
    with pytest.raises(ValueError, match="training set has 9"):
        PerDatapointGuide(num_data=8).set_num_data(9)

    def discrete(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    with pytest.raises(ValueError, match="'c' \\(Bernoulli\\) is discrete.*score_function.*enumeration"):
        PerDatapointGuide(num_data=8).attach(discrete)(torch.randn(4), index=torch.arange(4))


# ----- SemiAmortizedGuide --------------------------------------------------------------------
def test_refined_elbo_is_at_least_the_amortized_elbo_of_an_untrained_vae():
    torch.manual_seed(0)
    data = DigitsDataModule()
    x = data.datasets["val"].x[:64]
    vae = pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[32])
    guide = SemiAmortizedGuide().attach(vae.model, vae)
    base, refined = mean_elbo(vae.model, vae.guide, x), mean_elbo(vae.model, guide, x)
    assert refined > base + 0.05, (base, refined)


def test_refinement_climbs_toward_the_log_evidence_of_a_linear_gaussian_model():
    torch.manual_seed(0)
    x = lg_data(32, seed=3)
    encoder = torch.nn.Linear(D, 2 * K)
    torch.nn.init.zeros_(encoder.weight), torch.nn.init.zeros_(encoder.bias)  # q = N(0, softplus(0))
    base = AmortizedGuide(encoder)
    # plain gradient ascent (no clipping), stable for a step below 1 / (largest posterior precision)
    assert 0.02 < 1 / float(torch.linalg.eigvalsh(PRECISION).max())
    refined = SemiAmortizedGuide(base, num_steps=100, step_size=0.02, max_grad_norm=None).attach(lg_model)
    log_evidence = float(lg_log_evidence(x).mean())
    elbo_base, elbo_refined = mean_elbo(lg_model, base, x), mean_elbo(lg_model, refined, x, draws=20)
    assert elbo_base < elbo_refined <= log_evidence + 0.1
    gaps = (log_evidence - elbo_refined, log_evidence - elbo_base)
    assert gaps[0] < 0.05 * gaps[1], gaps


def test_differentiable_refinement_trains_the_encoder_and_the_detached_one_does_not():
    vae = pyro_lvm.VAE(data_shape=6, latent_dim=2, hidden_dims=[8])
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    for differentiable in (True, False):
        guide = SemiAmortizedGuide(num_steps=3, differentiable=differentiable).attach(vae.model, vae)
        loss = pyro.infer.Trace_ELBO().differentiable_loss(vae.model, guide, x)
        grads = torch.autograd.grad(loss, list(vae.encoder.parameters()), allow_unused=True)
        norm = sum(0.0 if g is None else float(g.abs().sum()) for g in grads)
        assert (norm > 0) == differentiable, (differentiable, norm)


def test_refinement_runs_under_no_grad_and_keeps_the_base_guide_plates():
    vae = pyro_lvm.VAE(data_shape=6, latent_dim=2, hidden_dims=[8])
    guide = SemiAmortizedGuide(num_steps=3).attach(vae.model, vae)
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    with torch.no_grad():
        q = guide.refine(x)["z"]
        trace = poutine.trace(guide).get_trace(x, num_data=50)
    assert not q.loc.requires_grad and not torch.allclose(q.loc, vae.encode(x)[0])
    site = trace.nodes["z"]
    assert site["value"].shape == (5, 2) and site["scale"] == 10.0  # 50 / 5: the VAE's subsample plate
    assert [f.name for f in site["cond_indep_stack"]] == ["data"]


@pytest.mark.parametrize("make_guide", [PerDatapointGuide, SemiAmortizedGuide], ids=["refit", "refine"])
def test_fitting_q_works_under_inference_mode_as_in_lightning_validate_and_test(make_guide):
    vae = pyro_lvm.VAE(data_shape=6, latent_dim=2, hidden_dims=[8])
    guide = make_guide().attach(vae.model, vae).eval()
    x = torch.bernoulli(torch.full((4, 6), 0.5))
    with torch.inference_mode():
        terms = pyro_lvm.elbo_terms(vae.model, guide, x)
    assert torch.isfinite(terms["elbo"])


def test_semi_amortized_guide_errors_speak_to_the_user():
    def gamma_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Gamma(torch.ones(x.shape[0], K), 1.0).to_event(1))

    guide = SemiAmortizedGuide(gamma_guide).attach(lg_model)
    with pytest.raises(ValueError, match="site 'z' is Gamma.*Normal"):
        guide(torch.randn(3, D))
    with pytest.raises(ValueError, match="no base guide"):
        SemiAmortizedGuide().attach(lg_model, None)


# ----- through pyro_lvm.fit on the digits -----------------------------------------------------
@pytest.mark.parametrize(
    "make_guide",
    [lambda: PerDatapointGuide(eval_steps=10), lambda: SemiAmortizedGuide(num_steps=3)],
    ids=["per_datapoint", "semi_amortized"],
)
def test_guide_trains_the_digits_vae_through_fit(make_guide):
    record = RecordLoss()
    vae = pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[32])
    module = pyro_lvm.fit(
        vae, guide=make_guide(), data=DigitsDataModule(batch_size=64), max_epochs=3, lr=1e-2,
        limit_val_batches=1, num_sanity_val_steps=0, callbacks=[record], **QUIET,
    )
    assert record.loss[-1] < record.loss[0] - 3.0, record.loss
    assert torch.isfinite(module.trainer.callback_metrics["val/elbo"])


# ----- with_global_autoguide -----------------------------------------------------------------
N_GLOBAL, PRIOR_SD, NOISE = 200, 3.0, 0.5


def global_model(x, index=None):
    """w ~ N(0, 3^2) shared, z_i ~ N(0, 1), x_i ~ N(w + z_i, 0.5^2)."""
    w = pyro.sample("w", dist.Normal(0.0, PRIOR_SD))
    with pyro.plate("data", N_GLOBAL, subsample=index):
        z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(w + z, NOISE).to_event(1), obs=x)


def test_global_autoguide_recovers_the_global_latent():
    torch.manual_seed(0)
    x = 2.0 + torch.randn(N_GLOBAL, 1) + NOISE * torch.randn(N_GLOBAL, 1)
    local = PerDatapointGuide(
        own_lr=0.05, create_plate=lambda x, index=None: pyro.plate("data", N_GLOBAL, subsample=index)
    )
    guide = with_global_autoguide(global_model, local)
    module = pyro_lvm.LVMModule(global_model, guide, lr=0.05)
    guide.set_num_data(N_GLOBAL)  # reaches the local guide, as LVMModule.setup does
    assert local.num_data == N_GLOBAL
    module.initialize({"x": x[:10], "index": torch.arange(10)})
    optimizer = module.configure_optimizers()
    for step in range(600):
        if step == 450:
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        index = torch.randperm(N_GLOBAL)[:100]
        optimizer.zero_grad()
        module({"x": x[index], "index": index}).backward()
        optimizer.step()
    # x_i ~ N(w, 1 + 0.5^2) marginally; the Gaussian posterior mean, which mean-field VI finds
    exact = float(x.sum() / (1 + NOISE**2) / (1 / PRIOR_SD**2 + N_GLOBAL / (1 + NOISE**2)))
    learned = float(guide[0].median()["w"])
    assert abs(learned - exact) < 0.1, (learned, exact)
    assert set(guide(x[:4], index=torch.arange(4))) == {"w", "z"}


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_per_datapoint_tables_are_checkpointed_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    def run(max_epochs, ckpt_path=None, dirpath=None):
        callbacks = [ModelCheckpoint(dirpath=dirpath, save_last=True)] if dirpath else []
        pl.seed_everything(7, verbose=False)
        return pyro_lvm.fit(
            pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[16]),
            guide=PerDatapointGuide(eval_steps=2), data=DigitsDataModule(batch_size=128), seed=7,
            max_epochs=max_epochs, ckpt_path=ckpt_path, callbacks=callbacks, limit_val_batches=1,
            num_sanity_val_steps=0, **dict(QUIET, enable_checkpointing=bool(dirpath)),
        )

    straight = run(3)
    run(1, dirpath=tmp_path)
    resumed = run(3, ckpt_path=str(tmp_path / "last.ckpt"), dirpath=tmp_path)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and any("locs.z" in key for key in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)

    # a fresh module evaluates from the checkpoint: the table is sized from the training split
    module = pyro_lvm.LVMModule(pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[16]),
                                guide=PerDatapointGuide(eval_steps=2))
    trainer = pl.Trainer(limit_test_batches=1, **QUIET)
    (metrics,) = trainer.test(module, datamodule=DigitsDataModule(batch_size=128),
                              ckpt_path=str(tmp_path / "last.ckpt"), weights_only=True, verbose=False)
    assert metrics["test/elbo"] < 0


def test_a_module_guide_gets_only_the_batch_keys_its_forward_takes():
    class Guide(pyro.nn.PyroModule):
        def forward(self, x):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))

    vae = pyro_lvm.VAE(data_shape=4, latent_dim=2, hidden_dims=[8])
    module = pyro_lvm.LVMModule(vae, guide=Guide())
    batch = {"x": torch.bernoulli(torch.full((3, 4), 0.5)), "index": torch.arange(3)}
    module.initialize(batch)
    assert torch.isfinite(module(batch))
