"""Gaussian pixels with a fixed or learned scale."""

from __future__ import annotations

import math
from typing import Literal, Sequence, Union

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import softplus

from ..ops import normal_log_prob

from .base import Likelihood, plain_shape

__all__ = ["GaussianLikelihood"]


class GaussianLikelihood(Likelihood):
    """Independent Gaussian pixels, ``p(x | z) = prod_d N(x_d | h_d, sigma_d^2)``.

    Arguments:
        event_shape: the shape of one data point, or ``None`` for the model to bind (a learned
            scale's parameters are created then).
        scale: a fixed standard deviation ``sigma`` (a float), or ``"learned"`` for
            one learned ``sigma_d`` per dimension (softplus-parameterized, floored
            at ``min_scale`` so the likelihood cannot collapse onto a point).
        min_scale: floor of a learned scale.

    Example:
        >>> lik = GaussianLikelihood(2, scale=1.0)
        >>> lik(torch.zeros(1, 2)).log_prob(torch.zeros(1, 2))
        tensor([-1.8379])
    """

    def __init__(
        self,
        event_shape: Union[None, int, Sequence[int]] = None,
        scale: Union[float, Literal["learned"]] = "learned",
        min_scale: float = 1e-3,
    ):
        super().__init__()
        self.min_scale = min_scale
        self.learned = isinstance(scale, str) and scale == "learned"
        if not self.learned:
            if isinstance(scale, (int, float)) and scale > 0:
                self.register_buffer("fixed_scale", torch.tensor(float(scale)))
            else:
                raise ValueError(
                    f"Gaussian likelihood scale must be a positive float or 'learned'; got {scale!r}."
                )
        self._config = {"event_shape": plain_shape(event_shape), "scale": scale, "min_scale": min_scale}
        if event_shape is not None:
            self.bind(event_shape)

    def _on_bind(self) -> None:
        if self.learned:
            # softplus^-1(1 - min_scale): start at sigma = 1
            init = math.log(math.expm1(1.0 - self.min_scale))
            self.raw_scale = nn.Parameter(torch.full((self.data_dim,), init))

    @property
    def scale(self) -> torch.Tensor:
        """The observation standard deviation ``sigma`` (per dimension if learned)."""
        if self.learned:
            shape = self._require_bound()
            return (softplus(self.raw_scale) + self.min_scale).reshape(shape)
        return self.fixed_scale

    def forward(self, h: torch.Tensor) -> dist.TorchDistribution:
        loc = self._unflatten(h)
        return dist.Normal(loc, self.scale.expand_as(loc)).to_event(len(self.event_shape))

    def mean(self, h: torch.Tensor) -> torch.Tensor:
        return self._unflatten(h)

    def log_density(self, h: torch.Tensor, x: torch.Tensor, reduce: bool = False) -> torch.Tensor:
        r""":math:`\log \mathcal N(x_d; h_d, \sigma_d^2)` per coordinate (:func:`pyro_lvm.ops.normal_log_prob`).

        Example:
            >>> lik = GaussianLikelihood(3, scale=0.5)
            >>> h, x = torch.randn(2, 3), torch.randn(2, 3)
            >>> bool(torch.allclose(lik.log_density(h, x).sum(-1), lik(h).log_prob(x)))
            True
        """
        log_p = normal_log_prob(x, self._unflatten(h), self.scale)
        return log_p.sum() if reduce else log_p


# ----- 8-bit data: likelihoods over the grid {0, 1/(L-1), ..., 1} ------------------------------------

#: how far (in levels, i.e. in units of the grid's step) a value may lie from the grid k / (L - 1)
