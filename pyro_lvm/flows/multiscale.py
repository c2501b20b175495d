"""Factoring out: apply a flow to part of the features and the identity to the rest (RealNVP's multi-scale)."""

from __future__ import annotations

from typing import Sequence

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import nn
from torch.distributions import Transform, constraints
from torch.distributions.utils import _sum_rightmost

from ._cache import ParameterAwareCache

__all__ = ["FactorOut"]


class FactorOut(ParameterAwareCache, TransformModule):
    r"""Pass the first ``split`` features through unchanged and transform the rest by an inner flow.

    With the features (channels of images, entries of vectors) split as :math:`u = (u_1, u_2)`,
    :math:`u_1` the first ``split`` of them, and :math:`g = g_K \circ \dots \circ g_1` the
    ``inner`` transforms in the generative direction (base to data),

    .. math::

        f(u_1, u_2) = \big(u_1,\; g(u_2)\big), \qquad
        f^{-1}(x_1, x_2) = \big(x_1,\; g^{-1}(x_2)\big), \qquad
        \log\lvert\det J_f\rvert = \sum_{k=1}^K \log\lvert\det J_{g_k}\rvert ,

    the Jacobian being block diagonal with an identity block. In the density-estimation
    direction this is RealNVP's multi-scale step: :math:`x_1` is "factored out" (it goes
    to the base as it is) and only :math:`x_2` goes on to the next scale. The inner flow may
    change shape on the way (a :class:`~pyro_lvm.flows.Squeeze` and its inverse) but must
    map its part back to the same shape, so that ``FactorOut`` is shape-preserving; a
    ``FactorOut`` may be nested in the inner flow of another one (one per scale).

    The inner modules are registered (an :class:`torch.nn.ModuleList` ``inner``), so their
    parameters train with the outer flow.

    References:
        Dinh, Sohl-Dickstein and Bengio, Density estimation using Real NVP, 2016, Sec. 3.6,
        https://arxiv.org/abs/1605.08803

    Arguments:
        inner: the transforms applied to the remaining features, in the generative direction.
        split: the number of leading features (along ``dim``) left unchanged, at least 1.
        dim: the feature dim, ``-3`` (channels of images ``(..., C, H, W)``, default) or
            ``-1`` (flat vectors ``(..., D)``); the event dim is ``-dim``.
        cache_size: 0 or 1, as in :class:`torch.distributions.Transform`.

    Example:
        >>> from pyro_lvm.flows import AffineCoupling
        >>> coupling = AffineCoupling((2, 4, 4), hidden=(8,), mask="channel")
        >>> _ = nn.init.normal_(coupling.net[-1].weight, std=0.1)
        >>> t = FactorOut([coupling], split=1)
        >>> x = torch.randn(5, 3, 4, 4)
        >>> y = t(x)
        >>> torch.equal(y[:, :1], x[:, :1]), torch.allclose(t.inv(y), x, atol=1e-5)
        (True, True)
        >>> t.log_abs_det_jacobian(x, y).shape
        torch.Size([5])
    """

    bijective = True
    sign = +1

    def __init__(
        self, inner: Sequence[Transform], split: int, dim: int = -3, cache_size: int = 1
    ) -> None:
        super().__init__(cache_size=cache_size)
        if dim not in (-1, -3):
            raise ValueError(
                f"FactorOut splits along dim=-3 (channels of images (..., C, H, W)) or dim=-1 "
                f"(flat vectors (..., D)); got dim={dim!r}."
            )
        if not isinstance(split, int) or split < 1:
            raise ValueError(f"FactorOut needs split >= 1 features left unchanged; got split={split!r}.")
        inner = list(inner)
        for t in inner:
            if not isinstance(t, Transform):
                raise TypeError(
                    f"FactorOut's inner flow must be torch/pyro Transforms; got {type(t).__name__}."
                )
        self.dim = dim
        self.split = split
        # the flow in order, and its modules registered so that their parameters train
        self._layers: tuple[Transform, ...] = tuple(inner)
        self.inner = nn.ModuleList([t for t in inner if isinstance(t, nn.Module)])
        self._cached_ld: tuple | None = None

    @property
    def event_dim(self) -> int:
        return -self.dim

    @constraints.dependent_property(is_discrete=False)
    def domain(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, -self.dim)

    @constraints.dependent_property(is_discrete=False)
    def codomain(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, -self.dim)

    @property
    def layers(self) -> tuple[Transform, ...]:
        """The inner transforms, in the generative direction."""
        return self._layers

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split ``x`` into the factored-out part (first ``split`` features) and the transformed part."""
        if x.dim() < -self.dim or x.size(self.dim) <= self.split:
            raise ValueError(
                f"FactorOut(split={self.split}, dim={self.dim}) needs inputs with more than {self.split} "
                f"features at dim {self.dim}; got shape {tuple(x.shape)}. Lower split or check the shapes."
            )
        n = x.size(self.dim)
        return x.narrow(self.dim, 0, self.split), x.narrow(self.dim, self.split, n - self.split)

    def _batch_dims(self, x: torch.Tensor) -> int:
        return x.dim() + self.dim

    def _check_same_shape(self, before: torch.Tensor, after: torch.Tensor) -> None:
        if after.shape != before.shape:
            raise ValueError(
                f"FactorOut's inner flow must map its part back to the same shape (add the inverse "
                f"of any Squeeze); it maps {tuple(before.shape)} to {tuple(after.shape)}."
            )

    def _run(self, h: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        batch_dims = self._batch_dims(h)
        start = h
        ld = h.new_zeros(h.shape[:batch_dims])
        for t in reversed(self._layers) if inverse else self._layers:
            out = t.inv(h) if inverse else t(h)
            x, y = (out, h) if inverse else (h, out)
            term = t.log_abs_det_jacobian(x, y)
            ld = ld + _sum_rightmost(term, term.dim() - batch_dims)
            h = out
        self._check_same_shape(start, h)
        return h, ld

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        kept, rest = self.parts(x)
        rest, ld = self._run(rest, inverse=False)
        y = torch.cat([kept, rest], dim=self.dim)
        self._cached_ld = (x, y, ld)
        return y

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        kept, rest = self.parts(y)
        rest, ld = self._run(rest, inverse=True)
        x = torch.cat([kept, rest], dim=self.dim)
        self._cached_ld = (x, y, ld)
        return x

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cached = self._cached_ld
        if cached is not None and cached[0] is x and cached[1] is y:
            return cached[2]
        _, ld = self._run(self.parts(x)[1], inverse=False)
        return ld

    def clear_cache(self) -> None:
        """Forget the cached pair and log-determinant (after changing the inner parameters in place)."""
        self._cached_x_y = None, None
        self._cached_ld = None

    def extra_repr(self) -> str:
        return f"split={self.split}, dim={self.dim}"
