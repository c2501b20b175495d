"""``pyro-lvm evaluate``: the held-out log-likelihood of a trained run, printed and saved as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch

from ..diagnostics.likelihood import evaluate
from ..diagnostics.report import evaluation_table
from .runs import load_parsed, other_entries, pair_of, run_dir, run_parser, split_data

__all__ = ["evaluate_main", "has_latents"]

def evaluate_main(args: list[str]) -> dict[str, Any]:
    """``pyro-lvm evaluate``: the held-out log-likelihood of a run, printed and saved as JSON.

    The model is rebuilt from the checkpoint (:func:`pyro_lvm.cli.runs.load_run`), the
    data from the run's ``config.yaml``; :func:`pyro_lvm.diagnostics.likelihood.evaluate` computes the
    importance-sampled log-likelihood with its standard error, bits/dim, the ELBO and its
    terms, the KL, active units and :math:`I(x; z)` (a flow: its exact log-likelihood).
    Returns the saved numbers.

    .. code-block:: console

       $ pyro-lvm evaluate --ckpt runs/vae_digits/version_0/checkpoints/last.ckpt
       $ pyro-lvm evaluate --ckpt RUN/checkpoints/last.ckpt --split val --num-particles 1000 --limit 500
    """
    from ..models.flow import FlowModel

    parser = run_parser(
        "pyro-lvm evaluate",
        "Evaluate a trained run on held-out data: importance-sampled log-likelihood (IWAE estimate) "
        "with its standard error, bits/dim, ELBO, reconstruction, KL, active units and I(x; z); "
        "flows: the exact log-likelihood. Prints a table and writes JSON.",
    )
    parser.add_argument("--num-particles", type=int, default=5000, help="importance samples per data point (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate N data points of the split only (see --subset)")
    parser.add_argument(
        "--subset", choices=["first", "random"], default="first",
        help="with --limit: the first N points, or N drawn at random with --seed (an unbiased sample of the "
             "split, whose order may not be random; default: %(default)s)",
    )
    parser.add_argument("--output", default=None, metavar="FILE.json", help="default RUN/evaluate_<split>.json")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    parser.add_argument(
        "--device", default="auto", metavar="DEVICE",
        help="where to evaluate: 'auto' (the first GPU when there is one, else the CPU), 'cpu', 'cuda', "
             "'cuda:N' (default: %(default)s)",
    )
    parser.add_argument(
        "--compile", choices=["auto", "true", "false"], default="auto",
        help="score Bernoulli likelihoods with a fused kernel built by torch.compile: 'auto' for long runs "
             "(particles x data elements >= 1e9), falling back to the eager kernel if it cannot be built (default: %(default)s)",
    )
    options = parser.parse_args(args)
    if options.num_particles < 1:
        parser.error(f"--num-particles must be a positive integer; got {options.num_particles}")
    if options.limit is not None and options.limit < 1:
        parser.error(f"--limit must be a positive integer; got {options.limit}")
    device = _device(parser, options.device)
    module, datamodule = load_parsed(parser, options)
    data = split_data(datamodule, options.split, options.limit, options.subset, options.seed)
    module = module.to(device)
    data = {key: value.to(device) for key, value in data.items()}
    pl.seed_everything(options.seed, verbose=False)
    common = dict(num_particles=options.num_particles, chunk_size=options.chunk_size,
                  batch_size=options.batch_size, progress=options.progress)
    flow = getattr(module, "lvm", module)
    if isinstance(flow, FlowModel):
        result = evaluate(flow, data["x"], **common)
    else:
        model, guide, scope = pair_of(module)
        with scope:
            latent = has_latents(guide, data["x"], other_entries(data))
            result = evaluate(model, data["x"], guide=guide, compile={"true": True, "false": False}.get(
                options.compile, "auto"), **common, **other_entries(data))
    exact = isinstance(flow, FlowModel) or not latent
    numbers = {"checkpoint": str(Path(options.ckpt).resolve()), "split": options.split,
               "model": type(flow).__name__, "flow": isinstance(flow, FlowModel), "exact": exact, "device": str(device),
               "subset": "all" if options.limit is None else f"{options.subset} {options.limit} (seed {options.seed})",
               **result.as_dict()}
    output = Path(options.output) if options.output else run_dir(options.ckpt) / f"evaluate_{options.split}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(numbers, indent=2) + "\n")
    print(evaluation_table(numbers))
    print(f"Wrote {output}")
    return numbers


def _device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """``--device``: ``auto`` is the first GPU when torch sees one, else the CPU; a GPU asked for must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: torch sees no CUDA GPU here; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"--device {name}: there are {torch.cuda.device_count()} GPU(s), numbered from 0")
    return device


def has_latents(guide: Callable, x: torch.Tensor, kwargs: dict) -> bool:
    """Whether the guide draws any latent sample site for the first data point."""
    from pyro import poutine

    from ..pairs import rows

    with torch.no_grad(), poutine.block():
        trace = poutine.trace(guide).get_trace(x[:1], **rows(kwargs, slice(0, 1), len(x)))
    return any(site["type"] == "sample" and not site["is_observed"] for site in trace.nodes.values())
