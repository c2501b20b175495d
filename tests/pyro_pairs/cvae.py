"""The conditional VAE of Pyro's CVAE example (Sohn et al. 2015), as a Pyro user writes it.

``xs`` is the input image with ``-1`` on the hidden pixels, ``ys`` the whole image; the model observes only the
hidden pixels, picked by boolean indexing (``loc[(xs == -1)...]``), so it does not broadcast over a particle
dimension. The prior p(z | x) is a network of the input, the guide q(z | x, y) a network of both.
"""

import pyro
import pyro.distributions as dist
import torch
from torch import nn


class Encoder(nn.Module):
    def __init__(self, z_dim: int, hidden: int, in_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc21 = nn.Linear(hidden, z_dim)
        self.fc22 = nn.Linear(hidden, z_dim)

    def forward(self, xs, ys=None):
        # the visible pixels of xs, and where the hidden ones are, those of ys
        if ys is not None:
            xs = xs.clone()
            xs[xs == -1] = ys[xs == -1]
        hidden = torch.relu(self.fc1(xs))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class Decoder(nn.Module):
    def __init__(self, z_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, z):
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(z))))


class CVAE(nn.Module):
    def __init__(self, z_dim: int = 2, hidden: int = 32, x_dim: int = 64):
        super().__init__()
        self.prior_net = Encoder(z_dim, hidden, x_dim)
        self.generation_net = Decoder(z_dim, hidden, x_dim)
        self.recognition_net = Encoder(z_dim, hidden, x_dim)
        self.x_dim = x_dim

    def model(self, xs, ys=None):
        pyro.module("generation_net", self)
        batch_size = xs.shape[0]
        with pyro.plate("data"):
            prior_loc, prior_scale = self.prior_net(xs)
            zs = pyro.sample("z", dist.Normal(prior_loc, prior_scale).to_event(1))
            loc = self.generation_net(zs)
            if ys is not None:
                # only the hidden pixels count: boolean indexing with the batch's own mask
                mask_loc = loc[(xs == -1).view(-1, self.x_dim)].view(batch_size, -1)
                mask_ys = ys[xs == -1].view(batch_size, -1)
                pyro.sample("y", dist.Bernoulli(mask_loc, validate_args=False).to_event(1), obs=mask_ys)
            else:
                pyro.deterministic("y", loc.detach())
            return loc

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is None:
                loc, scale = self.prior_net(xs)
            else:
                loc, scale = self.recognition_net(xs, ys)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))
