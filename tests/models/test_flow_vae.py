"""Flows inside the VAE: a flow prior p(z), a flow posterior q(z | x), and their estimators."""

import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from flow_checks import forward_map
from pyro_lvm import VAE, LVMModule
from pyro_lvm.estimators import Capacity, FreeBits, make_elbo
from pyro_lvm.nets import MLP

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]


def binary(n, d=16, seed=0):
    return torch.bernoulli(torch.full((n, d), 0.3), generator=torch.Generator().manual_seed(seed))


def perturb(vae, std=0.3):
    """Move the flows' zero-initialized last layers so that no flow is the identity."""
    torch.manual_seed(1)
    for flow in (vae.prior_flow, vae.posterior_flow):
        for module in flow.modules() if flow is not None else ():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                nn.init.normal_(module.bias, std=std)
    return vae


def flow_vae(dtype=torch.float64, **flows):
    torch.manual_seed(0)
    vae = VAE(data_shape=16, latent_dim=2, hidden_dims=[8], flow_layers=3, flow_hidden=[8], flow_context_dim=3, **flows)
    return perturb(vae).to(dtype)




def by_hand_log_density(base_log_prob, layers, z):
    """Change of variables with the Jacobian from autograd: log p0(f^-1(z)) - log|det J_f(f^-1(z))|."""
    u = z
    for t in reversed(layers):
        u = t.inv(u)
    f = forward_map(layers)
    out = []
    for i in range(z.shape[0]):
        jac = torch.autograd.functional.jacobian(f, u[i])
        out.append(base_log_prob(u[i], i) - torch.linalg.slogdet(jac)[1])
    return torch.stack(out), u


def grid_integral(log_prob, half_width=10.0, n=401):
    """int exp(log_prob(z)) dz over [-w, w]^2 by the trapezoid-free midpoint rule."""
    t = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    h = (t[1] - t[0]) ** 2
    return float(torch.exp(log_prob(z)).sum() * h)


# ----- the densities ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["realnvp", "nice"])
def test_flow_prior_log_prob_is_the_change_of_variables(kind):
    vae = flow_vae(prior_flow=kind)
    prior = vae.prior()
    assert type(prior).__name__ == "TransformedDistribution"
    z = torch.randn(5, 2, dtype=torch.float64) * 2
    std = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)
    expected, u = by_hand_log_density(lambda u, i: std.log_prob(u), list(vae.prior_flow), z)
    assert not torch.allclose(u, z, atol=1e-2)  # the flow is not the identity
    assert torch.allclose(prior.log_prob(z), expected, atol=1e-8)
    # the density broadcasts over batch (and particle) dims like N(0, I) does
    assert vae.prior(torch.Size([4, 3])).log_prob(torch.randn(4, 3, 2, dtype=torch.float64)).shape == (4, 3)


@pytest.mark.parametrize("kind", ["coupling", "iaf"])
def test_flow_posterior_log_prob_is_the_change_of_variables(kind):
    vae = flow_vae(posterior_flow=kind)
    x = binary(4).double()
    q = vae.posterior(x)
    loc, scale, context = vae.posterior_part.base(vae.encoder_output(x))
    layers = [t.condition(context) for t in vae.posterior_flow]
    z = torch.randn(4, 2, dtype=torch.float64)

    def base(u, i):
        return dist.Normal(loc[i], scale[i]).to_event(1).log_prob(u)

    # one data point at a time: the per-point map has a 2x2 Jacobian
    expected = []
    for i in range(4):
        point = [t.condition(context[i]) for t in vae.posterior_flow]
        value, _ = by_hand_log_density(lambda u, _: base(u, i), point, z[i : i + 1])
        expected.append(value[0])
    assert torch.allclose(q.log_prob(z), torch.stack(expected), atol=1e-8)
    # log q of an rsample'd value (cached inverse) equals the recomputed inverse
    pyro.set_rng_seed(0)
    sample = q.rsample()
    assert torch.allclose(q.log_prob(sample), q.log_prob(sample.detach().clone()), atol=1e-8)
    assert not torch.allclose(forward_map(layers)(loc), loc, atol=1e-2)


@pytest.mark.parametrize("flows", [dict(prior_flow="realnvp"), dict(posterior_flow="coupling")], ids=["prior", "posterior"])
def test_flow_densities_integrate_to_one(flows):
    vae = flow_vae(**flows)
    with torch.no_grad():
        if "prior_flow" in flows:
            total = grid_integral(vae.prior().log_prob)
        else:
            x = binary(1).double()
            total = grid_integral(lambda z: vae.posterior(x).log_prob(z[:, None])[:, 0])
    assert total == pytest.approx(1.0, abs=1e-2)


