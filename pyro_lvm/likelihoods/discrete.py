"""8-bit pixels on the grid k / (levels - 1): a discretized logistic mixture and a categorical over the levels."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import pyro.distributions as dist
import torch
from torch.distributions import constraints
from torch.nn.functional import log_softmax, logsigmoid, softplus


from .base import Likelihood, plain_shape

__all__ = ["DiscretizedLogisticMixtureLikelihood", "CategoricalLikelihood", "DiscretizedLogisticMixture",
           "GridCategorical"]

GRID_TOLERANCE = 1e-4

#: PixelCNN++'s floor of the logistics' log-scales (on its [-1, 1] scale of the data)
MIN_LOG_SCALE = -7.0


class _Grid(constraints.Constraint):
    """The values ``k / (levels - 1)``, ``k = 0, ..., levels - 1``, to :data:`GRID_TOLERANCE` levels."""

    is_discrete = True
    event_dim = 0

    def __init__(self, levels: int):
        self.levels = levels
        super().__init__()

    def check(self, value: torch.Tensor) -> torch.Tensor:
        k = value * (self.levels - 1)
        return (value >= 0) & (value <= 1) & ((k - k.round()).abs() <= GRID_TOLERANCE)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(levels={self.levels})"


def _grid(levels: int, like: torch.Tensor) -> torch.Tensor:
    """The ``levels`` values ``k / (levels - 1)``, of ``like``'s dtype and device."""
    return torch.arange(levels, dtype=like.dtype, device=like.device) / (levels - 1)


def _checked_levels(levels: Any, owner: str) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(
            f"{owner} needs levels, the number of values of the data (256 for 8-bit pixels), an int >= 2; "
            f"got {levels!r}."
        )
    return levels


def _log_expm1(log_d: torch.Tensor) -> torch.Tensor:
    r""":math:`\log(e^d - 1)` from :math:`\log d`, accurate for every :math:`d > 0` (no overflow, no underflow).

    Small :math:`d`: :math:`\log d + d/2 + d^2/24` (error below :math:`d^4/2880`); large: :math:`d + \log(1 - e^{-d})`.
    Each branch is evaluated at a clamped argument, so that the unused ones stay finite (and their gradients zero).
    """
    d = torch.exp(log_d)
    small, large = d < 1e-2, d > 20.0
    d_small, d_mid, d_large = d.clamp(max=1e-2), d.clamp(1e-2, 20.0), d.clamp(min=20.0)
    return torch.where(
        small,
        log_d + d_small / 2 + d_small * d_small / 24,
        torch.where(large, d_large + torch.log1p(-torch.exp(-d_large)), torch.log(torch.expm1(d_mid))),
    )


def _logistic_bin_log_prob(
    value: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor, levels: int
) -> torch.Tensor:
    r"""Log-probability of the bin of ``value`` (on the grid of ``levels`` values in [0, 1]) under a logistic.

    On PixelCNN++'s scale :math:`y = 2x - 1`, the bin of level :math:`k` is :math:`[y_k - b, y_k + b)` with
    :math:`b = 1/(L-1)`, the first and last ones extended to :math:`\mp\infty`. With
    :math:`a = (y_k + b - \mu)/s`, :math:`c = (y_k - b - \mu)/s` and :math:`a - c = 2b/s`,

    .. math::

        \log\big(\sigma(a) - \sigma(c)\big) = \log\sigma(c) + \log\sigma(-a) + \log\big(e^{2b/s} - 1\big),

    an identity whose three terms are each accurate in floating point (:func:`_log_expm1` takes
    :math:`\log(2b/s) = \log 2b - \log s`), so no density approximation is needed in the tails.
    """
    y = 2 * value - 1
    half = 1.0 / (levels - 1)
    inv_scale = torch.exp(-log_scale)
    upper = (y - loc + half) * inv_scale
    lower = (y - loc - half) * inv_scale
    interior = logsigmoid(lower) + logsigmoid(-upper) + _log_expm1(math.log(2 * half) - log_scale)
    level = value * (levels - 1)
    return torch.where(level < 0.5, logsigmoid(upper), torch.where(level > levels - 1.5, logsigmoid(-lower), interior))


