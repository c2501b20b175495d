"""Tests of pyro_lvm.flows.layers and pyro_lvm.flows.preprocessing: inverses, log-determinants, Pyro integration."""

import math

import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_lvm.flows.layers import ActNorm, DiagonalScaling, InvertibleConv1x1, Squeeze
from pyro_lvm.flows.preprocessing import Logit, bits_per_dim, dequantize


def _perturb(t: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> torch.nn.Module:
    """Move every parameter away from its init so that the checks below can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return t


def _check_round_trip(t, x: torch.Tensor) -> None:
    y = t(x)
    assert y.shape == t.forward_shape(x.shape)
    assert not torch.allclose(y.reshape(-1)[: x.numel()], x.reshape(-1)) or isinstance(t, Squeeze)
    torch.testing.assert_close(t.inv(y), x, atol=1e-5, rtol=1e-5)


def _check_log_det(t, x_event: torch.Tensor) -> None:
    """log|det J| of one example vs the slogdet of the autograd Jacobian of the flattened map."""
    shape = x_event.shape

    def f(v):
        return t(v.reshape(shape)).reshape(-1)

    jac = torch.autograd.functional.jacobian(f, x_event.reshape(-1))
    assert jac.shape[0] == jac.shape[1]
    sign, expected = torch.linalg.slogdet(jac)
    assert sign != 0
    got = t.log_abs_det_jacobian(x_event, t(x_event))
    assert got.shape == torch.Size([])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # batched: log-det has the batch shape
    xb = x_event.expand((2, 3) + shape).clone()
    assert t.log_abs_det_jacobian(xb, t(xb)).shape == (2, 3)


# ---------------------------------------------------------------- ActNorm


@pytest.mark.parametrize("shape,dim", [((5,), -1), ((4,), -1), ((3, 4, 4), -3), ((2, 3, 5), -3)])
def test_actnorm_init_round_trip_log_det(shape, dim):
    torch.manual_seed(0)
    t = ActNorm(shape[0], dim=dim).double()
    x = torch.randn((64,) + shape, dtype=torch.float64) * torch.linspace(0.5, 3.0, shape[0]).double().reshape(
        (shape[0],) + (1,) * (len(shape) - 1)
    ) + 2.0
    y = t(x)  # data-dependent initialization
    assert bool(t.initialized)
    reduce = (0,) + tuple(range(2, 1 + len(shape)))
    zeros, ones = torch.zeros(shape[0], dtype=torch.float64), torch.ones(shape[0], dtype=torch.float64)
    torch.testing.assert_close(y.mean(reduce), zeros, atol=1e-6, rtol=0)
    torch.testing.assert_close(y.std(reduce, unbiased=False), ones, atol=1e-5, rtol=0)
    assert t.log_scale.abs().max() > 0.1  # not the identity
    # a second call does not re-initialize
    before = t.log_scale.detach().clone()
    t(torch.randn((8,) + shape, dtype=torch.float64) * 10)
    torch.testing.assert_close(t.log_scale.detach(), before)
    _check_round_trip(t, torch.randn((7,) + shape, dtype=torch.float64))
    _check_log_det(t, torch.randn(shape, dtype=torch.float64))


def test_actnorm_explicit_initialize_and_eval_mode():
    t = ActNorm(3, dim=-3)
    t.eval()
    x = torch.randn(4, 3, 2, 2)
    t(x)
    assert not bool(t.initialized)  # no init in eval mode
    t.initialize(x * 3 + 1)
    assert bool(t.initialized)
    y = t(x * 3 + 1)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def test_actnorm_state_dict_keeps_initialized_flag():
    torch.manual_seed(1)
    t = ActNorm(4)
    t(torch.randn(32, 4) * 5 + 3)
    state = t.state_dict()
    assert "initialized" in state and bool(state["initialized"])
    loaded = ActNorm(4)
    loaded.load_state_dict(state)
    assert bool(loaded.initialized)
    loaded(torch.randn(32, 4) * 0.1 - 7)  # must not re-initialize from this batch
    torch.testing.assert_close(loaded.log_scale, t.log_scale)
    torch.testing.assert_close(loaded.bias, t.bias)


def test_actnorm_errors():
    with pytest.raises(ValueError, match="negative"):
        ActNorm(3, dim=0)
    with pytest.raises(ValueError, match="3 features"):
        ActNorm(3)(torch.randn(2, 4))


# ---------------------------------------------------------------- InvertibleConv1x1


@pytest.mark.parametrize("shape,dim", [((5,), -1), ((4,), -1), ((3, 4, 4), -3), ((2, 3, 5), -3), ((1, 2, 2), -3)])
def test_invconv_round_trip_log_det(shape, dim):
    torch.manual_seed(0)
    t = _perturb(InvertibleConv1x1(shape[0], dim=dim).double(), scale=0.3)
    _check_round_trip(t, torch.randn((6,) + shape, dtype=torch.float64))
    _check_log_det(t, torch.randn(shape, dtype=torch.float64))


def test_invconv_init_is_rotation_and_mixes_channels():
    torch.manual_seed(3)
    t = InvertibleConv1x1(4, dim=-3)
    w = t.weight().double()
    torch.testing.assert_close(w @ w.T, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.linalg.det(w) > 0
    assert (w - torch.diag(torch.diagonal(w))).abs().max() > 1e-3
    # same matrix at each pixel
    x = torch.randn(4, 3, 3)
    y = t(x)
    torch.testing.assert_close(y[:, 1, 2], t.weight() @ x[:, 1, 2])


@settings(max_examples=20, deadline=None)
@given(c=st.integers(1, 4), h=st.sampled_from([2, 4, 6]), w=st.sampled_from([2, 4, 6]), seed=st.integers(0, 10**6))
def test_invconv_hypothesis(c, h, w, seed):
    torch.manual_seed(seed)
    t = _perturb(InvertibleConv1x1(c, dim=-3).double(), seed=seed, scale=0.3)
    _check_round_trip(t, torch.randn(2, c, h, w, dtype=torch.float64))
    _check_log_det(t, torch.randn(c, h, w, dtype=torch.float64))


# ---------------------------------------------------------------- Squeeze


def test_squeeze_layout_round_trip_log_det():
    t = Squeeze()
    x = torch.randn(3, 2, 4, 6, dtype=torch.float64)
    y = t(x)
    assert y.shape == (3, 8, 2, 3)
    # channel 4c + 2i + j at (h, w) is input channel c at (2h + i, 2w + j)
    for c in range(2):
        for i in range(2):
            for j in range(2):
                torch.testing.assert_close(y[:, 4 * c + 2 * i + j], x[:, c, i::2, j::2])
    assert t.inverse_shape(y.shape) == x.shape
    assert torch.equal(t.inv(y), x)
    _check_log_det(t, torch.randn(2, 4, 6, dtype=torch.float64))


def test_squeeze_errors():
    with pytest.raises(ValueError, match="even H and W"):
        Squeeze()(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="even H and W"):
        Squeeze()(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="divisible by 4"):
        Squeeze().inv(torch.randn(6, 2, 2))


@settings(max_examples=20, deadline=None)
@given(c=st.integers(1, 4), h=st.sampled_from([2, 4, 6]), w=st.sampled_from([2, 4, 6]), seed=st.integers(0, 10**6))
def test_squeeze_hypothesis(c, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    t = Squeeze()
    x = torch.randn(2, c, h, w, generator=g, dtype=torch.float64)
    y = t(x)
    assert y.shape == (2, 4 * c, h // 2, w // 2)
    assert torch.equal(torch.sort(y.reshape(2, -1)).values, torch.sort(x.reshape(2, -1)).values)
    assert torch.equal(t.inv(y), x)
    _check_log_det(t, x[0])


# ---------------------------------------------------------------- DiagonalScaling


@pytest.mark.parametrize("event_shape", [5, (4,), (2, 3, 5)])
def test_diagonal_scaling(event_shape):
    torch.manual_seed(0)
    t = _perturb(DiagonalScaling(event_shape).double())
    shape = (event_shape,) if isinstance(event_shape, int) else event_shape
    _check_round_trip(t, torch.randn((3,) + shape, dtype=torch.float64))
    _check_log_det(t, torch.randn(shape, dtype=torch.float64))
    with pytest.raises(ValueError, match="event shape"):
        t(torch.randn(3, 7, dtype=torch.float64))


def test_diagonal_scaling_initializes_to_the_standard_deviation_not_the_rms():
    # data far from centred (as 8-bit images in logit space): the RMS would overstate the spread
    torch.manual_seed(0)
    scales = torch.tensor([0.1, 1.0, 3.0, 0.5], dtype=torch.float64)
    y = 5.0 + scales * torch.randn(4096, 4, dtype=torch.float64)
    t = DiagonalScaling(4).double()
    t.initialize(y)
    assert bool(t.initialized)
    torch.testing.assert_close(t.log_scale, y.std(0, unbiased=False).log())
    h = t.inv(y)
    torch.testing.assert_close(h.std(0, unbiased=False), torch.ones(4, dtype=torch.float64))
    assert (h.pow(2).mean(0).sqrt() > 1.5).all()  # the RMS of the output is not what is unit
    # a constant coordinate has no spread: the floor eps keeps the scale finite
    flat = torch.cat([y[:, :3], torch.full((4096, 1), 2.0, dtype=torch.float64)], -1)
    t.initialize(flat, eps=1e-3)
    assert t.log_scale[3].item() == pytest.approx(math.log(1e-3))
    with pytest.raises(ValueError, match="at least 2"):
        t.initialize(y[:1])


# ---------------------------------------------------------------- Logit, dequantize, bits/dim


@pytest.mark.parametrize("alpha", [0.0, 0.05, 1e-6])
@pytest.mark.parametrize("shape,event_dim", [((5,), 1), ((4,), 1), ((2, 3, 5), 3)])
def test_logit(alpha, shape, event_dim):
    torch.manual_seed(0)
    t = Logit(alpha=alpha, event_dim=event_dim)
    x = torch.rand((3,) + shape, dtype=torch.float64) * 0.98 + 0.01
    _check_round_trip(t, x)
    _check_log_det(t, x[0])
    assert t.domain.check(x).all()
    assert not t.domain.check(x + 1.5).any()
    assert t.domain.event_dim == t.codomain.event_dim == event_dim


def test_logit_errors():
    with pytest.raises(ValueError, match="alpha"):
        Logit(alpha=0.5)


def test_dequantize():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (1000, 3), dtype=torch.uint8)
    z = dequantize(x, generator=g)
    assert z.dtype == torch.get_default_dtype()
    assert (z >= 0).all() and (z < 1).all()
    assert torch.equal((z * 256).floor().to(torch.uint8), x)
    frac = z * 256 - x.float()
    assert abs(frac.mean().item() - 0.5) < 0.05  # uniform noise within each bin
    z2 = dequantize(torch.tensor([0.0, 3.0], dtype=torch.float64), num_levels=4)
    assert z2.dtype == torch.float64 and z2[1] >= 0.75
    with pytest.raises(ValueError, match="integer levels"):
        dequantize(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="integer levels"):
        dequantize(torch.tensor([256.0]))


def test_bits_per_dim_uniform_is_log2_levels():
    d = 3 * 4 * 4
    uniform = dist.Uniform(torch.zeros(d), torch.ones(d)).to_event(1)
    z = dequantize(torch.randint(0, 256, (10, d)))
    bpd = bits_per_dim(uniform.log_prob(z), num_dims=d)
    torch.testing.assert_close(bpd, torch.full((10,), 8.0))
    assert math.isclose(bits_per_dim(0.0, num_dims=5, num_levels=32), 5.0)
    # any log-density (in nats) converts by the formula
    lp = torch.tensor(-100.0)
    expected = torch.tensor((100.0 + 10 * math.log(256)) / (10 * math.log(2)))
    torch.testing.assert_close(bits_per_dim(lp, 10), expected)


# ---------------------------------------------------------------- inside TransformedDistribution


def test_image_stack_in_transformed_distribution():
    torch.manual_seed(0)
    c, h, w = 2, 4, 6
    actnorm = ActNorm(c, dim=-3).double()
    actnorm.initialize(torch.randn(16, c, h, w, dtype=torch.float64) * 2 + 1)
    conv = _perturb(InvertibleConv1x1(c, dim=-3).double(), scale=0.3)
    scale = _perturb(DiagonalScaling((4 * c, h // 2, w // 2)).double())
    conv2 = _perturb(InvertibleConv1x1(4 * c, dim=-3).double(), seed=1, scale=0.3)
    parts = [actnorm, conv, Squeeze(), conv2, scale]
    base = dist.Normal(torch.zeros(c, h, w, dtype=torch.float64), 1.0).to_event(3)
    flow = dist.TransformedDistribution(base, parts)
    assert flow.event_shape == (4 * c, h // 2, w // 2)
    y = flow.rsample((5,))
    assert y.shape == (5, 4 * c, h // 2, w // 2)
    y.sum().backward()  # gradients reach the parameters
    assert conv.log_s.grad is not None and scale.log_scale.grad is not None
    y = torch.randn(5, 4 * c, h // 2, w // 2, dtype=torch.float64)
    # log_prob = base log_prob - sum of forward log-dets, computed by hand
    x = y
    total = torch.zeros(5, dtype=torch.float64)
    for t in reversed(parts):
        x_prev = t.inv(x)
        total = total + t.log_abs_det_jacobian(x_prev, x)
        x = x_prev
    torch.testing.assert_close(flow.log_prob(y), base.log_prob(x) - total)
    assert not bool((total == 0).all())


def test_vector_stack_with_logit_in_transformed_distribution():
    torch.manual_seed(0)
    d = 5
    parts = [
        Logit(alpha=0.05, event_dim=1).inv,  # reals -> (0, 1)
        Logit(alpha=0.05, event_dim=1),  # (0, 1) -> reals
        _perturb(InvertibleConv1x1(d).double(), scale=0.3),
        _perturb(DiagonalScaling(d).double()),
    ]
    actnorm = ActNorm(d).double()
    base = dist.Normal(torch.zeros(d, dtype=torch.float64), 1.0).to_event(1)
    flow = dist.TransformedDistribution(base, parts + [actnorm])
    y = flow.rsample((200,))  # first forward call initializes ActNorm from the pushed-forward batch
    assert bool(actnorm.initialized)
    torch.testing.assert_close(y.mean(0), torch.zeros(d, dtype=torch.float64), atol=1e-6, rtol=0)
    y = torch.randn(7, d, dtype=torch.float64)
    lp = flow.log_prob(y)
    assert lp.shape == (7,)
    x = y
    total = torch.zeros(7, dtype=torch.float64)
    for t in reversed(parts + [actnorm]):
        x_prev = t.inv(x)
        total = total + t.log_abs_det_jacobian(x_prev, x)
        x = x_prev
    torch.testing.assert_close(lp, base.log_prob(x) - total)
    # Logit.inv followed by Logit is the identity: its log-dets cancel
    dets = Logit(0.05).inv.log_abs_det_jacobian(x, Logit(0.05).inv(x)) + Logit(0.05).log_abs_det_jacobian(
        Logit(0.05).inv(x), x
    )
    torch.testing.assert_close(dets, torch.zeros(7, dtype=torch.float64))
