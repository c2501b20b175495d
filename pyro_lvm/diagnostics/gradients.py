r"""The variance and signal-to-noise ratio of ELBO gradient estimators, compared on one model."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import pandas as pd
import pyro
import torch
from pyro.infer import ELBO
from pyro.params import module_from_param_with_module_name, user_param_name
from pyro.util import get_rng_state, set_rng_state
from torch import nn

from ..estimators import make_elbo
from ..training.module import LVMModule

__all__ = ["COLUMNS", "gradient_variance", "format_table"]

#: Columns of the table that :func:`gradient_variance` returns, in order.
COLUMNS = (
    "estimator", "group", "num_params", "grad_norm", "variance", "total_variance", "snr",
    "time_per_draw_s",
)


EstimatorSpec = Union[str, tuple, ELBO]


Estimators = Union[Mapping[str, Union[ELBO, str]], Sequence[EstimatorSpec]]


def gradient_variance(
    model: Union[nn.Module, Callable],
    guide: Optional[Callable],
    estimators: Estimators,
    data: Any,
    num_draws: int = 100,
    groups: Optional[Mapping[str, Sequence[str]]] = None,
    seed: int = 0,
) -> pd.DataFrame:
    r"""Monte-Carlo variance and signal-to-noise ratio of each estimator's ELBO gradient.

    A gradient estimator draws a random vector :math:`g` with
    :math:`\mathbb E[g] = \nabla_\lambda \mathcal L` for the training loss
    :math:`\mathcal L = -\mathrm{ELBO}_\beta / B` (nats per data point of a batch of
    :math:`B`, the loss of :class:`pyro_lvm.LVMModule`) and the parameters
    :math:`\lambda = (\theta, \phi)` of the model and the guide. For each estimator this
    draws :math:`g_1, \dots, g_S` (``num_draws``) on one batch at one parameter value and
    reports, per group of parameters with :math:`P` coordinates,

    * ``grad_norm`` :math:`= \|\bar g\|_2`, the norm of the mean gradient
      :math:`\bar g = \frac1S \sum_s g_s`;
    * ``variance`` :math:`= \frac1P \sum_p \hat\sigma_p^2`, with
      :math:`\hat\sigma_p^2` the unbiased sample variance of coordinate :math:`p`
      (the standard error of :math:`\bar g_p` is :math:`\hat\sigma_p / \sqrt S`);
    * ``total_variance`` :math:`= \sum_p \hat\sigma_p^2`, an estimate of
      :math:`\mathbb E\|g - \mathbb E g\|^2`;
    * ``snr`` :math:`= \frac1P \sum_p |\bar g_p| / \hat\sigma_p`, the signal-to-noise
      ratio of Rainforth et al. (2018), averaged over coordinates (a coordinate with
      :math:`\hat\sigma_p = 0` counts as :math:`+\infty`, or is left out when its mean
      is 0 too: a parameter the loss does not reach);
    * ``num_params`` :math:`= P` and ``time_per_draw_s``, the mean wall time of one
      loss and gradient evaluation.

    It measures the lecture's claim about the two ways of differentiating
    :math:`\mathbb E_{q_\phi}[f(z)]`: the score function (REINFORCE, the policy
    gradient) :math:`f(z)\nabla_\phi \log q_\phi(z)` has a far larger variance than the
    pathwise (reparameterization) gradient :math:`\nabla_\phi f(g_\phi(\epsilon))`, and
    a closed-form KL removes part of the latter's noise. All estimators are measured
    at the same parameter values (nothing is updated) and with the same seeds, draw
    ``s`` running after ``pyro.set_rng_seed(seed + s)``, so a table is reproducible.

    The pair runs in a private parameter store (Pyro's global store is neither read
    nor changed), as in :class:`~pyro_lvm.LVMModule`: parameters that a pair of
    functions creates with ``pyro.param`` take their initial values. To measure at
    trained values, pass the trained :class:`~pyro_lvm.LVMModule` as ``model``.
    Gradients are taken with respect to unconstrained parameters, as an optimizer sees
    them, and not with respect to an estimator's own parameters (a learned
    baseline). An estimator that keeps state between calls (a running-average
    baseline) updates it from draw to draw as in training, every estimator starting
    from the state it and the module hold; that state, and the global random state,
    are restored afterwards. One untimed draw per estimator comes first, so that
    one-time work (checks of the pair, Pyro's guess of ``max_plate_nesting``) neither
    shifts the seeded draws nor counts in ``time_per_draw_s``.

    References:
        Tighter Variational Bounds are Not Necessarily Better (Rainforth et al., 2018),
        https://arxiv.org/abs/1802.04537

    Arguments:
        model: a Pyro model, a module with ``model`` and ``guide`` methods (such as
            :class:`pyro_lvm.VAE`), or an :class:`~pyro_lvm.LVMModule`.
        guide: the guide, or ``None`` when ``model`` carries one.
        estimators: a dict label -> :class:`pyro.infer.ELBO`, or a list of names for
            :func:`pyro_lvm.make_elbo`, ``(name, options)`` pairs and ELBO instances
            (labelled by name, ``name(option=value, ...)`` and class name). Each must
            have ``differentiable_loss``.
        data: one batch: a tensor ``x``, a dict with key ``"x"`` whose other keys go by
            name to the model and guide that accept them, or a tuple of positional
            arguments (as :class:`~pyro_lvm.LVMModule` takes them).
        num_draws: gradient draws per estimator (at least 2).
        groups: group label -> parameter-name prefixes; a prefix matches a name
            equal to it or followed by ``"."`` (``"encoder"`` matches
            ``"encoder.0.weight"``). Default: one group per first component of
            the name: ``encoder``, ``decoder``, ``likelihood`` for a VAE, the
            ``pyro.param`` name for a pair of functions.
        seed: seed of the first draw.

    Returns:
        A :class:`pandas.DataFrame` with columns :data:`COLUMNS`, one row per
        estimator and group, in the order given.

    Example:
        >>> import pyro.distributions as dist
        >>> def model(x):                            # z ~ N(0, I), x | z ~ N(z, I)
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Normal(torch.zeros(16), 1.).to_event(1))
        ...         pyro.sample("x", dist.Normal(z, 1.).to_event(1), obs=x)
        >>> def guide(x):                            # q(z) = N(loc, I)
        ...     loc = pyro.param("loc", torch.zeros(16))
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("z", dist.Normal(loc, 1.).to_event(1))
        >>> table = gradient_variance(model, guide, ["reparam", "score_function"], torch.ones(8, 16), num_draws=50)
        >>> table[["estimator", "group", "num_params"]]
                estimator group  num_params
        0         reparam   loc          16
        1  score_function   loc          16
        >>> bool(table.variance[1] > 10 * table.variance[0])  # the score function is far noisier
        True
    """
    if num_draws < 2:
        raise ValueError(f"num_draws must be at least 2 to estimate a variance; got {num_draws}.")
    labelled = _labelled_estimators(estimators)
    if isinstance(model, LVMModule):
        if guide is not None:
            raise ValueError(
                "Got an LVMModule and a guide; the module already holds its pair. Pass guide=None."
            )
        module = model
    else:
        module = LVMModule(model, guide, estimator=labelled[0][1])
    own_estimator = module.estimator

    rng_state = get_rng_state()
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            pyro.set_rng_seed(seed)
            module.initialize(data)
            names, params = _named_parameters(module)
            selections = _groups(names, groups)
            rows = []
            with _restored(module) as start:
                for label, elbo in labelled:
                    module.estimator = module.objective.elbo = elbo
                    stats, seconds = _draw(module, elbo, data, params, num_draws, seed, start)
                    rows += _summaries(label, stats, selections, seconds / num_draws)
    finally:
        module.estimator = module.objective.elbo = own_estimator
        set_rng_state(rng_state)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def format_table(df: pd.DataFrame) -> str:
    """The table of :func:`gradient_variance` as fixed-width text, four significant digits.

    Example:
        >>> df = pd.DataFrame([["reparam", "loc", 1, 0.5, 0.0412, 0.0412, 2.46, 0.0003]], columns=COLUMNS)
        >>> print(format_table(df))
        estimator group  num_params grad_norm variance total_variance  snr time_per_draw_s
          reparam   loc           1       0.5   0.0412         0.0412 2.46          0.0003
    """
    formatters = {
        column: "{:.4g}".format
        for column in ("grad_norm", "variance", "total_variance", "snr", "time_per_draw_s")
    }
    return df.to_string(index=False, formatters=formatters)


def _labelled_estimators(estimators: Estimators) -> list[tuple[str, ELBO]]:
    if isinstance(estimators, Mapping):
        items = [(str(label), _build(spec)[1]) for label, spec in estimators.items()]
    elif isinstance(estimators, (str, ELBO)):
        items = [_build(estimators)]
    else:
        items = [_build(spec) for spec in estimators]
    if not items:
        raise ValueError(
            "No estimators given; pass names such as ['reparam', 'score_function'] "
            "(see pyro_lvm.estimators.ESTIMATORS), (name, options) pairs or ELBO instances."
        )
    labels = [label for label, _ in items]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(
            f"Estimator labels must be unique; {', '.join(map(repr, repeated))} appears more "
            "than once. Pass a dict {label: estimator} to name them."
        )
    for label, elbo in items:
        if not hasattr(elbo, "differentiable_loss"):
            raise TypeError(
                f"Estimator {label!r} ({type(elbo).__name__}) has no differentiable_loss; use a "
                "pyro_lvm estimator (pyro_lvm.estimators.make_elbo) or a Pyro ELBO that has one."
            )
    return items


def _build(spec: EstimatorSpec) -> tuple[str, ELBO]:
    if isinstance(spec, str):
        return spec, make_elbo(spec)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str):
        name, options = spec
        options = dict(options or {})
        label = f"{name}({', '.join(f'{k}={v!r}' for k, v in options.items())})" if options else name
        return label, make_elbo(name, **options)
    if isinstance(spec, ELBO):
        return type(spec).__name__, spec
    raise TypeError(
        f"Cannot use {spec!r} as an estimator; give a name for pyro_lvm.make_elbo, a "
        "(name, options) pair or a pyro.infer.ELBO instance."
    )


def _param_state(module: LVMModule) -> dict:
    # the pair's private parameter store; Pyro keeps decaying-average baselines there
    return module._param_state


def _copy(state: dict) -> dict:
    """A copy of a parameter-store state; parameters shared, buffers (baselines) cloned."""
    params = {
        name: value if isinstance(value, nn.Parameter) else value.detach().clone()
        for name, value in state["params"].items()
    }
    return {**state, "params": params, "constraints": dict(state["constraints"])}


@contextmanager
def _restored(module: LVMModule) -> Iterator[dict]:
    """Yield the module's state as it is now, and leave it so afterwards."""
    state = _param_state(module)
    before = _copy(state)
    try:
        yield before
    finally:
        state.clear()
        state.update(before)


