"""Mathematical checks of the coupling layers in :mod:`pyro_lvm.flows.coupling`."""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings, strategies as st

from flow_checks import autograd_logdet
from pyro_lvm.flows.coupling import (
    AdditiveCoupling,
    AffineCoupling,
    ConditionalAffineCoupling,
    coupling_mask,
)
from pyro_lvm.flows.stacks import initialize_actnorm, realnvp

CLASSES = [AdditiveCoupling, AffineCoupling]


def make(cls, shape, mask=None, parity=0, seed=0, **kw):
    """A float64 coupling with perturbed (non-identity) parameters."""
    torch.manual_seed(seed)
    hidden = (8,) if isinstance(shape, tuple) else (16, 16)
    t = cls(shape, hidden=hidden, mask=mask, parity=parity, cache_size=0, **kw).double()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return t


CASES = [
    (5, "half"),
    (6, "half"),
    (5, "alternate"),
    (6, "alternate"),
    ((2, 4, 4), "checkerboard"),
    ((2, 4, 4), "channel"),
]


def _check_transform(t, shape, batch=(3,)):
    event = (shape,) if isinstance(shape, int) else shape
    x = torch.randn(batch + event, dtype=torch.float64)
    y = t(x)
    assert y.shape == x.shape
    assert not torch.allclose(y, x), "test transform should not be the identity"
    assert torch.allclose(t.inv(y), x, atol=1e-5)
    ld = t.log_abs_det_jacobian(x, y)
    assert ld.shape == batch
    for b in range(batch[0]):
        sign, ref = autograd_logdet(t, x[b])
        assert sign > 0
        assert torch.allclose(ld[b], ref, atol=1e-4)
        # single-example call (no batch dims)
        assert torch.allclose(t.log_abs_det_jacobian(x[b], t(x[b])), ref, atol=1e-4)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("shape,mask", CASES)
@pytest.mark.parametrize("parity", [0, 1])
def test_round_trip_and_logdet(cls, shape, mask, parity):
    t = make(cls, shape, mask, parity)
    _check_transform(t, shape)


@pytest.mark.parametrize("shape,mask", CASES)
def test_sigmoid_scale(shape, mask):
    t = make(AffineCoupling, shape, mask, 1, scale="sigmoid")
    _check_transform(t, shape)


@pytest.mark.parametrize("cls", CLASSES)
def test_extra_batch_dims(cls):
    t = make(cls, (2, 4, 4), "checkerboard")
    x = torch.randn(2, 3, 2, 4, 4, dtype=torch.float64)
    y = t(x)
    assert torch.allclose(t.inv(y), x, atol=1e-5)
    assert t.log_abs_det_jacobian(x, y).shape == (2, 3)


@settings(max_examples=20, deadline=None)
@given(
    d=st.integers(2, 9),
    parity=st.integers(0, 1),
    affine=st.booleans(),
    seed=st.integers(0, 1000),
    mask=st.sampled_from(["half", "alternate"]),
)
def test_hypothesis_vectors(d, parity, affine, seed, mask):
    t = make(AffineCoupling if affine else AdditiveCoupling, d, mask, parity, seed=seed)
    _check_transform(t, d, batch=(2,))


@settings(max_examples=20, deadline=None)
@given(
    c=st.integers(1, 3),
    h=st.integers(1, 4),
    w=st.integers(2, 4),
    kind=st.sampled_from(["checkerboard", "channel"]),
    parity=st.integers(0, 1),
    affine=st.booleans(),
)
def test_hypothesis_images(c, h, w, kind, parity, affine):
    if kind == "channel" and c < 2:
        with pytest.raises(ValueError, match="C >= 2"):
            coupling_mask(kind, (c, h, w), parity)
        return
    t = make(AffineCoupling if affine else AdditiveCoupling, (c, h, w), kind, parity)
    _check_transform(t, (c, h, w), batch=(2,))


@settings(max_examples=20, deadline=None)
@given(d=st.integers(2, 9), parity=st.integers(0, 1))
def test_half_mask(d, parity):
    m0, m1 = coupling_mask("half", d, 0), coupling_mask("half", d, 1)
    assert torch.equal(m1, ~m0)
    assert int(m0.sum()) == d // 2 and int(m1.sum()) == d - d // 2
    assert coupling_mask("half", d, parity).dtype == torch.bool
    a0, a1 = coupling_mask("alternate", d, 0), coupling_mask("alternate", d, 1)
    assert torch.equal(a1, ~a0) and torch.equal(a0, torch.arange(d) % 2 == 0)


