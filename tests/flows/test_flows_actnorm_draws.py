"""ActNorm whose first input is a draw of the base (a flow prior or a guide), not a data batch (issue 19).

The data-dependent initialization estimates a mean and a standard deviation per feature from the
first forward input in training mode; from one draw (or a handful) it cannot, so the layer keeps
the identity, which is the right standardization of a standard normal draw.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import nn

from flow_checks import forward_map
from pyro_lvm import VAE
from pyro_lvm.flows import ActNorm, DiagonalScaling, nice, realnvp

torch.set_num_threads(1)

D = 4


def std_normal(d=D, dtype=torch.float64):
    return dist.Normal(torch.zeros(d, dtype=dtype), torch.ones(d, dtype=dtype)).to_event(1)


def actnorms(layers):
    return [m for t in layers for m in (t.modules() if isinstance(t, nn.Module) else ()) if isinstance(m, ActNorm)]


def at_identity(t: ActNorm) -> bool:
    return bool((t.log_scale == 0).all() and (t.bias == 0).all())




def check_change_of_variables(p: dist.TransformedDistribution, z: torch.Tensor) -> None:
    """log p(z) of a draw z (one event) against log p0(f^-1(z)) - log|det J_f| with J_f from autograd."""
    layers = p.transforms
    u = z.detach().clone()  # a clone: the inverse is computed, not read from the layers' caches
    for t in reversed(layers):
        u = t.inv(u)
    jac = torch.autograd.functional.jacobian(forward_map(layers), u)
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign != 0
    expected = p.base_dist.log_prob(u) - logabsdet
    torch.testing.assert_close(p.log_prob(z), expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(forward_map(layers)(u), z.detach(), atol=1e-10, rtol=1e-10)


def perturb(layers, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in layers:
            for q in t.parameters():
                q.add_(std * torch.randn(q.shape, generator=g, dtype=q.dtype))


DRAWS = {  # how the first forward input is drawn, and the shape of the draw
    "rsample()": (lambda p: p.rsample(), (D,)),
    "sample()": (lambda p: p.sample(), (D,)),
    "rsample((1,))": (lambda p: p.rsample((1,)), (1, D)),
    "rsample((5,))": (lambda p: p.rsample((5,)), (5, D)),
}


# ----- a lone ActNorm over a standard normal base ---------------------------------------------
@pytest.mark.parametrize("how", list(DRAWS))
def test_first_draw_through_actnorm_keeps_the_identity(how):
    draw, shape = DRAWS[how]
    layer = ActNorm(D).double()
    p = dist.TransformedDistribution(std_normal(), [layer])
    assert layer.training and not bool(layer.initialized)
    torch.manual_seed(0)
    z = draw(p)
    torch.manual_seed(0)
    u = draw(std_normal())  # the same base draw
    assert z.shape == shape
    assert bool(layer.initialized) and at_identity(layer)
    torch.testing.assert_close(z, u, atol=0, rtol=0)  # the identity map, exactly
    torch.testing.assert_close(p.log_prob(z), std_normal().log_prob(u))
    # marked initialized: a large, far from standard batch later does not initialize it
    layer(torch.randn(256, D, dtype=torch.float64) * 5 + 3)
    assert at_identity(layer)


def test_draws_have_the_change_of_variables_density_before_and_after_training():
    layer = ActNorm(D).double()
    p = dist.TransformedDistribution(std_normal(), [layer])
    check_change_of_variables(p, p.rsample())
    perturb([layer])  # as after some training: a non-trivial scale and shift
    assert not at_identity(layer)
    z = p.rsample()
    check_change_of_variables(p, z)
    assert layer.log_abs_det_jacobian(z, z).detach().abs() > 0.1  # the check could see a wrong log-det


# ----- a RealNVP stack with ActNorm ------------------------------------------------------------
@pytest.mark.parametrize("how", list(DRAWS))
def test_first_draw_through_realnvp_with_actnorm(how):
    draw, shape = DRAWS[how]
    torch.manual_seed(0)
    layers = list(realnvp(D, num_layers=3, hidden=(8,), actnorm=True).double())
    norms = actnorms(layers)
    assert len(norms) == 3
    p = dist.TransformedDistribution(std_normal(), layers)
    z = draw(p)
    assert z.shape == shape and torch.isfinite(z).all()
    assert all(bool(t.initialized) and at_identity(t) for t in norms)
    for event in z.reshape(-1, D):
        check_change_of_variables(p, event)


def test_realnvp_with_actnorm_draws_after_training_have_the_change_of_variables_density():
    torch.manual_seed(1)
    layers = list(realnvp(D, num_layers=3, hidden=(8,), actnorm=True).double())
    p = dist.TransformedDistribution(std_normal(), layers)
    p.rsample()
    perturb(layers, seed=2)
    assert all(not at_identity(t) for t in actnorms(layers))
    for z in (p.rsample(), p.rsample((1,))[0]):
        check_change_of_variables(p, z)


def test_nice_prior_draws_work_and_its_scaling_starts_at_the_identity():
    # DiagonalScaling, the other layer with a data-dependent initialization, never initializes
    # itself on a forward call
    torch.manual_seed(0)
    layers = list(nice(D, hidden=(8,)).double())
    p = dist.TransformedDistribution(std_normal(), layers)
    z = p.rsample()
    scaling = layers[-1]
    assert isinstance(scaling, DiagonalScaling) and bool((scaling.log_scale == 0).all())
    check_change_of_variables(p, z)


# ----- the rule: enough values per feature ----------------------------------------------------
def test_data_batch_is_still_used_for_the_data_dependent_initialization():
    torch.manual_seed(0)
    scale, shift = torch.tensor([0.5, 2.0, 4.0, 0.1], dtype=torch.float64), torch.tensor([3.0, -1.0, 0.0, 7.0])
    x = torch.randn(64, D, dtype=torch.float64) * scale + shift
    layer = ActNorm(D).double()
    y = layer(x)
    assert bool(layer.initialized)
    torch.testing.assert_close(y.mean(0), torch.zeros(D, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(y.var(0, unbiased=False), torch.ones(D, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(layer.log_scale.exp(), 1 / (x.std(0, unbiased=False) + layer.eps), rtol=1e-10, atol=0)


def test_images_count_spatial_positions_as_values_per_feature():
    torch.manual_seed(0)
    layer = ActNorm(3, dim=-3).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64) * 3 + 1  # 2 * 4 * 4 = 32 values per channel
    y = layer(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(y.var((0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("n,min_values", [(32, 32), (31, 32), (4, 4), (3, 4), (2, 2)])
def test_threshold_on_values_per_feature(n, min_values):
    torch.manual_seed(0)
    layer = ActNorm(D, min_init_values=min_values).double()
    x = torch.randn(n, D, dtype=torch.float64) * 3 + 2
    y = layer(x)
    assert bool(layer.initialized)
    if n >= min_values:  # standardized from x
        torch.testing.assert_close(y.mean(0), torch.zeros(D, dtype=torch.float64), atol=1e-10, rtol=0)
        assert not at_identity(layer)
    else:  # too few values: the identity
        assert at_identity(layer) and torch.equal(y, x)


def test_a_large_batch_of_draws_standardizes_what_the_layer_sees():
    # enough values per feature: Glow's initialization on the draws, here of a shifted, scaled base
    torch.manual_seed(0)
    base = dist.Normal(torch.full((D,), 3.0, dtype=torch.float64), 2.0).to_event(1)
    layer = ActNorm(D).double()
    z = dist.TransformedDistribution(base, [layer]).rsample((256,))
    torch.testing.assert_close(z.mean(0), torch.zeros(D, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(z.var(0, unbiased=False), torch.ones(D, dtype=torch.float64), atol=1e-5, rtol=0)


def test_trained_parameters_are_kept_on_the_first_forward_call():
    # log_prob only runs the inverse map: a flow prior is trained without any forward call, and the
    # first draw afterwards (a large batch) must not replace what was learnt
    torch.manual_seed(0)
    layer = ActNorm(D).double()
    p = dist.TransformedDistribution(std_normal(), [layer])
    data = torch.randn(128, D, dtype=torch.float64) * 2 + 1
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        (-p.log_prob(data).mean()).backward()
        opt.step()
    assert not bool(layer.initialized) and not at_identity(layer)
    trained = [q.detach().clone() for q in layer.parameters()]
    p.rsample((256,))
    assert bool(layer.initialized)
    for q, before in zip(layer.parameters(), trained):
        torch.testing.assert_close(q.detach(), before, atol=0, rtol=0)


def test_init_identity_option():
    layer = ActNorm(D, init="identity").double()
    assert bool(layer.initialized) and at_identity(layer)
    x = torch.randn(256, D, dtype=torch.float64) * 4 + 2
    assert torch.equal(layer(x), x) and at_identity(layer)
    layer.initialize(x)  # an explicit call still initializes
    torch.testing.assert_close(layer(x).mean(0), torch.zeros(D, dtype=torch.float64), atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="'data'.*'identity'"):
        ActNorm(D, init="zeros")
    with pytest.raises(ValueError, match="min_init_values"):
        ActNorm(D, min_init_values=1)


def test_explicit_initialize_on_one_value_says_what_to_do():
    layer = ActNorm(D)
    for x in (torch.randn(D), torch.randn(1, D)):
        with pytest.raises(ValueError, match=r"at least 2 values per feature.*1 per feature.*init='identity'"):
            layer.initialize(x)
    assert not bool(layer.initialized)
    layer.initialize(torch.tensor([[0.0, 1.0, 2.0, 3.0], [2.0, 3.0, 6.0, 3.5]]))  # 2 values: allowed
    torch.testing.assert_close(layer.bias, -torch.tensor([1.0, 2.0, 4.0, 3.25]) / (torch.tensor(
        [1.0, 1.0, 2.0, 0.25]) + layer.eps))
    with pytest.raises(ValueError, match="batch of at least 2.*skip"):
        DiagonalScaling(D).initialize(torch.randn(1, D))


def test_state_dict_after_a_draw_keeps_the_layer_initialized():
    layer = ActNorm(D)
    dist.TransformedDistribution(std_normal(dtype=torch.float32), [layer]).rsample()
    state = layer.state_dict()
    assert bool(state["initialized"])
    loaded = ActNorm(D)
    loaded.load_state_dict(state)
    loaded(torch.randn(256, D) * 5 + 3)
    assert at_identity(loaded)


# ----- in a VAE: flow prior and flow posterior -------------------------------------------------
class Unconditional(ConditionalTransformModule):
    """A transform that ignores the context, so that it can sit among a flow posterior's layers."""

    def __init__(self, transform):
        super().__init__()
        self.transform = transform

    def condition(self, context):
        return self.transform


