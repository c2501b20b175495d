"""Ready-made stacks of flow layers: NICE and RealNVP (single- or multi-scale) as Pyro transforms, and their ActNorm initialization."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from pyro.distributions.torch_transform import ComposeTransformModule, TransformModule
from torch import nn
from torch.distributions import ComposeTransform, Transform, constraints

from .coupling import AdditiveCoupling, AffineCoupling, as_event_shape
from .layers import ActNorm, DiagonalScaling, InvertibleConv1x1, Squeeze
from .multiscale import FactorOut

__all__ = ["NICE", "RealNVP", "nice", "realnvp", "initialize_actnorm", "transform_parts"]


class _Stack(ComposeTransformModule):
    """A :class:`~pyro.distributions.torch_transform.ComposeTransformModule` that keeps the plain init arguments it was built from."""

    def __init__(self, parts: list[nn.Module], event_shape: tuple[int, ...], config: dict[str, Any]) -> None:
        super().__init__(parts)
        self.event_shape = torch.Size(event_shape)
        self._config = config

    @property
    def config(self) -> dict[str, Any]:
        """The init arguments (plain data) that rebuild this stack: ``type(stack)(**stack.config)``."""
        return copy.deepcopy(self._config)

    def __getitem__(self, index: int | slice) -> nn.Module:
        # nn.ModuleList slices by calling type(self)(modules), which a stack's signature does not take
        if isinstance(index, slice):
            return ComposeTransformModule(self.parts[index])
        return super().__getitem__(index)

    __repr__ = nn.Module.__repr__

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._config.items())


class NICE(_Stack):
    r"""The NICE flow as one Pyro transform: additive couplings of alternating parity, then a diagonal scaling.

    In the generative direction (base :math:`u` to data :math:`x`), with
    :math:`g_k` the additive couplings (:class:`~pyro_lvm.flows.AdditiveCoupling`,
    parity :math:`k \bmod 2`) and :math:`S` the diagonal scaling
    (:class:`~pyro_lvm.flows.DiagonalScaling`, one log-scale per entry of the event),

    .. math::

        x = S \circ g_K \circ \dots \circ g_1 (u), \qquad
        \log\lvert\det J\rvert = \sum_i s_i ,

    since the couplings are volume preserving: all the change of volume is in the
    scaling. The stack is a :class:`~pyro.distributions.torch_transform.ComposeTransformModule`:
    ``stack(u)``, ``stack.inv(x)`` and ``stack.log_abs_det_jacobian(u, x)`` are those of
    the composition, it goes into ``TransformedDistribution(base, stack)`` and composes
    with Pyro's transforms, and iterating or indexing it gives its layers. Its ``config``
    holds the init arguments (plain data) that rebuild it, as a YAML ``class_path:
    pyro_lvm.flows.NICE`` with those ``init_args`` does.

    Flat vectors ``D`` use the ``"half"`` mask (first half against second;
    ``mask="alternate"`` couples even-indexed entries with odd ones, the paper's split on
    MNIST) and, by default, the paper's MNIST architecture (4 couplings, 5 hidden layers of
    1000 units); use smaller ``hidden`` for small problems. Images ``(C, H, W)`` use the
    ``"checkerboard"`` mask (or ``"channel"`` with ``mask="channel"`` when :math:`C \ge 2`)
    and 3x3 convolutional nets (default hidden widths ``(32, 32)``); the base has the
    image's shape.

    Initialisation (``init="shift"``, the default): each coupling's net keeps PyTorch's
    default initialisation of its last layer, so a fresh stack is a random shift of one
    half by a function of the other, layer after layer, not the identity. A zero last
    layer (``init="identity"``) starts at the identity but leaves the hidden layers without
    gradient until the last layer has grown, which costs the early steps: on
    ``benchmarks/flows.py`` (330 Adam steps at lr 1e-3, mean over 3 seeds, with the
    scaling initialized by :func:`initialize_actnorm`) the test NLL was 112.0 nats with
    ``"identity"`` and 109.2 with ``"shift"`` on the 64-d digits, 4.50 and 3.97 on eight
    Gaussians, 0.89 and 0.92 on two moons (MNIST, 170 steps: 1372 and 1364).

    References:
        Dinh, Krueger and Bengio, NICE: Non-linear Independent Components Estimation,
        2014, https://arxiv.org/abs/1410.8516

    Arguments:
        event_shape: size :math:`D \ge 2` of flat vectors, or ``(C, H, W)`` for images.
        num_layers: number of additive coupling layers (at least 2, so every entry moves).
        hidden: hidden widths of each coupling's net (default ``(1000,) * 5`` for vectors,
            ``(32, 32)`` for images).
        cache_size: 0 or 1, the layers' cache size.
        mask: the couplings' mask, ``"half"`` (vectors, default), ``"alternate"`` (vectors),
            ``"checkerboard"`` (images, default) or ``"channel"`` (images with :math:`C \ge 2`);
            see :func:`~pyro_lvm.flows.coupling_mask`.
        init: ``"shift"`` (default) or ``"identity"``, the start of the couplings' nets (see
            above and :class:`~pyro_lvm.flows.AdditiveCoupling`).

    Example:
        >>> import torch, pyro.distributions as dist
        >>> stack = NICE(4, hidden=(8,))
        >>> [type(t).__name__ for t in stack]
        ['AdditiveCoupling', 'AdditiveCoupling', 'AdditiveCoupling', 'AdditiveCoupling', 'DiagonalScaling']
        >>> with torch.no_grad():
        ...     _ = stack[-1].log_scale.normal_()  # a scaling that changes the volume
        >>> u = torch.randn(3, 4)
        >>> x = stack(u)
        >>> torch.allclose(stack.inv(x), u, atol=1e-5)
        True
        >>> jac = torch.autograd.functional.jacobian(stack, u[0])
        >>> torch.allclose(stack.log_abs_det_jacobian(u, x)[0], torch.linalg.slogdet(jac)[1], atol=1e-5)
        True
        >>> p = dist.TransformedDistribution(dist.Normal(torch.zeros(4), 1.0).to_event(1), stack)
        >>> p.log_prob(x).shape
        torch.Size([3])
        >>> NICE(**stack.config).config == stack.config
        True
        >>> NICE((1, 4, 4), hidden=(8,))[-1].log_scale.shape
        torch.Size([1, 4, 4])
    """

    def __init__(
        self,
        event_shape: int | Sequence[int],
        num_layers: int = 4,
        hidden: Sequence[int] | None = None,
        cache_size: int = 1,
        mask: str | None = None,
        init: str = "shift",
    ) -> None:
        try:
            shape = as_event_shape(event_shape)
        except (TypeError, ValueError):
            shape = ()
        if len(shape) == 1 and shape[0] < 2 or not shape:
            raise ValueError(
                f"NICE needs flat vectors of size dim >= 2 (an int) or images (C, H, W); got {event_shape!r}."
            )
        if not isinstance(num_layers, int) or num_layers < 2:
            raise ValueError(
                f"NICE needs num_layers >= 2 so that both halves are transformed; got {num_layers!r}."
            )
        hidden = ((1000,) * 5 if len(shape) == 1 else (32, 32)) if hidden is None else tuple(hidden)
        mask = ("half" if len(shape) == 1 else "checkerboard") if mask is None else mask
        layers: list[nn.Module] = [
            AdditiveCoupling(shape, hidden=hidden, mask=mask, parity=k % 2, cache_size=cache_size, init=init)
            for k in range(num_layers)
        ]
        layers.append(DiagonalScaling(shape if len(shape) > 1 else shape[0], cache_size=cache_size))
        config = dict(event_shape=list(shape), num_layers=num_layers, hidden=list(hidden), cache_size=cache_size,
                      mask=mask, init=init)
        super().__init__(layers, shape, config)


class RealNVP(_Stack):
    r"""A RealNVP flow as one Pyro transform: affine couplings of alternating parity, single- or multi-scale for images.

    The stack is a :class:`~pyro.distributions.torch_transform.ComposeTransformModule` in
    the generative direction (base :math:`u` to data :math:`x`): ``stack(u)``,
    ``stack.inv(x)`` and ``stack.log_abs_det_jacobian(u, x)`` are those of the
    composition, it goes into ``TransformedDistribution(base, stack)`` and composes with
    Pyro's transforms, and iterating or indexing it gives its layers. Its ``config`` holds
    the init arguments (plain data) that rebuild it, as a YAML ``class_path:
    pyro_lvm.flows.RealNVP`` with those ``init_args`` does.

    * Flat vectors ``D``: ``num_layers`` (default 4) :class:`~pyro_lvm.flows.AffineCoupling` s
      with the ``"half"`` mask (or ``mask="alternate"``) and alternating parity, each preceded
      (``actnorm=True``) by an :class:`~pyro_lvm.flows.ActNorm`.
    * Images ``(C, H, W)``, one scale (``num_scales=1``): in the density-estimation
      direction (data to base) the data go through ``num_layers`` (default 3) checkerboard
      couplings of alternating parity on ``(C, H, W)``, a :class:`~pyro_lvm.flows.Squeeze`
      to ``(4C, H/2, W/2)``, then ``num_layers`` channel couplings of alternating parity;
      the generative stack is the reverse (channel couplings, the squeeze's inverse,
      checkerboard couplings), so the base has shape ``stack.inverse_shape(event_shape)``
      ``= (4C, H/2, W/2)``.
    * Images, :math:`L` scales (``num_scales=L``, :math:`H` and :math:`W` divisible by
      :math:`2^L`): RealNVP's multi-scale architecture. Each of the first :math:`L - 1`
      scales is the single scale above followed by factoring out half of the
      :math:`4C` channels: the first :math:`2C` go to the base unchanged and the other
      :math:`2C`, of shape ``(2C, H/2, W/2)``, go through the next scale (a
      :class:`~pyro_lvm.flows.FactorOut`, nested once per scale). The last scale is the
      single-scale block (checkerboard couplings, squeeze, channel couplings), so every
      scale squeezes once; the paper's last scale has 4 checkerboard couplings and no
      squeeze instead. The base keeps the shape ``(4C, H/2, W/2)``.

    With ``actnorm=True`` an :class:`~pyro_lvm.flows.ActNorm` over the features precedes
    each coupling in the data-to-base direction; initialize them from data with
    :func:`initialize_actnorm` (which reaches the ones inside a ``FactorOut``). In a prior or
    a guide, whose first input is a draw of the base, they need no such step: a first input with
    too few values per feature to estimate a mean and a standard deviation (one draw, a small
    batch) leaves them at the identity (see :class:`~pyro_lvm.flows.ActNorm`). With
    ``conv1x1=True`` an :class:`~pyro_lvm.flows.InvertibleConv1x1` (Glow) mixes the
    features just before each coupling (after its ActNorm), on top of the alternating
    parities.

    Initialisation (``init="shift"``, the default): each coupling's log-scale head starts
    at zero and its shift head at PyTorch's default initialisation, so a fresh coupling is
    a random shift, volume-preserving with the tanh scale (:math:`s = 0`), rather than the
    identity. A zero last
    layer (``init="identity"``) leaves the hidden layers without gradient until the last
    layer has grown, which costs the early steps; a default-initialised log-scale head as
    well starts with random volume changes and trained worse. On ``benchmarks/flows.py``
    (330 Adam steps at lr 1e-3, test NLL in nats, mean over 3 seeds; ``"identity"`` /
    ``"shift"`` / both heads default): two moons 0.82 / 0.51 / 0.64, eight Gaussians
    3.66 / 3.53 / 3.72, 64-d digits 103.1 / 102.2 / --; MNIST (170 steps, one seed)
    1292 / 1276 / --.

    .. math::

        \log p(x) = \log p_U(f^{-1}(x)) - \sum_k \log\lvert\det J_{f_k}\rvert ,
        \qquad \log\lvert\det J_{\text{coupling}}\rvert = \sum_i s_i .

    References:
        Dinh, Sohl-Dickstein and Bengio, Density estimation using Real NVP, 2016,
        https://arxiv.org/abs/1605.08803

    Arguments:
        event_shape: ``D`` for flat vectors or ``(C, H, W)`` for images.
        num_layers: couplings (vectors, default 4) or couplings per stage (images, default 3).
        hidden: hidden widths of each coupling's net (default: the coupling's, see
            :class:`~pyro_lvm.flows.AffineCoupling`).
        actnorm: put an ActNorm before each coupling (initialize it from data, see
            :func:`initialize_actnorm`).
        scale: ``"tanh"`` or ``"sigmoid"``, the couplings' log-scale.
        cache_size: 0 or 1, the layers' cache size.
        num_scales: number of scales :math:`L \ge 1` (images only).
        conv1x1: put a learnable invertible 1x1 convolution (Glow) before each coupling.
        init: ``"shift"`` (default) or ``"identity"``, the start of the couplings' nets (see
            above and :class:`~pyro_lvm.flows.AffineCoupling`).
        mask: flat vectors only: ``"half"`` (default) or ``"alternate"`` (even-indexed
            entries against odd ones); see :func:`~pyro_lvm.flows.coupling_mask`. Images
            use checkerboard masks before each squeeze and channel masks after it.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> stack = RealNVP(4, num_layers=2, hidden=(8,))
        >>> with torch.no_grad():  # move the log-scale heads off zero, so that the volume changes
        ...     _ = [p.add_(0.1 * torch.randn_like(p)) for p in stack.parameters()]
        >>> u = torch.randn(3, 4)
        >>> x = stack(u)
        >>> torch.allclose(stack.inv(x), u, atol=1e-5)
        True
        >>> jac = torch.autograd.functional.jacobian(stack, u[0])
        >>> torch.allclose(stack.log_abs_det_jacobian(u, x)[0], torch.linalg.slogdet(jac)[1], atol=1e-5)
        True
        >>> p = dist.TransformedDistribution(dist.Normal(torch.zeros(4), 1.0).to_event(1), stack)
        >>> p.log_prob(x).shape
        torch.Size([3])
        >>> images = RealNVP((1, 4, 4), num_layers=2, hidden=(4,))
        >>> [type(t).__name__ for t in images]
        ['AffineCoupling', 'AffineCoupling', '_DepthToSpace', 'AffineCoupling', 'AffineCoupling']
        >>> images.inverse_shape(torch.Size([1, 4, 4]))
        torch.Size([4, 2, 2])
        >>> two = RealNVP((1, 8, 8), num_layers=2, hidden=(4,), num_scales=2)
        >>> type(two[0]).__name__, two[0].split
        ('FactorOut', 2)
    """

    def __init__(
        self,
        event_shape: int | Sequence[int],
        num_layers: int | None = None,
        hidden: Sequence[int] | None = None,
        actnorm: bool = False,
        scale: str = "tanh",
        cache_size: int = 1,
        num_scales: int = 1,
        conv1x1: bool = False,
        init: str = "shift",
        mask: str | None = None,
    ) -> None:
        shape = as_event_shape(event_shape)
        if num_layers is None:
            num_layers = 4 if len(shape) == 1 else 3
        if not isinstance(num_layers, int) or num_layers < 2:
            raise ValueError(
                f"RealNVP needs num_layers >= 2 so that both parts are transformed; got {num_layers!r}."
            )
        if not isinstance(num_scales, int) or num_scales < 1:
            raise ValueError(f"RealNVP needs an int num_scales >= 1; got num_scales={num_scales!r}.")
        hidden = None if hidden is None else tuple(hidden)
        config = dict(event_shape=list(shape), num_layers=num_layers, hidden=None if hidden is None else list(hidden),
                      actnorm=bool(actnorm), scale=scale, cache_size=cache_size, num_scales=num_scales,
                      conv1x1=bool(conv1x1), init=init, mask=mask)

        def block(ev: tuple[int, ...], mask: str) -> list[nn.Module]:
            out: list[nn.Module] = []
            for k in range(num_layers):
                if actnorm:
                    out.append(ActNorm(ev[0], dim=-len(ev), cache_size=cache_size))
                if conv1x1:
                    out.append(InvertibleConv1x1(ev[0], dim=-len(ev), cache_size=cache_size))
                out.append(
                    AffineCoupling(ev, hidden=hidden, mask=mask, parity=k % 2, scale=scale,
                                   cache_size=cache_size, init=init)
                )
            return out

        if len(shape) == 1:
            if num_scales != 1:
                raise ValueError(
                    f"RealNVP on flat vectors has a single scale; got num_scales={num_scales}. "
                    "Use num_scales=1, or images (C, H, W) for the multi-scale architecture."
                )
            if mask not in (None, "half", "alternate"):
                raise ValueError(f"RealNVP on flat vectors takes mask 'half' or 'alternate'; got {mask!r}.")
            super().__init__(block(shape, mask or "half"), shape, config)
            return
        if mask is not None:
            raise ValueError(
                f"RealNVP on images uses checkerboard masks, then channel masks after each squeeze; "
                f"mask applies to flat vectors only. Leave it out (got {mask!r})."
            )
        c, h, w = shape
        if num_scales == 1 and (h % 2 or w % 2):
            raise ValueError(
                f"RealNVP on images squeezes 2x2 blocks and needs even H and W; got event shape "
                f"{shape}. Pad or crop the images."
            )
        factor = 2**num_scales
        if h % factor or w % factor:
            fits = max(k for k in range(num_scales) if h % 2**k == 0 and w % 2**k == 0)
            padded = tuple(-(-s // factor) * factor for s in (h, w))
            raise ValueError(
                f"RealNVP with num_scales={num_scales} squeezes {num_scales} times and needs H and W "
                f"divisible by 2**{num_scales} = {factor}; got event shape {shape}. Pad the images to "
                f"{padded[0]}x{padded[1]}"
                + (f" or use num_scales <= {fits}." if fits >= 1 else ".")
            )

        def scale_stack(ev: tuple[int, int, int], level: int) -> list[nn.Module]:
            """Generative list of scale ``level`` (1-based), from ``(4C, H/2, W/2)`` to ``ev = (C, H, W)``."""
            ch, he, wi = ev
            squeezed = (4 * ch, he // 2, wi // 2)
            # data -> checkerboard -> squeeze -> channel [-> factor out half, next scale on the rest]
            checker = block(ev, "checkerboard")
            channel = block(squeezed, "channel")
            gen = list(reversed(channel)) + [_DepthToSpace()] + list(reversed(checker))
            if level < num_scales:
                rest = (2 * ch, he // 2, wi // 2)
                inner = [Squeeze()] + scale_stack(rest, level + 1)
                gen = [FactorOut(inner, split=2 * ch, dim=-3, cache_size=cache_size)] + gen
            return gen

        super().__init__(scale_stack(shape, 1), shape, config)


def nice(
    event_shape: int | Sequence[int],
    num_layers: int = 4,
    hidden: Sequence[int] | None = None,
    cache_size: int = 1,
    mask: str | None = None,
    init: str = "shift",
) -> NICE:
    r"""Build a :class:`NICE` stack (additive couplings, then a diagonal scaling), one Pyro transform.

    The lower-case factory of Pyro's convention (``affine_coupling`` for ``AffineCoupling``);
    the arguments are :class:`NICE`'s, where the maths and the defaults are.

    References:
        Dinh, Krueger and Bengio, NICE: Non-linear Independent Components Estimation,
        2014, https://arxiv.org/abs/1410.8516

    Arguments:
        event_shape: size :math:`D \ge 2` of flat vectors, or ``(C, H, W)`` for images.
        num_layers: number of additive coupling layers (at least 2).
        hidden: hidden widths of each coupling's net.
        cache_size: 0 or 1, the layers' cache size.
        mask: the couplings' mask (see :class:`NICE`).
        init: ``"shift"`` (default) or ``"identity"``, the start of the couplings' nets.

    Example:
        >>> import torch
        >>> stack = nice(4, hidden=(8,))
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(stack.inv(stack(x)), x, atol=1e-5)
        True
    """
    return NICE(event_shape, num_layers=num_layers, hidden=hidden, cache_size=cache_size, mask=mask, init=init)


def realnvp(
    event_shape: int | Sequence[int],
    num_layers: int | None = None,
    hidden: Sequence[int] | None = None,
    actnorm: bool = False,
    scale: str = "tanh",
    cache_size: int = 1,
    num_scales: int = 1,
    conv1x1: bool = False,
    init: str = "shift",
    mask: str | None = None,
) -> RealNVP:
    r"""Build a :class:`RealNVP` stack (affine couplings, single- or multi-scale for images), one Pyro transform.

    The lower-case factory of Pyro's convention (``affine_coupling`` for ``AffineCoupling``);
    the arguments are :class:`RealNVP`'s, where the maths and the defaults are.

    References:
        Dinh, Sohl-Dickstein and Bengio, Density estimation using Real NVP, 2016,
        https://arxiv.org/abs/1605.08803

    Arguments:
        event_shape: ``D`` for flat vectors or ``(C, H, W)`` for images.
        num_layers: couplings (vectors, default 4) or couplings per stage (images, default 3).
        hidden: hidden widths of each coupling's net.
        actnorm: put an ActNorm before each coupling.
        scale: ``"tanh"`` or ``"sigmoid"``, the couplings' log-scale.
        cache_size: 0 or 1, the layers' cache size.
        num_scales: number of scales :math:`L \ge 1` (images only).
        conv1x1: put a learnable invertible 1x1 convolution (Glow) before each coupling.
        init: ``"shift"`` (default) or ``"identity"``, the start of the couplings' nets.
        mask: flat vectors only: ``"half"`` (default) or ``"alternate"``.

    Example:
        >>> import torch
        >>> stack = realnvp((1, 4, 4), num_layers=2, hidden=(4,))
        >>> x = torch.randn(3, 1, 4, 4)
        >>> u = stack.inv(x)
        >>> u.shape, torch.allclose(stack(u), x, atol=1e-5)
        (torch.Size([3, 4, 2, 2]), True)
    """
    return RealNVP(event_shape, num_layers=num_layers, hidden=hidden, actnorm=actnorm, scale=scale,
                   cache_size=cache_size, num_scales=num_scales, conv1x1=conv1x1, init=init, mask=mask)


def transform_parts(transform: Transform | Sequence[Transform]) -> list[Transform]:
    """The transforms that ``transform`` chains, in order: the parts of a (nested) ``ComposeTransform``, flattened.

    A transform that is not a composition is its own one part; a list is read as the
    composition of its items. ``TransformedDistribution(base, transform_parts(t))`` has the
    density of ``TransformedDistribution(base, t)``, and its ``log_prob`` takes each
    layer's log-determinant at the pair the inverse pass has just computed (a
    ``ComposeTransform`` reruns its forward pass for them, free only if every layer caches).

    Arguments:
        transform: a transform, or a list of them in the generative direction.

    Example:
        >>> from torch.distributions import ComposeTransform, ExpTransform
        >>> exp = ExpTransform()
        >>> transform_parts(ComposeTransform([exp, ComposeTransform([exp, exp])])) == [exp] * 3
        True
    """
    items = transform.parts if isinstance(transform, ComposeTransform) else (
        [transform] if isinstance(transform, Transform) else list(transform))
    out: list[Transform] = []
    for t in items:
        out.extend(transform_parts(t) if isinstance(t, ComposeTransform) else [t])
    return out


@torch.no_grad()
def initialize_actnorm(transforms: Transform | Sequence[Transform], x: torch.Tensor) -> torch.Tensor:
    r"""Initialize every ActNorm (and NICE scaling) of a generative stack from data, data-to-base.

    ``x`` is pushed through the inverse of ``transforms`` (a stack such as :class:`RealNVP`,
    or a list, in the generative direction, base to data), entering every :class:`~pyro_lvm.flows.FactorOut` (at any
    depth) on the part it transforms. Each :class:`~pyro_lvm.flows.ActNorm` met on the way,
    :math:`y = x e^{\log s} + b` in the generative direction, is set from the values
    :math:`h` that reach it so that its *inverse* output (towards the base) is standardized
    per feature,

    .. math::

        \log s_c = \log \sigma_c(h), \qquad b_c = \mu_c(h), \qquad
        \frac{h - b_c}{e^{\log s_c}} \text{ has mean 0 and standard deviation 1},

    with the statistics over the batch and spatial dims. Each
    :class:`~pyro_lvm.flows.DiagonalScaling` (NICE's last layer) gets
    :math:`\log s_i = \log \sigma_i(h)`, the standard deviation per coordinate. All these layers are (re)initialized,
    whether or not they were before.

    References:
        Kingma and Dhariwal, Glow, 2018, https://arxiv.org/abs/1807.03039 ;
        Dinh, Sohl-Dickstein and Bengio, Density estimation using Real NVP, 2016,
        https://arxiv.org/abs/1605.08803

    Arguments:
        transforms: the stack (e.g. :class:`RealNVP`), or a list of transforms, in the generative direction.
        x: a data batch of shape ``(batch, *event_shape)``, with at least 2 values per feature.

    Returns:
        The base code :math:`u = f^{-1}(x)` under the initialized parameters.

    Example:
        >>> import torch
        >>> layers = realnvp((1, 8, 8), num_layers=2, hidden=(4,), actnorm=True, num_scales=2)
        >>> u = initialize_actnorm(layers, 3 * torch.randn(16, 1, 8, 8) + 1)
        >>> u.shape, all(bool(m.initialized) for m in layers.modules() if isinstance(m, ActNorm))
        (torch.Size([16, 4, 4, 4]), True)
    """
    h = x
    for t in reversed(transform_parts(transforms)):
        if isinstance(t, ActNorm):
            t.initialize(h)  # log s = -log sigma, b = -mu / sigma: the forward map standardizes h
            log_s = t.log_scale.detach().clone()
            t.log_scale.data.copy_(-log_s)  # log sigma: the inverse map standardizes h
            t.bias.data.mul_(-torch.exp(-log_s))  # mu
            h = t.inv(h)
        elif isinstance(t, DiagonalScaling):
            t.initialize(h)  # log s = log std: the inverse map gives h unit spread
            h = t.inv(h)
        elif isinstance(t, FactorOut):
            kept, rest = t.parts(h)
            rest = initialize_actnorm(t.layers, rest)
            t.clear_cache()
            h = torch.cat([kept, rest], dim=t.dim)
        else:
            h = t.inv(h)
    return h


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
