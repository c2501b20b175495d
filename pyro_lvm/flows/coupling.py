"""Coupling layers (NICE additive, RealNVP affine) as Pyro ``TransformModule`` s."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch import nn
from torch.distributions import Transform

from ._cache import ParameterAwareCache

__all__ = [
    "as_event_shape",
    "coupling_mask",
    "AdditiveCoupling",
    "AffineCoupling",
    "ConditionalAffineCoupling",
]

_MASK_KINDS = ("half", "alternate", "checkerboard", "channel")
_VECTOR_MASKS = ("half", "alternate")
_SCALES = ("tanh", "sigmoid")
_INITS = ("identity", "shift")


def as_event_shape(event_shape: int | Sequence[int]) -> tuple[int, ...]:
    """A flow's event shape as a tuple, checked: ``D`` (flat vectors) or ``(C, H, W)`` (images).

    Example:
        >>> as_event_shape(4), as_event_shape([1, 8, 8])
        ((4,), (1, 8, 8))
    """
    shape = (int(event_shape),) if isinstance(event_shape, int) else tuple(int(s) for s in event_shape)
    if len(shape) not in (1, 3) or any(s < 1 for s in shape):
        raise ValueError(
            f"event_shape must be an int D >= 1 (flat vectors) or a triple (C, H, W) of "
            f"positive sizes (images); got {event_shape!r}."
        )
    return shape


def coupling_mask(kind: str, shape: int | Sequence[int], parity: int = 0) -> torch.Tensor:
    """Boolean coupling mask: ``True`` marks the part a coupling layer keeps unchanged.

    * ``"half"`` (flat vectors ``(D,)``): the first ``D // 2`` entries for ``parity=0``,
      the remaining ``D - D // 2`` for ``parity=1`` (needs ``D >= 2``).
    * ``"alternate"`` (flat vectors ``(D,)``): the entries of even index ``0, 2, 4, ...``
      for ``parity=0``, the odd ones for ``parity=1`` (needs ``D >= 2``). On a flattened
      image it couples neighbouring pixels of a row, the split that NICE uses on MNIST
      (its "odd and even components").
    * ``"checkerboard"`` (images ``(C, H, W)``): ``(i + j) % 2 == parity`` at pixel
      ``(i, j)``, the same for every channel (needs ``H * W >= 2``).
    * ``"channel"`` (images ``(C, H, W)``): the first ``C // 2`` channels for
      ``parity=0``, the others for ``parity=1`` (needs ``C >= 2``).

    The masks of the two parities are complements, so alternating parities let every
    entry be transformed.

    Arguments:
        kind: ``"half"``, ``"alternate"``, ``"checkerboard"`` or ``"channel"``.
        shape: the event shape, ``D`` or ``(C, H, W)``.
        parity: 0 or 1; 1 gives the complement of the parity-0 mask.

    Example:
        >>> coupling_mask("half", 5, parity=0).tolist()
        [True, True, False, False, False]
        >>> coupling_mask("alternate", 5, parity=0).tolist()
        [True, False, True, False, True]
        >>> coupling_mask("checkerboard", (1, 2, 2), parity=0).int().tolist()
        [[[1, 0], [0, 1]]]
    """
    shape = as_event_shape(shape)
    if parity not in (0, 1):
        raise ValueError(f"parity must be 0 or 1; got {parity!r}.")
    if kind not in _MASK_KINDS:
        raise ValueError(f"Unknown mask kind {kind!r}; choose one of {_MASK_KINDS}.")
    if kind in _VECTOR_MASKS:
        if len(shape) != 1:
            raise ValueError(
                f"mask {kind!r} is for flat vectors (D,); got event shape {shape}. "
                "Use 'checkerboard' or 'channel' for images."
            )
        (d,) = shape
        if d < 2:
            raise ValueError(f"mask {kind!r} needs D >= 2 to split the vector; got D={d}.")
        m = torch.arange(d) < d // 2 if kind == "half" else torch.arange(d) % 2 == 0
    else:
        if len(shape) != 3:
            raise ValueError(
                f"mask {kind!r} is for images (C, H, W); got event shape {shape}. "
                "Use 'half' or 'alternate' for flat vectors."
            )
        c, h, w = shape
        if kind == "checkerboard":
            if h * w < 2:
                raise ValueError(f"mask 'checkerboard' needs H * W >= 2; got H={h}, W={w}.")
            ij = torch.arange(h).unsqueeze(-1) + torch.arange(w)
            m = (ij % 2 == 0).expand(c, h, w)
        else:
            if c < 2:
                raise ValueError(
                    f"mask 'channel' needs C >= 2 channels to split; got C={c}. "
                    "Use mask='checkerboard' for single-channel images."
                )
            m = (torch.arange(c) < c // 2).view(c, 1, 1).expand(c, h, w)
    m = m.clone()
    return ~m if parity == 1 else m


def _init_last(last: nn.Module, init: str, n_out: int, n_scale_heads: int) -> None:
    """Initialise a coupling net's last layer (``Linear`` or ``Conv2d``) in place.

    Its outputs are ``n_out`` heads of equal size, the first ``n_scale_heads`` of them
    log-scales. ``"identity"``: the whole layer is zero (the coupling starts as the
    identity map). ``"shift"``: the log-scale heads are zero and the shift head keeps
    PyTorch's default initialisation (the coupling starts as a volume-preserving shift).
    """
    with torch.no_grad():
        if init == "identity":
            last.weight.zero_()
            last.bias.zero_()
        else:
            rows = last.weight.shape[0] // n_out * n_scale_heads
            last.weight[:rows].zero_()
            last.bias[:rows].zero_()


def _check_init(init: str) -> str:
    if init not in _INITS:
        raise ValueError(
            f"init must be one of {_INITS} (the start of the coupling's default net); got {init!r}."
        )
    return init


def _mlp(n_in: int, hidden: Sequence[int], n_out: int) -> nn.Module:
    """ReLU MLP ``n_in -> hidden -> n_out`` (last layer initialised by the caller)."""
    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, n_out))


def _default_net(
    shape: tuple[int, ...], hidden: Sequence[int], n_out: int, extra_in: int = 0
) -> nn.Module:
    """MLP (vectors) or 3x3-conv net (images) with ``n_out`` outputs per entry (last layer initialised by the caller)."""
    layers: list[nn.Module] = []
    if len(shape) == 1:
        width = shape[0] + extra_in
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        last = nn.Linear(width, n_out * shape[0])
    else:
        width = shape[0] + extra_in
        for h in hidden:
            layers += [nn.Conv2d(width, h, 3, padding=1), nn.ReLU()]
            width = h
        last = nn.Conv2d(width, n_out * shape[0], 3, padding=1)
    return nn.Sequential(*layers, last)


def _run_net(
    net: nn.Module,
    xb: torch.Tensor,
    shape: tuple[int, ...],
    n_out: int,
    context: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Apply ``net`` to the masked input over arbitrary batch dims; split its ``n_out`` outputs."""
    event_dim = len(shape)
    batch = xb.shape[: xb.dim() - event_dim]
    if context is not None:
        batch = torch.broadcast_shapes(batch, context.shape[:-1])
        xb = xb.expand(batch + shape)
        if event_dim == 1:
            xb = torch.cat([xb, context.expand(batch + context.shape[-1:])], dim=-1)
        else:
            ctx = context.expand(batch + context.shape[-1:])[..., None, None]
            xb = torch.cat([xb, ctx.expand(batch + (context.shape[-1],) + shape[1:])], dim=-3)
    if event_dim == 1:
        out = net(xb)
    else:
        out = net(xb.reshape((-1,) + xb.shape[-3:]))
    expected = n_out * shape[0]
    if out.shape[-event_dim] != expected:
        raise ValueError(
            f"The coupling net must return {n_out} x {shape[0]} = {expected} "
            f"{'features' if event_dim == 1 else 'channels'}; got output shape {tuple(out.shape)}."
        )
    out = out.reshape(batch + (n_out,) + shape)
    return out.unbind(-event_dim - 1)


