"""A normalizing-flow density model as a Pyro model with no latent variable."""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Callable, Optional, Sequence, Union

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_transform import ComposeTransformModule
from pyro.infer.util import is_validation_enabled
from pyro.nn import PyroModule
from torch import nn
from torch.distributions import Distribution, Transform

from ..flows.layers import ActNorm, DiagonalScaling
from ..flows.preprocessing import Logit
from ..flows.preprocessing import bits_per_dim as _bits_per_dim
from ..flows.preprocessing import dequantize as _dequantize
from ..flows.stacks import initialize_actnorm, transform_parts
from ..parts import CUSTOM, build_part, part_config
from .base import data_plate

__all__ = ["FlowModel"]

_BASES = {"normal": dist.Normal, "logistic": dist.Logistic}


def _refusing_the_old_spelling(init: Callable) -> Callable:
    """``init`` behind a check that refuses the earlier ``FlowModel(event_shape, "realnvp", ...)`` with the new
    spelling; ``functools.wraps`` keeps ``init``'s own signature for jsonargparse, Sphinx and IDEs."""

    @functools.wraps(init)
    def checked(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        message = _old_spelling_message(args, kwargs)
        if message is not None:
            raise TypeError(message)
        init(self, *args, **kwargs)

    return checked


class FlowModel(PyroModule):
    r"""A density model :math:`x = f(u)`, :math:`u \sim p_U`, for any invertible transform :math:`f` (a Pyro ``TransformModule``).

    By the change of variables, with :math:`f = f_K \circ \dots \circ f_1` (the
    ``transform``, e.g. a :class:`~pyro_lvm.flows.RealNVP` stack, in the generative
    direction) and :math:`u = f^{-1}(x)`,

    .. math::

        \log p(x) = \log p_U(u) - \sum_{k=1}^K \log\lvert\det J_{f_k}\rvert ,

    exact. The base :math:`p_U` is the standard normal, or with ``base="logistic"`` the
    standard logistic of NICE, :math:`\log p_U(u) = -\sum_i \big(\operatorname{softplus}(u_i)
    + \operatorname{softplus}(-u_i)\big)`, whose tails fall linearly in :math:`\lvert u\rvert`
    instead of quadratically: a point far out in base space (e.g. a pixel that was constant in
    the batch that initialized a :class:`~pyro_lvm.flows.DiagonalScaling`) costs nats in
    proportion to its distance, not to its square. It has the shape
    ``transform.inverse_shape(event_shape)`` (``base_shape``).

    The model observes ``x`` from this distribution inside the data plate and has no latent
    site (its ``guide`` does nothing), so it trains by maximum likelihood through
    :class:`pyro_lvm.LVMModule` / :func:`pyro_lvm.fit` and ``pyro-lvm fit``, where
    ``val/elbo`` is exactly the held-out log-likelihood per data point and
    ``val/bits_per_dim`` the same in bits per dimension (:meth:`evaluation_metrics`).

    **Discrete data** (``dequantize=K``: e.g. 8-bit images scaled to :math:`[0, 1]` as
    ``level / 255``, ``K = 256``): the model dequantizes each batch with fresh uniform noise,
    :math:`y = (\mathrm{level} + u) / K \in [0, 1)^D`, observes :math:`y`, and adds the
    factor :math:`-D \log K`, so that the logged ELBO is the dequantization bound
    :math:`\mathbb E_u[\log p(y)] - D\log K \le \log P(x)` on the log-probability of the
    discrete data, and bits/dim are those of the :math:`K`-level data (Theis et al. 2016).
    With ``logit_alpha`` (RealNVP's pre-processing, :class:`~pyro_lvm.flows.Logit`) the
    transform models :math:`\operatorname{logit}(\alpha + (1 - 2\alpha) y)`; the log-determinant
    of this map is counted, so likelihoods stay those of :math:`y`. (With :math:`\alpha > 0` the
    mass the flow puts beyond :math:`\operatorname{logit}(\alpha)` is lost: the reported
    likelihood is then a slight under-estimate, never an over-estimate.)

    If the transform has :class:`~pyro_lvm.flows.ActNorm` layers (at any depth of a
    multi-scale stack) or NICE's :class:`~pyro_lvm.flows.DiagonalScaling`, they are
    initialized from data by :meth:`initialize`, which :meth:`model` calls on the first batch
    seen in training mode (a batch with some spread: the all-zeros :meth:`example_batch` is
    skipped).

    **Configuration and checkpoints.** ``config`` holds plain data that rebuilds the model,
    ``FlowModel(**flow.config)``: the transform as ``{"class_path": ..., "init_args": ...}``
    when it is one of pyro_lvm's stacks (:class:`~pyro_lvm.flows.NICE`,
    :class:`~pyro_lvm.flows.RealNVP`), which is also how a YAML config writes it::

        model:
          class_path: pyro_lvm.FlowModel
          init_args:
            transform:
              class_path: pyro_lvm.flows.RealNVP
              init_args: {event_shape: [1, 28, 28], num_scales: 2, actnorm: true}
            dequantize: 256
            logit_alpha: 1.0e-6

    Such a dict is built only from a class inside ``pyro_lvm`` (a configuration runs no
    foreign code). A transform of any other kind (a user's own, Pyro's) and a base given as
    a distribution are recorded as ``"custom"``: a checkpoint then holds their weights but
    cannot rebuild them; build the model in code and load the ``state_dict``.

    The stack's own options (``num_layers``, ``hidden``, ``actnorm``, ``num_scales``, ...)
    are arguments of the stack, not of FlowModel: the earlier spelling
    ``FlowModel(event_shape, "realnvp", num_layers=...)`` raises a ``TypeError`` that spells
    out the call to write instead.

    References:
        Dinh, Krueger and Bengio, NICE, 2014, https://arxiv.org/abs/1410.8516 ;
        Dinh, Sohl-Dickstein and Bengio, Density estimation using Real NVP, 2016,
        https://arxiv.org/abs/1605.08803 ;
        Theis, van den Oord and Bethge, A note on the evaluation of generative models, 2016,
        https://arxiv.org/abs/1511.01844

    Arguments:
        transform: the flow :math:`f`, base to data: a transform (a
            :class:`~pyro_lvm.flows.RealNVP` or :class:`~pyro_lvm.flows.NICE` stack, any
            Pyro ``TransformModule`` or torch ``Transform``), a list of transforms (composed in
            order), or a stack's configuration ``{"class_path": ..., "init_args": ...}``.
        base: the base distribution :math:`p_U`: ``"normal"`` (default), ``"logistic"``
            (NICE's on MNIST; it trains NICE on data in :math:`[0, 1]` without a logit, where
            the normal base diverges), or a distribution with event shape ``base_shape`` and
            no batch shape (its tensors do not follow the model's ``.to(device)``).
        dequantize: the number of levels :math:`K` of discrete data, or ``None`` for
            continuous data.
        logit_alpha: the logit pre-processing's :math:`\alpha` (1e-6 for MNIST, 0.05 for
            CIFAR-10 in the RealNVP paper), or ``None`` for none. Needs data in :math:`[0, 1]`.
        event_shape: shape of one data point, an int for flat vectors or ``(C, H, W)`` for
            images; by default the transform's own ``event_shape`` (pyro_lvm's stacks and
            couplings have one).

    Example:
        >>> from pyro_lvm.flows import NICE, RealNVP
        >>> flow = FlowModel(RealNVP(2, hidden=(8,)))
        >>> x = torch.randn(5, 2)
        >>> flow.log_prob(x).shape
        torch.Size([5])
        >>> torch.allclose(flow.forward_map(flow.inverse(x)), x, atol=1e-5)
        True
        >>> flow.config["transform"]["class_path"], flow.config["transform"]["init_args"]["hidden"]
        ('pyro_lvm.flows.RealNVP', [8])
        >>> rebuilt = FlowModel(**flow.config)
        >>> _ = rebuilt.load_state_dict(flow.state_dict())
        >>> torch.equal(rebuilt.log_prob(x), flow.log_prob(x))
        True
        >>> FlowModel(NICE(4, hidden=(8,)), base="logistic").base()
        Independent(Logistic(loc: torch.Size([4]), scale: torch.Size([4])), 1)
        >>> from pyro.distributions.transforms import AffineTransform
        >>> FlowModel(AffineTransform(0.0, 2.0), event_shape=3).config["transform"]
        'custom'
    """

    @_refusing_the_old_spelling
    def __init__(
        self,
        transform: Union[Transform, Sequence[Transform], dict],
        base: Union[str, Distribution] = "normal",
        dequantize: Optional[int] = None,
        logit_alpha: Optional[float] = None,
        event_shape: Union[None, int, Sequence[int]] = None,
    ) -> None:
        super().__init__()
        transform = _as_transform_module(transform)
        own_shape = getattr(transform, "event_shape", None)
        if event_shape is None:
            if own_shape is None:
                raise ValueError(
                    f"FlowModel needs event_shape, the shape of one data point, for a transform that does not "
                    f"carry its own ({type(transform).__name__}); e.g. FlowModel(transform, event_shape=784)."
                )
            event_shape = own_shape
        self.event_shape = torch.Size(
            (int(event_shape),) if isinstance(event_shape, int) else tuple(int(s) for s in event_shape)
        )
        if len(self.event_shape) == 0 or any(s < 1 for s in self.event_shape):
            raise ValueError(f"event_shape must be a non-empty shape of positive sizes; got {event_shape!r}.")
        if own_shape is not None and torch.Size(own_shape) != self.event_shape:
            raise ValueError(
                f"event_shape {tuple(self.event_shape)} differs from the transform's own event shape "
                f"{tuple(own_shape)}; leave event_shape out (it defaults to the transform's)."
            )
        if transform.codomain.event_dim > len(self.event_shape):
            raise ValueError(
                f"The transform acts on events of {transform.codomain.event_dim} dims but event_shape "
                f"{tuple(self.event_shape)} has {len(self.event_shape)}; set event_shape to the data's shape."
            )
        if dequantize is not None and (isinstance(dequantize, bool) or int(dequantize) != dequantize or dequantize < 2):
            raise ValueError(
                f"dequantize is the number of levels of the discrete data (256 for 8-bit images), an "
                f"int >= 2, or None for continuous data; got {dequantize!r}."
            )
        if logit_alpha is not None and not 0.0 <= logit_alpha < 0.5:
            raise ValueError(
                f"logit_alpha must lie in [0, 0.5) (RealNVP: 0.05 on CIFAR-10, 1e-6 on MNIST), or be None "
                f"for no logit pre-processing; got {logit_alpha!r}."
            )
        self.num_levels = None if dequantize is None else int(dequantize)
        self.logit_alpha = None if logit_alpha is None else float(logit_alpha)
        self.transform = transform
        self.preprocessing = (
            None if self.logit_alpha is None else Logit(self.logit_alpha, event_dim=len(self.event_shape))
        )
        self.base_shape = torch.Size(transform.inverse_shape(self.event_shape))
        self.register_buffer("base_loc", torch.zeros(self.base_shape))
        self.register_buffer("base_scale", torch.ones(self.base_shape))
        self._base_distribution: Optional[Distribution] = None
        if isinstance(base, Distribution):
            if base.batch_shape != () or base.event_shape != self.base_shape:
                raise ValueError(
                    f"base must be a distribution of one base point, batch_shape () and event_shape "
                    f"{tuple(self.base_shape)} (the transform's inverse_shape of the event); got batch_shape "
                    f"{tuple(base.batch_shape)} and event_shape {tuple(base.event_shape)}. Declare its dims as "
                    "event dims with .to_event(n)."
                )
            self._base_distribution = base
            self.base_name = CUSTOM
        elif base in _BASES:
            self.base_name = base
        elif base == CUSTOM:
            raise ValueError(
                "This FlowModel configuration comes from a model built on a base distribution of its own (base: "
                "'custom'), which a configuration cannot rebuild. Build FlowModel(transform, base=your_distribution, "
                "...) in code and load the checkpoint's state_dict into it."
            )
        else:
            raise ValueError(f"Unknown base {base!r}; choose one of {tuple(_BASES)}, or pass a distribution.")
        self.config = dict(
            transform=_transform_config(transform),
            base=self.base_name,
            dequantize=self.num_levels,
            logit_alpha=self.logit_alpha,
            event_shape=list(self.event_shape),
        )

    # ----- the distribution -------------------------------------------------------
    def base(self) -> Distribution:
        """The base distribution over ``base_shape``: standard normal, standard logistic, or the one given (``base``)."""
        if self._base_distribution is not None:
            return self._base_distribution
        return _BASES[self.base_name](self.base_loc, self.base_scale).to_event(len(self.base_shape))

    def _all_transforms(self) -> list:
        # the layers one by one: log_prob then takes each log-determinant at the pair that the
        # inverse pass has computed (a ComposeTransform would rerun the forward pass for them)
        layers = transform_parts(self.transform)
        if self.preprocessing is not None:
            layers.append(self.preprocessing.inv)  # logit space -> [0, 1]
        return layers

    def distribution(self) -> dist.TransformedDistribution:
        """p(x) as a :class:`pyro.distributions.TransformedDistribution` (of the dequantized data, if any)."""
        return dist.TransformedDistribution(self.base(), self._all_transforms())

    def _check(self, x: torch.Tensor, batched: bool = False) -> None:
        k = len(self.event_shape)
        if not isinstance(x, torch.Tensor) or x.dim() < k + int(batched) or x.shape[x.dim() - k:] != self.event_shape:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"FlowModel expects {'a batch' if batched else 'data'} of shape "
                f"({'batch' if batched else '...'}, {', '.join(map(str, self.event_shape))}); got {shape}. "
                "Set event_shape to the data's shape, or reshape the data."
            )
        if batched and x.dim() != k + 1:
            raise ValueError(
                f"FlowModel.model expects a batch of shape (batch, {', '.join(map(str, self.event_shape))}); "
                f"got {tuple(x.shape)}."
            )

    def _check_levels(self, x: torch.Tensor) -> torch.Tensor:
        """The integer levels ``round(x (K - 1))`` of data on the grid ``{0, 1/(K-1), ..., 1}``."""
        k = self.num_levels
        assert k is not None
        levels = torch.round(x * (k - 1))
        if is_validation_enabled() and x.numel():
            if bool(torch.isnan(x).any()):
                raise ValueError("FlowModel got NaNs in the data; remove or impute them before training.")
            off = (x * (k - 1) - levels).abs().max()
            if float(x.min()) < 0 or float(x.max()) > 1 or float(off) > 1e-3:
                raise ValueError(
                    f"FlowModel(dequantize={k}) expects discrete data scaled to [0, 1] on the grid "
                    f"level / {k - 1} (e.g. 8-bit pixels / 255, as MNISTDataModule(binarize='none') "
                    f"serves them); got values in [{float(x.min()):.4g}, {float(x.max()):.4g}], up to "
                    f"{float(off):.3g} levels off the grid. Set dequantize to the data's number of "
                    "levels, or to None for continuous data."
                )
        return levels

    def dequantize(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        r"""Uniform dequantization of grid data: :math:`y = (\mathrm{round}(x (K-1)) + u) / K`, :math:`u \sim U[0, 1)^D`.

        ``x`` holds discrete data scaled to :math:`[0, 1]` (level :math:`/(K-1)`); ``y`` lies in
        :math:`[0, 1)`, in the bin of side :math:`1/K` of its level (see
        :func:`pyro_lvm.flows.dequantize`). The identity when ``dequantize`` is not set.
        """
        if self.num_levels is None:
            return x
        return _dequantize(self._check_levels(x), self.num_levels, generator=generator).to(x.dtype)

    # ----- the Pyro model/guide pair -------------------------------------------------
    def model(self, x: torch.Tensor, num_data: Optional[int] = None) -> torch.Tensor:
        r"""Observe the data in the data plate (scaled to ``num_data`` points if given).

        Continuous data: ``x ~ p(x)``. Discrete data (``dequantize=K``): ``y = dequantize(x)``
        with fresh noise, ``y ~ p(y)``, and a factor :math:`-D \log K`, so that the site
        log-densities add up to the dequantization lower bound
        :math:`\log p(y) - D \log K \le \log P(x)` (in expectation over :math:`u`).
        """
        self._check(x, batched=True)
        y = self.dequantize(x)
        if self.training and self._needs_init() and x.shape[0] >= 2 and bool((x.std(0) > 0).any()):
            self.initialize(x)
        pyro.module("flow", self.transform)
        with data_plate(x, num_data):
            obs = pyro.sample("x", self.distribution(), obs=y)
            if self.num_levels is not None:
                d = math.prod(self.event_shape)
                pyro.factor("dequantization", y.new_full(y.shape[:1], -d * math.log(self.num_levels)))
            return obs

    def guide(self, x: torch.Tensor, num_data: Optional[int] = None) -> None:
        """Nothing to infer: the model has no latent variable."""

    # ----- ActNorm data-dependent initialization -------------------------------------
    def _needs_init(self) -> bool:
        return any(
            isinstance(m, (ActNorm, DiagonalScaling)) and not bool(m.initialized) for m in self.transform.modules()
        )

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        r"""Initialize the ActNorm layers from a data batch, in the data-to-base direction.

        ``x`` (data, dequantized and taken to logit space as in :meth:`model`) is pushed
        through the inverse stack; each ActNorm, nested ones included, is set so that its
        *inverse* output (towards the base) has zero mean and unit variance per feature:
        :math:`\log s = \log\sigma`, :math:`b = \mu` of the values that reach it.
        """
        self._check(x)
        h = self.dequantize(x)
        if self.preprocessing is not None:
            h = self.preprocessing(h)
        initialize_actnorm(self.transform, h)

    # ----- conveniences ------------------------------------------------------------
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density of continuous ``x`` (already dequantized, if the data are discrete),
        shape ``(...)`` for ``x`` of shape ``(..., *event_shape)``."""
        self._check(x)
        return self.distribution().log_prob(x)

    def log_likelihood(self, x: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
        r"""Log-likelihood of data points, shape ``(...)``: exact, or a bound for discrete data.

        Continuous data: :meth:`log_prob`. Discrete data (``dequantize=K``): the
        importance-weighted dequantization bound with :math:`S` = ``num_samples`` noise draws,

        .. math::

            \log P(x) \ \ge\ \log \frac1S \sum_{s=1}^S p\big(y^{(s)}\big) - D \log K,
            \qquad y^{(s)} = \mathrm{dequantize}(x),

        which is the usual one-draw bound for :math:`S = 1` and tightens as :math:`S` grows.
        """
        if self.num_levels is None:
            return self.log_prob(x)
        self._check(x)
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1; got {num_samples}.")
        d = math.prod(self.event_shape)
        # draws in chunks of about 2^22 numbers, vectorized over a leading sample dim
        chunk = max(1, min(num_samples, (1 << 22) // max(1, x.numel())))
        parts = []
        for start in range(0, num_samples, chunk):
            s = min(chunk, num_samples - start)
            parts.append(self.log_prob(self.dequantize(x.expand((s,) + x.shape))))
        draws = torch.cat(parts)
        return torch.logsumexp(draws, 0) - math.log(num_samples) - d * math.log(self.num_levels)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """The base-space code :math:`u = f^{-1}(x)`, shape ``(..., *base_shape)``."""
        self._check(x)
        for t in reversed(self._all_transforms()):
            x = t.inv(x)
        return x

    def forward_map(self, u: torch.Tensor) -> torch.Tensor:
        """:math:`x = f(u)` for base codes of shape ``(..., *base_shape)``."""
        for t in self._all_transforms():
            u = t(u)
        return u

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """``num_samples`` draws of ``x`` (of the dequantized data, in [0, 1), if discrete), shape ``(num_samples, *event_shape)``."""
        training = self.training
        self.eval()  # an uninitialized ActNorm must not initialize itself on base draws
        try:
            return self.distribution().sample(torch.Size([num_samples]))
        finally:
            self.train(training)

    def bits_per_dim(self, x: torch.Tensor, num_levels: Optional[int] = None, num_samples: int = 1) -> torch.Tensor:
        r"""Negative log-likelihood in bits per dimension, per data point.

        * ``dequantize=K`` set: ``x`` is the discrete data (as :meth:`model` takes it) and this is
          :math:`-\mathrm{log\_likelihood}(x) / (D \log 2)`, the bits/dim of the :math:`K`-level data
          (an upper bound, in expectation over the noise).
        * continuous data: :math:`-\log p(x) / (D \log 2)`; with ``num_levels`` given, ``x`` is
          data already dequantized to :math:`[0, 1)` and :func:`pyro_lvm.flows.bits_per_dim`
          counts the :math:`1/K` rescaling.
        """
        d = math.prod(self.event_shape)
        if self.num_levels is not None:
            if num_levels not in (None, self.num_levels):
                raise ValueError(
                    f"This FlowModel dequantizes {self.num_levels} levels itself; got num_levels={num_levels}."
                )
            return -self.log_likelihood(x, num_samples) / (d * math.log(2.0))
        lp = self.log_prob(x)
        if num_levels is None:
            return -lp / (d * math.log(2.0))
        return _bits_per_dim(lp, d, num_levels)

    def evaluation_metrics(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What :class:`pyro_lvm.LVMModule` logs besides the ELBO: ``bits_per_dim`` (summed over the batch)."""
        return {"bits_per_dim": -terms["elbo"] / (math.prod(self.event_shape) * math.log(2.0))}

    def example_batch(self, batch_size: int = 2) -> torch.Tensor:
        """A valid batch of zeros of the data's shape (to check an estimator against the pair)."""
        return self.base_loc.new_zeros((batch_size,) + tuple(self.event_shape))

    def extra_repr(self) -> str:
        extra = "" if self.num_levels is None else f", dequantize={self.num_levels}"
        extra += "" if self.logit_alpha is None else f", logit_alpha={self.logit_alpha}"
        extra += "" if self.base_name == "normal" else f", base={self.base_name!r}"
        return f"event_shape={tuple(self.event_shape)}, base_shape={tuple(self.base_shape)}{extra}"


def _as_transform_module(transform: Any) -> nn.Module:
    """The flow as a transform that is an ``nn.Module`` (its parameters registered): built from a
    configuration dict, composed from a list, or wrapped if it is a plain torch ``Transform``."""
    if isinstance(transform, dict):
        transform = _build_transform(transform)
    elif isinstance(transform, str):
        if transform == CUSTOM:
            raise ValueError(
                "This FlowModel configuration comes from a model built on a transform of its own (transform: "
                "'custom'), which a configuration cannot rebuild. Build FlowModel(your_transform, ...) in code "
                "and load the checkpoint's state_dict into it."
            )
        raise ValueError(
            f"FlowModel takes the flow as a transform, not a name; got transform={transform!r}. Write e.g. "
            "FlowModel(pyro_lvm.flows.RealNVP(event_shape)) or FlowModel(pyro_lvm.flows.NICE(event_shape))."
        )
    elif isinstance(transform, (list, tuple)):
        for t in transform:
            if not isinstance(t, Transform):
                raise TypeError(
                    f"FlowModel's list of transforms must hold torch/Pyro Transforms; got {type(t).__name__}."
                )
        return ComposeTransformModule(list(transform))
    if not isinstance(transform, Transform):
        raise TypeError(
            f"FlowModel's transform must be a torch/Pyro Transform (e.g. pyro_lvm.flows.RealNVP(...)), a list of "
            f"them, or a stack's configuration dict; got {type(transform).__name__}."
        )
    return transform if isinstance(transform, nn.Module) else ComposeTransformModule([transform])


def _transform_config(transform: nn.Module) -> Union[dict, str]:
    """``{"class_path", "init_args"}`` for one of pyro_lvm's configurable stacks, else ``"custom"``."""
    return part_config(transform)


def _build_transform(spec: dict) -> Transform:
    """A transform from ``{"class_path": "pyro_lvm...", "init_args": {...}}``, importing from pyro_lvm only."""
    return build_part(spec, Transform, "transform", "pyro_lvm.flows.RealNVP")


# the stack options that FlowModel took before it took a transform, at their defaults then
_STACK_OPTIONS = {"num_layers": None, "hidden": None, "actnorm": False, "scale": "tanh", "num_scales": 1,
                  "conv1x1": False, "init": "shift", "mask": None, "cache_size": 1}
_STACKS = {"nice": "NICE", "realnvp": "RealNVP"}
_OLD_ORDER = ("event_shape", "transforms", "num_layers", "hidden", "actnorm", "scale", "num_scales", "conv1x1",
              "init", "dequantize", "logit_alpha", "base", "mask")


def _is_shape(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, (list, tuple, torch.Size)) and len(value) > 0 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)