def test_sample_draws_from_the_flow_prior():
    vae = flow_vae(prior_flow="realnvp")
    pyro.set_rng_seed(0)
    x = vae.sample(3)
    pyro.set_rng_seed(0)
    u = torch.randn(3, 2, dtype=torch.float64)
    assert torch.allclose(x, vae.decode(forward_map(list(vae.prior_flow))(u)))


def test_encode_and_reconstruct_use_the_flow_at_the_base_mean():
    vae = flow_vae(posterior_flow="coupling")
    x = binary(3).double()
    loc, scale = vae.encode(x)
    base_loc, base_scale, context = vae.posterior_part.base(vae.encoder_output(x))
    assert torch.allclose(loc, forward_map([t.condition(context) for t in vae.posterior_flow])(base_loc))
    assert torch.equal(scale, base_scale)
    assert torch.allclose(vae.reconstruct(x), vae.decode(loc))
    assert vae.reconstruct(x, sample=True).shape == x.shape


# ----- the default VAE is unchanged -------------------------------------------------
def test_default_vae_has_the_parameters_and_random_numbers_of_the_plain_vae():
    torch.manual_seed(0)
    vae = VAE(data_shape=16, latent_dim=2, hidden_dims=[8])
    after = torch.get_rng_state()
    torch.manual_seed(0)
    encoder, decoder = MLP(16, [8], 4), MLP(2, [8], 16)
    assert torch.equal(torch.get_rng_state(), after)
    assert vae.prior_flow is None and vae.posterior_flow is None
    plain = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    plain.update({f"decoder.{k}": v for k, v in decoder.state_dict().items()})
    state = vae.state_dict()
    assert set(state) == set(plain)
    assert all(torch.equal(state[k], plain[k]) for k in plain)
    torch.manual_seed(0)
    explicit = VAE(data_shape=16, latent_dim=2, hidden_dims=[8], prior_flow=None, posterior_flow=None)
    x = binary(6)
    losses = []
    for model in (vae, explicit):
        pyro.set_rng_seed(3)
        losses.append(pyro.infer.Trace_ELBO().loss(model.model, model.guide, x))
    assert losses[0] == losses[1]
    assert type(vae.posterior(x)).__name__ == "Independent" and type(vae.prior()).__name__ == "Independent"


def test_flow_options_are_stored_and_rebuild_the_model():
    vae = flow_vae(prior_flow="nice", posterior_flow="iaf")
    assert vae.config["prior"]["class_path"] == "pyro_lvm.priors.FlowPrior"
    assert vae.config["prior"]["init_args"]["flow"] == "nice" and vae.config["prior"]["init_args"]["hidden"] == [8]
    assert vae.config["posterior"]["init_args"]["flow"] == "iaf"
    twin = VAE(**vae.config)
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in vae.state_dict().items()}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prior_flow="glow"), "prior_flow must be one of 'realnvp', 'nice'"),
        (dict(posterior_flow="maf"), "posterior_flow must be one of 'coupling', 'iaf'"),
        (dict(prior_flow="realnvp", latent_dim=1), "needs latent_dim >= 2"),
        (dict(posterior_flow="coupling", flow_layers=0), "flow_layers must be a positive integer"),
    ],
)
def test_bad_flow_options_are_refused(kwargs, message):
    kwargs = dict(dict(data_shape=16, latent_dim=2, hidden_dims=[8]), **kwargs)
    with pytest.raises(ValueError, match=message):
        VAE(**kwargs)


# ----- estimators -------------------------------------------------------------------
FLOWS = {
    "prior": dict(prior_flow="realnvp"),
    "posterior": dict(posterior_flow="coupling"),
    "both": dict(prior_flow="realnvp", posterior_flow="coupling"),
}


