"""A normalizing-flow density model as a Pyro model with no latent variable."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from ..flows import stacks
from ..flows.layers import ActNorm
from ..flows.preprocessing import bits_per_dim as _bits_per_dim
from .base import LatentVariableModel

__all__ = ["FlowModel"]

_STACKS = {"nice": stacks.nice, "realnvp": stacks.realnvp}


class FlowModel(PyroModule):
    r"""A density model :math:`x = f(u)`, :math:`u \sim \mathcal N(0, I)`, with :math:`f` a stack of flow layers.

    By the change of variables, with :math:`f = f_K \circ \dots \circ f_1` (the list
    ``transforms`` in the generative direction) and :math:`u = f^{-1}(x)`,

    .. math::

        \log p(x) = \log \mathcal N(u; 0, I) - \sum_{k=1}^K \log\lvert\det J_{f_k}\rvert ,

    exact. The model observes ``x`` from this distribution inside the data plate and
    has no latent site (its ``guide`` does nothing), so it trains by maximum likelihood
    through :class:`pyro_lvm.LVMModule` / :func:`pyro_lvm.fit`, where ``val/elbo`` is
    exactly the held-out log-likelihood per data point.

    If the stack has :class:`~pyro_lvm.flows.ActNorm` layers, they are initialized from
    data by :meth:`initialize`, which :meth:`model` calls on the first batch seen in
    training mode (a batch with some spread: the all-zeros :meth:`example_batch` is skipped).

    References:
        Dinh, Krueger and Bengio, NICE, 2014, https://arxiv.org/abs/1410.8516 ;
        Dinh, Sohl-Dickstein and Bengio, Density estimation using Real NVP, 2016,
        https://arxiv.org/abs/1605.08803

    Arguments:
        event_shape: shape of one data point (an int for flat vectors).
        transforms: ``"realnvp"`` (default when ``None``), ``"nice"`` (vectors only), or a
            sequence of transform modules in the generative direction (base to data).
        stack_options: keyword arguments of :func:`pyro_lvm.flows.stacks.nice` /
            :func:`pyro_lvm.flows.stacks.realnvp` (``num_layers``, ``hidden``, ``actnorm``, ...).

    Example:
        >>> flow = FlowModel(2, "realnvp", hidden=(8,))
        >>> x = torch.randn(5, 2)
        >>> flow.log_prob(x).shape
        torch.Size([5])
        >>> torch.allclose(flow.distribution().log_prob(x), flow.log_prob(x))
        True
    """

    def __init__(
        self,
        event_shape: Union[int, Sequence[int]],
        transforms: Union[None, str, Sequence[nn.Module]] = None,
        **stack_options: Any,
    ) -> None:
        super().__init__()
        self.event_shape = torch.Size(
            (int(event_shape),) if isinstance(event_shape, int) else tuple(int(s) for s in event_shape)
        )
        if len(self.event_shape) == 0 or any(s < 1 for s in self.event_shape):
            raise ValueError(f"event_shape must be a non-empty shape of positive sizes; got {event_shape!r}.")
        name = "realnvp" if transforms is None else transforms
        if isinstance(name, str):
            if name not in _STACKS:
                raise ValueError(f"Unknown flow {name!r}; choose one of {tuple(_STACKS)} or pass a list of transforms.")
            if name == "nice":
                if len(self.event_shape) != 1:
                    raise ValueError(
                        f"'nice' is for flat vectors; got event_shape {tuple(self.event_shape)}. "
                        "Flatten the data or use 'realnvp'."
                    )
                layers = _STACKS[name](self.event_shape[0], **stack_options)
            else:
                layers = _STACKS[name](tuple(self.event_shape), **stack_options)
        else:
            if stack_options:
                raise ValueError("stack options apply to a named stack ('nice', 'realnvp'), not to a list of transforms.")
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
            **stack_options,
        )
        self.transforms = nn.ModuleList(layers)
        base_shape = self.event_shape
        for t in reversed(self.transforms):
            base_shape = t.inverse_shape(base_shape)
        self.base_shape = torch.Size(base_shape)
        self.register_buffer("base_loc", torch.zeros(self.base_shape))
        self.register_buffer("base_scale", torch.ones(self.base_shape))

    # ----- the distribution -------------------------------------------------------
    def base(self) -> dist.TorchDistribution:
        """The base distribution N(0, I) over ``base_shape``."""
        return dist.Normal(self.base_loc, self.base_scale).to_event(len(self.base_shape))

    def distribution(self) -> dist.TransformedDistribution:
        """p(x) as a :class:`pyro.distributions.TransformedDistribution`."""
        return dist.TransformedDistribution(self.base(), list(self.transforms))

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

    # ----- the Pyro model/guide pair -------------------------------------------------
    def model(self, x: torch.Tensor, num_data: Optional[int] = None) -> torch.Tensor:
        """Observe ``x ~ p(x)`` in the data plate (scaled to ``num_data`` points if given)."""
        self._check(x, batched=True)
        if self.training and self._needs_init() and x.shape[0] >= 2 and bool((x.std(0) > 0).any()):
            self.initialize(x)
        pyro.module("flow", self.transforms)
        with LatentVariableModel._plate(self, x, num_data):
            return pyro.sample("x", self.distribution(), obs=x)

    def guide(self, x: torch.Tensor, num_data: Optional[int] = None) -> None:
        """Nothing to infer: the model has no latent variable."""

    # ----- ActNorm data-dependent initialization -------------------------------------
    def _actnorms(self) -> list[ActNorm]:
        return [t for t in self.transforms if isinstance(t, ActNorm)]

    def _needs_init(self) -> bool:
        return any(not bool(t.initialized) for t in self._actnorms())

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        r"""Initialize the ActNorm layers from a data batch, in the data-to-base direction.

        ``x`` is pushed through the inverse stack; each ActNorm is set so that its
        *inverse* output (towards the base) has zero mean and unit variance per feature:
        :math:`\log s = \log\sigma`, :math:`b = \mu` of the values that reach it.
        """
        self._check(x)
        h = x
        for t in reversed(self.transforms):
            if isinstance(t, ActNorm):
                t.initialize(h)  # sets log s = -log sigma, b = -mu / sigma (forward normalizes h)
                log_s = t.log_scale.detach().clone()
                t.log_scale.data.copy_(-log_s)  # log sigma
                t.bias.data.mul_(-torch.exp(-log_s))  # mu
            h = t.inv(h)

    # ----- conveniences ------------------------------------------------------------
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density of ``x`` of shape ``(..., *event_shape)``, shape ``(...)``."""
        self._check(x)
        return self.distribution().log_prob(x)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """The base-space code :math:`u = f^{-1}(x)`, shape ``(..., *base_shape)``."""
        self._check(x)
        for t in reversed(self.transforms):
            x = t.inv(x)
        return x

    def forward_map(self, u: torch.Tensor) -> torch.Tensor:
        """:math:`x = f(u)` for base codes of shape ``(..., *base_shape)``."""
        for t in self.transforms:
            u = t(u)
        return u

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """``num_samples`` draws of ``x``, shape ``(num_samples, *event_shape)``."""
        training = self.training
        self.eval()  # an uninitialized ActNorm must not initialize itself on base draws
        try:
            return self.distribution().sample(torch.Size([num_samples]))
        finally:
            self.train(training)

    def bits_per_dim(self, x: torch.Tensor, num_levels: Optional[int] = None) -> torch.Tensor:
        r"""Negative log-likelihood in bits per dimension, per data point.

        Continuous data: :math:`-\log p(x) / (D \log 2)`. Data dequantized from
        ``num_levels`` levels and scaled to :math:`[0, 1)` (:func:`pyro_lvm.flows.dequantize`):
        :func:`pyro_lvm.flows.bits_per_dim`, which counts the :math:`1/K` rescaling.
        """
        lp = self.log_prob(x)
        d = math.prod(self.event_shape)
        if num_levels is None:
            return -lp / (d * math.log(2.0))
        return _bits_per_dim(lp, d, num_levels)

    def example_batch(self, batch_size: int = 2) -> torch.Tensor:
        """A valid batch of zeros of the data's shape (to check an estimator against the pair)."""
        return self.base_loc.new_zeros((batch_size,) + tuple(self.event_shape))

    def extra_repr(self) -> str:
        return f"event_shape={tuple(self.event_shape)}, base_shape={tuple(self.base_shape)}"
