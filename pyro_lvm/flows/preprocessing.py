"""Data pre-processing for flows on images: dequantization, the logit transform and bits per dimension."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.distributions import Transform, constraints

__all__ = ["Logit", "bits_per_dim", "dequantize"]


class Logit(Transform):
    r"""The RealNVP logit pre-processing of data in :math:`[0, 1]`, squeezed away from the boundary by ``alpha``.

    With :math:`p = \alpha + (1 - 2\alpha)\, x`:

    .. math::

        y = \operatorname{logit}(p) = \log p - \log(1 - p), \qquad
        x = \frac{\sigma(y) - \alpha}{1 - 2\alpha}, \qquad
        \log\left|\det J\right| = \sum_i \left[\log(1 - 2\alpha) - \log p_i - \log(1 - p_i)\right],

    the sum running over the ``event_dim`` rightmost dims. It is computed from :math:`y` as
    :math:`\log(1 - 2\alpha) + \operatorname{softplus}(y) + \operatorname{softplus}(-y)` for numerical
    stability. The domain is :math:`[0, 1]` per coordinate (with ``alpha = 0`` the endpoints map to
    :math:`\pm\infty`), the codomain the reals.

    References:
        Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017,
        https://arxiv.org/abs/1605.08803 (Section 4.1)

    Arguments:
        alpha: boundary margin in :math:`[0, 1/2)`; RealNVP uses 0.05 for CIFAR-10 and 1e-6 for MNIST.
        event_dim: number of rightmost dims forming one event (1: vectors, 3: images).
        cache_size: cache size of the transform (0 or 1).

    Example:
        >>> t = Logit(alpha=0.05, event_dim=1)
        >>> x = torch.rand(4, 3)
        >>> torch.allclose(t.inv(t(x)), x, atol=1e-5)
        True
    """

    bijective = True
    sign = +1

    def __init__(self, alpha: float = 0.05, event_dim: int = 1, cache_size: int = 0) -> None:
        super().__init__(cache_size=cache_size)
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"Logit needs 0 <= alpha < 0.5, got alpha={alpha!r}; RealNVP uses 0.05.")
        if not isinstance(event_dim, int) or event_dim < 0:
            raise ValueError(f"Logit needs a non-negative int event_dim, got {event_dim!r}.")
        self.alpha = float(alpha)
        self._event_dim = event_dim

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Logit) and (other.alpha, other._event_dim) == (self.alpha, self._event_dim)

    def __hash__(self) -> int:
        return hash((Logit, self.alpha, self._event_dim))

    @constraints.dependent_property(is_discrete=False)
    def domain(self) -> constraints.Constraint:
        return constraints.independent(constraints.unit_interval, self._event_dim)

    @constraints.dependent_property(is_discrete=False)
    def codomain(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, self._event_dim)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        p = self.alpha + (1.0 - 2.0 * self.alpha) * x
        return torch.log(p) - torch.log1p(-p)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(y) - self.alpha) / (1.0 - 2.0 * self.alpha)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # -log p - log(1 - p) = softplus(-y) + softplus(y) for y = logit(p)
        value = math.log1p(-2.0 * self.alpha) + F.softplus(y) + F.softplus(-y)
        if self._event_dim:
            value = value.sum(tuple(range(-self._event_dim, 0)))
        return value


def dequantize(
    x: torch.Tensor, num_levels: int = 256, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""Uniformly dequantize integer levels :math:`x \in \{0, \dots, K-1\}^D` to :math:`(x + u) / K \in [0, 1)^D`.

    With :math:`u \sim \mathcal{U}[0, 1)^D` and :math:`K` = ``num_levels``. Why this is the right thing to
    fit a density to: let :math:`p` be any density on :math:`[0, 1)^D` and define the discrete model
    :math:`P(x) = \int_{[0,1)^D} p((x + u)/K)\, K^{-D}\, du`, the mass :math:`p` puts on the cube of
    side :math:`1/K` at :math:`x/K` (the change of variables :math:`z = (x + u)/K` has Jacobian
    :math:`K^{-D}`). By Jensen's inequality

    .. math::

        \log P(x) \ge \mathbb{E}_{u}\left[\log p\!\left(\tfrac{x + u}{K}\right)\right] - D \log K ,

    so the average log-likelihood of the dequantized data (after adding :math:`-D\log K` for the
    rescaling by :math:`1/K`, see :func:`bits_per_dim`) lower-bounds the log-likelihood of the discrete
    data under :math:`P`; maximizing it cannot be gamed by putting spikes on the discrete points.

    References:
        Theis, van den Oord & Bethge, "A note on the evaluation of generative models", ICLR 2016,
        https://arxiv.org/abs/1511.01844

    Arguments:
        x: integer-valued tensor (``uint8`` or any integer/float dtype holding levels in ``[0, K-1]``).
        num_levels: number of levels :math:`K` (256 for 8-bit images).
        generator: optional :class:`torch.Generator` for the noise.

    Returns:
        A floating tensor of the same shape with values in :math:`[0, 1)` (the default float dtype,
        or ``x``'s dtype if it is already floating).

    Example:
        >>> x = torch.tensor([0, 128, 255], dtype=torch.uint8)
        >>> z = dequantize(x)
        >>> bool(((z * 256).floor() == x).all()), bool((z >= 0).all() and (z < 1).all())
        (True, True)
    """
    if num_levels < 2:
        raise ValueError(f"dequantize needs num_levels >= 2, got {num_levels!r}.")
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    xf = x.to(dtype)
    if xf.numel() and (xf.min() < 0 or xf.max() > num_levels - 1 or (xf != xf.round()).any()):
        raise ValueError(
            f"dequantize expects integer levels in [0, {num_levels - 1}], got values in "
            f"[{xf.min().item()}, {xf.max().item()}]; pass raw levels (e.g. uint8 pixels), not data "
            "already scaled to [0, 1], or set num_levels."
        )
    u = torch.rand(x.shape, generator=generator, dtype=dtype, device=x.device)
    # (x + u) / K can round up to exactly 1 in low precision for u close to 1: keep it in [0, 1).
    z = (xf + u) / num_levels
    return torch.minimum(z, torch.nextafter(torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype)))