@pytest.mark.parametrize("estimator, particles", [("reparam", 1), ("stl", 1), ("iwae", 3), ("dreg", 3)])
@pytest.mark.parametrize("flows", list(FLOWS), ids=list(FLOWS))
def test_one_training_step_reaches_the_flow_parameters(flows, estimator, particles):
    torch.manual_seed(0)
    vae = VAE(data_shape=16, latent_dim=2, hidden_dims=[8], flow_layers=2, flow_hidden=[8], flow_context_dim=3,
              **FLOWS[flows])
    module = LVMModule(vae, estimator=make_elbo(estimator, num_particles=particles), latent_monitor=False)
    x = binary(5)
    module.initialize(x)
    loss = module(x)
    loss.backward()
    assert torch.isfinite(loss)
    for flow in (vae.prior_flow, vae.posterior_flow):
        if flow is not None:
            grads = [p.grad for p in flow.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert any(g.abs().sum() > 0 for g in grads)


def test_particles_see_a_left_particle_dim_and_the_context_broadcasts():
    vae = flow_vae(torch.float32, prior_flow="realnvp", posterior_flow="coupling")
    x = binary(5)
    with pyro.plate("particles", 7, dim=-2):
        z = pyro.poutine.trace(vae.guide).get_trace(x).nodes["z"]
    assert z["value"].shape == (7, 5, 2) and z["fn"].log_prob(z["value"]).shape == (7, 5)
    assert vae.prior().log_prob(z["value"]).shape == (7, 5)


def test_iwae_bound_is_above_the_elbo_with_flows():
    vae = flow_vae(torch.float32, prior_flow="realnvp", posterior_flow="coupling")
    x = binary(10)
    pyro.set_rng_seed(0)
    weights = make_elbo("iwae", num_particles=2000)
    with torch.no_grad():
        log_w = weights.particle_weights(vae.model, vae.guide, x).joint()  # (K, N)
    elbo = log_w.mean(0)
    stderr = log_w.std(0) / math.sqrt(log_w.shape[0])
    iwae = torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])
    assert (iwae >= elbo - 3 * stderr).all()
    assert float((iwae - elbo).sum()) > 0.1  # strictly tighter on a random model
    pyro.set_rng_seed(1)
    bound = -make_elbo("iwae", num_particles=2000).loss(vae.model, vae.guide, x)
    assert bound == pytest.approx(float(iwae.sum()), abs=0.5)


@pytest.mark.parametrize("flows", list(FLOWS), ids=list(FLOWS))
def test_analytic_kl_and_kl_control_refuse_a_flow(flows):
    vae = VAE(data_shape=16, latent_dim=2, hidden_dims=[8], flow_hidden=[8], **FLOWS[flows])
    with pytest.raises(ValueError, match="'analytic_kl' needs KL.*normalizing flow.*'reparam' or 'iwae'"):
        LVMModule(vae, estimator="analytic_kl")
    for control in (FreeBits(0.5), Capacity(5.0)):
        with pytest.raises(ValueError, match="kl_control.*normalizing flow.*'reparam' or 'iwae' without kl_control"):
            LVMModule(vae, estimator=make_elbo("reparam", kl_control=control))


# ----- behaviour: a non-Gaussian posterior ------------------------------------------
class Parabola(nn.Module):
    """x | z ~ N(z2 - z1^2, 0.1^2): given x, the posterior lies along the parabola z2 = x + z1^2."""

    def forward(self, z):
        return z[..., 1:] - z[..., :1] ** 2


def fitted_elbo(posterior_flow, steps=300):
    torch.manual_seed(0)
    vae = VAE(data_shape=1, latent_dim=2, hidden_dims=[16], likelihood="gaussian", likelihood_scale=0.1,
              posterior_flow=posterior_flow, flow_layers=2, flow_hidden=[16], flow_context_dim=4)
    vae.decoder = Parabola()
    x = torch.tensor([[-0.5], [0.0], [0.5], [1.0]])
    pyro.clear_param_store()
    elbo = make_elbo("reparam", num_particles=16, vectorize_particles=True)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        elbo.differentiable_loss(vae.model, vae.guide, x).backward()
        optimizer.step()
    pyro.set_rng_seed(0)
    weights = make_elbo("iwae", num_particles=4000)
    with torch.no_grad():
        log_w = weights.particle_weights(vae.model, vae.guide, x).joint()
    per_point = log_w.mean(0)
    return float(per_point.mean()), float((log_w.var(0) / log_w.shape[0]).sum().sqrt() / x.shape[0])


def test_flow_posterior_beats_the_diagonal_gaussian_on_a_banana_posterior():
    gaussian, se_gaussian = fitted_elbo(None)
    flow, se_flow = fitted_elbo("coupling")
    assert flow > gaussian + 0.2 + 3 * (se_gaussian + se_flow), (flow, gaussian)


# ----- the shipped configs ------------------------------------------------------------
@pytest.mark.parametrize("name", ["vae_digits_flow_prior.yaml", "vae_digits_flow_posterior.yaml"])
def test_flow_configs_run_through_the_cli(name, tmp_path, monkeypatch):
    from pyro_lvm.cli import main

    monkeypatch.setattr("sys.argv", ["pyro-lvm"])
    monkeypatch.chdir(tmp_path)
    main(["fit", f"--config={REPO / 'configs' / name}", "--trainer.fast_dev_run=true",
          "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    assert (tmp_path / "samples.png").is_file()