@pytest.mark.parametrize("d", [6, 8])
def test_alternate_mask_is_the_half_mask_on_entries_ordered_evens_first(d):
    # with the same initial draws, a coupling on the "alternate" mask is the "half" one applied
    # to the entries reordered evens-then-odds (how the NICE tries coupled odd and even pixels).
    # Even D only: for odd D "half" keeps D // 2 entries at parity 0, "alternate" the D // 2 + 1 evens
    order = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    x = torch.randn(4, d, dtype=torch.float64)
    for parity in (0, 1):
        alternate, half = make(AffineCoupling, d, "alternate", parity), make(AffineCoupling, d, "half", parity)
        y = alternate(x)
        assert torch.allclose(y[:, order], half(x[:, order]), atol=1e-12)
        assert torch.allclose(alternate.log_abs_det_jacobian(x, y),
                              half.log_abs_det_jacobian(x[:, order], y[:, order]), atol=1e-12)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("d,parity", [(6, 0), (6, 1), (7, 0), (7, 1)])
def test_alternate_mask_moves_each_parity_by_a_function_of_the_other(cls, d, parity):
    # the Jacobian's structure: kept rows are the identity's, a transformed entry depends on
    # itself alone among the transformed ones, and on the kept ones
    t = make(cls, d, "alternate", parity)
    x = torch.randn(d, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(t, x)
    kept = torch.arange(d) % 2 == parity
    assert torch.equal(t(x)[kept], x[kept])
    assert torch.equal(jac[kept], torch.eye(d, dtype=torch.float64)[kept])
    among_free = jac[~kept][:, ~kept]
    assert torch.equal(among_free, torch.diag(torch.diagonal(among_free)))
    assert jac[~kept][:, kept].abs().min() > 0
    # the order that gathers the kept entries is rebuilt from the mask, not saved
    assert set(t.state_dict()) == set(make(cls, d, "half", parity).state_dict())


def test_image_masks():
    cb = coupling_mask("checkerboard", (3, 4, 5), 1)
    i, j = torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij")
    assert torch.equal(cb, ((i + j) % 2 == 1).expand(3, 4, 5))
    ch = coupling_mask("channel", (3, 2, 2), 0)
    assert ch[0].all() and not ch[1:].any()
    assert torch.equal(coupling_mask("channel", (3, 2, 2), 1), ~ch)


@pytest.mark.parametrize(
    "kind,shape,msg",
    [
        ("channel", (1, 4, 4), "C >= 2"),
        ("half", (2, 4, 4), "flat vectors"),
        ("alternate", (2, 4, 4), "flat vectors"),
        ("alternate", 1, "D >= 2"),
        ("checkerboard", 6, r"images \(C, H, W\)"),
        ("half", 1, "D >= 2"),
        ("diagonal", 4, "Unknown mask kind"),
    ],
)
def test_mask_errors(kind, shape, msg):
    with pytest.raises(ValueError, match=msg):
        coupling_mask(kind, shape, 0)


def test_custom_net_and_argument_errors():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    t = AffineCoupling(4, net=net, cache_size=0)
    x = torch.randn(3, 4)
    assert torch.allclose(t.inv(t(x)), x, atol=1e-5)
    with pytest.raises(ValueError, match="2 x 4 = 8"):
        AffineCoupling(4, net=torch.nn.Linear(4, 4))(x)
    with pytest.raises(ValueError, match="not both"):
        AdditiveCoupling(4, hidden=(8,), net=torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="scale must be one of"):
        AffineCoupling(4, scale="exp")
    with pytest.raises(ValueError, match="event_shape"):
        AffineCoupling((4, 4))


def test_bad_input_shape_error():
    t = AffineCoupling(4)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        t(torch.randn(3, 5))


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("shape", [5, (2, 4, 4)])
def test_fresh_coupling_is_identity(cls, shape):
    # the classes' default init="identity": the default net's last layer is zero
    t = cls(shape, cache_size=0)
    x = torch.randn((3,) + ((shape,) if isinstance(shape, int) else shape))
    assert torch.equal(t(x), x)
    assert torch.equal(t.log_abs_det_jacobian(x, x), torch.zeros(3))


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("shape,mask", CASES)
def test_shift_init_starts_as_a_volume_preserving_shift_of_the_transformed_part(cls, shape, mask):
    # init="shift": the log-scale head is zero (s = 0, log|det J| = 0) and the shift head is
    # PyTorch's default, so the transformed part moves by a non-constant function of the kept part
    torch.manual_seed(0)
    t = cls(shape, hidden=(8,), mask=mask, cache_size=0, init="shift").double()
    event = (shape,) if isinstance(shape, int) else shape
    x = torch.randn((64,) + event, dtype=torch.float64)
    y = t(x)
    keep = coupling_mask(mask, shape).expand_as(x)
    assert torch.equal(y[keep], x[keep])
    move = (y - x)[~keep].reshape(64, -1)
    assert move.abs().min() > 0 and move.std(0).min() > 1e-3  # depends on the kept part
    assert torch.equal(t.log_abs_det_jacobian(x, y), torch.zeros(64, dtype=torch.float64))
    jac = torch.autograd.functional.jacobian(lambda v: t(v.reshape(event)).reshape(-1), x[0].reshape(-1))
    assert torch.allclose(torch.linalg.det(jac), torch.tensor(1.0, dtype=torch.float64), atol=1e-10)
    torch.testing.assert_close(t.inv(y), x)


def test_shift_init_is_the_default_of_the_stacks_and_identity_can_be_asked_for():
    from pyro_lvm.flows.stacks import nice

    torch.manual_seed(0)
    for layers in (realnvp(4, hidden=(8,)), nice(4, hidden=(8,)), realnvp((1, 4, 4), num_layers=2, hidden=(4,))):
        couplings = [m for m in layers.modules() if isinstance(m, (AdditiveCoupling, AffineCoupling))]
        assert couplings and all(c.init == "shift" for c in couplings)
    x = torch.randn(5, 4)
    for layers in (realnvp(4, hidden=(8,), init="identity"), nice(4, hidden=(8,), init="identity")):
        y = x
        for t in layers:
            y = t(y)
        assert torch.equal(y, x)
    c = ConditionalAffineCoupling(4, context_dim=2, hidden=(8,), init="shift").condition(torch.randn(5, 2))
    y = c(x)
    assert not torch.equal(y, x) and torch.equal(c.log_abs_det_jacobian(x, y), torch.zeros(5))


def test_unknown_init_is_a_clear_error():
    with pytest.raises(ValueError, match=r"init must be one of .*'identity'.*'shift'.*got 'zeros'"):
        AffineCoupling(4, init="zeros")
    with pytest.raises(ValueError, match="init must be one of"):
        realnvp(4, init="default")


@pytest.mark.parametrize("shape,mask", CASES)
def test_additive_is_volume_preserving(shape, mask):
    t = make(AdditiveCoupling, shape, mask, 1)
    event = (shape,) if isinstance(shape, int) else shape
    x = torch.randn((4,) + event, dtype=torch.float64)
    ld = t.log_abs_det_jacobian(x, t(x))
    assert torch.equal(ld, torch.zeros(4, dtype=torch.float64))
    jac = torch.autograd.functional.jacobian(
        lambda v: t(v.reshape(event)).reshape(-1), x[0].reshape(-1)
    )
    assert torch.allclose(torch.linalg.det(jac), torch.tensor(1.0, dtype=torch.float64), atol=1e-8)


def test_affine_tanh_scale_is_bounded():
    t = make(AffineCoupling, 6, parity=0)
    with torch.no_grad():
        t.net[-1].weight.mul_(1e6)
        t.net[-1].bias.fill_(1e6)
        t.scale_factor.copy_(torch.linspace(0.5, 2.0, 3))  # one per transformed entry
    x = 100 * torch.randn(50, 6, dtype=torch.float64)
    s, _ = t._params(t._split(x)[0])  # the compact half net: log-scales of the transformed half
    assert torch.isfinite(s).all()
    assert (s.abs() <= t.scale_factor.abs() + 1e-12).all()
    assert s.abs().max() > 0.4  # the net output is indeed huge
    y = t(x)
    assert torch.isfinite(y).all() and torch.isfinite(t.log_abs_det_jacobian(x, y)).all()
    assert torch.allclose(t.inv(y), x, rtol=1e-6, atol=1e-6)


def test_affine_sigmoid_scale_is_stable():
    t = make(AffineCoupling, 6, scale="sigmoid")
    with torch.no_grad():
        t.net[-1].weight.mul_(1e4)
    x = 10 * torch.randn(50, 6, dtype=torch.float64)
    s, _ = t._params(t._split(x)[0])
    assert torch.isfinite(s).all() and (s >= 0).all()  # the data-to-base map contracts
    assert torch.isfinite(t.log_abs_det_jacobian(x, t(x))).all()


@pytest.mark.parametrize("cls", CLASSES)
def test_cache_returns_same_tensor(cls):
    t = cls(5, cache_size=1)
    x = torch.randn(3, 5)
    y = t(x)
    assert t.inv(y) is x
    assert t(x) is y


@pytest.mark.parametrize("shape", [6, 7])
def test_transformed_distribution(shape):
    d = shape
    parts = [
        make(AffineCoupling, d, parity=0, seed=1),
        make(AdditiveCoupling, d, parity=1, seed=2),
        make(AffineCoupling, d, parity=1, seed=3, scale="sigmoid"),
        make(AffineCoupling, d, parity=0, seed=4),
    ]
    base = dist.Normal(torch.zeros(d, dtype=torch.float64), 1.0).to_event(1)
    flow = dist.TransformedDistribution(base, parts)
    y = torch.randn(10, d, dtype=torch.float64)
    # manual inverse pass
    z, total = y, torch.zeros(10, dtype=torch.float64)
    for t in reversed(parts):
        x = t.inv(z)
        total = total + t.log_abs_det_jacobian(x, z)
        z = x
    expected = base.log_prob(z) - total
    assert torch.allclose(flow.log_prob(y), expected, atol=1e-10)
    # independent check: change of variables with the full Jacobian of the composed inverse
    def inverse(v):
        for t in reversed(parts):
            v = t.inv(v)
        return v

    _, ld_inv = autograd_logdet(inverse, y[0])
    assert torch.allclose(flow.log_prob(y[0]), base.log_prob(inverse(y[0])) + ld_inv, atol=1e-6)
    assert flow.rsample().shape == (d,)
    sample = flow.rsample((4, 2))
    assert sample.shape == (4, 2, d)
    assert flow.log_prob(sample).shape == (4, 2)
    assert torch.isfinite(flow.log_prob(sample)).all()


def test_transformed_distribution_images():
    shape = (2, 4, 4)
    parts = [
        make(AffineCoupling, shape, "checkerboard", 0),
        make(AffineCoupling, shape, "checkerboard", 1, seed=1),
        make(AdditiveCoupling, shape, "channel", 0, seed=2),
        make(AffineCoupling, shape, "channel", 1, seed=3),
    ]
    base = dist.Normal(torch.zeros(shape, dtype=torch.float64), 1.0).to_event(3)
    flow = dist.TransformedDistribution(base, parts)
    sample = flow.rsample((5,))
    assert sample.shape == (5,) + shape
    lp = flow.log_prob(sample)
    z = sample
    total = 0
    for t in reversed(parts):
        x = t.inv(z)
        total = total + t.log_abs_det_jacobian(x, z)
        z = x
    assert torch.allclose(lp, base.log_prob(z) - total, atol=1e-10)


def test_density_integrates_to_one_and_rsample_is_differentiable():
    # A flow on D=2: the density integrates to ~1 on a grid wide enough for its heavy tail
    # (2.6% of its draws lie beyond |x| = 8).
    parts = [make(AffineCoupling, 2, parity=p, seed=p) for p in (0, 1, 0)]
    base = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)
    flow = dist.TransformedDistribution(base, parts)
    g = torch.linspace(-24, 24, 961, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    mass = flow.log_prob(grid).exp().sum() * (g[1] - g[0]) ** 2
    assert math.isclose(mass.item(), 1.0, abs_tol=1e-3)
    parts[0].scale_factor.grad = None
    flow.rsample((8,)).sum().backward()
    assert parts[0].scale_factor.grad is not None


@pytest.mark.parametrize("shape,mask", [(5, "half"), (5, "alternate"), ((2, 4, 4), "checkerboard")])
def test_conditional_affine_coupling(shape, mask):
    torch.manual_seed(0)
    t = ConditionalAffineCoupling(shape, context_dim=3, hidden=(8,), mask=mask, cache_size=0).double()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    event = (shape,) if isinstance(shape, int) else shape
    x = torch.randn((4,) + event, dtype=torch.float64)
    c1, c2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    t1, t2 = t.condition(c1), t.condition(c2)
    y1 = t1(x)
    assert not torch.allclose(y1, t2(x)), "the context must matter"
    assert torch.allclose(t1.inv(y1), x, atol=1e-5)
    ld = t1.log_abs_det_jacobian(x, y1)
    assert ld.shape == (4,)
    for b in range(4):
        tb = t.condition(c1[b])
        _, ref = autograd_logdet(tb, x[b])
        assert torch.allclose(ld[b], ref, atol=1e-4)
    # broadcasting a single context over the batch, inside a TransformedDistribution
    base = dist.Normal(torch.zeros(event, dtype=torch.float64), 1.0).to_event(len(event))
    flow = dist.ConditionalTransformedDistribution(base, [t]).condition(c1[0])
    s = flow.rsample((6,))
    assert s.shape == (6,) + event
    assert torch.isfinite(flow.log_prob(s)).all()
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        t.condition(torch.randn(2))


def test_sigmoid_scale_contracts_towards_the_base_and_trains_with_actnorm():
    # the data-to-base map (what log_prob evaluates) multiplies by sigmoid(r + 2) <= 1: no
    # division by a small number, whatever the net outputs
    t = make(AffineCoupling, 4, scale="sigmoid")
    with torch.no_grad():
        t.net[-1].weight.mul_(1e3)
    y = 5 * torch.randn(200, 4, dtype=torch.float64)
    x = t.inv(y)
    (shift,) = t._params(t._split(y)[0])[1:]
    kept, free = t._split(y)
    assert (t._split(x)[1].abs() <= (free - shift).abs() + 1e-12).all()
    # with ActNorm for the scales, a stack trains on thin, non-Gaussian data (a ring of
    # width 0.05) without overflowing: beyond the Gaussian fit that ActNorm's init gives
    torch.manual_seed(0)
    angle = 2 * math.pi * torch.rand(2048)
    data = torch.stack([angle.cos(), angle.sin()], -1) * (1 + 0.05 * torch.randn(2048, 1))
    layers = realnvp(2, num_layers=6, hidden=(32, 32), actnorm=True, scale="sigmoid")
    initialize_actnorm(layers, data[:512])
    flow = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), list(layers))
    opt = torch.optim.Adam(layers.parameters(), lr=3e-3)
    start = -flow.log_prob(data).mean().item()
    for _ in range(300):
        loss = -flow.log_prob(data[torch.randint(0, 2048, (128,))]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = -flow.log_prob(data).mean().item()
    print(f"ring NLL {start:.3f} -> {end:.3f}")
    assert math.isfinite(end) and end < start - 0.3, (start, end)


def test_tanh_log_scale_is_c_tanh_r_in_both_signs():
    # computed as 2c sigmoid(2r) - c (cheaper on CPU): the same function as c tanh(r)
    from pyro_lvm.flows.coupling import _signed_log_scale

    r = torch.linspace(-30, 30, 600, dtype=torch.float64).reshape(-1, 3)
    c = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    expected = c * torch.tanh(r)
    assert torch.allclose(_signed_log_scale(r, "tanh", c, 1.0), expected, rtol=0, atol=1e-14)
    assert torch.allclose(_signed_log_scale(r, "tanh", c, -1.0), -expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("shape, mask", [(5, "half"), (5, "alternate"), ((2, 4, 4), "checkerboard")])
def test_log_det_kept_from_the_pass_equals_a_fresh_one(shape, mask):
    t = make(AffineCoupling, shape, mask=mask)
    x = torch.randn((7,) + ((shape,) if isinstance(shape, int) else shape), dtype=torch.float64)
    y = t(x)
    kept = t.log_abs_det_jacobian(x, y)  # from the forward pass
    assert torch.allclose(kept, t.log_abs_det_jacobian(x.clone(), y.clone()), atol=1e-12)  # recomputed
    y_again = y.clone()
    x_back = t.inv(y_again)  # the data-to-base pass, as log_prob runs it, keeps -(-s) summed
    assert torch.allclose(t.log_abs_det_jacobian(x_back, y_again), kept, atol=1e-10)


def test_full_batch_training_on_one_tensor_never_reuses_a_stale_cache():
    # torch's cache keys on the input tensor only: a loop over a fixed tensor got the last step's
    # output (its graph already freed) and failed at the second backward
    torch.manual_seed(0)
    x = torch.randn(128, 2) * torch.tensor([2.0, 0.5])
    stack = realnvp(2, num_layers=4, hidden=(16,), actnorm=True)
    flow = dist.TransformedDistribution(dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1), list(stack))
    optimizer = torch.optim.Adam(stack.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = -flow.log_prob(x).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    # the cache still serves an unchanged layer: the same output object for the same input
    layer = stack[1]
    y = layer(x)
    assert layer(x) is y and layer.inv(y) is x
    with torch.no_grad():
        next(layer.parameters()).add_(0.1)  # any in-place update of a parameter invalidates it
    assert layer(x) is not y
