"""``pyro-lvm diagnose``: pictures and a Markdown report on the approximate posterior of a trained run."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl

from ..diagnostics.report import (
    khat_section,
    kl_section,
    optional_sections,
    write_report,
)
from .evaluate import has_latents
from .runs import load_parsed, other_entries, pair_of, run_dir, run_parser, split_data

__all__ = ["diagnose_main"]

def diagnose_main(args: list[str]) -> Path:
    """``pyro-lvm diagnose``: pictures and a Markdown report on the approximate posterior of a run.

    Writes into ``--output-dir`` (default ``RUN/diagnose``) ``report.md`` and the PNGs it
    shows: the Pareto k-hat of each input's importance weights
    (:func:`pyro_lvm.diagnostics.psis.psis_khat`) as a histogram, the inputs with the
    largest k-hat, the KL per latent dimension (posterior collapse), the amortization gap,
    SBC rank histograms and NUTS against the guide (:mod:`pyro_lvm.diagnostics`), on
    any run: a built-in model's pair (several latent sites, a conditional model given the
    split's ``y`` and ``mask``, a flow posterior) or a user's own. A check that cannot work
    on the model says why in the report (NUTS and the gap on a discrete latent). A flow has
    no latent: the report says so.
    Returns the report's path.

    .. code-block:: console

       $ pyro-lvm diagnose --ckpt runs/vae_digits/version_0/checkpoints/last.ckpt --num-inputs 200
    """
    from ..models.flow import FlowModel
    from .. import diagnostics as checks

    parser = run_parser(
        "pyro-lvm diagnose",
        "Diagnose the approximate posterior q(z | x) of a trained run: PSIS k-hat per input and the worst "
        "inputs, KL per latent dimension, and (where available) amortization gap, SBC and NUTS against q. "
        "Writes PNGs and report.md.",
    )
    parser.add_argument("--num-inputs", type=int, default=100, metavar="N", help="inputs of the split to diagnose (default: %(default)s)")
    parser.add_argument("--num-particles", type=int, default=1000, help="draws from q per input for k-hat (default: %(default)s)")
    parser.add_argument("--num-worst", type=int, default=8, help="inputs with the largest k-hat to show (default: %(default)s)")
    parser.add_argument("--output-dir", default=None, metavar="DIR", help="default RUN/diagnose")
    parser.add_argument("--gap-inputs", type=int, default=16, help="inputs whose amortization gap is measured; 0 skips it (default: %(default)s)")
    parser.add_argument("--gap-steps", type=int, default=300, help="optimization steps of each per-input q (default: %(default)s)")
    parser.add_argument("--num-simulations", type=int, default=500, help="SBC simulations; 0 skips SBC (default: %(default)s)")
    parser.add_argument(
        "--nuts-inputs", type=int, default=2,
        help="inputs compared with NUTS, the slowest check (seconds per input at the defaults for the digits "
        "VAE on a CPU, minutes at 300 + 300 steps); 0 skips it (default: %(default)s)",
    )
    parser.add_argument("--nuts-samples", type=int, default=100, help="NUTS draws per chain (default: %(default)s)")
    parser.add_argument("--nuts-warmup", type=int, default=100, help="NUTS warm-up steps per chain (default: %(default)s)")
    options = parser.parse_args(args)
    for name in ("num_inputs", "num_particles", "num_worst", "gap_inputs", "gap_steps", "num_simulations",
                 "nuts_inputs", "nuts_samples", "nuts_warmup"):
        least = {"num_particles": 2, "gap_inputs": 0, "num_simulations": 0, "nuts_inputs": 0}.get(name, 1)
        if getattr(options, name) < least:
            parser.error(f"--{name.replace('_', '-')} is too small; got {getattr(options, name)}")
    module, datamodule = load_parsed(parser, options)
    out = Path(options.output_dir) if options.output_dir else run_dir(options.ckpt) / "diagnose"
    out.mkdir(parents=True, exist_ok=True)
    lvm = getattr(module, "lvm", module)
    lines = [f"# Posterior diagnostics of {type(lvm).__name__}", "",
             f"Checkpoint: `{Path(options.ckpt).resolve()}`; {options.split} split.", ""]
    if isinstance(lvm, FlowModel):
        lines += ["A normalizing flow has no latent variable: its log-likelihood is exact, so there is no "
                  "approximate posterior to diagnose (no k-hat, amortization gap, SBC or NUTS). "
                  "Use `pyro-lvm evaluate` for its log-likelihood and bits/dim.", ""]
        return write_report(out, lines)
    data = split_data(datamodule, options.split, options.num_inputs)
    x, kwargs = data["x"], other_entries(data)
    model, guide, scope = pair_of(module)
    pl.seed_everything(options.seed, verbose=False)
    with scope:
        if not has_latents(guide, x, kwargs):
            lines += [f"{type(lvm).__name__}'s guide draws no latent variable: its log-likelihood is exact, so "
                      "there is no approximate posterior to diagnose (no k-hat, amortization gap, SBC or NUTS). "
                      "Use `pyro-lvm evaluate` for its log-likelihood and bits/dim.", ""]
            return write_report(out, lines)
        try:
            lines += khat_section(checks, model, guide, x, kwargs, options, out)
        except ValueError as err:  # e.g. global latents: no importance weights per input
            lines += ["## Pareto k-hat of the importance weights", "", f"Not run for this model: {err}", ""]
        lines += kl_section(model, guide, x, kwargs, options, out)
        lines += optional_sections(checks, model, guide, x, kwargs, options, out)
    return write_report(out, lines)
