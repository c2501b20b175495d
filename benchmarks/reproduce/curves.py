"""Learning curves of the reproduction rows, one figure for the docs' Reproducibility page.

For every row with a run under ``OUT`` (``OUT/ROW/run/metrics*.csv``, as
``benchmarks/reproduce/run.py`` leaves it, one file per session of a resumed run), the curve
of the row's training objective per epoch (``train/loss_epoch``: the negative of the bound its
estimator maximizes, averaged over the epoch's mini-batches, in nats per image) against
passes over the training set (log scale), with the row's evaluated test number
(``OUT/ROW/result.json``) as a marker at the end of its run and, for the binarized rows, the
paper's number as a marker at the paper's budget, so a short run shows where it was heading.
A row's bound lies above its test NLL (by the bound's gap; less for larger ``k``).

    python benchmarks/reproduce/curves.py --out runs/reproduce --figure docs/benchmarks/reproduce_curves.png
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import yaml

if __package__ in (None, ""):  # run as a script: import the runner as a sibling module
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import DIM, REPO, ROWS  # type: ignore[no-redef]
else:
    from .run import DIM, REPO, ROWS

__all__ = ["read_curve", "paper_bits_per_dim", "plot_curves", "main"]

PANELS = {
    "one stochastic layer, dynamic binarization": [
        "burda_1layer_vae", "burda_1layer_iwae5", "burda_1layer_iwae50",
        "beyond_1layer_dreg50", "beyond_1layer_iaf_iwae50", "beyond_1layer_savae",
    ],
    "two stochastic layers (dynamic) and static binarization": [
        "burda_2layer_vae", "burda_2layer_iwae5", "burda_2layer_iwae50", "static_vae", "static_iwae50",
    ],
    "flows on dequantized MNIST": ["nice_mnist", "realnvp_maf_mnist"],
}


def read_curve(run: Path, key: str = "train/loss_epoch") -> tuple[list[int], list[float]]:
    """(passes, ``key``) per epoch of a run, over its sessions' metrics files.

    ``run.py`` moves a run's ``metrics.csv`` to ``metrics.sessionN.csv`` before resuming it
    (Lightning's CSV logger would overwrite it), so the curve reads them in order and then
    ``metrics.csv``; an epoch logged twice keeps its last value.
    """
    files = sorted(run.glob("metrics.session*.csv"), key=lambda p: int(p.stem.split("session")[-1]))
    by_epoch: dict[int, float] = {}
    for path in [*files, run / "metrics.csv"]:
        if not path.is_file():
            continue
        with path.open() as stream:
            for record in csv.DictReader(stream):
                value = record.get(key) or ""
                if value:
                    by_epoch[int(record["epoch"]) + 1] = float(value)
    passes = sorted(by_epoch)
    return passes, [by_epoch[p] for p in passes]


def paper_bits_per_dim(result: dict) -> float:
    r"""A flow row's paper number in bits/dim of the 8-bit data, from the row's ``result.json``.

    Our log-likelihood ``ours`` (in the paper's units) and our ``bits_per_dim`` differ by the
    same offset as the paper's number and its bits/dim (:math:`784 \log 256`, and for the logit
    rows the test set's mean log-determinant of the logit), so
    :math:`b_\text{paper} = b_\text{ours} + (\ell_\text{ours} - \ell_\text{paper}) / (784 \log 2)`.

    Example:
        >>> round(paper_bits_per_dim({"ours": 784 * math.log(256), "bits_per_dim": 0.0, "paper": 1980.5}), 3)
        4.356
    """
    return result["bits_per_dim"] + (result["ours"] - result["paper"]) / (DIM * math.log(2))


def plot_curves(out: Union[Path, Sequence[Path]], figure: Path, rows: Optional[Sequence[str]] = None) -> list[str]:
    """Draw one panel per group of rows that has runs in ``out``; returns the rows drawn.

    ``out`` may be several output folders: each row is drawn from the first that has its run.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folders = [Path(out)] if isinstance(out, (str, Path)) else [Path(o) for o in out]
    homes: dict[str, list[Path]] = {}  # row -> the folders with a run of it, in the order given
    for name in ROWS:
        found = [folder for folder in folders if any((folder / name / "run").glob("metrics*.csv"))]
        if found:
            homes[name] = found
    panels = {title: [n for n in names if (rows is None or n in rows) and n in homes] for title, names in PANELS.items()}
    panels = {title: names for title, names in panels.items() if names}
    if not panels:
        raise SystemExit(f"no run with a metrics.csv under {', '.join(map(str, folders))}; "
                         "train rows with benchmarks/reproduce/run.py first")
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.2 * len(panels), 9.5), 4.6), squeeze=False)
    drawn = []
    for ax, (title, names) in zip(axes[0], panels.items()):
        flow = all(ROWS[n].kind != "nll" for n in names)
        for k, name in enumerate(names):
            row, color = ROWS[name], f"C{k}"
            for j, folder in enumerate(homes[name]):  # the first folder solid, other runs of the row dashed
                passes, values = read_curve(folder / name / "run")
                if not passes:
                    continue
                if flow:  # nats per image -> bits/dim
                    values = [v / (DIM * math.log(2)) for v in values]
                label = name if j == 0 else f"{name} ({folder.name})"
                ax.plot(passes, values, color=color, lw=1.4, ls="-" if j == 0 else "--", label=label)
                if flow:  # and its validation curve, which early stopping watches
                    val_passes, val_bits = read_curve(folder / name / "run", "val/bits_per_dim")
                    ax.plot(val_passes, val_bits, color=color, lw=0.9, ls="-." if j == 0 else ":",
                            label=f"{label}, validation")
                result_path = folder / name / "result.json"
                if result_path.is_file():
                    result = json.loads(result_path.read_text())
                    ours = result["bits_per_dim"] if flow else result["ours"]
                    # at the checkpoint evaluated (a flow's best validation epoch), else the run's end
                    at = result.get("checkpoint_passes") or passes[-1]
                    ax.plot([at], [ours], "o" if j == 0 else "s", color=color, ms=6, mfc="none" if j else color)
                    if flow and j == 0:  # the paper's number, dotted: its budget is set by early stopping
                        ax.axhline(paper_bits_per_dim(result), color=color, ls=":", lw=1.2)
            drawn.append(name)
            if not flow:  # the paper's number at the paper's budget (the row config's epochs)
                budget = yaml.safe_load(row.config.read_text())["trainer"]["max_epochs"]
                ax.plot([budget], [row.paper], "*", color=color, ms=11, mec="k", mew=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("passes over the training set")
        ax.set_ylabel("negative log-likelihood, bits/dim" if flow else "training objective (-bound), nats per image")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper right")
    gap = "\n" if len(panels) < 3 else "  "  # one or two panels are too narrow for one line
    fig.suptitle("lines: each row's training objective per epoch (flows, dash-dot: validation);" + gap
                 + "o: our test number at the checkpoint evaluated;  "
                 "*: the paper's number at its budget (flows, dotted: the paper's number)", fontsize=9)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    plt.close(fig)
    return drawn


def main(argv: Optional[Sequence[str]] = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", nargs="+", default=[str(REPO / "runs" / "reproduce")], metavar="DIR",
                        help="the runner's output folder(s); a row is drawn from the first that has it "
                             "(default: runs/reproduce)")
    parser.add_argument("--figure", default=str(REPO / "docs" / "benchmarks" / "reproduce_curves.png"),
                        metavar="PNG", help="default: docs/benchmarks/reproduce_curves.png")
    parser.add_argument("--rows", default=None, help="comma-separated rows (default: every row with a run)")
    args = parser.parse_args(argv)
    rows = None if args.rows is None else [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in rows or [] if n not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    drawn = plot_curves([Path(o) for o in args.out], Path(args.figure), rows)
    print(f"Wrote {args.figure} ({', '.join(drawn)})")
    return drawn


if __name__ == "__main__":
    main()
