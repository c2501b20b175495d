"""Wrong estimator/pair combinations fail early and say what to use; estimator state and options."""

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_lvm
from pyro_lvm import DiscreteVAE, LVMModule, VAE
from pyro_lvm.estimators import ScoreFunctionELBO, make_elbo
from pyro_lvm.schedules import Exponential


@pytest.mark.parametrize("name", ["iwae", "dreg", "stl"])
def test_pathwise_estimators_refuse_a_discrete_latent_at_construction(name):
    with pytest.raises(ValueError, match=f"'{name}' needs reparameterizable latents.*'vimco'"):
        LVMModule(DiscreteVAE(data_shape=6, num_latents=3, num_categories=2, hidden_dims=[8]),
                  estimator=make_elbo(name, num_particles=2))


def test_enum_refuses_several_independent_categoricals():
    with pytest.raises(ValueError, match="no enumerate_support.*C\\*\\*M.*'vimco'"):
        LVMModule(DiscreteVAE(data_shape=6, num_latents=3, num_categories=2, hidden_dims=[8]), estimator="enum")


@pytest.mark.parametrize("name, message", [("enum", "no discrete latent"), ("relaxed", "no discrete latent")])
def test_discrete_estimators_refuse_a_continuous_model(name, message):
    with pytest.raises(ValueError, match=message):
        LVMModule(VAE(data_shape=6, latent_dim=2, hidden_dims=[8]), estimator=name)


@pytest.mark.parametrize("name", ["enum", "vimco", "score_function", "relaxed", "reparam"])
def test_discrete_estimators_accept_a_one_categorical_model(name):
    # accepted, and a step teaches the guide: a finite loss whose gradient reaches the encoder
    module = LVMModule(DiscreteVAE(data_shape=6, num_latents=1, num_categories=4, hidden_dims=[8]),
                       estimator=make_elbo(name, num_particles=2))
    x = torch.bernoulli(torch.full((8, 6), 0.5))
    module.initialize(x)
    loss = module(x)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in module.lvm.encoder.parameters())


def test_vimco_needs_two_particles():
    with pytest.raises(ValueError, match="num_particles >= 2"):
        make_elbo("vimco", num_particles=1)


def test_analytic_kl_without_a_closed_form_fails_at_first_use():
    def model():
        pyro.sample("z", dist.Gamma(2.0, 1.0))

    def guide():
        pyro.sample("z", dist.LogNormal(0.0, 1.0))

    with pytest.raises(ValueError, match="closed form, but none is registered for site 'z': q = LogNormal, p = Gamma. Use 'reparam'"):
        make_elbo("analytic_kl").loss(model, guide)


def test_iwae_on_a_user_pair_with_a_discrete_latent_fails_at_first_use():
    def model(x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("c", dist.Bernoulli(0.3))

    with pytest.raises(ValueError, match="site 'c' \\(Bernoulli\\) has no rsample"):
        make_elbo("iwae", num_particles=4).differentiable_loss(model, guide, torch.zeros(3))
    module = LVMModule(model, guide, estimator="dreg")
    with pytest.raises(ValueError, match="'dreg' needs reparameterizable"):
        module.initialize(torch.zeros(3))


def test_relaxed_refuses_an_integer_categorical():
    def model():
        pyro.sample("c", dist.Categorical(logits=torch.zeros(3)))

    def guide():
        pyro.sample("c", dist.Categorical(logits=torch.zeros(3)))

    with pytest.raises(ValueError, match="Use OneHotCategorical instead of Categorical"):
        make_elbo("relaxed").loss(model, guide)


def test_a_model_latent_missing_from_the_guide_points_to_enum():
    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("a", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'b' has none.*'enum'"):
        make_elbo("iwae", num_particles=2).loss(model, guide)


def test_nvil_baseline_trains_at_its_own_learning_rate():
    vae = VAE(data_shape=6, latent_dim=2, hidden_dims=[8])
    module = LVMModule(vae, estimator=ScoreFunctionELBO(baseline="nvil", baseline_lr=0.02), lr=1e-3)
    x = torch.bernoulli(torch.full((16, 6), 0.5))
    module.initialize(x)
    optimizer = module.configure_optimizers()
    baseline = {id(p) for p in module.estimator.baseline_net.parameters()}
    assert len(baseline) == 4  # two linear layers, built at the dry run
    groups = {g["lr"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    assert groups[0.02] == baseline and not baseline & groups[1e-3]
    # the regression term trains the baseline towards the learning signal
    before = module.estimator.baseline_net(x).detach()
    module(x).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.estimator.baseline_net.parameters())
    assert torch.equal(before, module.estimator.baseline_net(x).detach())  # no step taken yet


def test_decaying_average_baseline_takes_any_batch_size():
    vae = VAE(data_shape=6, latent_dim=2, hidden_dims=[8])
    elbo = make_elbo("score_function")
    for n in (5, 7, 3):
        elbo.differentiable_loss(vae.model, vae.guide, torch.bernoulli(torch.full((n, 6), 0.5))).backward()
    assert set(elbo.state_dict()) == {"average/local"}
    copy = make_elbo("score_function")
    copy.load_state_dict(elbo.state_dict())
    assert torch.equal(copy.state_dict()["average/local"], elbo.state_dict()["average/local"])


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_the_temperature_schedule_follows_the_training_step():
    vae = DiscreteVAE(data_shape=6, num_latents=2, num_categories=3, hidden_dims=[8])
    elbo = make_elbo("relaxed", temperature=Exponential(start=1.0, end=0.5, rate=0.01))
    module = LVMModule(vae, estimator=elbo)
    x = torch.bernoulli(torch.full((4, 6), 0.5))
    module.initialize(x)
    module.training_step(x, 0)  # not attached to a trainer: global_step is 0
    assert elbo.temperature == 1.0
    elbo.set_step(50)
    assert elbo.temperature == pytest.approx(float(torch.exp(torch.tensor(-0.5))))
    elbo.set_step(10_000)
    assert elbo.temperature == 0.5
    with pytest.raises(ValueError, match="temperature must be > 0"):
        make_elbo("relaxed", temperature=0.0)


@pytest.mark.parametrize("name", ["score_function", "vimco", "enum", "relaxed"])
def test_discrete_vae_trains_with_each_discrete_estimator(name):
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    x = pyro_lvm.data.DigitsDataModule(binarize="static", batch_size=128)
    x.setup("fit")
    batch = next(iter(x.train_dataloader()))["x"]
    vae = DiscreteVAE(data_shape=64, num_latents=1, num_categories=10, hidden_dims=[64])
    module = LVMModule(vae, estimator=make_elbo(name, num_particles=4 if name == "vimco" else 1))
    module.initialize(batch)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    exact = make_elbo("enum")
    with torch.no_grad(), module._scope():
        before = exact.loss(vae.model, vae.guide, batch)
    for _ in range(150):
        optimizer.zero_grad()
        module(batch).backward()
        optimizer.step()
    with torch.no_grad(), module._scope():
        after = exact.loss(vae.model, vae.guide, batch)
    assert after < before - 5.0, (before, after)  # the exact -ELBO falls by > 5 nats per batch
