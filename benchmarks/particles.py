"""What running particles one at a time costs: seconds per training step, vectorized against sequential.

A model that does not broadcast over a particle dimension (boolean indexing, ``view(batch_size, -1)``) runs the
multi-sample estimators' K particles one pass each (pyro_lvm decides this on the first batch; see
``pyro_lvm.pairs.check_vectorization``). This script measures that cost on one model written to broadcast, run
both ways by forcing ``vectorize_particles``: the VAE of Pyro's VAE tutorial at MNIST's size (784-400-50,
Bernoulli likelihood, batches of 128 random binary images), one IWAE or DReG training step (loss, backward, Adam),
interleaved rounds, the median per configuration. The vectorized path is the peer in the same run: the table's
ratio is sequential / vectorized.

    python benchmarks/particles.py                 # K = 5 and 50, IWAE and DReG, 2 threads
    python benchmarks/particles.py --particles 5 --steps 10 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_lvm.estimators import make_elbo


class TutorialVAE(nn.Module):
    """Pyro's VAE tutorial: 784-400-z, softplus hidden layers, a Bernoulli decoder."""

    def __init__(self, x_dim: int = 784, hidden: int = 400, z_dim: int = 50):
        super().__init__()
        self.z_dim = z_dim
        self.enc = nn.Linear(x_dim, hidden)
        self.enc_loc, self.enc_scale = nn.Linear(hidden, z_dim), nn.Linear(hidden, z_dim)
        self.dec = nn.Sequential(nn.Linear(z_dim, hidden), nn.Softplus(), nn.Linear(hidden, x_dim))

    def model(self, x):
        pyro.module("decoder", self.dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=self.dec(z), validate_args=False).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self)
        with pyro.plate("data", x.shape[0]):
            hidden = nn.functional.softplus(self.enc(x))
            pyro.sample("latent", dist.Normal(self.enc_loc(hidden), self.enc_scale(hidden).exp()).to_event(1))


def seconds_per_step(estimator: str, particles: int, vectorize: bool, x: torch.Tensor, steps: int) -> float:
    torch.manual_seed(0)
    vae = TutorialVAE(x_dim=x.shape[1])
    elbo = make_elbo(estimator, num_particles=particles, vectorize_particles=vectorize)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    with pyro.validation_enabled(False):
        elbo.differentiable_loss(vae.model, vae.guide, x).backward()  # the first step checks and builds
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            optimizer.zero_grad()
            elbo.differentiable_loss(vae.model, vae.guide, x).backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--particles", type=int, nargs="+", default=[5, 50])
    parser.add_argument("--estimators", nargs="+", default=["iwae", "dreg"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median over all steps)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((options.batch_size, 784), 0.3))
    configs = [(e, k) for e in options.estimators for k in options.particles]
    times: dict = {(e, k, v): [] for e, k in configs for v in (True, False)}
    for _ in range(options.rounds):
        for e, k in configs:
            for vectorize in (True, False):
                times[(e, k, vectorize)].append(seconds_per_step(e, k, vectorize, x, options.steps))
    rows = []
    print(f"{'estimator':>10} {'K':>4} {'vectorized s/step':>18} {'one at a time s/step':>21} {'ratio':>6}")
    for e, k in configs:
        fast, slow = statistics.median(times[(e, k, True)]), statistics.median(times[(e, k, False)])
        rows.append({"estimator": e, "particles": k, "vectorized": fast, "sequential": slow, "ratio": slow / fast})
        print(f"{e:>10} {k:>4} {fast:>18.4f} {slow:>21.4f} {slow / fast:>6.2f}")
    return rows


if __name__ == "__main__":
    main()