def vae_with_actnorm(actnorm=True):
    torch.manual_seed(0)
    vae = VAE(data_shape=6, latent_dim=D, hidden_dims=[8], prior_flow="realnvp", posterior_flow="coupling",
              flow_layers=2, flow_hidden=[8], flow_context_dim=3).double()
    prior_layers = list(realnvp(D, num_layers=2, hidden=(8,), actnorm=True).double())
    posterior_layers = [Unconditional(ActNorm(D).double())] + list(vae.posterior_flow)
    if actnorm:
        vae.prior_part.flow = nn.ModuleList(prior_layers)
        vae.posterior_part.flow = nn.ModuleList(posterior_layers)
    return vae, prior_layers, posterior_layers


@pytest.mark.parametrize("batch", [1, 5])
def test_vae_elbo_with_actnorm_prior_and_posterior_on_the_first_call(batch):
    vae, prior_layers, posterior_layers = vae_with_actnorm()
    x = torch.bernoulli(torch.full((batch, 6), 0.4, dtype=torch.float64),
                        generator=torch.Generator().manual_seed(0))
    pyro.clear_param_store()
    torch.manual_seed(3)
    loss = pyro.infer.Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    loss.backward()
    assert torch.isfinite(loss)
    guide_norm = posterior_layers[0].transform
    assert bool(guide_norm.initialized) and at_identity(guide_norm)  # z of shape (batch, D): too few values
    for t in [guide_norm] + actnorms(prior_layers):
        assert t.log_scale.grad is not None and t.log_scale.grad.abs().sum() > 0
        assert torch.isfinite(t.bias.grad).all()
    # an ActNorm at the identity changes nothing: the same estimate without the ActNorm layers
    vae.prior_part.flow = nn.ModuleList([t for t in prior_layers if not isinstance(t, ActNorm)])
    vae.posterior_part.flow = nn.ModuleList(posterior_layers[1:])
    pyro.clear_param_store()
    torch.manual_seed(3)
    without = pyro.infer.Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    torch.testing.assert_close(loss, without, atol=1e-10, rtol=1e-10)