class _Coupling(ParameterAwareCache, TransformModule):
    """Shared plumbing of the coupling layers (masks, nets, constraints)."""

    bijective = True
    _n_out = 1
    _n_scale_heads = 0  # how many of the net's leading output heads are log-scales

    def __init__(
        self,
        event_shape: int | Sequence[int],
        hidden: Sequence[int] | None = None,
        net: nn.Module | None = None,
        mask: str | None = None,
        parity: int = 0,
        cache_size: int = 1,
        extra_in: int = 0,
        init: str = "identity",
    ) -> None:
        super().__init__(cache_size=cache_size)
        self.init = _check_init(init)
        self.event_shape = as_event_shape(event_shape)
        self.dim = -len(self.event_shape)
        kind = mask if mask is not None else ("half" if len(self.event_shape) == 1 else "checkerboard")
        self.mask_kind = kind
        self.parity = parity
        self.register_buffer("mask", coupling_mask(kind, self.event_shape, parity).float())
        # built once: TransformedDistribution asks for them on every log_prob and sample
        self._real_events = constraints.independent(constraints.real, len(self.event_shape))
        # With a vector mask and the default net, the net sees only the kept half (and the
        # context) and returns values for the transformed half only: no weights that would
        # only ever meet the mask's zeros (half the parameters and FLOPs of a masked net).
        # the compact half net's split: sizes in storage order (None: masked net), whether
        # the kept half comes first, and (for "alternate") the order that puts the kept
        # entries first and its inverse (not saved: the mask determines them)
        self._sizes: list[int] | None = None
        self._kept_first = parity == 0
        self.register_buffer("_order", None, persistent=False)
        self.register_buffer("_unorder", None, persistent=False)
        if net is None:
            if hidden is None:
                hidden = (64, 64) if len(self.event_shape) == 1 else (32, 32)
            if kind in _VECTOR_MASKS:
                d, k = self.event_shape[0], self.event_shape[0] // 2
                self._sizes = [k, d - k]
                n_kept, n_free = (k, d - k) if parity == 0 else (d - k, k)
                if kind == "alternate":
                    kept = self.mask.bool()
                    order = torch.cat([kept.nonzero().flatten(), (~kept).nonzero().flatten()])
                    self._order, self._unorder = order, torch.argsort(order)
                    n_kept, n_free = int(kept.sum()), d - int(kept.sum())
                    self._sizes, self._kept_first = [n_kept, n_free], True
                net = _mlp(n_kept + extra_in, hidden, self._n_out * n_free)
            else:
                net = _default_net(self.event_shape, hidden, self._n_out, extra_in)
            _init_last(net[-1], init, self._n_out, self._n_scale_heads)
        elif hidden is not None:
            raise ValueError("Pass either `hidden` (widths of the default net) or `net`, not both.")
        self.net = net

    @property
    def event_dim(self) -> int:
        return len(self.event_shape)

    @constraints.dependent_property(is_discrete=False)
    def domain(self):
        return self._real_events

    @constraints.dependent_property(is_discrete=False)
    def codomain(self):
        return self._real_events

    @property
    def sign(self) -> int:
        # Triangular Jacobian (after permutation) with a positive diagonal.
        return 1

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[self.dim :] != self.event_shape or x.dim() < self.event_dim:
            raise ValueError(
                f"{type(self).__name__} expects inputs of shape (..., {', '.join(map(str, self.event_shape))}); "
                f"got {tuple(x.shape)}."
            )

    # The half-mask path runs once per layer per step, so it keeps to few tensor operations
    # (one split, one chunk, one cat): in small flows their overhead, not the matmuls, sets the speed.

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept and transformed halves of a vector (vector mask, default net)."""
        if self._order is not None:
            x = x.index_select(-1, self._order)
        first, second = x.split_with_sizes(self._sizes, -1)
        return (first, second) if self._kept_first else (second, first)

    def _join(self, kept: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
        if kept.shape[:-1] != free.shape[:-1]:  # a context broadcast the transformed half
            kept = kept.expand(free.shape[:-1] + kept.shape[-1:])
        joined = torch.cat((kept, free) if self._kept_first else (free, kept), dim=-1)
        return joined if self._unorder is None else joined.index_select(-1, self._unorder)

    def _half_net(self, kept: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The compact net's ``_n_out`` outputs, each of the transformed half's size."""
        if context is not None:
            batch = torch.broadcast_shapes(kept.shape[:-1], context.shape[:-1])
            kept = torch.cat(
                [kept.expand(batch + kept.shape[-1:]), context.expand(batch + context.shape[-1:])], dim=-1
            )
        out = self.net(kept)
        return out.chunk(self._n_out, -1) if self._n_out > 1 else (out,)

    def _batch_zeros(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[: x.dim() - self.event_dim])

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, mask={self.mask_kind!r}, parity={self.parity}"


