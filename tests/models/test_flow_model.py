"""Mathematical checks of the flow stacks (:mod:`pyro_lvm.flows.stacks`) and :class:`FlowModel`."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings, strategies as st
from pyro.distributions.torch_transform import ComposeTransformModule

import flow_checks
import pyro_lvm
from flow_checks import autograd_logdet, forward
from pyro_lvm.flows import NICE, ActNorm, AdditiveCoupling, AffineCoupling, DiagonalScaling, RealNVP
from pyro_lvm.flows import bits_per_dim as flows_bits_per_dim
from pyro_lvm.flows.stacks import nice, realnvp
from pyro_lvm.models.flow import FlowModel


def perturb(module: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    return flow_checks.perturb(module, std, seed, generator=False)


# ----- training against a density known exactly ------------------------------------
def mixture() -> dist.TorchDistribution:
    means = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    scales = torch.tensor([[0.5, 1.0], [0.5, 1.0]])
    return dist.MixtureSameFamily(dist.Categorical(torch.ones(2)), dist.Normal(means, scales).to_event(1))


def test_realnvp_fit_reaches_true_density_and_val_elbo_is_exact_log_likelihood():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    target = mixture()
    data = target.sample((12000,))
    flow = FlowModel(RealNVP(2, num_layers=6, hidden=(32, 32)))
    module = pyro_lvm.fit(
        flow, data=data, estimator="reparam", lr=1e-3, max_epochs=12, enable_progress_bar=False,
        logger=False, enable_checkpointing=False, enable_model_summary=False,
    )
    flow.eval()
    held_out = target.sample((20000,))
    with torch.no_grad():
        diff = target.log_prob(held_out) - flow.log_prob(held_out)  # paired: same points
    gap, stderr = diff.mean().item(), diff.std().item() / math.sqrt(len(diff))
    assert stderr < 0.005
    # cross-entropy >= entropy: the model can only lose, up to Monte-Carlo error
    print(f"gap to the true density: {gap:.4f} +- {stderr:.4f} nats")
    assert -4 * stderr < gap < 0.05, (gap, stderr)

    # fit's held-out tenth (same seeded split): val/elbo is the exact mean log-likelihood
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    val = data[order[: len(data) // 10]]
    with torch.no_grad():
        expected = flow.log_prob(val).mean()
    logged = module.trainer.callback_metrics["val/elbo"]
    assert torch.allclose(logged, expected, atol=1e-4), (logged, expected)


# ----- the change of variables -----------------------------------------------------
@pytest.mark.parametrize("stack", [lambda: RealNVP(3, hidden=(8,)), lambda: NICE(4, hidden=(8,)),
                                   lambda: RealNVP((1, 4, 4), num_layers=2, hidden=(4,))],
                         ids=["realnvp", "nice", "realnvp-images"])
def test_log_prob_is_transformed_distribution_and_change_of_variables(stack):
    flow = perturb(FlowModel(stack())).double()
    x = torch.randn((5,) + tuple(flow.event_shape), dtype=torch.float64)
    lp = flow.log_prob(x)
    assert lp.shape == (5,)
    ref = dist.TransformedDistribution(flow.base(), flow.transform).log_prob(x)
    assert torch.allclose(lp, ref, atol=1e-10)
    # by hand: log N(u) - sum_k log|det J_k| along the generative pass from u = f^{-1}(x)
    u = flow.inverse(x)
    assert u.shape == (5,) + tuple(flow.base_shape)
    x_again, ld = forward(flow.transform, u)
    assert torch.allclose(x_again, x, atol=1e-8)
    base = -0.5 * (u ** 2).flatten(1).sum(-1) - 0.5 * u[0].numel() * math.log(2 * math.pi)
    assert torch.allclose(lp, base - ld, atol=1e-8)
    # and the log-determinant equals autograd's on one example
    sign, ref_ld = autograd_logdet(flow.forward_map, u[0])
    assert sign > 0 and torch.allclose(ld[0], ref_ld, atol=1e-4)


def test_sample_and_inverse_round_trip():
    flow = perturb(FlowModel(RealNVP(3, hidden=(8,)))).double()
    x = flow.sample(7)
    assert x.shape == (7, 3) and x.dtype == torch.float64
    assert torch.allclose(flow.forward_map(flow.inverse(x)), x, atol=1e-8)
    u = torch.randn(4, 3, dtype=torch.float64)
    assert torch.allclose(flow.inverse(flow.forward_map(u)), u, atol=1e-8)


def test_nice_log_det_is_the_diagonal_scaling_only():
    layers = perturb(nice(5, num_layers=4, hidden=(8, 8))).double()
    assert [type(t) for t in layers] == [AdditiveCoupling] * 4 + [DiagonalScaling]
    assert [t.parity for t in layers[:4]] == [0, 1, 0, 1]
    u = torch.randn(3, 5, dtype=torch.float64)
    x, ld = forward(layers, u)
    scaling = layers[-1].log_scale.sum()
    assert not torch.allclose(x, u)
    assert torch.allclose(ld, scaling.expand(3))

    def f(v):
        for t in layers:
            v = t(v)
        return v

    sign, ref = autograd_logdet(f, u[1])
    assert sign > 0 and torch.allclose(ref, scaling, atol=1e-8)


@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 8, 8)])
def test_realnvp_image_stack_round_trip(shape):
    layers = perturb(realnvp(shape, hidden=(4,)), std=0.1).double()
    c, h, w = shape
    x = torch.randn((2,) + shape, dtype=torch.float64)
    u = x
    for t in reversed(layers):
        u = t.inv(u)
    assert u.shape == (2, 4 * c, h // 2, w // 2)
    y, ld = forward(layers, u)
    assert not torch.allclose(y.flatten(1), u.flatten(1))
    assert torch.allclose(y, x, atol=1e-8)
    assert ld.shape == (2,)
    # checkerboard couplings on the data side, channel couplings on the base side
    kinds = [t.mask_kind for t in layers if isinstance(t, AffineCoupling)]
    assert kinds == ["channel"] * 3 + ["checkerboard"] * 3


def test_realnvp_vectors_with_actnorm_layout():
    layers = realnvp(4, num_layers=3, actnorm=True, hidden=(8,))
    assert [type(t) for t in layers] == [ActNorm, AffineCoupling] * 3
    assert [t.parity for t in layers if isinstance(t, AffineCoupling)] == [0, 1, 0]


def test_actnorm_initialized_on_the_data_to_base_direction():
    torch.manual_seed(0)
    flow = perturb(FlowModel(RealNVP(2, actnorm=True, hidden=(8,)))).double()
    for t in flow.transform:
        if isinstance(t, ActNorm):
            t.initialized.fill_(False)
    # the all-zeros example batch cannot set a scale: no initialization there
    pyro.infer.Trace_ELBO().loss(flow.model, flow.guide, flow.example_batch().double())
    assert flow._needs_init()
    x = torch.randn(500, 2, dtype=torch.float64) * torch.tensor([5.0, 0.2], dtype=torch.float64) + 3.0
    flow.model(x)  # training mode: the first batch initializes every ActNorm
    assert not flow._needs_init()
    h = x
    for t in reversed(flow.transform):
        h = t.inv(h)
        if isinstance(t, ActNorm):  # what leaves each ActNorm towards the base is standardized
            assert torch.allclose(h.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-6)
            assert torch.allclose(h.std(0, unbiased=False), torch.ones(2, dtype=torch.float64), atol=1e-4)


# ----- the Pyro pair ---------------------------------------------------------------
def test_model_is_exact_likelihood_with_subsampling_and_registered_parameters():
    pyro.clear_param_store()
    flow = perturb(FlowModel(RealNVP(3, hidden=(8,))))
    x = torch.randn(6, 3)
    loss = pyro.infer.Trace_ELBO().loss(flow.model, flow.guide, x)
    assert math.isclose(loss, -flow.log_prob(x).sum().item(), rel_tol=1e-5)
    trace = pyro.poutine.trace(flow.model).get_trace(x, num_data=60)
    assert torch.allclose(trace.log_prob_sum(), 10 * flow.log_prob(x).sum(), rtol=1e-5)
    assert len(pyro.get_param_store()) == len(list(flow.transform.parameters())) > 0
    assert {"base_loc", "base_scale"} <= set(flow.state_dict())
    assert flow.config["transform"]["class_path"] == "pyro_lvm.flows.RealNVP" and flow.config["event_shape"] == [3]


def test_bits_per_dim_of_standard_normal_is_its_entropy():
    torch.manual_seed(0)
    flow = FlowModel([], event_shape=4)  # the identity flow: p = N(0, I)
    x = torch.randn(40000, 4)
    bpd = flow.bits_per_dim(x)
    entropy = 0.5 * math.log(2 * math.pi * math.e) / math.log(2)
    stderr = bpd.std().item() / math.sqrt(len(bpd))
    assert abs(bpd.mean().item() - entropy) < 4 * stderr
    # dequantized data: the library's bits_per_dim on the scaled data's log-density
    z = torch.rand(5, 4)
    assert torch.allclose(flow.bits_per_dim(z, num_levels=256), flows_bits_per_dim(flow.log_prob(z), 4, 256))


def test_errors_speak_to_the_user():
    flow = FlowModel(RealNVP(3, hidden=(8,)))
    with pytest.raises(ValueError, match=r"\(batch, 3\); got \(4, 2\)"):
        flow.model(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="got"):
        flow.log_prob(torch.zeros(4, 5))
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_scales'"):
        NICE((1, 4, 4), num_scales=2)  # a RealNVP option
    with pytest.raises(ValueError, match=r"divisible by 2\*\*3 = 8.*num_scales <= 2"):
        RealNVP((1, 28, 28), num_scales=3)
    with pytest.raises(TypeError, match="not a name \\(got 'glow'\\)"):
        FlowModel(3, "glow")
    with pytest.raises(ValueError, match="even H and W"):
        realnvp((1, 5, 4))
    with pytest.raises(ValueError, match="num_layers >= 2"):
        nice(4, num_layers=1)
    with pytest.raises(ValueError, match="flat vectors only"):
        RealNVP((1, 4, 4), mask="alternate")
    with pytest.raises(ValueError, match="'half' or 'alternate'"):
        realnvp(4, mask="checkerboard")
    with pytest.raises(ValueError, match="differs from the transform's own event shape"):
        FlowModel(RealNVP(3), event_shape=4)
    with pytest.raises(ValueError, match="needs event_shape"):
        FlowModel(dist.transforms.AffineTransform(0.0, 2.0))
    with pytest.raises(ValueError, match="Unknown base 'laplace'"):
        FlowModel(RealNVP(3), base="laplace")


@settings(max_examples=15, deadline=None)
@given(
    name=st.sampled_from(["nice", "realnvp"]),
    dim=st.integers(2, 7),
    num_layers=st.integers(2, 5),
    seed=st.integers(0, 1000),
    mask=st.sampled_from(["half", "alternate"]),
)
def test_vector_stacks_round_trip_and_log_det_property(name, dim, num_layers, seed, mask):
    layers = perturb(nice(dim, num_layers, hidden=(6,), mask=mask) if name == "nice"
                     else realnvp(dim, num_layers, hidden=(6,), mask=mask), seed=seed).double()
    u = torch.randn(2, dim, dtype=torch.float64)
    x, ld = forward(layers, u)
    back = x
    for t in reversed(layers):
        back = t.inv(back)
    assert torch.allclose(back, u, atol=1e-8)

    def f(v):
        for t in layers:
            v = t(v)
        return v

    sign, ref = autograd_logdet(f, u[0])
    assert sign > 0 and torch.allclose(ld[0], ref, atol=1e-4)


def test_nice_scaling_is_initialized_from_the_data_scale():
    torch.manual_seed(0)
    x = torch.randn(512, 6) * torch.tensor([0.1, 1.0, 3.0, 10.0, 30.0, 0.5])
    flow = FlowModel(NICE(6, hidden=(8,)))
    assert flow._needs_init()
    flow.initialize(x)
    scaling = flow.transform[-1]
    assert bool(scaling.initialized) and not flow._needs_init()
    # the scaling gives the data unit standard deviation per coordinate on the way to the base
    h = scaling.inv(x)
    assert torch.allclose(h.std(0, unbiased=False), torch.ones(6), atol=1e-4)
    # and the model initializes itself on its first training batch
    fresh = FlowModel(NICE(6, hidden=(8,)))
    fresh.model(x)
    assert torch.allclose(fresh.transform[-1].log_scale, scaling.log_scale)


# ----- the logistic base (NICE's on MNIST) --------------------------------------------
def test_logistic_base_is_the_change_of_variables_with_a_standard_logistic():
    torch.manual_seed(0)
    flow = perturb(FlowModel(NICE(4, hidden=(8,)), base="logistic")).double()
    x = torch.randn(6, 4, dtype=torch.float64) * 3
    u = flow.inverse(x)
    _, ld = forward(flow.transform, u)
    by_hand = -(torch.nn.functional.softplus(u) + torch.nn.functional.softplus(-u)).sum(-1) - ld
    assert torch.allclose(flow.log_prob(x), by_hand, atol=1e-10)
    # the base's draws have the standard logistic's variance pi^2 / 3 (sd of the estimate ~0.013)
    draws = flow.base().sample(torch.Size([200_000]))
    assert abs(float(draws.var()) - math.pi ** 2 / 3) < 0.07
    assert abs(float(draws.mean())) < 0.02
    # its tails cost nats linearly in |u|, a normal's quadratically
    far = torch.full((1, 4), 900.0, dtype=torch.float64)
    assert torch.allclose(flow.base().log_prob(far), torch.tensor([-3600.0], dtype=torch.float64), rtol=1e-3)
    with pytest.raises(ValueError, match="Unknown base 'laplace'.*'normal', 'logistic'"):
        FlowModel(NICE(4, hidden=(8,)), base="laplace")


def test_logistic_base_keeps_nice_on_unit_interval_data_finite_where_the_normal_explodes():
    # NICE on 8-bit data in [0, 1] (no logit): entry 0 is 0 in every image of the batch that
    # initializes the diagonal scaling, so its scale is the dequantization noise's
    # (sd 1 / (256 sqrt 12)); an image where it is lit lands ~900 sds out in base space.
    gen = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 256, (65, 8), generator=gen).float()
    levels[:64, 0] = 0.0
    levels[64, 0] = 255.0
    x = levels / 255
    lls = {}
    for base in ("normal", "logistic"):
        torch.manual_seed(1)
        flow = FlowModel(NICE(8, hidden=(16,)), dequantize=256, base=base)
        flow.initialize(x[:64])
        torch.manual_seed(2)
        with torch.no_grad():
            lls[base] = flow.log_likelihood(x[64:]).item()
    # far out u ~ 880: normal -u^2/2 ~ -3.9e5, logistic -u ~ -880
    assert lls["normal"] < -2e5
    assert lls["logistic"] > -3e3
    assert FlowModel(NICE(8, hidden=(16,)), base="logistic").config["base"] == "logistic"


def _save(flow: FlowModel, path):
    """A checkpoint of the flow as LVMModule writes it: its weights and the config that rebuilds it."""
    state = {f"lvm.{k}": v for k, v in flow.state_dict().items()}
    torch.save({"state_dict": state, "pyro_lvm": {"model": {
        "class": "pyro_lvm.models.flow.FlowModel", "config": flow.config}}}, path)
    return path


def test_logistic_base_survives_a_checkpoint_round_trip(tmp_path):
    from pyro_lvm.training import model_from_checkpoint

    flow = perturb(FlowModel(NICE(4, hidden=(8,)), base="logistic"))
    rebuilt = model_from_checkpoint(_save(flow, tmp_path / "flow.ckpt"))
    x = torch.randn(5, 4)
    assert rebuilt.base_name == "logistic" and "base='logistic'" in repr(rebuilt)
    assert torch.allclose(rebuilt.log_prob(x), flow.eval().log_prob(x), atol=1e-5)


@pytest.mark.parametrize("name", ["NICE", "RealNVP"])
def test_alternate_mask_survives_a_checkpoint_round_trip_and_yaml(name, tmp_path, monkeypatch):
    # the mask is an argument of the stack (so a YAML config can set it) and part of FlowModel's config
    from pyro_lvm.training import model_from_checkpoint
    from pyro_lvm.cli.fit import DEFAULT_CONFIG, LVMCLI

    stack = {"NICE": NICE, "RealNVP": RealNVP}[name]
    flow = perturb(FlowModel(stack(6, hidden=(8,), mask="alternate")))
    assert [t.mask_kind for t in flow.transform if hasattr(t, "mask_kind")] == ["alternate"] * 4
    rebuilt = model_from_checkpoint(_save(flow, tmp_path / "flow.ckpt"))
    x = torch.randn(5, 6)
    assert {t.mask_kind for t in rebuilt.transform if hasattr(t, "mask_kind")} == {"alternate"}
    assert torch.allclose(rebuilt.log_prob(x), flow.eval().log_prob(x), atol=1e-5)
    monkeypatch.setattr("sys.argv", ["pyro-lvm"])
    cli = LVMCLI(args=["--config", str(DEFAULT_CONFIG), "--model.model", "pyro_lvm.FlowModel",
                       "--model.model.init_args.transform", f"pyro_lvm.flows.{name}",
                       "--model.model.init_args.transform.init_args.event_shape", "64",
                       "--model.model.init_args.transform.init_args.mask", "alternate",
                       "--trainer.logger", "false"], run=False)
    assert cli.model.lvm.config["transform"]["init_args"]["mask"] == "alternate"
    assert isinstance(cli.model.lvm.transform, stack)


# ----- the stacks are Pyro transforms ---------------------------------------------------
STACKS = {
    "realnvp": lambda: RealNVP(4, num_layers=3, hidden=(8,), actnorm=True),
    "nice": lambda: NICE(4, hidden=(8,), mask="alternate"),
    "realnvp-images": lambda: RealNVP((1, 4, 4), num_layers=2, hidden=(4,), conv1x1=True),
    "realnvp-multiscale": lambda: RealNVP((1, 8, 8), num_layers=2, hidden=(3,), num_scales=2),
}


@pytest.mark.parametrize("make", list(STACKS.values()), ids=list(STACKS))
def test_stack_log_det_matches_the_autograd_jacobian_of_the_stack_itself(make):
    # the stack is called, inverted and differentiated as one transform, not layer by layer
    stack = perturb(make()).double()
    assert isinstance(stack, ComposeTransformModule)
    u = torch.randn((3,) + tuple(stack.inverse_shape(stack.event_shape)), dtype=torch.float64)
    x = stack(u)
    assert x.shape == (3,) + tuple(stack.event_shape)
    assert torch.allclose(stack.inv(x), u, atol=1e-8)
    ld = stack.log_abs_det_jacobian(u, x)
    assert ld.shape == (3,)
    for i in range(3):
        sign, ref = autograd_logdet(stack, u[i])
        assert sign > 0 and torch.allclose(ld[i], ref, atol=1e-6)


@pytest.mark.parametrize("as_list", [False, True], ids=["stack", "[stack]"])
def test_transformed_distribution_of_a_stack_is_the_change_of_variables(as_list):
    stack = perturb(realnvp(3, num_layers=3, hidden=(8,))).double()
    base = dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1)
    p = dist.TransformedDistribution(base, [stack] if as_list else stack)
    x = torch.randn(6, 3, dtype=torch.float64)
    u = stack.inv(x)
    by_hand = base.log_prob(u) - torch.stack([autograd_logdet(stack, ui)[1] for ui in u])
    assert torch.allclose(p.log_prob(x), by_hand, atol=1e-8)
    z = p.rsample((5,))
    assert z.shape == (5, 3) and z.requires_grad


def test_stack_composes_with_a_pyro_transform():
    # y = a + b * f(u): log p(y) = log p_f((y - a) / b) - sum_i log|b_i|
    stack = perturb(nice(3, hidden=(8,))).double()
    loc, scale = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([2.0, 0.5, 3.0], dtype=torch.float64)
    chain = ComposeTransformModule([stack, dist.transforms.AffineTransform(loc, scale, event_dim=1)])
    assert set(chain.parameters()) == set(stack.parameters())
    base = dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1)
    y = torch.randn(4, 3, dtype=torch.float64)
    inner = dist.TransformedDistribution(base, stack).log_prob((y - loc) / scale)
    composed = dist.TransformedDistribution(base, chain).log_prob(y)
    assert torch.allclose(composed, inner - scale.log().sum(), atol=1e-10)


def test_stack_trains_inside_a_plain_pyro_model():
    # a Pyro user's own model: the stack registered with pyro.module, observed through
    # TransformedDistribution, no guide (no latent): the ELBO is the exact log-likelihood
    pyro.clear_param_store()
    torch.manual_seed(0)
    data = torch.randn(256, 2) @ torch.tensor([[2.0, 0.0], [1.5, 0.3]]) + 1.0
    stack = realnvp(2, num_layers=4, hidden=(16,))

    def model(x):
        pyro.module("stack", stack)
        base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.TransformedDistribution(base, stack), obs=x)

    def guide(x):
        pass

    def nll():
        base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        return -dist.TransformedDistribution(base, stack).log_prob(data).sum().item()

    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    before = nll()
    assert math.isclose(svi.step(data), before, rel_tol=1e-6)  # the loss of the parameters before the step
    assert {name.split("$$$")[0] for name in pyro.get_param_store()} == {"stack"}
    assert len(pyro.get_param_store()) == len(list(stack.parameters()))
    for _ in range(100):
        svi.step(data)
    after = nll()
    assert math.isclose(svi.evaluate_loss(data), after, rel_tol=1e-6)
    print(f"negative log-likelihood per point: {before / len(data):.3f} -> {after / len(data):.3f}")
    assert after < before - 0.3 * len(data), (before, after)


def test_a_slice_of_a_stack_is_a_transform_of_those_layers():
    stack = perturb(realnvp(4, num_layers=4, hidden=(8,))).double()
    head, tail = stack[:2], stack[2:]
    assert isinstance(head, ComposeTransformModule) and list(head) == list(stack)[:2]
    u = torch.randn(3, 4, dtype=torch.float64)
    assert torch.allclose(tail(head(u)), stack(u), atol=1e-12)


# ----- FlowModel takes a transform; the earlier spelling; the config ------------------------
def _by_hand(name, dim, num_layers, hidden, **options):
    """The layers the earlier ``FlowModel(dim, name, ...)`` built, in its order, one by one."""
    if name == "nice":
        mask = options.get("mask", "half")
        return [AdditiveCoupling(dim, hidden=hidden, mask=mask, parity=k % 2, init="shift")
                for k in range(num_layers)] + [DiagonalScaling(dim)]
    layers = []
    for k in range(num_layers):
        if options.get("actnorm"):
            layers.append(ActNorm(dim))
        layers.append(AffineCoupling(dim, hidden=hidden, mask=options.get("mask", "half"), parity=k % 2, init="shift"))
    return layers


@pytest.mark.parametrize("name,options,model_options", [
    ("realnvp", {"actnorm": True}, {"dequantize": 17, "logit_alpha": 0.01}),
    ("nice", {"mask": "alternate"}, {"base": "logistic", "dequantize": 256}),
])
def test_flow_model_of_a_stack_has_the_parameters_and_likelihood_of_the_layers_built_one_by_one(name, options, model_options):
    stack_class = {"nice": NICE, "realnvp": RealNVP}[name]
    torch.manual_seed(0)
    flow = FlowModel(stack_class(6, num_layers=3, hidden=(8,), **options), **model_options)
    torch.manual_seed(0)
    by_hand = FlowModel(_by_hand(name, 6, 3, (8,), **options), event_shape=6, **model_options)
    mine, theirs = flow.state_dict(), by_hand.state_dict()
    assert list(mine) == list(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    levels = model_options["dequantize"]
    x = torch.randint(0, levels, (32, 6)).float() / (levels - 1)
    for model in (flow, by_hand):
        torch.manual_seed(2)  # the same dequantization noise for both initializations
        model.initialize(x)
    torch.manual_seed(1)
    expected = by_hand.log_likelihood(x, num_samples=3)
    torch.manual_seed(1)
    assert torch.equal(flow.log_likelihood(x, num_samples=3), expected)


@pytest.mark.parametrize("old_call,new_python", [
    (lambda: FlowModel(2, "realnvp", num_layers=6, hidden=(32, 32)),
     "FlowModel(pyro_lvm.flows.RealNVP(2, num_layers=6, hidden=[32, 32]))"),
    (lambda: FlowModel((1, 8, 8), "realnvp", num_layers=2, hidden=(4,), actnorm=True, dequantize=17,
                       logit_alpha=0.01),
     "FlowModel(pyro_lvm.flows.RealNVP([1, 8, 8], num_layers=2, hidden=[4], actnorm=True), dequantize=17, "
     "logit_alpha=0.01)"),
    (lambda: FlowModel(event_shape=[6], transforms="nice", num_layers=4, hidden=[8], actnorm=False, scale="tanh",
                       num_scales=1, conv1x1=False, init="shift", dequantize=256, logit_alpha=None, base="logistic",
                       mask="alternate"),  # an earlier checkpoint's config
     "FlowModel(pyro_lvm.flows.NICE([6], num_layers=4, hidden=[8], mask='alternate'), dequantize=256, "
     "base='logistic')"),
])
def test_the_earlier_spelling_fails_with_the_new_one_which_builds(old_call, new_python):
    import re

    import yaml

    with pytest.raises(TypeError, match="FlowModel takes the flow as a transform now") as error:
        old_call()
    message = str(error.value)
    assert f"Write {new_python};" in message
    # both spellings the message gives build the same model
    python_built = eval(new_python, {"FlowModel": FlowModel, "pyro_lvm": pyro_lvm})
    yaml_text = re.search(r"in a YAML config, (.*)\.$", message).group(1)
    yaml_built = FlowModel(**yaml.safe_load("{" + yaml_text + "}"))
    assert yaml_built.config == python_built.config


def test_the_config_is_plain_data_that_rebuilds_the_model():
    import json

    import yaml

    flow = perturb(FlowModel(RealNVP((1, 8, 8), num_layers=2, hidden=(4,), actnorm=True, num_scales=2),
                             dequantize=256, logit_alpha=1e-6))
    x = torch.randint(0, 256, (16, 1, 8, 8)).float() / 255
    flow.initialize(x)
    config = flow.config
    assert json.loads(json.dumps(config)) == config and yaml.safe_load(yaml.safe_dump(config)) == config
    assert config["transform"] == {"class_path": "pyro_lvm.flows.RealNVP", "init_args": {
        "event_shape": [1, 8, 8], "num_layers": 2, "hidden": [4], "actnorm": True, "scale": "tanh", "cache_size": 1,
        "num_scales": 2, "conv1x1": False, "init": "shift", "mask": None}}
    rebuilt = FlowModel(**json.loads(json.dumps(config)))
    assert list(rebuilt.state_dict()) == list(flow.state_dict())
    rebuilt.load_state_dict(flow.state_dict())
    assert rebuilt.config == config
    torch.manual_seed(0)
    expected = flow.eval().log_likelihood(x)
    torch.manual_seed(0)
    assert torch.equal(rebuilt.eval().log_likelihood(x), expected)


def test_a_hand_made_transform_or_base_is_marked_custom_and_a_config_builds_only_pyro_lvm_classes():
    coupling = AffineCoupling(4, hidden=(8,))
    flow = FlowModel(coupling)  # a single layer carries its event shape
    assert flow.config["transform"] == "custom" and flow.config["base"] == "normal"
    assert flow.transform is coupling and flow.event_shape == (4,)
    with pytest.raises(ValueError, match="cannot rebuild"):
        FlowModel(**flow.config)
    logistic = dist.Logistic(torch.zeros(4), torch.ones(4)).to_event(1)
    assert FlowModel(RealNVP(4, hidden=(8,)), base=logistic).config["base"] == "custom"
    with pytest.raises(ValueError, match="event_shape \\(4,\\).*to_event"):
        FlowModel(RealNVP(4, hidden=(8,)), base=dist.Normal(torch.zeros(4), 1.0))
    for class_path in ("builtins.eval", "torch.distributions.ExpTransform"):
        with pytest.raises(ValueError, match="transforms of pyro_lvm only"):
            FlowModel({"class_path": class_path, "init_args": {}}, event_shape=4)
    with pytest.raises(ValueError, match="not a transform"):
        FlowModel({"class_path": "pyro_lvm.models.flow.FlowModel", "init_args": {}}, event_shape=4)


def test_a_base_distribution_object_is_the_base_of_the_change_of_variables():
    stack = perturb(nice(3, hidden=(8,))).double()
    base = dist.StudentT(3.0, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)).to_event(1)
    flow = FlowModel(stack, base=base)
    x = torch.randn(5, 3, dtype=torch.float64)
    u = stack.inv(x)
    assert torch.allclose(flow.log_prob(x), base.log_prob(u) - stack.log_abs_det_jacobian(u, x), atol=1e-10)
    assert flow.sample(4).shape == (4, 3)
