"""Time and peak memory of :func:`pyro_lvm.diagnostics.log_likelihood` against the decoder's forward passes alone.

A VAE 784-200-200-50 (Bernoulli likelihood; untrained: the cost does not depend on the
weights) on the first ``--num-images`` MNIST test images (dynamically binarized once, as
:class:`pyro_lvm.data.MNISTDataModule` does), ``K = --num-particles`` importance samples per
image. For each chunk size, one fresh worker process measures

* ``eager``: the wall time of ``log_likelihood(vae, x, K, chunk_size, batch_size,
  compile=False)``, the Bernoulli log-density computed by torch's eager kernels;
* ``compiled``: the same with ``compile=True``: the fused kernel of
  :func:`pyro_lvm.likelihoods.compiled_log_prob` (built once by a warm-up call on a
  small problem before the clock starts; its build time is printed separately, and it is
  what ``compile="auto"`` does by itself for runs of this size);
* ``decoder``: the wall time of a plain torch loop over the same chunks and batches that
  only runs the decoder MLP (its matrix multiplications, biases and ReLUs) on random
  ``z`` of shape ``(chunk_size, batch_size, 50)``, under ``torch.no_grad()``: the floor that
  any importance-sampling estimate with this decoder has to pay;
* the ratios of the two ``log_likelihood`` times to the decoder's (target: at most 1.5);
* ``dec+lik``: the same loop that also evaluates the Bernoulli log-density of the images
  under the decoder's output with torch's eager kernel (``vae.likelihood(h).log_prob(x)``);
* the peak memory: the growth of the worker's peak resident set size
  (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) during the eager ``log_likelihood``, over
  its value after loading the data, building the model and the warm-up calls.

The timed calls alternate (eager, compiled, decoder, dec+lik) for ``--rounds`` rounds and
the medians are reported, so that a slow patch of a shared machine hits all alike.

    python benchmarks/log_likelihood.py --num-images 200     # about a minute on 2 cores
    python benchmarks/log_likelihood.py                      # the full test set (10,000 images)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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
    from pyro_lvm.diagnostics import log_likelihood

    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    dm = MNISTDataModule(root=args.root, binarize="dynamic")
    x = dm.datasets["test"].x[: args.num_images].reshape(-1, 784).contiguous()
    vae = VAE(data_shape=784, latent_dim=50, hidden_dims=[200, 200])
    vae.eval()
    k, chunk, batch = args.num_particles, args.chunk_size, args.batch_size
    # warm up on a tiny problem (Pyro's first-call checks), below the measured peak
    log_likelihood(vae, x[:2], num_particles=4, chunk_size=4, batch_size=2, compile=False)
    start = time.perf_counter()
    log_likelihood(vae, x[:2], num_particles=4, chunk_size=4, batch_size=2, compile=True)
    compile_time = time.perf_counter() - start
    base = _maxrss_mb()
    sizes = [chunk] * (k // chunk) + ([k % chunk] if k % chunk else [])

    def eager():
        return log_likelihood(vae, x, num_particles=k, chunk_size=chunk, batch_size=batch, compile=False)

    def compiled():
        return log_likelihood(vae, x, num_particles=k, chunk_size=chunk, batch_size=batch, compile=True)

    @torch.no_grad()
    def decoder():
        for b0 in range(0, len(x), batch):
            b = min(batch, len(x) - b0)
            for size in sizes:
                vae.decoder(torch.randn(size, b, 50))

    @torch.no_grad()
    def decoder_likelihood():
        for b0 in range(0, len(x), batch):
            xb = x[b0:b0 + batch]
            for size in sizes:
                vae.likelihood(vae.decoder(torch.randn(size, len(xb), 50))).log_prob(xb)

    times: dict = {"eager": [], "compiled": [], "decoder": [], "decoder_likelihood": []}
    results = {}
    peak = 0.0
    for _ in range(args.rounds):
        for name, fn in (("eager", eager), ("compiled", compiled), ("decoder", decoder),
                         ("decoder_likelihood", decoder_likelihood)):
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
            if name == "eager":
                peak = max(peak, _maxrss_mb() - base)
    med = {name: statistics.median(values) for name, values in times.items()}
    return {
        "chunk_size": chunk, "batch_size": batch, "eager_s": med["eager"], "compiled_s": med["compiled"],
        "compile_s": compile_time, "decoder_s": med["decoder"], "ratio_eager": med["eager"] / med["decoder"],
        "ratio_compiled": med["compiled"] / med["decoder"], "decoder_likelihood_s": med["decoder_likelihood"],
        "peak_mb": peak, "mean_ll": results["eager"].mean, "stderr": results["eager"].stderr,
        "mean_ll_compiled": results["compiled"].mean,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=10000)
    parser.add_argument("--num-particles", type=int, default=5000)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
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
                ("rounds", args.rounds),
            )
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"log_likelihood: K={args.num_particles}, {args.num_images} MNIST test images, VAE 784-200-200-50, "
          f"{args.threads} thread(s), torch {torch.__version__}, medians of {args.rounds} interleaved rounds")
    print(f"{'chunk x batch':>14} {'decoder s':>10} {'eager s':>9} {'ratio':>6} {'compiled s':>11} {'ratio':>6} "
          f"{'build s':>8} {'dec+lik s':>10} {'peak MB':>8} {'LL (nats)':>18}")
    for r in rows:
        print(f"{r['chunk_size']:>6} x {r['batch_size']:<5} {r['decoder_s']:>10.2f} {r['eager_s']:>9.2f} "
              f"{r['ratio_eager']:>6.2f} {r['compiled_s']:>11.2f} {r['ratio_compiled']:>6.2f} {r['compile_s']:>8.1f} "
              f"{r['decoder_likelihood_s']:>10.2f} {r['peak_mb']:>8.0f} {r['mean_ll']:>10.2f} +- {r['stderr']:.2f}")
        if abs(r["mean_ll"] - r["mean_ll_compiled"]) > 0.01 + 3 * r["stderr"]:
            print(f"  compiled mean {r['mean_ll_compiled']:.2f} differs from the eager one by more than 3 standard errors")
    print("ratio: log_likelihood / decoder (target <= 1.5); build s: the fused kernel's compilation (once per process).")
    print("dec+lik: decoder plus torch's eager Bernoulli log-density; peak MB: growth of ru_maxrss during the eager run.")


if __name__ == "__main__":
    main()
