"""A normalizing-flow density model as a Pyro model with no latent variable."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from pyro.nn import PyroModule
from torch import nn

from ..flows import stacks
from ..flows.stacks import initialize_actnorm
from ..flows.layers import ActNorm, DiagonalScaling
from ..flows.preprocessing import Logit
from ..flows.preprocessing import bits_per_dim as _bits_per_dim
from ..flows.preprocessing import dequantize as _dequantize
from .base import LatentVariableModel

__all__ = ["FlowModel"]

_STACKS = {"nice": stacks.nice, "realnvp": stacks.realnvp}
_BASES = {"normal": dist.Normal, "logistic": dist.Logistic}


class FlowModel(PyroModule):
    r"""A density model :math:`x = f(u)`, :math:`u \sim p_U` (by default :math:`\mathcal N(0, I)`), with :math:`f` a stack of flow layers.

    By the change of variables, with :math:`f = f_K \circ \dots \circ f_1` (the list
    ``transforms`` in the generative direction) and :math:`u = f^{-1}(x)`,

    .. math::

        \log p(x) = \log p_U(u) - \sum_{k=1}^K \log\lvert\det J_{f_k}\rvert ,

    exact. The base :math:`p_U` is the standard normal, or with ``base="logistic"`` the
    standard logistic of NICE, :math:`\log p_U(u) = -\sum_i \big(\operatorname{softplus}(u_i)
    + \operatorname{softplus}(-u_i)\big)`, whose tails fall linearly in :math:`\lvert u\rvert`
    instead of quadratically: a point far out in base space (e.g. a pixel that was constant in
    the batch that initialized a :class:`~pyro_lvm.flows.DiagonalScaling`) costs nats in
    proportion to its distance, not to its square.

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
    With ``logit_alpha`` (RealNVP's pre-processing, :class:`~pyro_lvm.flows.Logit`) the stack
    models :math:`\operatorname{logit}(\alpha + (1 - 2\alpha) y)`; the log-determinant of
    this map is counted, so likelihoods stay those of :math:`y`. (With :math:`\alpha > 0` the
    mass the flow puts beyond :math:`\operatorname{logit}(\alpha)` is lost: the reported
    likelihood is then a slight under-estimate, never an over-estimate.)

    If the stack has :class:`~pyro_lvm.flows.ActNorm` layers (at any depth of a multi-scale
    stack) or NICE's :class:`~pyro_lvm.flows.DiagonalScaling`, they are initialized from data by :meth:`initialize`, which :meth:`model` calls
    on the first batch seen in training mode (a batch with some spread: the all-zeros
    :meth:`example_batch` is skipped).

    References:
        Dinh, Krueger and Bengio, NICE, 2014, https://arxiv.org/abs/1410.8516 ;
        Dinh, Sohl-Dickstein and Bengio, Density estimation using Real NVP, 2016,
        https://arxiv.org/abs/1605.08803 ;
        Theis, van den Oord and Bethge, A note on the evaluation of generative models, 2016,
        https://arxiv.org/abs/1511.01844

    Arguments:
        event_shape: shape of one data point: an int for flat vectors, ``(C, H, W)`` for images.
        transforms: ``"realnvp"`` (default when ``None``), ``"nice"``, or a sequence of
            transform modules in the generative direction (base to data).
        num_layers: couplings (see :func:`pyro_lvm.flows.realnvp` / :func:`pyro_lvm.flows.nice`).
        hidden: hidden widths of each coupling's net.
        actnorm: RealNVP only: an ActNorm before each coupling.
        scale: RealNVP only: ``"tanh"`` or ``"sigmoid"`` log-scales.
        num_scales: RealNVP on images only: the number of scales of the multi-scale
            architecture (half the channels factored out at each scale but the last).
        conv1x1: RealNVP only: an invertible 1x1 convolution before each coupling.
        init: how the couplings start: ``"shift"`` (a random shift with log-determinant 0,
            which learns faster) or ``"identity"`` (see :func:`pyro_lvm.flows.realnvp`).
        dequantize: the number of levels :math:`K` of discrete data, or ``None`` for
            continuous data.
        logit_alpha: the logit pre-processing's :math:`\alpha` (1e-6 for MNIST, 0.05 for
            CIFAR-10 in the RealNVP paper), or ``None`` for none. Needs data in :math:`[0, 1]`.
        base: the base distribution, ``"normal"`` (default) or ``"logistic"`` (NICE's on
            MNIST; it trains NICE on data in :math:`[0, 1]` without a logit, where the
            normal base diverges).
        mask: the couplings' mask on flat vectors, ``"half"`` (default: first half against
            second) or ``"alternate"`` (even-indexed entries against odd ones, NICE's split
            on MNIST); for images NICE takes ``"checkerboard"`` (default) or ``"channel"``.
            See :func:`~pyro_lvm.flows.coupling_mask`.
        stack_options: further keyword arguments of the named stack (from Python).

    Example:
        >>> flow = FlowModel(2, "realnvp", hidden=(8,))
        >>> x = torch.randn(5, 2)
        >>> flow.log_prob(x).shape
        torch.Size([5])
        >>> torch.allclose(flow.distribution().log_prob(x), flow.log_prob(x))
        True
        >>> FlowModel(4, "nice", hidden=(8,), base="logistic").base()
        Independent(Logistic(loc: torch.Size([4]), scale: torch.Size([4])), 1)
    """

    def __init__(
        self,
        event_shape: Union[int, Sequence[int]],
        transforms: Union[None, str, Sequence[nn.Module]] = None,
        num_layers: Optional[int] = None,
        hidden: Optional[Sequence[int]] = None,
        actnorm: bool = False,
        scale: str = "tanh",
        num_scales: int = 1,
        conv1x1: bool = False,
        init: str = "shift",
        dequantize: Optional[int] = None,
        logit_alpha: Optional[float] = None,
        base: str = "normal",
        mask: Optional[str] = None,
        **stack_options: Any,
    ) -> None:
        super().__init__()
        self.event_shape = torch.Size(
            (int(event_shape),) if isinstance(event_shape, int) else tuple(int(s) for s in event_shape)
        )
        if len(self.event_shape) == 0 or any(s < 1 for s in self.event_shape):
            raise ValueError(f"event_shape must be a non-empty shape of positive sizes; got {event_shape!r}.")
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
        if base not in _BASES:
            raise ValueError(f"Unknown base {base!r}; choose one of {tuple(_BASES)}.")
        self.base_name = base
        self.num_levels = None if dequantize is None else int(dequantize)
        self.logit_alpha = None if logit_alpha is None else float(logit_alpha)
        name = "realnvp" if transforms is None else transforms
        options = {"num_layers": num_layers, "hidden": None if hidden is None else list(hidden), "init": init}
        if isinstance(name, str):
            if name not in _STACKS:
                raise ValueError(f"Unknown flow {name!r}; choose one of {tuple(_STACKS)} or pass a list of transforms.")
            if name == "nice":
                if actnorm or scale != "tanh" or num_scales != 1 or conv1x1:
                    raise ValueError(
                        "actnorm, scale, num_scales and conv1x1 are options of 'realnvp'; NICE's additive "
                        "couplings have no scale (leave them at their defaults, or use 'realnvp')."
                    )
            else:
                options.update(actnorm=actnorm, scale=scale)
                if num_scales != 1:
                    options["num_scales"] = num_scales
                if conv1x1:
                    options["conv1x1"] = True
            if mask is not None:
                options["mask"] = mask
            options.update(stack_options)
            kwargs = {k: v for k, v in options.items() if v is not None}
            shape_arg = self.event_shape[0] if len(self.event_shape) == 1 else tuple(self.event_shape)
            layers = list(_STACKS[name](shape_arg, **kwargs))
        else:
            if (stack_options or num_layers is not None or hidden is not None or actnorm or scale != "tanh"
                    or num_scales != 1 or conv1x1 or init != "shift" or mask is not None):
                raise ValueError(
                    "num_layers, hidden, actnorm, scale, num_scales, init, mask and other stack options apply to a "
                    "named stack ('nice', 'realnvp'), not to a list of transforms."
                )
            layers = list(transforms)
            for t in layers:
                if not isinstance(t, nn.Module):
                    raise TypeError(
                        f"transforms must be nn.Modules (e.g. pyro TransformModules) so that their "
                        f"parameters are trained; got {type(t).__name__}."
                    )
        self.config = dict(
            event_shape=list(self.event_shape),
            transforms=name if isinstance(name, str) else "custom",
            num_layers=num_layers,
            hidden=options["hidden"],
            actnorm=actnorm,
            scale=scale,
            num_scales=num_scales,
            conv1x1=conv1x1,
            init=init,
            dequantize=self.num_levels,
            logit_alpha=self.logit_alpha,
            base=base,
            **({} if mask is None else {"mask": mask}),
            **stack_options,
        )
        self.transforms = nn.ModuleList(layers)
        self.preprocessing = (
            None if self.logit_alpha is None else Logit(self.logit_alpha, event_dim=len(self.event_shape))
        )
        base_shape = self.event_shape
        for t in reversed(self.transforms):
            base_shape = t.inverse_shape(base_shape)
        self.base_shape = torch.Size(base_shape)
        self.register_buffer("base_loc", torch.zeros(self.base_shape))
        self.register_buffer("base_scale", torch.ones(self.base_shape))

    # ----- the distribution -------------------------------------------------------
    def base(self) -> dist.TorchDistribution:
        """The base distribution over ``base_shape``: standard normal or standard logistic (``base``)."""
        return _BASES[self.base_name](self.base_loc, self.base_scale).to_event(len(self.base_shape))

    def _all_transforms(self) -> list:
        layers = list(self.transforms)
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
        pyro.module("flow", self.transforms)
        with LatentVariableModel._plate(self, x, num_data):
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
            isinstance(m, (ActNorm, DiagonalScaling)) and not bool(m.initialized) for m in self.transforms.modules()
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
        initialize_actnorm(list(self.transforms), h)

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