def _old_spelling_message(args: tuple, kwargs: dict) -> Optional[str]:
    """What to write instead of the earlier ``FlowModel(event_shape, "realnvp", num_layers=...)``, or None."""
    first = args[0] if args else kwargs.get("transform")
    if _is_shape(first):  # the earlier order, FlowModel(event_shape, transforms, num_layers, ...)
        old = {**dict(zip(_OLD_ORDER, args)), **kwargs}
    elif any(k in _STACK_OPTIONS or k == "transforms" for k in kwargs) or (not args and "transform" not in kwargs):
        old = dict(kwargs)
    else:
        return None
    shape = old.get("event_shape")
    shape = list(shape) if isinstance(shape, (tuple, torch.Size)) else shape
    model_args = {k: old[k] for k in ("dequantize", "logit_alpha") if old.get(k) is not None}
    if isinstance(old.get("base"), str) and old["base"] != "normal":
        model_args["base"] = old["base"]
    python_tail = "".join(f", {k}={v!r}" for k, v in model_args.items())
    stack = old.get("transforms") if old.get("transforms") is not None else "realnvp"
    if not isinstance(stack, str):  # a list of transforms
        return (
            "FlowModel takes the flow as its first argument, transform, and no longer takes the stack's options. "
            f"Write FlowModel(transform=your_transforms, event_shape={shape!r}{python_tail})."
        )
    if stack not in _STACKS:
        return (
            f"FlowModel takes the flow as a transform, not a name (got {stack!r}): pyro_lvm.flows.RealNVP(...), "
            "pyro_lvm.flows.NICE(...), or any torch/Pyro Transform, e.g. FlowModel(pyro_lvm.flows.RealNVP(event_shape))."
        )
    options = {k: v for k, v in old.items() if k in _STACK_OPTIONS and v != _STACK_OPTIONS[k]}
    if stack == "nice":  # NICE took none of RealNVP's options (they were at their defaults)
        options = {k: v for k, v in options.items() if k in ("num_layers", "hidden", "mask", "init", "cache_size")}
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
    name = _STACKS[stack]
    python = (f"FlowModel(pyro_lvm.flows.{name}({'D' if shape is None else repr(shape)}"
              + "".join(f", {k}={v!r}" for k, v in options.items()) + f"){python_tail})")
    yaml = (f"transform: {{class_path: pyro_lvm.flows.{name}, init_args: {{event_shape: "
            f"{'D' if shape is None else json.dumps(shape)}"
            + "".join(f", {k}: {json.dumps(v)}" for k, v in options.items()) + "}}"
            + "".join(f", {k}: {json.dumps(v)}" for k, v in model_args.items()))
    knobs = [k for k in old if k in _STACK_OPTIONS]
    return (
        "FlowModel takes the flow as a transform now"
        + (f"; the stack's options ({', '.join(knobs)}) are the stack's arguments" if knobs else "")
        + f". Write {python}; in a YAML config, {yaml}."
    )
