"""The fast training step computes Pyro's loss and gradients exactly, and steps aside where it cannot."""

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

import pyro_lvm.likelihoods
from pyro_lvm import VAE, ConditionalVAE, HierarchicalVAE, LVMModule
from pyro_lvm.estimators import FreeBits, make_elbo
from pyro_lvm.training.fast_step import FastLoss, fast_path_blocker
from pyro_lvm.models.conv_vae import ConvVAE
from pyro_lvm.priors import MixturePrior, VampPrior

torch.set_num_threads(1)


def _models():
    return {
        "vae": (VAE(data_shape=12, latent_dim=3, hidden_dims=[16]), torch.bernoulli(torch.full((6, 12), 0.4))),
        "gaussian_vae": (VAE(data_shape=12, latent_dim=3, hidden_dims=[16], likelihood="gaussian"), torch.randn(6, 12)),
        "conv_vae": (ConvVAE(data_shape=(1, 8, 8), latent_channels=2, channels=(4,), hidden_dim=8),
                     torch.bernoulli(torch.full((5, 1, 8, 8), 0.4))),
        "flow_vae": (VAE(data_shape=12, latent_dim=4, hidden_dims=[16], prior_flow="realnvp", posterior_flow="iaf",
                         flow_layers=2, flow_hidden=[8]),
                     torch.bernoulli(torch.full((6, 12), 0.4))),
        # priors with a written-out log-density: the fast step's closed forms with their log p(z)
        "vamp_vae": (VAE(data_shape=12, latent_dim=3, hidden_dims=[16], prior=VampPrior(num_pseudo_inputs=4)),
                     torch.bernoulli(torch.full((6, 12), 0.4))),
        "mixture_vae": (VAE(data_shape=12, latent_dim=3, hidden_dims=[16], likelihood="gaussian",
                            prior=MixturePrior(num_components=3)), torch.randn(6, 12)),
    }


