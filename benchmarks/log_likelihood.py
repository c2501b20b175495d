"""Time and peak memory of :func:`pyro_lvm.evaluation.log_likelihood` against the decoder's forward passes alone.

A VAE 784-200-200-50 (Bernoulli likelihood; untrained: the cost does not depend on the
weights) on the first ``--num-images`` MNIST test images (dynamically binarized once, as
:class:`pyro_lvm.data.MNISTDataModule` does), ``K = --num-particles`` importance samples per
image. For each chunk size, one fresh worker process measures

* ``log_likelihood``: the wall time of ``log_likelihood(vae, x, K, chunk_size, batch_size)``;
* ``decoder``: the wall time of a plain torch loop over the same chunks and batches that
  only runs the decoder MLP (its matrix multiplications, biases and ReLUs) on random
  ``z`` of shape ``(chunk_size, batch_size, 50)``, under ``torch.no_grad()``: the floor that
  any importance-sampling estimate with this decoder has to pay;
* the ratio of the two (target: at most 1.5);
* ``decoder + likelihood``: the same loop that also evaluates the model's Bernoulli
  log-density of the images under the decoder's output (``vae.likelihood(h).log_prob(x)``),
  and the ratio of ``log_likelihood`` to it: on a CPU the element-wise log-sigmoid over
  ``K x N x 784`` logits costs about as much as the decoder's matrix multiplications, so
  this is the realistic floor;
* the peak memory: the growth of the worker's peak resident set size
  (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) during each measurement, over its value
  after loading the data, building the model and a tiny warm-up call.

    python benchmarks/log_likelihood.py --num-images 200     # about a minute on 2 cores
    python benchmarks/log_likelihood.py                      # the full test set (10,000 images)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def worker(args: argparse.Namespace) -> dict:
    import pyro

    from pyro_lvm import VAE
    from pyro_lvm.data import MNISTDataModule
    from pyro_lvm.evaluation import log_likelihood

    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    dm = MNISTDataModule(root=args.root, binarize="dynamic")
    x = dm.datasets["test"].x[: args.num_images].reshape(-1, 784).contiguous()
    vae = VAE(data_shape=784, latent_dim=50, hidden_dims=[200, 200])
    vae.eval()
    k, chunk, batch = args.num_particles, args.chunk_size, args.batch_size
    # warm up on a tiny problem (Pyro's first-call checks), below the measured peak
    log_likelihood(vae, x[:2], num_particles=4, chunk_size=4, batch_size=2)
    base = _maxrss_mb()

    start = time.perf_counter()
    result = log_likelihood(vae, x, num_particles=k, chunk_size=chunk, batch_size=batch)
    ll_time = time.perf_counter() - start
    ll_peak = _maxrss_mb() - base

    sizes = [chunk] * (k // chunk) + ([k % chunk] if k % chunk else [])
    start = time.perf_counter()
    with torch.no_grad():
        for b0 in range(0, len(x), batch):
            b = min(batch, len(x) - b0)
            for size in sizes:
                vae.decoder(torch.randn(size, b, 50))
    dec_time = time.perf_counter() - start

    start = time.perf_counter()
    with torch.no_grad():
        for b0 in range(0, len(x), batch):
            xb = x[b0:b0 + batch]
            for size in sizes:
                h = vae.decoder(torch.randn(size, len(xb), 50))
                vae.likelihood(h).log_prob(xb)
    floor_time = time.perf_counter() - start
    return {
        "chunk_size": chunk, "batch_size": batch, "log_likelihood_s": ll_time, "decoder_s": dec_time,
        "ratio": ll_time / dec_time, "decoder_likelihood_s": floor_time, "ratio_floor": ll_time / floor_time,
        "peak_mb": ll_peak,
        "mean_ll": result.mean, "stderr": result.stderr,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=10000)
    parser.add_argument("--num-particles", type=int, default=5000)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", default=os.environ.get("PYRO_LVM_MNIST", "/work/shared/data/mnist"))
    parser.add_argument("--chunk-size", type=int, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.chunk_size is not None:
        print(json.dumps(worker(args)))
        return
    rows = []
    for chunk in args.chunk_sizes:
        cmd = [sys.executable, __file__, "--chunk-size", str(chunk)] + [
            f"--{name}={value}" for name, value in (
                ("num-images", args.num_images), ("num-particles", args.num_particles),
                ("batch-size", args.batch_size), ("threads", args.threads), ("root", args.root),
            )
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"log_likelihood: K={args.num_particles}, {args.num_images} MNIST test images, VAE 784-200-200-50, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print(f"{'chunk x batch':>14} {'log_lik s':>10} {'decoder s':>10} {'ratio':>6} {'dec+lik s':>10} {'ratio':>6} "
          f"{'peak MB':>8} {'LL (nats)':>18}")
    for r in rows:
        print(f"{r['chunk_size']:>6} x {r['batch_size']:<5} {r['log_likelihood_s']:>10.2f} {r['decoder_s']:>10.2f} "
              f"{r['ratio']:>6.2f} {r['decoder_likelihood_s']:>10.2f} {r['ratio_floor']:>6.2f} "
              f"{r['peak_mb']:>8.0f} {r['mean_ll']:>10.2f} +- {r['stderr']:.2f}")
    print("ratio: log_lik / decoder, then log_lik / (decoder + Bernoulli log p(x | z)).")
    print("peak MB: growth of ru_maxrss during log_likelihood over its value after set-up (one process per row).")


if __name__ == "__main__":
    main()
