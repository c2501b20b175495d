"""Ready-made stacks of flow layers: NICE and (single-scale) RealNVP."""

from __future__ import annotations

from typing import Sequence

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import nn
from torch.distributions import constraints

from .coupling import AdditiveCoupling, AffineCoupling, _event_shape
from .layers import ActNorm, DiagonalScaling, Squeeze

__all__ = ["nice", "realnvp"]


def nice(
    dim: int,
    num_layers: int = 4,
    hidden: Sequence[int] = (1000,) * 5,
    cache_size: int = 1,
) -> nn.ModuleList:
    r"""The NICE flow on flat vectors: additive couplings of alternating parity, then a diagonal scaling.

    In the generative direction (base :math:`u` to data :math:`x`), with
    :math:`g_k` the additive couplings (:class:`~pyro_lvm.flows.AdditiveCoupling`,
    ``"half"`` mask, parity :math:`k \bmod 2`) and :math:`S` the diagonal scaling
    (:class:`~pyro_lvm.flows.DiagonalScaling`),

    .. math::

        x = S \circ g_K \circ \dots \circ g_1 (u), \qquad
        \log\lvert\det J\rvert = \sum_i s_i ,

    since the couplings are volume preserving: all the change of volume is in the
    scaling. The defaults (4 couplings, 5 hidden layers of 1000 units) are the paper's
    MNIST architecture; use smaller ``hidden`` for small problems.

    References:
        Dinh, Krueger and Bengio, NICE: Non-linear Independent Components Estimation,
        2014, https://arxiv.org/abs/1410.8516

    Arguments:
        dim: size :math:`D \ge 2` of the vectors.
        num_layers: number of additive coupling layers (at least 2, so every entry moves).
        hidden: hidden widths of each coupling's MLP.
        cache_size: 0 or 1, the layers' cache size.

    Example:
        >>> import torch
        >>> layers = nice(4, hidden=(8,))
        >>> [type(t).__name__ for t in layers]
        ['AdditiveCoupling', 'AdditiveCoupling', 'AdditiveCoupling', 'AdditiveCoupling', 'DiagonalScaling']
        >>> x = torch.randn(3, 4)
        >>> y = x
        >>> for t in layers:
        ...     y = t(y)
        >>> for t in reversed(layers):
        ...     y = t.inv(y)
        >>> torch.allclose(y, x, atol=1e-5)
        True
    """
    if not isinstance(dim, int) or dim < 2:
        raise ValueError(f"nice() needs flat vectors of size dim >= 2 (an int); got dim={dim!r}.")
    if num_layers < 2:
        raise ValueError(
            f"nice() needs num_layers >= 2 so that both halves are transformed; got {num_layers}."
        )
    layers: list[nn.Module] = [
        AdditiveCoupling(dim, hidden=tuple(hidden), mask="half", parity=k % 2, cache_size=cache_size)
        for k in range(num_layers)
    ]
    layers.append(DiagonalScaling(dim, cache_size=cache_size))
    return nn.ModuleList(layers)


