r"""The report that ``pyro-lvm diagnose`` writes: pictures and Markdown sections of the posterior checks."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..plots import (
    as_images,
    save_tiles,
)
from .likelihood import evaluate
from .posterior import take_rows

__all__ = [
    "evaluation_table",
    "write_report",
    "khat_section",
    "kl_section",
    "optional_sections",
    "gap_section",
    "sbc_section",
    "nuts_section",
]

def evaluation_table(n: dict[str, Any]) -> str:
    which = "" if n.get("subset", "all") == "all" else f", {n['subset'].split()[0]} ones"
    rows = [f"{n['model']} on {n['num_points']} {n['split']} points{which} ({n['checkpoint']})"]
    if n["exact"]:  # a flow, or a pair without latent variables: nothing to sample
        rows += [f"  exact log-likelihood   {n['log_likelihood']:.3f} ± {n['log_likelihood_stderr']:.3f} nats per data point",
                 f"  bits/dim               {n['bits_per_dim']:.4f}"]
        return "\n".join(rows)
    mi = n["mutual_information"]
    if n["log_likelihood"] is None:  # global latents: log p(x) is one integral over the whole data set
        rows += ["  log-likelihood         n/a: the model has global latents (sites outside the data plate), so "
                 "log p(x) does not split into one term per data point; the ELBO counts their terms once"]
    else:
        rows += [
            f"  log-likelihood         {n['log_likelihood']:.3f} ± {n['log_likelihood_stderr']:.3f} nats per data point "
            f"(IWAE, K={n['num_particles']}; ± standard error across data points)",
            f"  bits/dim               {n['bits_per_dim']:.4f}",
        ]
    rows += [
        f"  ELBO                   {n['elbo']:.3f}",
        f"  reconstruction         {n['reconstruction']:.3f}",
        f"  KL                     {n['kl']:.3f}",
        f"  active units           {n['active_units']} of {n['num_units']}",
        f"  I(x; z)                {'n/a (several latent sites, or no density of q per site)' if mi is None else f'{mi:.3f} nats'}",
    ]
    return "\n".join(rows)


def write_report(out: Path, lines: list[str]) -> Path:
    path = out / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    print("\n".join(lines))
    print(f"Wrote {path}")
    return path


def khat_section(checks, model, guide, x, kwargs, options, out: Path) -> list[str]:
    from matplotlib.figure import Figure

    khat = checks.psis_khat(model, guide, x, num_particles=options.num_particles,
                                      chunk_size=options.chunk_size, batch_size=options.batch_size, **kwargs)
    finite = khat[torch.isfinite(khat)]
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    ax.hist(finite.numpy(), bins=30, color="C0")
    for threshold, colour in ((0.5, "C1"), (0.7, "C3")):
        ax.axvline(threshold, color=colour, linestyle="--", label=f"k = {threshold}")
    ax.set_xlabel("Pareto k-hat of p(x, z) / q(z | x)")
    ax.set_ylabel("inputs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "khat_histogram.png", dpi=100)
    n = len(khat)
    good, ok, bad = int((khat < 0.5).sum()), int(((khat >= 0.5) & (khat <= 0.7)).sum()), int((khat > 0.7).sum())
    lines = [
        "## Pareto k-hat of the importance weights", "",
        f"{n} inputs, {options.num_particles} draws from q(z | x) each (PSIS; Yao et al. 2018). "
        "Below 0.5 the weights have a finite variance and the log-likelihood estimate is reliable; "
        "above 0.7 q(z | x) misses posterior mass and importance sampling is unreliable.", "",
        "| k-hat | inputs |", "|---|---|",
        f"| < 0.5 (good) | {good} ({100 * good / n:.0f}%) |",
        f"| 0.5 - 0.7 (slow) | {ok} ({100 * ok / n:.0f}%) |",
        f"| > 0.7 (unreliable) | {bad} ({100 * bad / n:.0f}%) |", "",
        "![k-hat histogram](khat_histogram.png)", "",
    ]
    worst = torch.argsort(torch.nan_to_num(khat, neginf=-1e9), descending=True)[:options.num_worst]
    lines += ["Inputs with the largest k-hat (index in the split: k-hat): "
              + ", ".join(f"{int(i)}: {float(khat[i]):.2f}" for i in worst) + ".", ""]
    try:
        tiles = as_images(x[worst])
        save_tiles(tiles[None], out / "worst_inputs.png", col_labels=[f"{float(khat[i]):.2f}" for i in worst],
                    title="inputs with the largest k-hat")
        lines += ["![worst inputs](worst_inputs.png)", ""]
    except (ValueError, RuntimeError) as err:  # data that are not images
        lines += [f"(The worst inputs are not drawn: {err})", ""]
    (out / "khat.json").write_text(json.dumps([float(k) for k in khat]) + "\n")
    return lines


def kl_section(model, guide, x, kwargs, options, out: Path) -> list[str]:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # a few particles suffice: only the guide's KL per dimension and its activity are drawn
    result = evaluate(model, x, guide=guide, num_particles=2, chunk_size=2, batch_size=options.batch_size, **kwargs)
    lines = ["## KL per latent dimension (posterior collapse)", ""]
    if not result.kl_per_dim:
        return lines + ["No local latent site with a KL per dimension to show.", ""]
    for site, kl in result.kl_per_dim.items():
        values = kl.flatten()
        fig = Figure(figsize=(max(4.0, 0.25 * len(values) + 1.5), 3.0))
        ax = fig.subplots()
        ax.bar(range(len(values)), values.numpy(), color="C0")
        ax.set_xlabel(f"dimension of {site}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # dimensions are whole numbers
        ax.set_ylabel("KL (nats per data point)")
        ax.set_title(f"KL per dimension of {site}: {result.active_units} of {result.num_units} units active", fontsize=9)
        fig.tight_layout()
        name = f"kl_per_dim_{re.sub(r'[^A-Za-z0-9_]', '_', site)}.png"
        fig.savefig(out / name, dpi=100)
        collapsed = int((values < 0.01).sum())
        lines += [f"Site `{site}`: total KL {float(values.sum()):.3f} nats, {collapsed} of {len(values)} "
                  "dimensions with KL below 0.01 nats (collapsed).", "", f"![KL per dimension]({name})", ""]
    lines += [f"Active units: {result.active_units} of {result.num_units}.", ""]
    return lines


def optional_sections(checks, model, guide, x, kwargs, options, out: Path) -> list[str]:
    """Amortization gap, SBC and NUTS against q, where :mod:`pyro_lvm.diagnostics` has them.

    They run on the pair as trained (a built-in model's or a user's own), with the split's
    other per-point tensors (a conditional model's ``y`` and ``mask``) passed along; a check
    that cannot work on the model (NUTS or the gap on a discrete latent) says why.
    """
    sections = (
        ("Amortization gap", "amortization_gap", gap_section, "gap_inputs"),
        ("Simulation-based calibration", "sbc", sbc_section, "num_simulations"),
        ("NUTS against the guide", "compare_with_nuts", nuts_section, "nuts_inputs"),
    )
    lines = []
    for title, name, section, count in sections:
        lines += [f"## {title}", ""]
        fn = getattr(checks, name, None)
        if getattr(options, count) == 0:
            lines += [f"Skipped (--{count.replace('_', '-')} 0).", ""]
        elif fn is None:
            lines += [f"Not available: this pyro_lvm has no pyro_lvm.diagnostics.{name}.", ""]
        else:
            try:
                lines += section(checks, model, guide, x, kwargs, options, out)
            except (ValueError, NotImplementedError) as err:  # e.g. a discrete latent
                lines += [f"Not run for this model: {err}", ""]
    return lines


def gap_section(checks, model, guide, x, kwargs, options, out: Path) -> list[str]:
    from matplotlib.figure import Figure

    x, kwargs = take_rows(x, kwargs, torch.arange(min(options.gap_inputs, len(x))))
    gap = checks.amortization_gap(
        model, x, guide=guide, num_steps=options.gap_steps, eval_particles=options.num_particles,
        log_likelihood_particles=options.num_particles, chunk_size=options.chunk_size,
        history_every=max(1, options.gap_steps // 50), **kwargs,
    )
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    ax.plot(gap.history["step"], gap.history["inference_gap"], color="C0")
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_xlabel("optimization step of the per-input q_i")
    ax.set_ylabel("log p(x) - ELBO (nats)")
    ax.set_title("the inference gap closing as q_i is refined", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "amortization_gap.png", dpi=100)
    means = gap.summary()
    rows = [f"| {key} | {means[key]:.4g} |" for key in
            ("log_likelihood", "elbo_amortized", "elbo_optimized", "amortization_gap", "approximation_gap", "inference_gap")
            if key in means]
    return [
        f"First {len(x)} inputs, a per-input Gaussian q_i refined for {options.gap_steps} steps "
        "(Cremer et al. 2018). Means over inputs, nats:", "",
        "| quantity | mean |", "|---|---|", *rows, "", gap.family, "", "![amortization gap](amortization_gap.png)", "",
    ]


def sbc_section(checks, model, guide, x, kwargs, options, out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    result = checks.sbc(model, guide, num_simulations=options.num_simulations, num_draws=99, num_bins=20,
                                  batch_size=min(500, options.num_simulations), x=x, **kwargs)
    panels = 16
    fig = checks.plot_sbc(result, str(out / "sbc_ranks.png"), max_panels=panels)
    plt.close(fig)
    p_values = result.p_values.flatten()
    small = int((p_values < 0.01).sum())
    shown = f" The {panels} least uniform dimensions are drawn." if len(p_values) > panels else ""
    return [
        f"{options.num_simulations} simulations (z, x) ~ p(z, x) from the model (for a conditional model, given "
        f"the split's inputs), ranks of each latent among 99 draws of q(z | x), ties broken at random "
        f"(Talts et al. 2018). Chi-square test of uniform ranks: {small} of {len(p_values)} latent dimensions "
        f"with p < 0.01 (smallest p = {float(p_values.min()):.2g}).{shown}", "",
        "![SBC rank histograms](sbc_ranks.png)", "",
    ]


def nuts_section(checks, model, guide, x, kwargs, options, out: Path) -> list[str]:
    from matplotlib.figure import Figure

    x, kwargs = take_rows(x, kwargs, torch.arange(min(options.nuts_inputs, len(x))))
    result = checks.compare_with_nuts(
        model, x, guide=guide, num_samples=options.nuts_samples, warmup_steps=options.nuts_warmup,
        guide_samples=max(options.nuts_samples, 100), chunk_size=options.chunk_size, **kwargs,
    )
    rows = 24  # a large latent (a convolutional VAE's map) would make an unreadable table and plot
    full = result.table
    table = full.nlargest(rows, "wasserstein").sort_index() if len(full) > rows else full
    shown = (f" The {rows} of {len(full)} rows with the largest Wasserstein distance are shown."
             if len(full) > rows else "")
    fig = Figure(figsize=(max(4.0, 0.35 * len(table) + 1.5), 3.2))
    ax = fig.subplots()
    positions = np.arange(len(table))
    ax.errorbar(positions - 0.1, table["nuts_mean"], yerr=table["nuts_sd"], fmt="o", label="NUTS", color="C0")
    ax.errorbar(positions + 0.1, table["guide_mean"], yerr=table["guide_sd"], fmt="s", label="q(z | x)", color="C1")
    labels = [f"x{o} {s}[{d}]" for o, s, d in zip(table["obs"], table["site"], table["latent"])]
    ax.set_xticks(positions, labels, fontsize=7, rotation=90)
    ax.set_ylabel("posterior mean ± sd")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "nuts_vs_guide.png", dpi=100)
    full.to_csv(out / "nuts_vs_guide.csv", index=False)
    return [
        f"NUTS on p(z | x), all latent sites jointly, with the trained model for the first {len(x)} inputs "
        f"({options.nuts_samples} draws after {options.nuts_warmup} warm-up steps per chain) against q(z | x).{shown}", "",
        "```", table.to_string(index=False, float_format=lambda v: f"{v:.3g}"), "```", "",
        "![NUTS against the guide](nuts_vs_guide.png)", "", "Every row: `nuts_vs_guide.csv`.", "",
    ]
