"""A semi-supervised VAE (M2 of Kingma et al. 2014), as a Pyro user writes it.

p(y) = Cat(1/C), p(z) = N(0, I), p(x | y, z) = Bernoulli(decoder(y, z)); the digit ``y`` is observed where the
batch has a label (``y >= 0``) and latent elsewhere (Pyro's ``obs_mask``, which splits the site into ``y_observed``
and ``y_unobserved``). The guide q(y | x) q(z | x, y) draws the missing digits first (marked for parallel
enumeration, as in Pyro's SS-VAE tutorial) and z given them: it draws y before z where the model draws z first,
though p(z) does not depend on y.
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn


def _cat(*tensors):
    """Concatenate along the last dim after broadcasting the other dims (an enumerated y has extra ones)."""
    shape = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return torch.cat([t.expand(shape + t.shape[-1:]) for t in tensors], -1)


class SSVAE(nn.Module):
    def __init__(self, num_classes: int = 10, z_dim: int = 2, hidden: int = 32, x_dim: int = 64):
        super().__init__()
        self.num_classes, self.z_dim = num_classes, z_dim
        self.decoder = nn.Sequential(nn.Linear(num_classes + z_dim, hidden), nn.Softplus(), nn.Linear(hidden, x_dim))
        self.encoder_y = nn.Sequential(nn.Linear(x_dim, hidden), nn.Softplus(), nn.Linear(hidden, num_classes))
        self.encoder_z = nn.Sequential(nn.Linear(x_dim + num_classes, hidden), nn.Softplus(), nn.Linear(hidden, 2 * z_dim))

    def model(self, x, y):
        pyro.module("ss_vae", self)
        labelled = y >= 0
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            digit = pyro.sample("y", dist.Categorical(logits=x.new_zeros(self.num_classes)),
                                obs=y.clamp(min=0), obs_mask=labelled)
            logits = self.decoder(_cat(F.one_hot(digit, self.num_classes).to(x.dtype), z))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x, y):
        pyro.module("ss_vae", self)
        labelled = y >= 0
        with pyro.plate("data", x.shape[0]):
            with pyro.poutine.mask(mask=~labelled):
                guess = pyro.sample("y_unobserved", dist.Categorical(logits=self.encoder_y(x)),
                                    infer={"enumerate": "parallel"})
            digit = torch.where(labelled, y.clamp(min=0), guess)
            loc, raw = self.encoder_z(_cat(x, F.one_hot(digit, self.num_classes).to(x.dtype))).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw) + 1e-3).to_event(1))

    def classify(self, x):
        """The most probable digit under q(y | x)."""
        return self.encoder_y(x).argmax(-1)