def _logistic_mixture_log_prob(
    value: torch.Tensor, logits: torch.Tensor, locs: torch.Tensor, log_scales: torch.Tensor, levels: int, dim: int
) -> torch.Tensor:
    """log p(value) of the discretized mixture whose components lie along ``dim`` (``value`` has size 1 there)."""
    log_probs = _logistic_bin_log_prob(value, locs, log_scales.clamp(min=MIN_LOG_SCALE), levels)
    return torch.logsumexp(log_probs + log_softmax(logits, dim=dim), dim=dim)


def _censored_logistic_mean(loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    r""":math:`\mathbb E[(\operatorname{clamp}(Y, -1, 1) + 1)/2]` for :math:`Y` logistic(:math:`\mu, s`): the data scale's [0, 1].

    :math:`\int_{-1}^{1} P(Y > t)\,dt / 2 = \tfrac{s}{2}\big(\operatorname{softplus}(A) - \operatorname{softplus}(B)\big)`
    with :math:`A = (\mu + 1)/s`, :math:`B = (\mu - 1)/s`; for broad logistics (:math:`A - B = 2/s \le 20`) the
    difference is taken as :math:`\log(1 + \sigma(B)(e^{A - B} - 1))`, which does not cancel.
    """
    log_scale = log_scale.clamp(MIN_LOG_SCALE, 60.0)
    scale = torch.exp(log_scale)
    a, b = (loc + 1) / scale, (loc - 1) / scale
    width = 2 / scale
    broad = width <= 20.0
    gap_broad = torch.log1p(torch.sigmoid(b) * torch.expm1(width.clamp(max=20.0)))
    gap = torch.where(broad, gap_broad, softplus(a) - softplus(b))
    return (scale / 2 * gap).clamp(0.0, 1.0)


def _check_grid(lik: Likelihood, x: torch.Tensor, levels: int) -> None:
    """Raise a ``ValueError`` unless ``x`` has the likelihood's shape and lies on the grid ``k / (levels - 1)``."""
    lik._check_shape(x)
    if not torch.isfinite(x).all():
        lik._raise_not_finite(x)
    k = x * (levels - 1)
    off = (k - k.round()).abs()
    if not bool(((x < 0) | (x > 1) | (off > GRID_TOLERANCE)).any()):
        return
    name = type(lik).__name__
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ValueError(
            f"{name} needs data in [0, 1] on the grid k/{levels - 1}; got min={lo:.4g}, max={hi:.4g}. Rescale the "
            f"data to [0, 1] (e.g. divide 8-bit pixels by 255, as MNISTDataModule(binarize='none') serves them)."
        )
    first = tuple((off > GRID_TOLERANCE).nonzero()[0].tolist())
    raise ValueError(
        f"{name}(levels={levels}) needs data on the grid k/{levels - 1}, k = 0..{levels - 1} (8-bit pixels / 255 for "
        f"levels=256); the value {float(x[first]):.6g} at index {first} is {float(off[first]):.3g} levels off it "
        f"(up to {float(off.max()):.3g}). Set levels to the data's number of values (e.g. levels=17 for the 8x8 "
        "digits, k/16), or for continuous data use likelihood='continuous_bernoulli' or 'gaussian'."
    )


class DiscretizedLogisticMixture(dist.TorchDistribution):
    r"""A mixture of logistics discretized to the grid :math:`\{0, \tfrac1{L-1}, \dots, 1\}`, one value per batch element.

    PixelCNN++'s distribution of a pixel (Salimans et al. 2017). On the scale :math:`y = 2x - 1 \in [-1, 1]`
    of the data :math:`x`, component :math:`m` is a logistic with location :math:`\mu_m` and scale
    :math:`s_m = e^{\ell_m}` (:math:`\ell_m` floored at :data:`MIN_LOG_SCALE` = -7), weighted by
    :math:`\pi = \operatorname{softmax}(\text{logits})`, and level :math:`k` gets the mass of its bin
    :math:`[y_k - b, y_k + b)`, :math:`b = 1/(L-1)`, the first and last bins extended to :math:`\mp\infty`:

    .. math::

        P(x = \tfrac{k}{L-1}) = \sum_m \pi_m \big(F_m(y_k + b) - F_m(y_k - b)\big), \qquad
        F_m(t) = \sigma\big((t - \mu_m)/s_m\big),

    with :math:`F_m(y_0 - b) = 0` and :math:`F_m(y_{L-1} + b) = 1`. The differences are taken in log space by
    an exact identity (see :func:`_logistic_bin_log_prob`), accurate where PixelCNN++ falls back on the density.

    Arguments:
        logits: mixture logits, shape ``(*batch_shape, M)``.
        locs: the components' locations on the [-1, 1] scale, ``(*batch_shape, M)``.
        log_scales: their log-scales on that scale, ``(*batch_shape, M)``.
        levels: the number :math:`L` of values.

    Example:
        >>> d = DiscretizedLogisticMixture(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), levels=4)
        >>> d.batch_shape, d.event_shape, d.support
        (torch.Size([2]), torch.Size([]), _Grid(levels=4))
        >>> d.log_prob(torch.tensor([0.0, 1 / 3])).exp()  # y = 2x - 1, bins of half-width 1/3: F(-2/3), F(0) - F(-2/3)
        tensor([0.3392, 0.1608])
        >>> d.enumerate_support(expand=False).flatten()
        tensor([0.0000, 0.3333, 0.6667, 1.0000])
    """

    arg_constraints = {
        "logits": constraints.independent(constraints.real, 1),
        "locs": constraints.independent(constraints.real, 1),
        "log_scales": constraints.independent(constraints.real, 1),
    }
    has_enumerate_support = True

    def __init__(
        self,
        logits: torch.Tensor,
        locs: torch.Tensor,
        log_scales: torch.Tensor,
        levels: int = 256,
        validate_args: Optional[bool] = None,
    ):
        self.levels = _checked_levels(levels, type(self).__name__)
        self.logits, self.locs, self.log_scales = torch.broadcast_tensors(logits, locs, log_scales)
        super().__init__(self.logits.shape[:-1], validate_args=validate_args)

    @property
    def num_components(self) -> int:
        return self.logits.shape[-1]

    @property
    def support(self) -> constraints.Constraint:
        return _Grid(self.levels)

    def expand(self, batch_shape: torch.Size, _instance=None) -> "DiscretizedLogisticMixture":
        new = self._get_checked_instance(DiscretizedLogisticMixture, _instance)
        batch_shape = torch.Size(batch_shape)
        shape = batch_shape + (self.num_components,)
        new.levels = self.levels
        new.logits, new.locs, new.log_scales = (t.expand(shape) for t in (self.logits, self.locs, self.log_scales))
        super(DiscretizedLogisticMixture, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return _logistic_mixture_log_prob(
            value.unsqueeze(-1), self.logits, self.locs, self.log_scales, self.levels, dim=-1
        )

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """A component, then a logistic draw from it, clamped to [-1, 1] and rounded to the grid."""
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            component = dist.Categorical(logits=self.logits).sample(sample_shape).unsqueeze(-1)
            full = shape + (self.num_components,)
            loc = self.locs.expand(full).gather(-1, component).squeeze(-1)
            log_scale = self.log_scales.clamp(min=MIN_LOG_SCALE).expand(full).gather(-1, component).squeeze(-1)
            u = torch.rand(shape, dtype=loc.dtype, device=loc.device)
            y = (loc + log_scale.exp() * torch.logit(u)).clamp(-1.0, 1.0)  # u = 0 gives -inf: the first bin
            return torch.round((y + 1) / 2 * (self.levels - 1)) / (self.levels - 1)

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        values = _grid(self.levels, self.locs).reshape((-1,) + (1,) * len(self.batch_shape))
        return values.expand((-1,) + self.batch_shape) if expand else values

    @property
    def probs(self) -> torch.Tensor:
        """The probabilities of the ``levels`` values, shape ``(*batch_shape, levels)`` (sums to 1)."""
        return self.log_prob(self.enumerate_support(expand=False)).exp().movedim(0, -1)

    @property
    def mean(self) -> torch.Tensor:
        """The exact :math:`\\mathbb E[x] = \\sum_k P(k)\\, k/(L-1)`, a sum over the ``levels`` values."""
        return (self.probs * _grid(self.levels, self.locs)).sum(-1)

    @property
    def variance(self) -> torch.Tensor:
        grid = _grid(self.levels, self.locs)
        probs = self.probs
        mean = (probs * grid).sum(-1, keepdim=True)
        return (probs * (grid - mean) ** 2).sum(-1)


class GridCategorical(dist.TorchDistribution):
    r"""A categorical over the grid :math:`\{0, \tfrac1{L-1}, \dots, 1\}`: :math:`P(x = \tfrac{k}{L-1}) = \operatorname{softmax}(\text{logits})_k`.

    :class:`pyro.distributions.Categorical` with values on the data's [0, 1] scale instead of the
    indices :math:`k`: :meth:`log_prob` scores a value by its level :math:`\operatorname{round}(x (L - 1))`,
    :meth:`sample` returns :math:`k / (L - 1)`.

    Arguments:
        logits: unnormalized log-probabilities of the ``levels`` values, shape ``(*batch_shape, levels)``.

    Example:
        >>> d = GridCategorical(torch.log(torch.tensor([0.5, 0.25, 0.25])))
        >>> d.levels, d.mean, d.log_prob(torch.tensor(0.5)).exp()
        (3, tensor(0.3750), tensor(0.2500))
    """

    arg_constraints = {"logits": constraints.independent(constraints.real, 1)}
    has_enumerate_support = True

    def __init__(self, logits: torch.Tensor, validate_args: Optional[bool] = None):
        if logits.dim() < 1 or logits.shape[-1] < 2:
            raise ValueError(f"GridCategorical needs logits of shape (..., levels) with levels >= 2; got {tuple(logits.shape)}.")
        self.logits = logits - logits.logsumexp(-1, keepdim=True)
        super().__init__(logits.shape[:-1], validate_args=validate_args)

    @property
    def levels(self) -> int:
        return self.logits.shape[-1]

    @property
    def support(self) -> constraints.Constraint:
        return _Grid(self.levels)

    @property
    def probs(self) -> torch.Tensor:
        return self.logits.exp()

    def expand(self, batch_shape: torch.Size, _instance=None) -> "GridCategorical":
        new = self._get_checked_instance(GridCategorical, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logits = self.logits.expand(batch_shape + (self.levels,))
        super(GridCategorical, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        index = torch.round(value * (self.levels - 1)).long().clamp(0, self.levels - 1).unsqueeze(-1)
        index, logits = torch.broadcast_tensors(index, self.logits)
        return logits.gather(-1, index[..., :1]).squeeze(-1)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            index = dist.Categorical(logits=self.logits).sample(sample_shape)
            return index.to(self.logits.dtype) / (self.levels - 1)

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        values = _grid(self.levels, self.logits).reshape((-1,) + (1,) * len(self.batch_shape))
        return values.expand((-1,) + self.batch_shape) if expand else values

    @property
    def mean(self) -> torch.Tensor:
        return (self.probs * _grid(self.levels, self.logits)).sum(-1)

    @property
    def variance(self) -> torch.Tensor:
        grid = _grid(self.levels, self.logits)
        return (self.probs * (grid - self.mean.unsqueeze(-1)) ** 2).sum(-1)


class DiscretizedLogisticMixtureLikelihood(Likelihood):
    r"""Independent pixels, each a mixture of discretized logistics over 8-bit levels (PixelCNN++'s likelihood).

    For data on the grid :math:`x \in \{0, \tfrac1{L-1}, \dots, 1\}` (8-bit pixels divided by 255, as
    :class:`pyro_lvm.data.MNISTDataModule` serves them with ``binarize="none"``), every pixel is an
    independent :class:`DiscretizedLogisticMixture` of :math:`M` = ``num_components`` logistics
    (Salimans et al. 2017, without their autoregression over colour channels):

    .. math::

        p(x \mid z) = \prod_d \sum_{m=1}^M \pi_{dm} \big(F_{dm}(y_d + b) - F_{dm}(y_d - b)\big),
        \qquad F_{dm}(t) = \sigma\Big(\frac{t - \mu_{dm}}{e^{\ell_{dm}}}\Big),

    on the scale :math:`y = 2x - 1 \in [-1, 1]` with half-bin :math:`b = 1/(L-1)`, the first and last bins
    extended to :math:`\mp\infty`. The decoder gives :math:`3M` numbers per pixel (:attr:`params_per_value`),
    read as ``(..., 3M, *event_shape)`` (:meth:`~Likelihood.param_groups`): the :math:`M` mixture logits,
    the :math:`M` locations :math:`\mu` **on the [-1, 1] scale** (as in PixelCNN++: the decoder's 0 is
    mid-grey) and the :math:`M` log-scales :math:`\ell` on that scale, floored at -7 as in PixelCNN++.

    :meth:`mean` is the mean of the mixture of logistics censored to [-1, 1] (clamped, then mapped to
    [0, 1]), in closed form per component,
    :math:`\tfrac{s}{2}\big(\operatorname{softplus}(\tfrac{\mu + 1}{s}) - \operatorname{softplus}(\tfrac{\mu - 1}{s})\big)`:
    it lies in [0, 1] and within half a level (:math:`\tfrac{1}{2(L-1)}`) of the discretized distribution's
    exact :math:`\mathbb E[x]`, which ``self(h).base_dist.mean`` computes by summing over the :math:`L` levels
    (:math:`L` times the memory).

    References:
        PixelCNN++: Improving the PixelCNN with Discretized Logistic Mixture Likelihood and Other
        Modifications (Salimans, Karpathy, Chen & Kingma, 2017), https://arxiv.org/abs/1701.05517

    Arguments:
        event_shape: the shape of one data point, or ``None`` for the model to bind.
        num_components: the number :math:`M` of logistics per pixel.
        levels: the number :math:`L` of values of the data (256 for 8-bit pixels).

    Example:
        >>> lik = DiscretizedLogisticMixtureLikelihood(3, num_components=2)
        >>> lik.output_dim  # 3 * 2 numbers per pixel
        18
        >>> h, x = torch.randn(4, 18), torch.randint(0, 256, (4, 3)) / 255
        >>> bool(torch.allclose(lik.log_density(h, x).sum(-1), lik(h).log_prob(x)))
        True
        >>> lik(h).sample().shape, bool(((lik.mean(h) >= 0) & (lik.mean(h) <= 1)).all())
        (torch.Size([4, 3]), True)
        >>> lik.check(torch.full((1, 3), 0.5))  # 0.5 is 127.5 / 255, not a level
        Traceback (most recent call last):
        ...
        ValueError: DiscretizedLogisticMixtureLikelihood(levels=256) needs data on the grid k/255, ...
    """

    def __init__(
        self,
        event_shape: Union[None, int, Sequence[int]] = None,
        num_components: int = 5,
        levels: int = 256,
    ):
        if isinstance(num_components, bool) or not isinstance(num_components, int) or num_components < 1:
            raise ValueError(f"num_components must be a positive integer; got {num_components!r}.")
        levels = _checked_levels(levels, type(self).__name__)
        super().__init__()
        self.num_components = num_components
        self.levels = levels
        self.params_per_value = 3 * num_components
        self._config = {"event_shape": plain_shape(event_shape), "num_components": num_components, "levels": levels}
        if event_shape is not None:
            self.bind(event_shape)

    def _parts(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, locations and log-scales, each ``(..., M, *event_shape)``."""
        return self.param_groups(h).split(self.num_components, dim=-len(self.event_shape) - 1)

    def forward(self, h: torch.Tensor) -> dist.TorchDistribution:
        dim = -len(self._require_bound()) - 1
        logits, locs, log_scales = (t.movedim(dim, -1) for t in self._parts(h))
        return DiscretizedLogisticMixture(logits, locs, log_scales, levels=self.levels).to_event(len(self.event_shape))

    def mean(self, h: torch.Tensor) -> torch.Tensor:
        logits, locs, log_scales = self._parts(h)
        dim = -len(self.event_shape) - 1
        return (torch.softmax(logits, dim=dim) * _censored_logistic_mean(locs, log_scales)).sum(dim).clamp(0.0, 1.0)

    def log_density(self, h: torch.Tensor, x: torch.Tensor, reduce: bool = False) -> torch.Tensor:
        r""":math:`\log \sum_m \pi_m (F_m(y + b) - F_m(y - b))` per pixel, the components along the parameter axis."""
        logits, locs, log_scales = self._parts(h)
        dim = -len(self.event_shape) - 1
        value = _logistic_mixture_log_prob(x.unsqueeze(dim), logits, locs, log_scales, self.levels, dim=dim)
        return value.sum() if reduce else value

    def check(self, x: torch.Tensor) -> None:
        _check_grid(self, x, self.levels)


class CategoricalLikelihood(Likelihood):
    r"""Independent pixels, each a categorical over the :math:`L` levels of 8-bit data (as PixelRNN's softmax).

    For data on the grid :math:`x \in \{0, \tfrac1{L-1}, \dots, 1\}` (8-bit pixels divided by 255, as
    :class:`pyro_lvm.data.MNISTDataModule` serves them with ``binarize="none"``),

    .. math::

        p(x \mid z) = \prod_d \operatorname{softmax}(h_{\cdot d})_{k_d}, \qquad k_d = \operatorname{round}\big(x_d (L - 1)\big),

    with :math:`L` logits per pixel from the decoder (:attr:`params_per_value` = ``levels``), read as
    ``(..., L, *event_shape)``. :meth:`mean` is :math:`\sum_k p_k\, k/(L-1)`; draws lie on the grid. No order
    of the levels is assumed, so the decoder is large: an MLP decoder for 28x28 images ends in
    :math:`256 \times 784 = 200{,}704` outputs (a 512-unit last hidden layer makes that layer 103 million
    weights); a convolutional decoder's last layer has :math:`256 C` channels.
    :class:`DiscretizedLogisticMixtureLikelihood` needs 15 numbers per pixel for 5 components.

    References:
        Pixel Recurrent Neural Networks (van den Oord, Kalchbrenner & Kavukcuoglu, 2016),
        https://arxiv.org/abs/1601.06759

    Arguments:
        event_shape: the shape of one data point, or ``None`` for the model to bind.
        levels: the number :math:`L` of values of the data (256 for 8-bit pixels).

    Example:
        >>> lik = CategoricalLikelihood(2, levels=4)
        >>> h = torch.zeros(1, 8)  # 4 logits for each of 2 pixels: uniform
        >>> lik(h).log_prob(torch.tensor([[0.0, 1.0]])), lik.mean(h)
        (tensor([-2.7726]), tensor([[0.5000, 0.5000]]))
        >>> bool(torch.allclose(lik.log_density(h, torch.tensor([[1 / 3, 2 / 3]])).sum(-1), torch.tensor(-2.7726)))
        True
    """

    def __init__(self, event_shape: Union[None, int, Sequence[int]] = None, levels: int = 256):
        levels = _checked_levels(levels, type(self).__name__)
        super().__init__()
        self.levels = levels
        self.params_per_value = levels
        self._config = {"event_shape": plain_shape(event_shape), "levels": levels}
        if event_shape is not None:
            self.bind(event_shape)

    def forward(self, h: torch.Tensor) -> dist.TorchDistribution:
        dim = -len(self._require_bound()) - 1
        return GridCategorical(self.param_groups(h).movedim(dim, -1)).to_event(len(self.event_shape))

    def mean(self, h: torch.Tensor) -> torch.Tensor:
        groups = self.param_groups(h)
        dim = -len(self.event_shape) - 1
        grid = _grid(self.levels, groups).reshape((-1,) + (1,) * len(self.event_shape))
        return (torch.softmax(groups, dim=dim) * grid).sum(dim)

    def log_density(self, h: torch.Tensor, x: torch.Tensor, reduce: bool = False) -> torch.Tensor:
        r""":math:`\log \operatorname{softmax}(h_{\cdot d})_{k_d}` per pixel, :math:`k_d = \operatorname{round}(x_d (L - 1))`."""
        groups = self.param_groups(h)
        dim = -len(self.event_shape) - 1
        index = torch.round(x * (self.levels - 1)).long().clamp(0, self.levels - 1).unsqueeze(dim)
        shape = torch.broadcast_shapes(index.shape, groups.shape[:dim] + (1,) + groups.shape[dim + 1:])
        value = log_softmax(groups, dim=dim).expand(shape[:dim] + groups.shape[dim:dim + 1] + shape[dim + 1:])
        value = value.gather(dim, index.expand(shape)).squeeze(dim)
        return value.sum() if reduce else value

    def check(self, x: torch.Tensor) -> None:
        _check_grid(self, x, self.levels)


#: the likelihoods a model's ``likelihood`` argument may name (:func:`make_likelihood`)
