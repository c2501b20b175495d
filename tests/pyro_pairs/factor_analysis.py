"""Bayesian factor analysis, as a Pyro user writes it: global loadings under ``AutoNormal``, local factors amortized.

x_i = W z_i + b + eps_i, with W ~ N(0, 1) (global), z_i ~ N(0, I) (local), eps_i ~ N(0, sigma^2 I). The guide calls
an ``AutoNormal`` of the model blocked to the global site ``W`` (as Pyro's tutorials compose an autoguide into a
hand-written guide), then draws the local factors from an amortized Gaussian q(z_i | x_i) of an encoder. The data
plate declares the training set's size (``num_data``) and scales a batch up to it, as Pyro's subsampling does, so
that a minibatch ELBO is unbiased.
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer.autoguide import AutoNormal
from torch import nn


class FactorAnalysis(nn.Module):
    def __init__(self, x_dim: int = 6, z_dim: int = 2, num_data: int = 0, noise: float = 0.5):
        super().__init__()
        self.x_dim, self.z_dim, self.num_data, self.noise = x_dim, z_dim, num_data, noise
        self.encoder = nn.Linear(x_dim, 2 * z_dim)
        self.global_guide = AutoNormal(poutine.block(self.model, expose=["W"]), init_scale=0.05)

    def model(self, x):
        b = pyro.param("b", lambda: x.new_zeros(self.x_dim))
        W = pyro.sample("W", dist.Normal(x.new_zeros(self.x_dim, self.z_dim), 1.0).to_event(2))
        size = self.num_data or x.shape[0]
        with pyro.plate("data", size, subsample=torch.arange(x.shape[0])):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.transpose(-1, -2) + b, self.noise).to_event(1), obs=x)

    def guide(self, x):
        self.global_guide(x)
        pyro.module("encoder", self.encoder)
        size = self.num_data or x.shape[0]
        with pyro.plate("data", size, subsample=torch.arange(x.shape[0])):
            loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw) + 1e-3).to_event(1))


def factor_data(n: int = 360, x_dim: int = 6, z_dim: int = 2, noise: float = 0.5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(x_dim, z_dim, generator=g)
    z = torch.randn(n, z_dim, generator=g)
    return z @ W.T + 0.3 + noise * torch.randn(n, x_dim, generator=g)