def _named_parameters(module: LVMModule) -> tuple[list[str], list[nn.Parameter]]:
    """The pair's trainable parameters, named as Pyro names them (``encoder.0.weight``, ``loc``)."""
    in_store = {id(value): name for name, value in _param_state(module)["params"].items()}
    skip = {id(p) for p in module.estimator_modules.parameters()} if hasattr(module, "estimator_modules") else set()
    names, params = [], []
    for path, param in module.named_parameters():
        if not param.requires_grad or id(param) in skip:
            continue
        name = in_store.get(id(param))
        if name is None:  # not reached through pyro.param / pyro.module: the module path
            parts = path.split(".")
            drop = 2 if parts[0] == "pair_modules" else 1
            name = ".".join(parts[drop:]).replace("/", ".") or path
        else:
            user = user_param_name(name)  # "0.weight" of pyro.module's "encoder$$$0.weight"
            name = f"{module_from_param_with_module_name(name)}.{user}" if user != name else name
        names.append(name)
        params.append(param)
    if not params:
        raise ValueError(
            "The model/guide pair has no trainable parameters, so there is no gradient to measure."
        )
    return names, params


def _groups(
    names: list[str], groups: Optional[Mapping[str, Sequence[str]]]
) -> list[tuple[str, list[int]]]:
    """``(label, indices of its parameters)`` per group, in order."""
    if groups is None:
        members: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            members.setdefault(name.split(".")[0], []).append(i)
    else:
        if isinstance(groups, (str, bytes)) or not isinstance(groups, Mapping):
            raise TypeError(
                f"groups must be a dict of group label -> list of name prefixes; got {type(groups).__name__}."
            )
        members = {}
        for label, prefixes in groups.items():
            prefixes = [prefixes] if isinstance(prefixes, str) else list(prefixes)
            chosen = [
                i for i, name in enumerate(names)
                if any(name == p or name.startswith(p + ".") for p in prefixes)
            ]
            if not chosen:
                raise ValueError(
                    f"Group {label!r} with prefixes {prefixes} matches no parameter; "
                    f"parameter names: {', '.join(names)}."
                )
            members[label] = chosen
    return list(members.items())


