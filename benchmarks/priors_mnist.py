r"""Parts against the plain VAE on dynamically binarized MNIST: VampPrior, IAF posterior, both.

One stochastic layer with Burda et al.'s networks (784-200-200-50, tanh), Bernoulli pixels, the
reparameterized ELBO, batch 100, Adam at 1e-3, the same seed and epochs for every variant:

* ``plain``: :math:`\mathcal N(0, I)` prior, diagonal Gaussian posterior;
* ``vamp``: :class:`pyro_lvm.priors.VampPrior` with 500 pseudo-inputs (Tomczak & Welling 2018);
* ``iaf``: :class:`pyro_lvm.posteriors.IAFPosterior`, 4 layers (Kingma et al. 2016);
* ``vamp+iaf``: both (the VampPrior mixing the IAF posterior's base Gaussians, ``components="base"``).

Each is trained by ``pyro_lvm.fit`` (no logger, checkpoints or monitor) and scored by the importance-sampled
:math:`\log p(x)` (:func:`pyro_lvm.diagnostics.likelihood.log_likelihood`, ``K`` particles) on the first
``N`` test images, binarized once with a fixed seed. The table gives the test NLL, its paired gain over
``plain`` with the standard error of the mean difference, and the training time. ``--peer`` also times one
epoch of a hand-written PyTorch VampPrior VAE (the same networks, data order and loss) against one epoch of
``pyro_lvm.fit`` of the ``vamp`` variant, in this process.

    python benchmarks/priors_mnist.py --mnist ../shared/data/mnist                       # 100 epochs, K=5000
    python benchmarks/priors_mnist.py --mnist ../shared/data/mnist --epochs 10 --particles 1000
    python benchmarks/priors_mnist.py --mnist ../shared/data/mnist --peer --epochs 0     # timing only

With ``--results DIR`` each variant's per-image log-likelihoods and training time are saved there (and variants
already saved are not trained again), so variants can run in separate processes and one last call prints the
table of all of them.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings

import torch
import torch.nn.functional as F

VARIANTS = ("plain", "vamp", "iaf", "vamp+iaf")


def build(variant: str, seed: int = 0):
    from pyro_lvm import VAE
    from pyro_lvm.posteriors import IAFPosterior
    from pyro_lvm.priors import VampPrior

    torch.manual_seed(seed)
    # with the IAF posterior, the mixture of the Gaussians before the flow (the exact mixture of IAF posteriors
    # inverts the flow for every draw and pseudo-input: 50 passes each, hours per epoch on a CPU)
    components = "base" if "iaf" in variant else "posterior"
    prior = VampPrior(num_pseudo_inputs=500, components=components) if "vamp" in variant else "standard_normal"
    posterior = IAFPosterior(num_layers=4, hidden=[200], context_dim=50) if "iaf" in variant else "diagonal"
    return VAE(data_shape=784, latent_dim=50, hidden_dims=[200, 200], activation="tanh", prior=prior,
               posterior=posterior)


def data(root: str, seed: int = 0):
    from pyro_lvm.data import MNISTDataModule

    dm = MNISTDataModule(root=root, batch_size=100, binarize="dynamic", seed=seed)
    dm.setup()
    return dm


def train(vae, dm, epochs: int, seed: int = 0) -> float:
    from pyro_lvm import fit

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(vae, data=dm, estimator="reparam", lr=1e-3, seed=seed, max_epochs=epochs, latent_monitor=False,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0)
    return time.perf_counter() - start


def test_images(dm, n: int) -> torch.Tensor:
    return torch.cat([b["x"] for b in dm.test_dataloader()])[:n]


def score(vae, x: torch.Tensor, particles: int) -> torch.Tensor:
    from pyro_lvm.diagnostics.likelihood import log_likelihood

    vae.eval()
    return log_likelihood(vae, x=x, num_particles=particles, chunk_size=min(particles, 500)).per_point


def handwritten_vamp_epoch(dm, seed: int = 0) -> float:
    """Seconds for one epoch of a VampPrior VAE written in plain PyTorch (the same sizes and loss)."""
    torch.manual_seed(seed)

    def mlp(sizes):
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
        return torch.nn.Sequential(*layers[:-1])

    encoder, decoder = mlp([784, 200, 200, 100]), mlp([50, 200, 200, 784])
    pseudo = torch.nn.Parameter(torch.empty(500, 784).normal_(0.05, 0.01))
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters(), pseudo], lr=1e-3)
    log2pi = math.log(2 * math.pi)

    def gaussian(h):
        loc, raw = h.chunk(2, -1)
        return loc, F.softplus(raw) + 1e-5

    start = time.perf_counter()
    for batch in dm.train_dataloader():
        x = batch["x"]
        loc, scale = gaussian(encoder(x))
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        log_q = (-0.5 * eps**2 - scale.log()).sum(-1) - 25 * log2pi
        p_loc, p_scale = gaussian(encoder(pseudo.clamp(0, 1)))
        u = (z[:, None, :] - p_loc) / p_scale  # (batch, 500, 50): standardized, float32-safe
        comp = -0.5 * u.pow(2).sum(-1) - p_scale.log().sum(-1) - 25 * log2pi
        log_p = torch.logsumexp(comp, -1) - math.log(500)
        log_lik = -F.binary_cross_entropy_with_logits(decoder(z), x, reduction="none").sum(-1)
        loss = -(log_lik + log_p - log_q).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", required=True, help="folder with the MNIST IDX files")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--particles", type=int, default=5000)
    parser.add_argument("--test-points", type=int, default=2000)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--peer", action="store_true", help="time one epoch against hand-written PyTorch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", help="folder for each variant's numbers (reused when present)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dm = data(args.mnist)
    if args.peer:
        torch_s = handwritten_vamp_epoch(dm)
        lib_s = train(build("vamp"), dm, 1)
        print(f"one epoch, VampPrior VAE: hand-written {torch_s:.1f} s, pyro_lvm.fit {lib_s:.1f} s, "
              f"ratio {lib_s / torch_s:.2f}")
    if args.epochs == 0:
        return
    x = test_images(dm, args.test_points)
    results = {}
    for variant in args.variants:
        path = None if args.results is None else os.path.join(
            args.results, f"{variant}_e{args.epochs}_k{args.particles}_n{len(x)}.pt")
        if path is not None and os.path.exists(path):
            saved = torch.load(path, weights_only=True)
            results[variant] = (saved["log_likelihood"], float(saved["seconds"]))
            continue
        vae = build(variant)
        seconds = train(vae, dm, args.epochs)
        results[variant] = (score(vae, x, args.particles), seconds)
        print(f"{variant}: trained in {seconds:.0f} s, test NLL {-float(results[variant][0].mean()):.2f}", flush=True)
        if path is not None:
            os.makedirs(args.results, exist_ok=True)
            torch.save({"log_likelihood": results[variant][0], "seconds": seconds}, path)
    print(f"\n{args.epochs} epochs, test NLL with K={args.particles} on the first {len(x)} test images\n")
    print(f"{'variant':<10} {'NLL':>8} {'gain over plain':>18} {'train s':>8}")
    base = results.get("plain", (None,))[0]
    for variant, (ll, seconds) in results.items():
        gain = "" if base is None or variant == "plain" else (
            f"{float((ll - base).mean()):.2f} +- {float((ll - base).std() / math.sqrt(len(ll))):.2f}")
        print(f"{variant:<10} {-float(ll.mean()):>8.2f} {gain:>18} {seconds:>8.0f}")


if __name__ == "__main__":
    main()
