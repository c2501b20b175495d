"""The Gaussian mixture of Pyro's GMM tutorial, as a Pyro user writes it.

Global mixture weights, component locations and a shared scale, MAP-estimated by ``AutoDelta`` (the guide
exposes only the global sites); each point's component assignment is enumerated in the model
(``config_enumerate``), so the pair trains with ``TraceEnum_ELBO`` (pyro_lvm's ``"enum"``) and no other estimator.
"""

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import config_enumerate
from pyro.infer.autoguide import AutoDelta
from torch import nn


class GaussianMixture(nn.Module):
    def __init__(self, num_components: int = 3):
        super().__init__()
        self.num_components = num_components
        self.autoguide = AutoDelta(poutine.block(self.model, expose=["weights", "locs", "scale"]))

    @config_enumerate
    def model(self, data):
        k = self.num_components
        weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(k)))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
        with pyro.plate("components", k):
            locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(data)):
            assignment = pyro.sample("assignment", dist.Categorical(weights))
            pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data.squeeze(-1))

    def guide(self, data):
        return self.autoguide(data)


def mixture_data(n: int = 200, seed: int = 0) -> torch.Tensor:
    """Points from three well separated components, as a column (N, 1)."""
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(0, 3, (n,), generator=g)
    return (torch.tensor([-4.0, 0.0, 5.0])[which] + 0.5 * torch.randn(n, generator=g)).unsqueeze(-1)