def _draw(
    module: LVMModule,
    elbo: ELBO,
    data: Any,
    params: list[nn.Parameter],
    num_draws: int,
    seed: int,
    start: dict,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float]:
    """Welford's running mean and variance (float64) of each parameter's gradient.

    Every estimator starts from the same state (``start``: the module's store with
    its baselines; the estimator's own running averages as they were).
    """
    stateful = hasattr(elbo, "state_dict") and hasattr(elbo, "load_state_dict")
    state = _clone(elbo.state_dict()) if stateful else None
    cuda = any(p.device.type == "cuda" for p in params)
    mean = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in params]
    m2 = [torch.zeros_like(m) for m in mean]
    seconds = 0.0
    try:
        # One draw first, so that work done once (the estimator's check of the pair, Pyro's
        # guess of max_plate_nesting) neither shifts the seeded draws nor counts in the time.
        pyro.set_rng_seed(seed)
        torch.autograd.grad(module(data), params, allow_unused=True)
        _param_state(module).update(_copy(start))
        if stateful:
            elbo.load_state_dict(_clone(state))
        for draw in range(num_draws):
            pyro.set_rng_seed(seed + draw)
            if cuda:
                torch.cuda.synchronize()
            tic = time.perf_counter()
            grads = torch.autograd.grad(module(data), params, allow_unused=True)
            if cuda:
                torch.cuda.synchronize()
            seconds += time.perf_counter() - tic
            for g, m, s in zip(grads, mean, m2):
                if g is None:  # a parameter this estimator's loss does not reach
                    g = torch.zeros_like(m)
                delta = g.double() - m
                m += delta / (draw + 1)
                s += delta * (g.double() - m)
    finally:
        if stateful:
            elbo.load_state_dict(state)
    return [(m.reshape(-1), s.reshape(-1) / (num_draws - 1)) for m, s in zip(mean, m2)], seconds


def _clone(state: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _summaries(
    label: str,
    stats: list[tuple[torch.Tensor, torch.Tensor]],
    selections: list[tuple[str, list[int]]],
    time_per_draw: float,
) -> list[list]:
    rows = []
    for group, index in selections:
        mean = torch.cat([stats[i][0] for i in index])
        variance = torch.cat([stats[i][1] for i in index])
        std = variance.sqrt()
        reached = (std > 0) | (mean != 0)
        snr = (mean.abs() / std)[reached]
        rows.append([
            label,
            group,
            int(mean.numel()),
            float(mean.norm()),
            float(variance.mean()),
            float(variance.sum()),
            float(snr.mean()) if snr.numel() else math.nan,
            time_per_draw,
        ])
    return rows