def realnvp(
    event_shape: int | Sequence[int],
    num_layers: int | None = None,
    hidden: Sequence[int] | None = None,
    actnorm: bool = False,
    scale: str = "tanh",
    cache_size: int = 1,
) -> nn.ModuleList:
    r"""A RealNVP flow: affine couplings of alternating parity (single scale for images).

    The list is in the generative direction (base :math:`u` to data :math:`x`), ready for
    ``pyro.distributions.TransformedDistribution(base, list(layers))``.

    * Flat vectors ``D``: ``num_layers`` (default 4) :class:`~pyro_lvm.flows.AffineCoupling` s
      with the ``"half"`` mask and alternating parity, each preceded (``actnorm=True``) by an
      :class:`~pyro_lvm.flows.ActNorm`.
    * Images ``(C, H, W)`` (even ``H`` and ``W``): RealNVP's single scale. In the
      density-estimation direction (data to base) the data go through ``num_layers``
      (default 3) checkerboard couplings of alternating parity on ``(C, H, W)``, a
      :class:`~pyro_lvm.flows.Squeeze` to ``(4C, H/2, W/2)``, then ``num_layers`` channel
      couplings of alternating parity; the generative list is the reverse (channel
      couplings, the squeeze's inverse, checkerboard couplings), so the base has shape
      ``(4C, H/2, W/2)`` (:class:`pyro_lvm.models.FlowModel` works it out from the layers'
      ``inverse_shape``). With ``actnorm=True`` an :class:`~pyro_lvm.flows.ActNorm` over the
      channels precedes each coupling.

    .. math::

        \log p(x) = \log p_U(f^{-1}(x)) - \sum_k \log\lvert\det J_{f_k}\rvert ,
        \qquad \log\lvert\det J_{\text{coupling}}\rvert = \sum_i s_i .

    Future work: the multi-scale architecture (factoring out half of the dims at each
    scale and repeating the block on the rest) is not implemented; this is one scale.

    References:
        Dinh, Sohl-Dickstein and Bengio, Density estimation using Real NVP, 2016,
        https://arxiv.org/abs/1605.08803

    Arguments:
        event_shape: ``D`` for flat vectors or ``(C, H, W)`` for images.
        num_layers: couplings (vectors, default 4) or couplings per stage (images, default 3).
        hidden: hidden widths of each coupling's net (see :class:`~pyro_lvm.flows.AffineCoupling`).
        actnorm: put an ActNorm before each coupling (initialize it from data, see
            :meth:`pyro_lvm.models.FlowModel.initialize`).
        scale: ``"tanh"`` or ``"sigmoid"``, the couplings' log-scale.
        cache_size: 0 or 1, the layers' cache size.

    Example:
        >>> import torch
        >>> layers = realnvp((1, 4, 4), num_layers=2, hidden=(4,))
        >>> [type(t).__name__ for t in layers]
        ['AffineCoupling', 'AffineCoupling', '_DepthToSpace', 'AffineCoupling', 'AffineCoupling']
        >>> x = torch.randn(3, 1, 4, 4)
        >>> u = x
        >>> for t in reversed(layers):
        ...     u = t.inv(u)
        >>> u.shape
        torch.Size([3, 4, 2, 2])
        >>> y = u
        >>> for t in layers:
        ...     y = t(y)
        >>> torch.allclose(y, x, atol=1e-5)
        True
    """
    shape = _event_shape(event_shape)
    if num_layers is None:
        num_layers = 4 if len(shape) == 1 else 3
    if num_layers < 2:
        raise ValueError(
            f"realnvp() needs num_layers >= 2 so that both parts are transformed; got {num_layers}."
        )
    hidden = None if hidden is None else tuple(hidden)

    def block(ev: tuple[int, ...], mask: str) -> list[nn.Module]:
        out: list[nn.Module] = []
        for k in range(num_layers):
            if actnorm:
                out.append(ActNorm(ev[0], dim=-len(ev), cache_size=cache_size))
            out.append(
                AffineCoupling(ev, hidden=hidden, mask=mask, parity=k % 2, scale=scale,
                               cache_size=cache_size)
            )
        return out

    if len(shape) == 1:
        return nn.ModuleList(block(shape, "half"))
    c, h, w = shape
    if h % 2 or w % 2:
        raise ValueError(
            f"realnvp() on images squeezes 2x2 blocks and needs even H and W; got event shape "
            f"{shape}. Pad or crop the images."
        )
    # generative order: the reverse of data -> checkerboard -> squeeze -> channel -> base
    channel = block((4 * c, h // 2, w // 2), "channel")
    checker = block(shape, "checkerboard")
    return nn.ModuleList(list(reversed(channel)) + [_DepthToSpace()] + list(reversed(checker)))


class _DepthToSpace(TransformModule):
    """Depth-to-space :math:`(4C, H, W) \\to (C, 2H, 2W)`, the inverse of :class:`Squeeze`, as a module."""

    bijective = True
    sign = +1
    domain = constraints.independent(constraints.real, 3)
    codomain = constraints.independent(constraints.real, 3)

    def __init__(self) -> None:
        super().__init__(cache_size=0)
        self._squeeze = Squeeze()

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        return self._squeeze.inverse_shape(shape)

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        return self._squeeze.forward_shape(shape)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self._squeeze._inverse(x)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self._squeeze._call(y)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[:-3])