def test_vae_sampling_from_an_actnorm_prior_on_the_first_call_and_after_training():
    vae, prior_layers, _ = vae_with_actnorm()
    norms = actnorms(prior_layers)
    z = vae.prior().rsample()  # one unbatched draw of the prior, in training mode
    assert z.shape == (D,) and all(bool(t.initialized) and at_identity(t) for t in norms)
    # a fresh model trained a few steps (the prior's ActNorms only see log_prob), then sampled
    vae, prior_layers, _ = vae_with_actnorm()
    norms = actnorms(prior_layers)
    x = torch.bernoulli(torch.full((16, 6), 0.4, dtype=torch.float64), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(vae.parameters(), lr=0.05)
    elbo = pyro.infer.Trace_ELBO()
    pyro.clear_param_store()
    for _ in range(3):
        opt.zero_grad()
        elbo.differentiable_loss(vae.model, vae.guide, x).backward()
        opt.step()
    assert all(not bool(t.initialized) and not at_identity(t) for t in norms)
    trained = [t.log_scale.detach().clone() for t in norms]
    assert vae.sample(64).shape == (64, 6)  # 64 draws in training mode: enough values, but trained
    assert all(bool(t.initialized) for t in norms)
    for t, before in zip(norms, trained):
        torch.testing.assert_close(t.log_scale.detach(), before, atol=0, rtol=0)