class AdditiveCoupling(_Coupling):
    r"""Additive coupling layer of NICE: shift the masked-out part by a function of the rest.

    With a binary mask :math:`b` (1 on the kept part) and a network :math:`m`,

    .. math::

        y = x + (1 - b) \odot m(b \odot x), \qquad
        x = y - (1 - b) \odot m(b \odot y), \qquad
        \log\lvert\det J\rvert = 0,

    since the Jacobian is unit-triangular (the layer is volume preserving).

    References:
        Dinh, Krueger and Bengio, NICE: Non-linear Independent Components Estimation,
        2014, https://arxiv.org/abs/1410.8516

    Arguments:
        event_shape: ``D`` for flat vectors ``(..., D)`` or ``(C, H, W)`` for images.
        hidden: hidden widths of the default net (an MLP for vectors; 3x3 convolutions,
            padding 1, for images); defaults ``(64, 64)`` / ``(32, 32)``.
        net: a custom net mapping ``(..., D)`` to ``(..., D)`` or ``(N, C, H, W)`` to
            ``(N, C, H, W)``, used instead of the default one (see ``init``).
        mask: ``"half"`` (vectors, default), ``"alternate"`` (vectors), ``"checkerboard"``
            (images, default) or ``"channel"``; see :func:`coupling_mask`.
        parity: 0 or 1; 1 swaps the kept and transformed parts.
        cache_size: 0 or 1, as in :class:`torch.distributions.Transform`.
        init: the default net's last layer: ``"identity"`` (zero, so a fresh layer is the
            identity) or ``"shift"`` (PyTorch's default initialisation, so a fresh layer is
            a random shift; what :func:`~pyro_lvm.flows.nice` uses, see there why).

    Example:
        >>> t = AdditiveCoupling(5, hidden=(16,), cache_size=0)
        >>> _ = nn.init.normal_(t.net[-1].weight)
        >>> x = torch.randn(3, 5)
        >>> torch.allclose(t.inv(t(x)), x, atol=1e-5)
        True
        >>> t.log_abs_det_jacobian(x, t(x)).shape
        torch.Size([3])
    """

    volume_preserving = True

    def __init__(
        self,
        event_shape: int | Sequence[int],
        hidden: Sequence[int] | None = None,
        net: nn.Module | None = None,
        mask: str | None = None,
        parity: int = 0,
        cache_size: int = 1,
        init: str = "identity",
    ) -> None:
        super().__init__(event_shape, hidden, net, mask, parity, cache_size, init=init)

    def _shift(self, kept: torch.Tensor) -> torch.Tensor:
        (shift,) = _run_net(self.net, kept, self.event_shape, 1)
        return shift * (1 - self.mask)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        if self._sizes is not None:
            kept, free = self._split(x)
            (shift,) = self._half_net(kept)
            return self._join(kept, free + shift)
        return x + self._shift(x * self.mask)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        self._check(y)
        if self._sizes is not None:
            kept, free = self._split(y)
            (shift,) = self._half_net(kept)
            return self._join(kept, free - shift)
        return y - self._shift(y * self.mask)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._batch_zeros(x)


