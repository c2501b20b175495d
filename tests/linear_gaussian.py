"""The linear-Gaussian model shared by the tests that need an exact log-evidence and posterior.

z ~ N(0, I_k), x | z ~ N(W z + b, s^2 I_d): log p(x) = log N(x; b, W W^T + s^2 I) and
p(z | x) = N(Sigma W^T (x - b) / s^2, Sigma) with Sigma = (I + W^T W / s^2)^-1.
"""

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import MultivariateNormal


def linear_gaussian(k: int, d: int, s: float, n: int, seed: int = 0) -> dict:
    """W, b, n data points x, their exact log p(x), the posterior means ``post_loc`` and covariance ``post_cov``.

    Also returns the generator, so that a test can draw more numbers from the same stream.
    """
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, k, dtype=torch.float64, generator=g)
    b = torch.randn(d, dtype=torch.float64, generator=g)
    x = torch.randn(n, d, dtype=torch.float64, generator=g)
    marginal = MultivariateNormal(b, W @ W.T + s**2 * torch.eye(d, dtype=torch.float64))
    cov = torch.linalg.inv(torch.eye(k, dtype=torch.float64) + W.T @ W / s**2)
    loc = (x - b) @ W @ cov / s**2  # cov is symmetric
    return dict(W=W, b=b, x=x, s=s, log_px=marginal.log_prob(x), post_loc=loc, post_cov=cov, generator=g)


def make_model(lg: dict):
    """The model as a Pyro function of x, its sites in ``pyro.plate("data")``."""
    k = lg["W"].shape[1]

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(k, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ lg["W"].T + lg["b"], lg["s"]).to_event(1), obs=x)

    return model