def _perturb(module):
    """Non-zero weights everywhere (flows start at the identity), so that every term carries a gradient."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


def _loss_and_grads(fn, params, seed):
    torch.manual_seed(seed)
    loss = fn()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _assert_same(a, b):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6), (loss_a, loss_b)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-6 * (1 + float(gb.abs().max())))


@pytest.mark.parametrize("name", ["vae", "gaussian_vae", "conv_vae", "flow_vae", "vamp_vae", "mixture_vae"])
@pytest.mark.parametrize("estimator", ["reparam", "analytic_kl"])
def test_fast_loss_and_gradients_equal_pyros(name, estimator):
    lvm, x = _models()[name]
    if name in ("flow_vae", "vamp_vae", "mixture_vae") and estimator == "analytic_kl":
        pytest.skip("no closed-form KL for flows and mixtures: the estimator refuses the pair")
    _perturb(lvm)
    stock = Trace_ELBO() if estimator == "reparam" else TraceMeanField_ELBO()
    stock.max_plate_nesting = 1  # no dry run that would draw from the generator
    params = [p for p in lvm.parameters()]
    pyro_result = _loss_and_grads(lambda: stock.differentiable_loss(lvm.model, lvm.guide, x), params, seed=7)
    fast_result = _loss_and_grads(lambda: FastLoss(lvm, make_elbo(estimator))(x), params, seed=7)
    _assert_same(fast_result, pyro_result)
    # another seed gives another draw (for analytic KL too: the reconstruction is sampled)
    other = _loss_and_grads(lambda: FastLoss(lvm, make_elbo(estimator))(x), params, seed=8)
    assert not torch.equal(other[0], fast_result[0])


@pytest.mark.parametrize("name", ["vae", "gaussian_vae", "conv_vae", "vamp_vae", "mixture_vae"])
@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
@pytest.mark.parametrize("beta", [1.0, 0.0, 0.3])
def test_fast_particle_bounds_equal_pyro_lvms_iwae_and_dreg(name, estimator, beta):
    # the loss and every gradient (DReG's reweighted guide gradient included) equal those of
    # the Pyro implementation in pyro_lvm.estimators, for the same draws; in float64, where
    # the two orders of summation agree to 1e-10 (float32 rounding alone reaches 3e-5 here)
    lvm, x = _models()[name]
    _perturb(lvm)
    lvm, x = lvm.double(), x.double()
    elbo = make_elbo(estimator, num_particles=5, beta=beta)
    elbo.check(lvm.model, lvm.guide, x)  # sizes the particle plate (its dry run draws numbers)
    params = list(lvm.parameters())
    pyro_loss, pyro_grads = _loss_and_grads(lambda: elbo.differentiable_loss(lvm.model, lvm.guide, x), params, 11)
    fast = FastLoss(lvm, elbo)
    fast_result = _loss_and_grads(lambda: fast(x), params, seed=11)
    fast_loss, fast_grads = fast_result
    assert fast_loss.dtype == torch.float64 and float(fast_loss) == pytest.approx(float(pyro_loss), rel=1e-10)
    for a, b in zip(fast_grads, pyro_grads):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
    encoder = [i for i, (n, _) in enumerate(lvm.named_parameters()) if n.startswith("encoder")]
    assert encoder and any(float(fast_result[1][i].abs().max()) > 0 for i in encoder)


def test_dreg_fast_path_reweights_the_guide_gradient_and_not_the_decoders():
    # IWAE and DReG share the bound and the decoder's gradient and differ in the encoder's
    lvm, x = _models()["vae"]
    _perturb(lvm)
    lvm, x = lvm.double(), x.double()
    params = list(lvm.parameters())
    names = [n for n, _ in lvm.named_parameters()]
    out = {}
    for estimator in ("iwae", "dreg"):
        out[estimator] = _loss_and_grads(lambda: FastLoss(lvm, make_elbo(estimator, num_particles=7))(x), params, 4)
    assert torch.allclose(out["iwae"][0], out["dreg"][0])
    for name, a, b in zip(names, out["iwae"][1], out["dreg"][1]):
        if name.startswith("decoder"):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), name
    assert any(not torch.allclose(a, b, rtol=1e-3) for n, a, b in zip(names, out["iwae"][1], out["dreg"][1])
               if n.startswith("encoder"))


@pytest.mark.parametrize("beta", [0.0, 0.3, 2.0])
@pytest.mark.parametrize("estimator", ["reparam", "analytic_kl", "score_function"])
@pytest.mark.parametrize("name", ["vae", "gaussian_vae", "vamp_vae"])
def test_beta_weighs_the_kl_as_pyro_lvm_estimators_do(beta, estimator, name):
    if name == "vamp_vae" and estimator == "analytic_kl":
        pytest.skip("no closed-form KL to a VampPrior")
    lvm, x = _models()[name]
    _perturb(lvm)
    elbo, twin = make_elbo(estimator, beta=beta), make_elbo(estimator, beta=beta)
    for e in (elbo, twin):
        e.check(lvm.model, lvm.guide, x)
        e.max_plate_nesting = 1
    params = list(lvm.parameters())
    for seed in (1, 2, 3):  # three steps: the score function's running baseline moves alike
        pyro_result = _loss_and_grads(lambda: elbo.differentiable_loss(lvm.model, lvm.guide, x), params, seed)
        fast_result = _loss_and_grads(lambda: FastLoss(lvm, twin)(x), params, seed)
        _assert_same(fast_result, pyro_result)


def _train(fast_step: bool, batches, estimator="analytic_kl"):
    pyro.set_rng_seed(0)
    particles = 4 if estimator in ("iwae", "dreg") else 1
    module = LVMModule(VAE(data_shape=12, latent_dim=3, hidden_dims=[16]), estimator=make_elbo(estimator, num_particles=particles),
                       fast_step=fast_step, latent_monitor=False)
    module.initialize(batches[0])
    optimizer = module.configure_optimizers()
    losses = []
    for x in batches:
        optimizer.zero_grad()
        loss = module(x)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return module, losses


@pytest.mark.parametrize("estimator", ["reparam", "analytic_kl", "score_function", "iwae", "dreg"])
def test_training_with_the_fast_step_follows_pyros_path(estimator):
    torch.manual_seed(5)
    batches = [torch.bernoulli(torch.full((8, 12), 0.3)) for _ in range(6)]
    fast, fast_losses = _train(True, batches, estimator)
    slow, slow_losses = _train(False, batches, estimator)
    assert fast._fast is not None and fast._pyro_steps == 1  # only the first step ran through Pyro
    assert slow._fast is None and slow.fast_path_blocker == "fast_step=False" and slow._pyro_steps == 6
    assert fast_losses == pytest.approx(slow_losses, rel=1e-5)
    for (name, a), b in zip(fast.state_dict().items(), slow.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


def test_the_fast_step_still_checks_every_batch():
    module = LVMModule(VAE(data_shape=4, latent_dim=2, hidden_dims=[8]), estimator="reparam", latent_monitor=False)
    x = torch.bernoulli(torch.full((8, 4), 0.5))
    module.initialize(x)
    module(x)  # the first step, through Pyro
    assert module._pyro_steps == 1
    grey = x.clone()
    grey[3, 1] = 0.5
    with pytest.raises(ValueError, match="binary"):
        module(grey)  # the fast path's first batch: checked
    bad = x.clone()
    bad[0, 0] = float("nan")
    module._fast.check_next = True  # as at an epoch's start
    with pytest.raises(ValueError, match="NaN"):
        module(bad)
    with pytest.raises(ValueError, match="shape"):
        module(x[:, :3])  # shapes: every batch
    # values: every check_every-th batch
    module._fast.check_next = False
    seen = 0
    for _ in range(module._fast.check_every):
        try:
            module(grey)
        except ValueError:
            seen += 1
    assert seen == 1
    assert module._pyro_steps == 1  # these went through the fast path


def test_batches_with_model_arguments_go_through_pyro():
    module = LVMModule(VAE(data_shape=4, latent_dim=2, hidden_dims=[8]), estimator="reparam", latent_monitor=False)
    x = torch.bernoulli(torch.full((8, 4), 0.5))
    module.initialize(x)
    module(x)
    module({"x": x, "label": torch.zeros(8)})  # a key the model does not take: fast
    assert module._pyro_steps == 1
    module({"x": x, "num_data": 100})  # the model scales by num_data / batch: Pyro's path
    assert module._pyro_steps == 2


def test_what_has_no_fast_path_is_named():
    vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8])
    assert fast_path_blocker(vae, vae.guide, make_elbo("vimco", num_particles=3)).startswith("estimator VIMCOELBO")
    assert fast_path_blocker(vae, vae.guide, make_elbo("iwae", num_particles=3)) is None
    assert fast_path_blocker(vae, vae.guide, make_elbo("score_function", baseline="nvil")) == "the NVIL baseline"
    flow_vae = _models()["flow_vae"][0]
    assert "diagonal Gaussian" in fast_path_blocker(flow_vae, flow_vae.guide, make_elbo("score_function"))
    for name in ("iwae", "dreg"):  # through the flow's own log-determinants: Pyro's path
        assert fast_path_blocker(flow_vae, flow_vae.guide, make_elbo(name, num_particles=3)).startswith(f"{name} needs")
    assert fast_path_blocker(vae, vae.guide, make_elbo("reparam", num_particles=2)) == "num_particles=2"
    assert fast_path_blocker(vae, vae.guide, make_elbo("reparam", kl_control=FreeBits(0.1))) == "kl_control"
    assert fast_path_blocker(vae, lambda x: None, make_elbo("reparam")) == "the guide is not the model's own"
    assert fast_path_blocker(None, vae.guide, make_elbo("reparam")) == "not a built-in model"
    hvae = HierarchicalVAE(data_shape=4, latent_dims=[3, 2], hidden_dims=[[8], [8]])
    assert fast_path_blocker(hvae, hvae.guide, make_elbo("reparam")) == "HierarchicalVAE has a model of its own"
    cvae = ConditionalVAE(data_shape=4, latent_dim=2, hidden_dims=[8])
    assert fast_path_blocker(cvae, cvae.guide, make_elbo("reparam")) == "ConditionalVAE has a model of its own"
    module = LVMModule(hvae, estimator="reparam", latent_monitor=False)
    assert module._fast is None and "HierarchicalVAE" in module.fast_path_blocker
    with pytest.raises(ValueError, match="No fast path"):
        FastLoss(vae, make_elbo("vimco", num_particles=2))


def test_a_user_pair_trains_through_pyro():
    def model(x):
        loc = pyro.param("loc", torch.zeros(2))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x / 2, 0.5 ** 0.5).to_event(1))

    module = LVMModule(model, guide, estimator="reparam", latent_monitor=False)
    x = torch.randn(5, 2)
    module.initialize(x)
    module(x).backward()
    module(x)
    assert module._fast is None and module.fast_path_blocker == "not a built-in model" and module._pyro_steps == 2


def test_a_copied_module_keeps_its_fast_path():
    module = LVMModule(VAE(data_shape=4, latent_dim=2, hidden_dims=[8]), estimator="analytic_kl", latent_monitor=False)
    twin = copy.deepcopy(module)
    assert twin._fast is not None and twin._fast.lvm is twin.lvm


def test_a_swapped_estimator_gets_its_own_path():
    # e.g. pyro_lvm.diagnostics.gradient_variance swaps the module's estimator between draws
    module = LVMModule(VAE(data_shape=4, latent_dim=2, hidden_dims=[8]), estimator="reparam", latent_monitor=False)
    x = torch.bernoulli(torch.full((8, 4), 0.5))
    module.initialize(x)
    module(x)
    module(x)
    assert module._pyro_steps == 1 and not module._fast.analytic
    module.estimator = module.objective.elbo = make_elbo("vimco", num_particles=3)
    module(x)
    assert module._fast is None and module.fast_path_blocker.startswith("estimator VIMCOELBO")
    module.estimator = module.objective.elbo = make_elbo("analytic_kl")
    module(x)  # through Pyro first: the new estimator checks the pair
    module(x)
    assert module._fast.analytic and module._pyro_steps == 1


def test_the_fast_step_asks_the_model_and_its_likelihood():
    # a user's subclass that changes the model is not computed from the parts; one that says its
    # redefinition keeps the meaning is; a likelihood without a written-out density keeps the
    # single-sample estimators on the distributions and the particle ones on Pyro
    class Tempered(VAE):
        def model(self, x, num_data=None):
            with pyro.poutine.scale(scale=0.5):
                return super().model(x, num_data)

    class Registered(VAE):
        keeps_base_meaning = ("model",)

        def model(self, x, num_data=None):
            return super().model(x, num_data)

    class Tempered2(Registered):
        def model(self, x, num_data=None):  # redefined again without saying so
            with pyro.poutine.scale(scale=0.5):
                return super().model(x, num_data)

    kwargs = dict(data_shape=4, latent_dim=2, hidden_dims=[8])
    reparam = make_elbo("reparam")
    t, r, t2 = Tempered(**kwargs), Registered(**kwargs), Tempered2(**kwargs)
    assert fast_path_blocker(t, t.guide, reparam) == "Tempered has a model of its own"
    assert fast_path_blocker(r, r.guide, reparam) is None
    assert fast_path_blocker(t2, t2.guide, reparam) == "Tempered2 has a model of its own"

    class NoDensity(pyro_lvm.likelihoods.BernoulliLikelihood):
        log_density = pyro_lvm.likelihoods.Likelihood.log_density

    vae = VAE(**kwargs)
    vae.likelihood = NoDensity(4)
    assert fast_path_blocker(vae, vae.guide, reparam) is None
    assert "needs the encoder's diagonal Gaussian" in fast_path_blocker(vae, vae.guide, make_elbo("iwae", num_particles=3))
    x = torch.bernoulli(torch.full((6, 4), 0.5))
    fast = FastLoss(vae, reparam)
    assert not fast.closed_form
    torch.manual_seed(1)
    through_distributions = fast(x)
    torch.manual_seed(1)
    vae.likelihood = pyro_lvm.likelihoods.BernoulliLikelihood(4)
    written_out = FastLoss(vae, reparam)(x)
    assert torch.allclose(through_distributions, written_out, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: VAE(data_shape=12, latent_dim=3, hidden_dims=[16]),
    lambda: ConvVAE(data_shape=[1, 8, 8], channels=[4, 8], latent_channels=2),
], ids=["vae", "conv_vae_spatial_latent"])
def test_validation_without_traces_gives_the_traced_numbers(make):
    # the held-out ELBO, its terms and the latent monitor's KL per dimension and activity are the same
    # through the closed form (fast_step=True) as through Pyro's traces, for the same draws
    import pytorch_lightning as pl

    torch.manual_seed(0)
    model = make()
    shape = model.event_shape
    x = torch.bernoulli(torch.full((20, *shape), 0.4))
    results = {}
    for fast in (True, False):
        module = LVMModule(copy.deepcopy(model), fast_step=fast)
        assert (module._fast is not None) == fast
        trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False)
        torch.manual_seed(5)
        (metrics,) = trainer.validate(module, dataloaders=torch.utils.data.DataLoader(x, batch_size=8), verbose=False)
        results[fast] = metrics, module.latent_monitor.history[-1]
    (fast, fast_history), (traced, traced_history) = results[True], results[False]
    for key in ("val/elbo", "val/reconstruction", "val/kl", "val/active_units"):
        assert fast[key] == pytest.approx(traced[key], rel=1e-5, abs=1e-4), key
    assert fast_history["kl"] == pytest.approx(traced_history["kl"], rel=1e-5)
    for key in ("kl", "activity"):  # per latent variable, in the latent's shape
        assert torch.allclose(fast_history["sites"]["z"][key], traced_history["sites"]["z"][key], atol=1e-5), key
