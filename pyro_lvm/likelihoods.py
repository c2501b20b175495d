"""Observation models p(x | z): heads that turn a decoder's output into a distribution."""

from __future__ import annotations

import math
from typing import Literal, Sequence, Union

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import softplus

__all__ = ["Likelihood", "BernoulliLikelihood", "GaussianLikelihood", "make_likelihood"]


class Likelihood(nn.Module):
    """Base class of observation models.

    A likelihood maps the decoder's flat output ``h`` of shape ``(..., D)`` to a
    distribution over ``x`` with ``event_shape`` equal to the data's shape, and
    checks that data lie in its support before any work is done.

    Arguments:
        event_shape: the shape of one data point, e.g. ``(784,)`` or ``(1, 28, 28)``.
    """

    def __init__(self, event_shape: Union[int, Sequence[int]]):
        super().__init__()
        self.event_shape = torch.Size(
            [event_shape] if isinstance(event_shape, int) else event_shape
        )
        self.data_dim = math.prod(self.event_shape)

    def _unflatten(self, h: torch.Tensor) -> torch.Tensor:
        return h.reshape(h.shape[:-1] + self.event_shape)

    def forward(self, h: torch.Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    def mean(self, h: torch.Tensor) -> torch.Tensor:
        """E[x | z] for decoder output ``h``."""
        raise NotImplementedError

    def check(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming the problem if ``x`` cannot be scored.

        One pass over the batch (and one host sync); details are computed only on failure.
        """
        self._check_shape(x)
        if not torch.isfinite(x).all():
            self._raise_not_finite(x)

    def _check_shape(self, x: torch.Tensor) -> None:
        if x.shape[-len(self.event_shape) :] != self.event_shape:
            raise ValueError(
                f"{type(self).__name__} expects data of shape (batch, "
                f"{', '.join(map(str, self.event_shape))}); got {tuple(x.shape)}. "
                "Set the model's data_shape to match the data, or flatten the data."
            )

    @staticmethod
    def _raise_not_finite(x: torch.Tensor) -> None:
        bad = ~torch.isfinite(x)
        raise ValueError(
            f"Data contain {int(bad.sum())} NaN/inf values (first at index "
            f"{tuple(bad.nonzero()[0].tolist())}). Clean or impute them before training."
        )


class BernoulliLikelihood(Likelihood):
    """Independent Bernoulli pixels, ``p(x | z) = prod_d Bern(x_d | sigmoid(h_d))``.

    The decoder emits logits; the log-probability is the (numerically stable)
    negative binary cross-entropy. Data must be binary: binarize grey levels
    (statically or dynamically, see :mod:`pyro_lvm.data`) or use a Gaussian.

    Example:
        >>> lik = BernoulliLikelihood(3)
        >>> lik(torch.zeros(2, 3)).log_prob(torch.ones(2, 3))
        tensor([-2.0794, -2.0794])
    """

    def forward(self, h: torch.Tensor) -> dist.TorchDistribution:
        return dist.Bernoulli(logits=self._unflatten(h)).to_event(len(self.event_shape))

    def mean(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self._unflatten(h))

    def check(self, x: torch.Tensor) -> None:
        self._check_shape(x)
        if ((x == 0) | (x == 1)).all():
            return
        if not torch.isfinite(x).all():
            self._raise_not_finite(x)
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise ValueError(
                f"Bernoulli likelihood needs data in [0, 1]; got min={lo:.4g}, max={hi:.4g}. "
                "Use likelihood='gaussian' or rescale the data."
            )
        raise ValueError(
            "Bernoulli likelihood needs binary data (0 or 1); got grey levels in "
            f"[{lo:.4g}, {hi:.4g}]. Binarize the data (binarize='dynamic' or 'static' "
            "in the data module) or use likelihood='gaussian'."
        )


class GaussianLikelihood(Likelihood):
    """Independent Gaussian pixels, ``p(x | z) = prod_d N(x_d | h_d, sigma_d^2)``.

    Arguments:
        event_shape: the shape of one data point.
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
        event_shape: Union[int, Sequence[int]],
        scale: Union[float, Literal["learned"]] = "learned",
        min_scale: float = 1e-3,
    ):
        super().__init__(event_shape)
        self.min_scale = min_scale
        if scale == "learned":
            # softplus^-1(1 - min_scale): start at sigma = 1
            init = math.log(math.expm1(1.0 - min_scale))
            self.raw_scale = nn.Parameter(torch.full((self.data_dim,), init))
        elif isinstance(scale, (int, float)) and scale > 0:
            self.register_buffer("fixed_scale", torch.tensor(float(scale)))
        else:
            raise ValueError(
                f"Gaussian likelihood scale must be a positive float or 'learned'; got {scale!r}."
            )

    @property
    def scale(self) -> torch.Tensor:
        """The observation standard deviation ``sigma`` (per dimension if learned)."""
        if hasattr(self, "raw_scale"):
            return self._unflatten(softplus(self.raw_scale) + self.min_scale)
        return self.fixed_scale

    def forward(self, h: torch.Tensor) -> dist.TorchDistribution:
        loc = self._unflatten(h)
        return dist.Normal(loc, self.scale.expand_as(loc)).to_event(len(self.event_shape))

    def mean(self, h: torch.Tensor) -> torch.Tensor:
        return self._unflatten(h)


def make_likelihood(
    name: str,
    event_shape: Union[int, Sequence[int]],
    scale: Union[float, Literal["learned"]] = "learned",
) -> Likelihood:
    """Build a likelihood by name: ``"bernoulli"`` or ``"gaussian"``.

    Example:
        >>> make_likelihood("gaussian", 4, scale=0.1).scale
        tensor(0.1000)
    """
    if name == "bernoulli":
        return BernoulliLikelihood(event_shape)
    if name == "gaussian":
        return GaussianLikelihood(event_shape, scale=scale)
    raise ValueError(f"Unknown likelihood {name!r}; choose 'bernoulli' or 'gaussian'.")
