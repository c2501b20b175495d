"""The linear-Gaussian model, derived once for every test that needs an exact log-evidence and posterior.

z ~ N(0, I_k), x | z ~ N(W z + b, s^2 I_d): log p(x) = log N(x; b, W W^T + s^2 I) and
p(z | x) = N(Sigma W^T (x - b) / s^2, Sigma) with Sigma = (I + W^T W / s^2)^-1. The fixture
``linear_gaussian_model`` of ``tests/conftest.py`` hands out :meth:`LinearGaussian.random`.
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import MultivariateNormal


class LinearGaussian:
    """The model with weights ``W`` (d x k), offset ``b`` and noise ``s``; its exact evidence and posterior."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor, s: float):
        self.W, self.b, self.s = W, b, s
        d, k = W.shape
        self.precision = torch.eye(k, dtype=W.dtype) + W.T @ W / s**2  # of the posterior
        self.post_cov = torch.linalg.inv(self.precision)
        self.marginal = MultivariateNormal(b, W @ W.T + s**2 * torch.eye(d, dtype=W.dtype))

    @classmethod
    def random(cls, k: int, d: int, s: float, seed: int = 0, dtype: torch.dtype = torch.float64,
               generator: Optional[torch.Generator] = None) -> "LinearGaussian":
        """Standard-normal ``W`` and ``b``, drawn in that order from ``generator`` (or a new one seeded ``seed``)."""
        g = generator if generator is not None else torch.Generator().manual_seed(seed)
        W = torch.randn(d, k, dtype=dtype, generator=g)
        return cls(W, torch.randn(d, dtype=dtype, generator=g), s)

    @property
    def k(self) -> int:
        return self.W.shape[1]

    def log_evidence(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per data point."""
        return self.marginal.log_prob(x)

    def posterior_loc(self, x: torch.Tensor) -> torch.Tensor:
        """E[z | x] per data point (the covariance ``post_cov`` is the same for every x)."""
        return (x - self.b) @ self.W @ self.post_cov / self.s**2  # post_cov is symmetric

    def posterior(self, x: torch.Tensor) -> MultivariateNormal:
        return MultivariateNormal(self.posterior_loc(x), self.post_cov)

    def model(self, x: torch.Tensor) -> None:
        """The model as a Pyro function of x, its sites in ``pyro.plate("data")``."""
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.k, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.s).to_event(1), obs=x)

    def sample(self, n: int, seed: int) -> torch.Tensor:
        """n data points drawn from the model."""
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.k, dtype=self.W.dtype, generator=g)
        return z @ self.W.T + self.b + self.s * torch.randn(n, self.W.shape[0], dtype=self.W.dtype, generator=g)


def linear_gaussian(k: int, d: int, s: float, n: int, seed: int = 0) -> dict:
    """W, b, n data points x (standard normal, not from the model), their exact log p(x), the posterior means
    ``post_loc`` and covariance ``post_cov``, the :class:`LinearGaussian` as ``lg``.

    Also returns the generator, so that a test can draw more numbers from the same stream.
    """
    g = torch.Generator().manual_seed(seed)
    lg = LinearGaussian.random(k, d, s, generator=g)
    x = torch.randn(n, d, dtype=torch.float64, generator=g)
    return dict(W=lg.W, b=lg.b, x=x, s=s, log_px=lg.log_evidence(x), post_loc=lg.posterior_loc(x),
                post_cov=lg.post_cov, marginal=lg.marginal, lg=lg, generator=g)


def make_model(lg: dict):
    """The model of a :func:`linear_gaussian` dictionary as a Pyro function of x."""
    return lg["lg"].model
