"""Mathematical checks of RealNVP's multi-scale architecture (:class:`FactorOut`, ``realnvp(num_scales=L)``) and image NICE."""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from flow_checks import autograd_logdet, forward, inverse, perturb
from pyro_lvm.flows.coupling import AdditiveCoupling, AffineCoupling
from pyro_lvm.flows.layers import ActNorm, DiagonalScaling, InvertibleConv1x1, Squeeze
from pyro_lvm.flows.multiscale import FactorOut
from pyro_lvm.flows.stacks import _DepthToSpace, initialize_actnorm, nice, realnvp

torch.set_num_threads(1)


def base_shape(shape, layers):
    s = torch.Size(shape)
    for t in reversed(list(layers)):
        s = t.inverse_shape(s)
    return s


def std_normal(shape, dtype=torch.float64):
    return dist.Normal(torch.zeros(shape, dtype=dtype), torch.ones(shape, dtype=dtype)).to_event(len(shape))


# ----- FactorOut ---------------------------------------------------------------------
def squeezed_inner(shape):
    """A shape-preserving inner flow that squeezes: Squeeze, two channel couplings, depth-to-space."""
    c, h, w = shape
    sq = (4 * c, h // 2, w // 2)
    return [Squeeze(), AffineCoupling(sq, hidden=(4,), mask="channel", parity=0),
            AffineCoupling(sq, hidden=(4,), mask="channel", parity=1), _DepthToSpace(),
            AffineCoupling(shape, hidden=(4,), mask="checkerboard", parity=1)]


@pytest.mark.parametrize("shape,split", [((2, 4, 4), 1), ((3, 8, 8), 1), ((4, 4, 8), 2)])
def test_factor_out_round_trip_log_det_matches_autograd_and_kept_part_is_untouched(shape, split):
    c, h, w = shape
    t = perturb(FactorOut(squeezed_inner((c - split, h, w)), split=split)).double()
    u = torch.randn((2, 3) + shape, dtype=torch.float64)  # two batch dims
    x = t(u)
    assert x.shape == u.shape
    assert torch.equal(x[..., :split, :, :], u[..., :split, :, :])
    assert not torch.allclose(x[..., split:, :, :], u[..., split:, :, :])
    assert torch.allclose(t.inv(x), u, atol=1e-5)
    ld = t.log_abs_det_jacobian(u, x)
    assert ld.shape == (2, 3)
    # summed inner log-dets, and recomputed (cache miss) equal to cached
    inner_x, inner_ld = forward(t.layers, u[..., split:, :, :])
    assert torch.allclose(ld, inner_ld, atol=1e-10)
    assert torch.allclose(t.log_abs_det_jacobian(u.clone(), x.clone()), ld, atol=1e-10)
    sign, ref = autograd_logdet(t, u[0, 0])
    assert sign > 0 and torch.allclose(ld[0, 0], ref, atol=1e-4)
    # the Jacobian rows of the kept part are those of the identity
    jac = torch.autograd.functional.jacobian(lambda v: t(v.reshape(shape)).reshape(-1), u[0, 0].reshape(-1))
    n = split * h * w
    assert torch.equal(jac[:n], torch.eye(jac.shape[0], dtype=torch.float64)[:n])


def test_factor_out_on_vectors_and_cache():
    inner = [AffineCoupling(3, hidden=(4,), parity=0), AffineCoupling(3, hidden=(4,), parity=1)]
    t = perturb(FactorOut(inner, split=2, dim=-1, cache_size=1)).double()
    u = torch.randn(4, 5, dtype=torch.float64)
    x = t(u)
    assert t.inv(x) is u  # cache_size=1: the pair is cached
    assert torch.equal(x[:, :2], u[:, :2])
    sign, ref = autograd_logdet(t, u[1])
    assert sign > 0 and torch.allclose(t.log_abs_det_jacobian(u, x)[1], ref, atol=1e-4)
    t0 = FactorOut(t.layers, split=2, dim=-1, cache_size=0)
    assert torch.allclose(t0.inv(t0(u)), u, atol=1e-10) and t0.inv(x) is not u


def test_factor_out_registers_inner_modules_and_nests():
    inner2 = [AffineCoupling((1, 4, 4), hidden=(4,), parity=0)]
    inner1 = [AffineCoupling((2, 4, 4), hidden=(4,), mask="channel"), FactorOut(inner2, split=1)]
    t = FactorOut(inner1, split=1)
    params = {id(p) for p in t.parameters()}
    for m in inner1[:1] + inner2:
        assert {id(p) for p in m.parameters()} <= params
    assert len(list(t.parameters())) == len(list(inner1[0].parameters())) + len(list(inner2[0].parameters()))
    # state_dict round trip into a fresh copy
    perturb(t)
    fresh = FactorOut([AffineCoupling((2, 4, 4), hidden=(4,), mask="channel"),
                       FactorOut([AffineCoupling((1, 4, 4), hidden=(4,), parity=0)], split=1)], split=1)
    fresh.load_state_dict(t.state_dict())
    x = torch.randn(2, 3, 4, 4)
    assert torch.allclose(fresh(x), t(x))


def test_factor_out_errors_speak_to_the_user():
    with pytest.raises(ValueError, match="split >= 1"):
        FactorOut([], split=0)
    with pytest.raises(ValueError, match="dim=-3"):
        FactorOut([], split=1, dim=-2)
    with pytest.raises(TypeError, match="Transforms"):
        FactorOut([torch.nn.Linear(2, 2)], split=1)
    with pytest.raises(ValueError, match=r"more than 2 features at dim -3; got shape \(2, 2, 4, 4\)"):
        FactorOut([], split=2)(torch.randn(2, 2, 4, 4))
    with pytest.raises(ValueError, match="same shape"):
        FactorOut([Squeeze()], split=1)(torch.randn(2, 2, 4, 4))


# ----- the multi-scale RealNVP -----------------------------------------------------
@pytest.mark.parametrize("shape,num_scales", [((1, 8, 8), 2), ((2, 4, 4), 2), ((1, 4, 8), 2), ((3, 8, 8), 2),
                                              ((1, 8, 8), 3)])
def test_multiscale_realnvp_round_trip_base_shape_and_log_det(shape, num_scales):
    layers = perturb(realnvp(shape, num_layers=2, hidden=(4,), num_scales=num_scales)).double()
    c, h, w = shape
    assert base_shape(shape, layers) == (4 * c, h // 2, w // 2)
    x = torch.randn((2,) + shape, dtype=torch.float64)
    u = inverse(layers, x)
    assert u.shape == (2, 4 * c, h // 2, w // 2)
    y, ld = forward(layers, u)
    assert torch.allclose(y, x, atol=1e-5)
    assert not torch.allclose(y.flatten(1), u.flatten(1))
    sign, ref = autograd_logdet(lambda v: forward(layers, v)[0], u[0])
    assert sign > 0 and torch.allclose(ld[0], ref, atol=1e-4)
    # one FactorOut per scale but the last, nested
    depth, t = 0, layers[0]
    while isinstance(t, FactorOut):
        depth += 1
        assert t.split == 2 * c * 2 ** (depth - 1)
        t = t.layers[1]  # after the Squeeze: the next scale's first layer
    assert depth == num_scales - 1


def test_multiscale_layout_of_two_scales():
    layers = realnvp((1, 8, 8), num_layers=3, hidden=(4,), num_scales=2)
    assert [type(t) for t in layers] == [FactorOut] + [AffineCoupling] * 3 + [_DepthToSpace] + [AffineCoupling] * 3
    inner = layers[0].layers
    assert [type(t) for t in inner] == [Squeeze] + [AffineCoupling] * 3 + [_DepthToSpace] + [AffineCoupling] * 3
    # data side first: checkerboard then (after the squeeze) channel couplings, at each scale
    kinds = [t.mask_kind for t in layers if isinstance(t, AffineCoupling)]
    assert kinds == ["channel"] * 3 + ["checkerboard"] * 3
    assert [t.event_shape for t in inner if isinstance(t, AffineCoupling)] == [(8, 2, 2)] * 3 + [(2, 4, 4)] * 3
    with_actnorm = realnvp((1, 8, 8), num_layers=2, hidden=(4,), num_scales=2, actnorm=True)
    assert [type(t) for t in with_actnorm[0].layers] == [Squeeze] + [AffineCoupling, ActNorm] * 2 + [
        _DepthToSpace] + [AffineCoupling, ActNorm] * 2


def test_multiscale_factored_out_channels_do_not_depend_on_the_inner_scales():
    layers = perturb(realnvp((1, 8, 8), num_layers=2, hidden=(4,), num_scales=2)).double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    u = inverse(layers, x)
    perturb(layers[0], std=0.5, seed=1)  # only the second scale changes
    v = inverse(layers, x)
    assert torch.equal(u[:, :2], v[:, :2])
    assert not torch.allclose(u[:, 2:], v[:, 2:])


def test_gradient_of_log_prob_reaches_every_coupling_of_every_scale():
    layers = perturb(realnvp((2, 8, 8), num_layers=2, hidden=(4,), num_scales=3, actnorm=True))
    couplings = [m for m in layers.modules() if isinstance(m, AffineCoupling)]
    assert len(couplings) == 3 * 2 * 2
    assert len(list(layers.parameters())) == sum(len(list(m.parameters())) for m in layers.modules()
                                                 if isinstance(m, (AffineCoupling, ActNorm)))
    p = dist.TransformedDistribution(std_normal((8, 4, 4), torch.float32), list(layers))
    p.log_prob(torch.randn(4, 2, 8, 8)).sum().backward()
    for m in layers.modules():
        if isinstance(m, (AffineCoupling, ActNorm)):
            for name, q in m.named_parameters():
                assert q.grad is not None and q.grad.abs().sum() > 0, (m, name)


@settings(max_examples=15, deadline=None)
@given(
    c=st.integers(1, 3),
    num_scales=st.integers(1, 3),
    a=st.integers(1, 2),
    b=st.integers(1, 2),
    actnorm=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_multiscale_round_trip_and_log_det_property(c, num_scales, a, b, actnorm, seed):
    shape = (c, a * 2**num_scales, b * 2**num_scales)
    assume(math.prod(shape) <= 192)
    layers = perturb(realnvp(shape, num_layers=2, hidden=(3,), num_scales=num_scales, actnorm=actnorm),
                     seed=seed).double()
    u = torch.randn((2,) + tuple(base_shape(shape, layers)), dtype=torch.float64)
    x, ld = forward(layers, u)
    assert x.shape == (2,) + shape
    assert torch.allclose(inverse(layers, x), u, atol=1e-5)
    sign, ref = autograd_logdet(lambda v: forward(layers, v)[0], u[0])
    assert sign > 0 and torch.allclose(ld[0], ref, atol=1e-4)


@pytest.mark.parametrize("cache_size", [0, 1])
def test_multiscale_in_transformed_distribution_is_the_change_of_variables(cache_size):
    shape = (2, 4, 8)
    layers = perturb(realnvp(shape, num_layers=2, hidden=(4,), num_scales=2, cache_size=cache_size)).double()
    base = std_normal((8, 2, 4))
    p = dist.TransformedDistribution(base, list(layers))
    x = torch.randn((3, 2) + shape, dtype=torch.float64)
    lp = p.log_prob(x)
    assert lp.shape == (3, 2)
    u = inverse(layers, x)
    _, ld = forward(layers, u)
    by_hand = -0.5 * (u ** 2).flatten(2).sum(-1) - 0.5 * u[0, 0].numel() * math.log(2 * math.pi) - ld
    assert torch.allclose(lp, by_hand, atol=1e-8)
    draws = p.rsample((5,))
    assert draws.shape == (5,) + shape
    draws.sum().backward()
    assert all(q.grad is not None for q in layers[0].parameters())


def test_realnvp_scales_need_divisible_sizes():
    realnvp((1, 28, 28), hidden=(4,), num_scales=2)  # 28 = 4 * 7: two scales fit
    with pytest.raises(ValueError, match=r"divisible by 2\*\*3 = 8; got event shape \(1, 28, 28\)"
                                         r".*32x32 or use num_scales <= 2"):
        realnvp((1, 28, 28), num_scales=3)
    with pytest.raises(ValueError, match="even H and W"):
        realnvp((1, 6, 5))
    with pytest.raises(ValueError, match="8x8.$"):
        realnvp((1, 6, 5), num_scales=3)
    with pytest.raises(ValueError, match="flat vectors has a single scale"):
        realnvp(8, num_scales=2)
    with pytest.raises(ValueError, match="num_scales >= 1"):
        realnvp((1, 8, 8), num_scales=0)


def test_num_scales_one_is_the_single_scale_stack():
    torch.manual_seed(0)
    one = realnvp((2, 4, 4), num_layers=2, hidden=(4,))
    torch.manual_seed(0)
    same = realnvp((2, 4, 4), num_layers=2, hidden=(4,), num_scales=1)
    assert [type(t) for t in one] == [type(t) for t in same]
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), same.state_dict().values()))


@pytest.mark.parametrize("shape,num_scales", [((1, 8, 8), 2), (5, 1)])
def test_conv1x1_before_each_coupling_round_trip_and_log_det(shape, num_scales):
    layers = perturb(realnvp(shape, num_layers=2, hidden=(4,), num_scales=num_scales, actnorm=True,
                             conv1x1=True)).double()
    flat = [m for m in layers.modules() if isinstance(m, (ActNorm, InvertibleConv1x1, AffineCoupling))]
    # the 1x1 convolution sits between each ActNorm and its coupling (images: ActNorm first on
    # the data side; flat vectors keep the single-scale stack's generative order ActNorm, coupling)
    stage = [AffineCoupling, InvertibleConv1x1, ActNorm]
    assert [type(m) for m in flat[:3]] == (stage if isinstance(shape, tuple) else stage[::-1])
    assert sum(isinstance(m, InvertibleConv1x1) for m in flat) == sum(isinstance(m, AffineCoupling) for m in flat)
    shape = (shape,) if isinstance(shape, int) else shape
    u = torch.randn((2,) + tuple(base_shape(shape, layers)), dtype=torch.float64)
    x, ld = forward(layers, u)
    assert torch.allclose(inverse(layers, x), u, atol=1e-5)
    sign, ref = autograd_logdet(lambda v: forward(layers, v)[0], u[0])
    assert sign > 0 and torch.allclose(ld[0], ref, atol=1e-4)


# ----- ActNorm initialization through FactorOut --------------------------------------
def test_initialize_actnorm_standardizes_every_actnorm_output_at_every_scale():
    torch.manual_seed(0)
    layers = perturb(realnvp((2, 8, 8), num_layers=2, hidden=(4,), num_scales=3, actnorm=True)).double()
    actnorms = [m for m in layers.modules() if isinstance(m, ActNorm)]
    assert len(actnorms) == 3 * 2 * 2
    x = torch.randn(64, 2, 8, 8, dtype=torch.float64) * torch.tensor([4.0, 0.3]).view(2, 1, 1) + 2.0
    u = initialize_actnorm(layers, x)
    assert all(bool(m.initialized) for m in actnorms)
    # record what leaves each ActNorm towards the base on a fresh pass (a clone: no cache hit)
    seen = {}
    for m in actnorms:
        m._inverse = (lambda y, m=m, f=m._inverse: seen.setdefault(id(m), f(y)))
    v = inverse(layers, x.clone())
    assert torch.allclose(u, v, atol=1e-10)
    assert len(seen) == len(actnorms)
    for m in actnorms:
        h = seen[id(m)].movedim(-3, -1).reshape(-1, m.num_features)
        assert torch.allclose(h.mean(0), torch.zeros(m.num_features, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(h.std(0, unbiased=False), torch.ones(m.num_features, dtype=torch.float64), atol=1e-4)


def test_multiscale_realnvp_learns_digits_by_maximum_likelihood():
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = torch.as_tensor(load_digits().data, dtype=torch.float32).reshape(-1, 1, 8, 8)
    data = (digits + torch.rand_like(digits)) / 17.0  # dequantized 17 levels, in [0, 1)
    train, test = data[:1500], data[1500:]
    layers = realnvp((1, 8, 8), num_layers=2, hidden=(16,), num_scales=2, actnorm=True)
    initialize_actnorm(layers, train[:256])
    p = dist.TransformedDistribution(std_normal((4, 4, 4), torch.float32), list(layers))

    def nll():
        with torch.no_grad():
            return -p.log_prob(test).mean().item() / 64

    start = nll()
    opt = torch.optim.Adam(layers.parameters(), lr=3e-3)
    history = []
    for step in range(100):
        batch = train[torch.randint(len(train), (64,))]
        loss = -p.log_prob(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    end = nll()
    print(f"held-out NLL per dim: {start:.3f} -> {end:.3f} nats")
    assert all(math.isfinite(v) for v in history) and math.isfinite(end)
    assert end < start - 0.3, (start, end)


# ----- NICE on images ---------------------------------------------------------------
@pytest.mark.parametrize("shape,mask", [((1, 4, 4), None), ((2, 4, 4), "channel"), ((3, 4, 8), "checkerboard")])
def test_image_nice_round_trip_and_log_det_is_the_diagonal_scaling(shape, mask):
    layers = perturb(nice(shape, num_layers=4, hidden=(4,), mask=mask), std=0.3).double()
    assert [type(t) for t in layers] == [AdditiveCoupling] * 4 + [DiagonalScaling]
    assert [t.mask_kind for t in layers[:4]] == [mask or "checkerboard"] * 4
    assert [t.parity for t in layers[:4]] == [0, 1, 0, 1]
    assert layers[-1].log_scale.shape == shape
    assert base_shape(shape, layers) == shape
    u = torch.randn((3,) + shape, dtype=torch.float64)
    x, ld = forward(layers, u)
    assert not torch.allclose(x, u)
    assert torch.allclose(inverse(layers, x), u, atol=1e-5)
    scaling = layers[-1].log_scale.sum()
    assert torch.allclose(ld, scaling.expand(3))
    sign, ref = autograd_logdet(lambda v: forward(layers, v)[0], u[0])
    assert sign > 0 and torch.allclose(ref, scaling, atol=1e-6)


def test_image_nice_errors():
    with pytest.raises(ValueError, match=r"images \(C, H, W\); got \(4, 4\)"):
        nice((4, 4))
    with pytest.raises(ValueError, match="dim >= 2"):
        nice(1)
    with pytest.raises(ValueError, match="C >= 2"):
        nice((1, 4, 4), mask="channel")