def bits_per_dim(
    log_prob: torch.Tensor | float, num_dims: int, num_levels: int = 256
) -> torch.Tensor | float:
    r"""Bits per dimension of discrete data from the log-density (in nats) of its dequantized version.

    For data with :math:`D` = ``num_dims`` dims and :math:`K` = ``num_levels`` levels, scaled to
    :math:`[0, 1)` by :math:`1/K` (see :func:`dequantize`), whose density there is ``log_prob``:

    .. math::

        \text{bits/dim} = -\frac{\log p(z) - D \log K}{D \log 2},

    the :math:`-D\log K` undoing the :math:`1/K` rescaling so that the density is that of data on the
    integer scale (unit-volume bins). A uniform density on :math:`[0,1)^D` gives :math:`\log_2 K`
    (8 bits/dim for 8-bit data). Lower is better.

    Arguments:
        log_prob: log-density in nats of the scaled data (tensor of any shape, or a float).
        num_dims: number of dims :math:`D` of one example (e.g. :math:`C H W`).
        num_levels: number of levels :math:`K` of the discrete data.

    Example:
        >>> bits_per_dim(0.0, num_dims=784)
        8.0
    """
    if num_dims < 1 or num_levels < 2:
        raise ValueError(
            f"bits_per_dim needs num_dims >= 1 and num_levels >= 2, got num_dims={num_dims!r}, "
            f"num_levels={num_levels!r}."
        )
    return -(log_prob - num_dims * math.log(num_levels)) / (num_dims * math.log(2.0))