def _signed_log_scale(
    raw: torch.Tensor, scale: str, scale_factor: torch.Tensor | None, sign: float = 1.0
) -> torch.Tensor:
    """``sign`` times the log-scale ``s`` of the raw net output (``sign=-1`` gives ``-s`` at no extra cost)."""
    if scale == "tanh":
        # s = c tanh(r), computed as 2c sigmoid(2r) - c: the same function (to float rounding),
        # but torch's CPU sigmoid and its backward take about half the time of tanh's
        c = scale_factor
        return torch.addcmul(c.neg() if sign > 0 else c, torch.sigmoid(raw * 2.0), c, value=2.0 * sign)
    # Glow's scale, in the data-to-base direction that log_prob evaluates: x = (y - t) sigmoid(r + 2)
    s = F.logsigmoid(raw + 2.0)  # = -log-scale
    return s.neg() if sign > 0 else s


class AffineCoupling(_Coupling):
    r"""Affine coupling layer of RealNVP: scale and shift the masked-out part by functions of the rest.

    With a binary mask :math:`b` (1 on the kept part) and a network giving
    :math:`(r, t)` from :math:`b \odot x`, the log-scale is
    :math:`s = (1 - b) \odot \sigma(r)` and

    .. math::

        y = x \odot e^{s} + (1 - b) \odot t, \qquad
        x = (y - (1 - b) \odot t) \odot e^{-s}, \qquad
        \log\lvert\det J\rvert = \sum_i s_i .

    Two stable log-scales :math:`\sigma`: ``scale="tanh"`` (default, RealNVP's code)
    :math:`s = c \tanh(r)` with a learnable per-entry factor :math:`c` initialised at 1,
    so :math:`\lvert s\rvert \le \lvert c\rvert`; ``scale="sigmoid"`` (Glow)
    :math:`e^{-s} = \operatorname{sigmoid}(r + 2)`: the data-to-base map, the one
    ``log_prob`` evaluates in training, multiplies by a factor in :math:`(0, 1)` and never
    divides by a small number (computed in log space; a fresh sigmoid layer scales by
    :math:`1/\operatorname{sigmoid}(2) \approx 1.13` rather than being the identity). The
    sigmoid layer can only contract towards the base, so, as in Glow, pair it with
    :class:`~pyro_lvm.flows.ActNorm` (``realnvp(..., actnorm=True)``), which learns the scales.

    References:
        Dinh, Sohl-Dickstein and Bengio, Density estimation using Real NVP, 2016,
        https://arxiv.org/abs/1605.08803 ; Kingma and Dhariwal, Glow, 2018,
        https://arxiv.org/abs/1807.03039

    Arguments:
        event_shape: ``D`` for flat vectors ``(..., D)`` or ``(C, H, W)`` for images.
        hidden: hidden widths of the default net (an MLP for vectors; 3x3 convolutions,
            padding 1, for images); defaults ``(64, 64)`` / ``(32, 32)``.
        net: a custom net mapping ``(..., D)`` to ``(..., 2 D)`` or ``(N, C, H, W)`` to
            ``(N, 2 C, H, W)`` (raw log-scale first, then shift), used instead of the
            default one (see ``init``).
        mask: ``"half"`` (vectors, default), ``"alternate"`` (vectors), ``"checkerboard"``
            (images, default) or ``"channel"``; see :func:`coupling_mask`.
        parity: 0 or 1; 1 swaps the kept and transformed parts.
        scale: ``"tanh"`` or ``"sigmoid"``, the log-scale parameterisation.
        cache_size: 0 or 1, as in :class:`torch.distributions.Transform`.
        init: the default net's last layer: ``"identity"`` (zero: a fresh layer is the
            identity) or ``"shift"`` (the log-scale head zero, the shift head at PyTorch's
            default initialisation: with ``scale="tanh"`` a fresh layer is a
            volume-preserving random shift, :math:`s = 0`; what
            :func:`~pyro_lvm.flows.realnvp` uses, see there why).

    Example:
        >>> t = AffineCoupling((2, 4, 4), hidden=(8,), mask="channel", cache_size=0)
        >>> _ = nn.init.normal_(t.net[-1].weight, std=0.1)
        >>> x = torch.randn(3, 2, 4, 4)
        >>> torch.allclose(t.inv(t(x)), x, atol=1e-5)
        True
        >>> t.log_abs_det_jacobian(x, t(x)).shape
        torch.Size([3])
    """

    _n_out = 2
    _n_scale_heads = 1  # the net returns the raw log-scale first, then the shift

    def __init__(
        self,
        event_shape: int | Sequence[int],
        hidden: Sequence[int] | None = None,
        net: nn.Module | None = None,
        mask: str | None = None,
        parity: int = 0,
        scale: str = "tanh",
        cache_size: int = 1,
        init: str = "identity",
        _extra_in: int = 0,
    ) -> None:
        if scale not in _SCALES:
            raise ValueError(f"scale must be one of {_SCALES}; got {scale!r}.")
        super().__init__(event_shape, hidden, net, mask, parity, cache_size, _extra_in, init)
        self.scale = scale
        if scale == "tanh":
            # one factor per transformed entry (the compact half net), else per entry
            size = self._sizes[int(self._kept_first)] if self._sizes is not None else self.event_shape
            self.scale_factor = nn.Parameter(torch.ones(size))
        else:
            self.register_parameter("scale_factor", None)
        self._cached_log_det: tuple | None = None

    def _scale_shift(
        self, kept: torch.Tensor, context: torch.Tensor | None, sign: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``sign`` times the log-scale, and the shift: of the transformed half only (compact net), else masked full-size."""
        if self._sizes is not None:
            raw, shift = self._half_net(kept, context)
            return _signed_log_scale(raw, self.scale, self.scale_factor, sign), shift
        raw, shift = _run_net(self.net, kept, self.event_shape, 2, context)
        free = 1 - self.mask
        return _signed_log_scale(raw, self.scale, self.scale_factor, sign) * free, shift * free

    def _params(
        self, kept: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-scale ``s`` and shift ``t`` given the kept part (the transformed half's with the compact net)."""
        return self._scale_shift(kept, context, 1.0)

    def _sum_event(self, v: torch.Tensor) -> torch.Tensor:
        return v.sum(-1) if self.event_dim == 1 else v.sum((-3, -2, -1))

    def _forward_with(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x)
        if self._sizes is not None:
            kept, free = self._split(x)
            s, t = self._scale_shift(kept, context, 1.0)
            y = self._join(kept, torch.addcmul(t, free, torch.exp(s)))
        else:
            s, t = self._scale_shift(x * self.mask, context, 1.0)
            y = torch.addcmul(t, x, torch.exp(s))
        # the log-det for log_abs_det_jacobian(x, y); a plain attribute, skipping Module.__setattr__
        self.__dict__["_cached_log_det"] = (x, y, context, self._sum_event(s))
        return y

    def _inverse_with(self, y: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self._check(y)
        if self._sizes is not None:
            kept, free = self._split(y)
            neg_s, t = self._scale_shift(kept, context, -1.0)
            x = self._join(kept, (free - t) * torch.exp(neg_s))
        else:
            neg_s, t = self._scale_shift(y * self.mask, context, -1.0)
            x = (y - t) * torch.exp(neg_s)
        self.__dict__["_cached_log_det"] = (x, y, context, self._sum_event(neg_s).neg())
        return x

    def _log_det_with(
        self, x: torch.Tensor, y: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        cached = self._cached_log_det
        if cached is not None and cached[0] is x and cached[1] is y and cached[2] is context:
            return cached[3]
        kept = self._split(x)[0] if self._sizes is not None else x * self.mask
        return self._sum_event(self._scale_shift(kept, context, 1.0)[0])

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_with(x)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self._inverse_with(y)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._log_det_with(x, y)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale!r}"


class _ConditionedAffineCoupling(Transform):
    """An :class:`AffineCoupling` whose net also sees a fixed context (shares its parameters)."""

    bijective = True

    def __init__(self, coupling: AffineCoupling, context: torch.Tensor, cache_size: int) -> None:
        super().__init__(cache_size=cache_size)
        self.coupling = coupling
        self.context = context
        n = len(coupling.event_shape)
        self.domain = constraints.independent(constraints.real, n)
        self.codomain = constraints.independent(constraints.real, n)

    @property
    def sign(self) -> int:
        return 1

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self.coupling._forward_with(x, self.context)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.coupling._inverse_with(y, self.context)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.coupling._log_det_with(x, y, self.context)


class ConditionalAffineCoupling(ConditionalTransformModule):
    r"""Affine coupling layer whose net also takes a context vector :math:`c`.

    Same maps as :class:`AffineCoupling`, with :math:`(r, t) = \mathrm{net}(b \odot x, c)`:

    .. math::

        y = x \odot e^{s(b \odot x, c)} + (1 - b) \odot t(b \odot x, c), \qquad
        \log\lvert\det J\rvert = \sum_i s_i(b \odot x, c).

    The context is concatenated to the masked input (as extra features for vectors,
    as constant extra channels for images); ``.condition(context)`` returns the
    transform for that context (context shape ``(..., context_dim)``, broadcast
    against the batch shape of the input).

    References:
        Dinh, Sohl-Dickstein and Bengio, Density estimation using Real NVP, 2016,
        https://arxiv.org/abs/1605.08803

    Arguments:
        event_shape: ``D`` for flat vectors or ``(C, H, W)`` for images.
        context_dim: size of the context vector.
        hidden: hidden widths of the default net.
        net: a custom net taking ``D + context_dim`` features (or ``C + context_dim``
            channels) and returning ``2 D`` features (``2 C`` channels).
        mask: ``"half"``, ``"alternate"``, ``"checkerboard"`` or ``"channel"``.
        parity: 0 or 1.
        scale: ``"tanh"`` or ``"sigmoid"``.
        cache_size: 0 or 1, for the conditioned transforms.
        init: ``"identity"`` or ``"shift"``, the default net's start (see :class:`AffineCoupling`).

    Example:
        >>> t = ConditionalAffineCoupling(4, context_dim=2, hidden=(8,))
        >>> _ = nn.init.normal_(t.coupling.net[-1].weight)
        >>> x, c = torch.randn(3, 4), torch.randn(3, 2)
        >>> tc = t.condition(c)
        >>> torch.allclose(tc.inv(tc(x).clone()), x, atol=1e-5)
        True
    """

    bijective = True

    def __init__(
        self,
        event_shape: int | Sequence[int],
        context_dim: int,
        hidden: Sequence[int] | None = None,
        net: nn.Module | None = None,
        mask: str | None = None,
        parity: int = 0,
        scale: str = "tanh",
        cache_size: int = 1,
        init: str = "identity",
    ) -> None:
        super().__init__()
        if context_dim < 1:
            raise ValueError(f"context_dim must be >= 1; got {context_dim}.")
        self.context_dim = context_dim
        self.cache_size = cache_size
        self.coupling = AffineCoupling(
            event_shape, hidden, net, mask, parity, scale, cache_size=0, init=init, _extra_in=context_dim
        )

    def condition(self, context: torch.Tensor) -> Transform:
        if context.shape[-1:] != (self.context_dim,):
            raise ValueError(
                f"context must have shape (..., {self.context_dim}); got {tuple(context.shape)}."
            )
        return _ConditionedAffineCoupling(self.coupling, context, self.cache_size)
