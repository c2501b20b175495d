"""Train and evaluate the reproduction rows (``configs/*.yaml``) and write the table against the papers.

For each chosen row this script trains with ``pyro-lvm fit --config benchmarks/reproduce/configs/ROW.yaml``
(in a subprocess, from the repository root), evaluates the last checkpoint with
``pyro-lvm evaluate --num-particles K`` on the test split, and writes ``OUT/results.md`` and
``OUT/results.rst``: our number, the paper's, the difference, the training budget (epochs, steps,
wall-clock, device) and the seed. Every row keeps its own folder ``OUT/ROW`` (run folder
``OUT/ROW/run`` with ``checkpoints/last.ckpt``, ``metrics.csv`` (and ``metrics.sessionN.csv``, the
curves of the earlier sessions of a resumed run); ``budget.json``; ``result.json``), so rows run in
separate sessions, or resumed with ``--resume``, end up in the same table. ``curves.py`` draws
their learning curves.

    python benchmarks/reproduce/run.py --quick                       # a few minutes on a CPU
    python benchmarks/reproduce/run.py --rows burda_1layer_vae,burda_1layer_iwae50
    python benchmarks/reproduce/run.py --rows burda_1layer_vae --resume --max-epochs 100
    python benchmarks/reproduce/run.py --rows nice_mnist --resume --max-minutes 120   # one session's share
    python benchmarks/reproduce/run.py --rows all --jobs 13 --threads 1 --accelerator gpu --chunk-size 1000

Units. Binarized rows: the test negative log-likelihood in nats (lower is better), the IWAE
estimate with ``K`` importance samples. Flow rows: the test log-likelihood in the paper's units
(higher is better): NICE's continuous density of the dequantized data in ``[0, 1]``
(``log P(levels) + D log 256``); the MAF paper's density in logit space
(``log P(levels) + D log 256 - E[log |dz/dy|]``, with ``z = logit(lambda + (1 - 2 lambda) y)``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import yaml

if TYPE_CHECKING:  # torch is imported where it is used: the runner's own commands start fast
    import torch

__all__ = ["Row", "ROWS", "QUICK", "main", "logit_log_det", "format_tables", "format_beyond"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CONFIGS = HERE / "configs"
DEFAULT_DATA = REPO.parent / "shared" / "data"


@dataclass(frozen=True)
class Row:
    """One line of a published table: its config, the paper's number and how to compare with it."""

    name: str
    label: str
    paper: float
    source: str
    kind: str = "nll"  # "nll" (nats, lower is better), "nice" or "maf" (log-likelihood, higher is better)
    data: str = "mnist"  # the folder under the data root
    baseline: Optional[str] = None  # beyond-the-paper rows: the one-layer row they improve on

    @property
    def config(self) -> Path:
        return CONFIGS / f"{self.name}.yaml"

    @property
    def higher_is_better(self) -> bool:
        return self.kind != "nll"


ROWS: dict[str, Row] = {row.name: row for row in [
    Row("burda_1layer_vae", "1 stochastic layer, VAE (k=1), dynamic", 86.76, "Burda et al. 2015, Table 1"),
    Row("burda_1layer_iwae5", "1 stochastic layer, IWAE k=5, dynamic", 85.54, "Burda et al. 2015, Table 1"),
    Row("burda_1layer_iwae50", "1 stochastic layer, IWAE k=50, dynamic", 84.78, "Burda et al. 2015, Table 1"),
    Row("burda_2layer_vae", "2 stochastic layers, VAE (k=1), dynamic", 85.33, "Burda et al. 2015, Table 1"),
    Row("burda_2layer_iwae5", "2 stochastic layers, IWAE k=5, dynamic", 83.89, "Burda et al. 2015, Table 1"),
    Row("burda_2layer_iwae50", "2 stochastic layers, IWAE k=50, dynamic", 82.90, "Burda et al. 2015, Table 1"),
    Row("static_vae", "1 stochastic layer, VAE (k=1), static", 89.9, "Rezende & Mohamed 2015",
        data="binarized_mnist"),
    Row("static_iwae50", "1 stochastic layer, IWAE k=50, static", 87.10, "Burda et al. 2015, appendix",
        data="binarized_mnist"),
    Row("nice_mnist", "NICE, dequantized [0, 1] (log-lik.)", 1980.50, "Dinh et al. 2014", kind="nice"),
    Row("realnvp_maf_mnist", "RealNVP (5), logit space (log-lik.)", -1323.2, "Papamakarios et al. 2017, Table 2",
        kind="maf"),
    # Beyond the paper: the one-layer model with what pyro_lvm adds; "paper" is the two-layer number
    # of the same k, the target whose gap to the one-layer baseline these rows try to close.
    Row("beyond_1layer_dreg50", "1 layer, DReG k=50 (target: 2 layers, IWAE k=50)", 82.90,
        "Burda et al. 2015, Table 1, 2 layers", baseline="burda_1layer_iwae50"),
    Row("beyond_1layer_iaf_iwae50", "1 layer, IWAE k=50 + IAF posterior (target: 2 layers, k=50)", 82.90,
        "Burda et al. 2015, Table 1, 2 layers", baseline="burda_1layer_iwae50"),
    Row("beyond_1layer_savae", "1 layer, semi-amortized VAE k=1 (target: 2 layers, VAE)", 85.33,
        "Burda et al. 2015, Table 1, 2 layers", baseline="burda_1layer_vae"),
]}

# The --quick budget: the one-stochastic-layer VAE for a few hundred steps of 100 images,
# evaluated with K = 100 on the first 1000 test images (a CPU minute).
QUICK = {"rows": ["burda_1layer_vae"], "max_steps": 600, "batch_size": 100, "num_particles": 100, "limit": 1000}

DIM = 784
LOGIT_ALPHA = 1e-6


def logit_log_det(levels: "torch.Tensor", alpha: float = LOGIT_ALPHA, seed: int = 0) -> "torch.Tensor":
    r"""Per image, :math:`\sum_d \log\lvert dz_d / dy_d\rvert` of the logit pre-processing, at one dequantization.

    With :math:`y = (\ell + u) / 256`, :math:`u \sim U(0, 1)`, :math:`s = \alpha + (1 - 2\alpha) y`
    and :math:`z = \operatorname{logit}(s)`,

    .. math::

        \log\left\lvert \frac{dz}{dy} \right\rvert = \log(1 - 2\alpha) - \log s - \log(1 - s),

    so a density in logit space is :math:`\log p(z) = \log p(y) - \sum_d \log\lvert dz_d/dy_d\rvert`.

    Arguments:
        levels: grey levels scaled to ``[0, 1]`` as ``level / 255`` (as ``MNISTDataModule(binarize="none")`` gives).
        alpha: the logit's :math:`\alpha` (:math:`\lambda = 10^{-6}` in the MAF paper).
        seed: seeds the uniform dequantization noise.

    Example:
        >>> import torch
        >>> x = torch.zeros(2, 784)
        >>> logit_log_det(x).shape
        torch.Size([2])
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    flat = levels.reshape(len(levels), -1).double()
    y = (torch.round(flat * 255.0) + torch.rand(flat.shape, generator=generator, dtype=torch.float64)) / 256.0
    s = alpha + (1.0 - 2.0 * alpha) * y
    return (math.log(1.0 - 2.0 * alpha) - torch.log(s) - torch.log1p(-s)).sum(-1)


def _device(threads: Optional[int] = None, accelerator: Optional[str] = None) -> str:
    """The device a row ran on; on a CPU with the threads its runs used (``--threads``, else this process's)."""
    import torch

    if torch.cuda.is_available() and accelerator != "cpu":
        return f"GPU {torch.cuda.get_device_name(0)}"
    if threads is None:
        threads = int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, {threads} thread(s))"


def _data_root(row: Row, data: Path) -> str:
    folder = data / row.data
    return str(folder if folder.is_dir() else data)


def _fit_config(row: Row, out: Path, data: Path, seed: int, args: argparse.Namespace) -> Path:
    """The row's YAML with the run folder, data root, seed and any budget override filled in."""
    config = yaml.safe_load(row.config.read_text())
    config["seed_everything"] = seed
    trainer = config.setdefault("trainer", {})
    trainer["logger"]["init_args"].update(save_dir=str(out), name=row.name, version="run")
    trainer["enable_progress_bar"] = False
    if args.accelerator is not None:
        trainer["accelerator"] = args.accelerator
    if args.max_epochs is not None:
        trainer["max_epochs"] = args.max_epochs
    if args.max_steps is not None:
        trainer["max_steps"] = args.max_steps
    if args.limit_train_batches is not None:
        trainer["limit_train_batches"] = args.limit_train_batches
    if args.max_minutes is not None:
        # the session ends on the last epoch boundary (a checkpoint --resume continues) that
        # fits in this session's minutes, and records that the budget, not convergence, ended it
        trainer.setdefault("callbacks", []).append({
            "class_path": "benchmarks.reproduce.schedule.TimeBudget",
            "init_args": {"seconds": 60.0 * args.max_minutes, "record": str(_time_record(out, row))}})
    if args.batch_size is not None:
        config["data"]["init_args"]["batch_size"] = args.batch_size
    config["data"]["init_args"]["root"] = _data_root(row, data)
    path = out / row.name / "fit_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _time_record(out: Path, row: Row) -> Path:
    """Where :class:`~benchmarks.reproduce.schedule.TimeBudget` notes that it ended a session."""
    return out / row.name / "time_budget.json"


def _env(threads: Optional[int]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _cli(arguments: list[str], env: dict[str, str], log: Path) -> None:
    command = [sys.executable, "-m", "pyro_lvm.cli", *arguments]
    with log.open("a") as stream:
        stream.write("$ " + " ".join(command) + "\n")
        stream.flush()
        done = subprocess.run(command, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"`pyro-lvm {arguments[0]}` failed (exit {done.returncode}); log {log}:\n{tail}")


def train(row: Row, out: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train (or resume) one row; returns the budget so far (epochs, steps, wall-clock summed over sessions)."""
    from pyro_lvm.training import load_checkpoint

    folder = out / row.name
    run = folder / "run"
    last = run / "checkpoints" / "last.ckpt"
    budget_path = folder / "budget.json"
    if run.exists() and not args.resume:
        if not args.overwrite:
            raise SystemExit(
                f"{run} exists. Pass --resume to continue it from {last.name}, or --overwrite to start again."
            )
        shutil.rmtree(run)
        budget_path.unlink(missing_ok=True)
    budget = json.loads(budget_path.read_text()) if budget_path.is_file() and args.resume else {"wall_clock_s": 0.0, "sessions": []}
    resuming = args.resume and last.is_file()
    config = _fit_config(row, out, data, args.seed, args)
    command = ["fit", "--config", str(config)]
    if not resuming:  # a fresh start in a folder the runner has decided to reuse (see above)
        command += ["--overwrite", "true"]
    if resuming:
        command += ["--ckpt_path", str(last)]
        # Lightning's CSV logger starts metrics.csv afresh in the same folder: keep the earlier
        # sessions' curves beside it (curves.py reads them all)
        metrics = run / "metrics.csv"
        if metrics.is_file():
            metrics.rename(run / f"metrics.session{len(list(run.glob('metrics.session*.csv'))) + 1}.csv")
    start = time.perf_counter()
    _cli(command, _env(args.threads), folder / "log.txt")
    seconds = time.perf_counter() - start
    checkpoint = load_checkpoint(str(last))
    epochs, steps = int(checkpoint.get("epoch", -1)) + 1, int(checkpoint.get("global_step", 0))
    resolved = yaml.safe_load(config.read_text())
    # the paper's budget is the row's own config's, whatever --max-epochs asked for this time
    max_epochs = _paper_epochs(row)
    batch_size = resolved["data"]["init_args"]["batch_size"]
    # passes over the training set: the checkpoint's epoch counter is off by one for a run
    # stopped by max_steps in the middle of an epoch
    num_train = _num_train(row, resolved["data"]["init_args"])
    passes = steps * batch_size / num_train if steps else float(epochs)
    budget["wall_clock_s"] += seconds
    # the epochs this session was allowed: a flow row that ends below them was stopped early
    allowed = args.max_epochs if args.max_epochs is not None else resolved["trainer"].get("max_epochs")
    device = _device(args.threads, args.accelerator)
    session = {"wall_clock_s": round(seconds, 1), "device": device, "epochs": epochs, "steps": steps,
               "max_epochs": allowed}
    if args.max_minutes is not None:
        session["max_minutes"] = args.max_minutes
        session["stopped_by_time"] = _time_record(out, row).is_file()
    budget["sessions"].append(session)
    budget.update(epochs=epochs, passes=round(passes, 2), steps=steps, max_epochs=max_epochs, device=device,
                  seed=args.seed, batch_size=batch_size)
    budget_path.write_text(json.dumps(budget, indent=2) + "\n")
    return budget


def _num_train(row: Row, data_args: dict[str, Any]) -> int:
    if row.data == "binarized_mnist":
        return 50000
    return 60000 - int(data_args.get("val_size", 10000))


def evaluate(row: Row, out: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``pyro-lvm evaluate`` on the test split; the row's number in the paper's units."""
    folder = out / row.name
    output = folder / f"evaluate_test_k{args.num_particles}.json"
    checkpoint = evaluated_checkpoint(row, folder / "run")
    command = ["evaluate", "--ckpt", str(checkpoint), "--split", "test",
               "--num-particles", str(args.num_particles), "--seed", str(args.seed), "--output", str(output)]
    if args.limit is not None:  # a random subset: the test split's order is not random
        command += ["--limit", str(args.limit), "--subset", "random"]
    # on the device the row trained on; chunks of particles as large as its memory allows
    command += ["--device", "cpu" if args.accelerator == "cpu" else "auto", "--chunk-size", str(args.chunk_size),
                "--compile", args.compile]
    start = time.perf_counter()
    _cli(command, _env(args.threads), folder / "log.txt")
    seconds = time.perf_counter() - start
    numbers = json.loads(output.read_text())
    ll = float(numbers["log_likelihood"])
    if row.kind == "nll":
        ours = -ll
    elif row.kind == "nice":
        ours = ll + DIM * math.log(256.0)
    else:
        ours = ll + DIM * math.log(256.0) - _mean_logit_log_det(row, data, numbers["num_points"], args.seed)
    return {"ours": ours, "stderr": float(numbers["log_likelihood_stderr"]), "bits_per_dim": numbers.get("bits_per_dim"),
            "num_particles": int(numbers.get("num_particles") or args.num_particles),
            "num_points": int(numbers["num_points"]), "evaluate_s": round(seconds, 1),
            "checkpoint": checkpoint.name, "checkpoint_passes": _checkpoint_passes(checkpoint)}


def evaluated_checkpoint(row: Row, run: Path) -> Path:
    """The checkpoint a row's number comes from: the last, or for the flows early stopping's model.

    The flow rows train until their validation log-likelihood stops improving and, as their
    papers do, are evaluated at the epoch where it was best: the one ``best-epochNNNN.ckpt``
    their monitoring ``ModelCheckpoint`` (``save_top_k: 1``) keeps. A flow run from before
    that file existed is evaluated on ``last.ckpt``, which its config then wrote only at a new
    best.
    """
    last = run / "checkpoints" / "last.ckpt"
    found = sorted((run / "checkpoints").glob("best-epoch*.ckpt")) if row.kind != "nll" else []
    return found[-1] if found else last


def _checkpoint_passes(path: Path) -> Optional[int]:
    from pyro_lvm.training import load_checkpoint

    epoch = load_checkpoint(str(path)).get("epoch")
    return None if epoch is None else int(epoch) + 1


def _mean_logit_log_det(row: Row, data: Path, num_points: int, seed: int) -> float:
    from pyro_lvm.data import MNISTDataModule

    from pyro_lvm.cli.runs import subset_indices

    module = MNISTDataModule(root=_data_root(row, data), binarize="none", val_size=0)
    x = module.datasets["test"].x
    if num_points < len(x):  # the subset pyro-lvm evaluate --subset random evaluated
        x = x[subset_indices(len(x), num_points, seed)]
    return float(logit_log_det(x, seed=seed).mean())


def _paper_epochs(row: Row) -> Optional[int]:
    """The paper's budget in passes: the row's own config's ``max_epochs``."""
    return yaml.safe_load(row.config.read_text())["trainer"].get("max_epochs")


def _status(row: Row, budget: dict[str, Any], quick: bool) -> str:
    if quick:
        return "quick budget (not the paper's)"
    max_epochs = _paper_epochs(row)  # not the budget's, which a --max-epochs cut short
    if row.kind == "nll" and max_epochs is not None and budget["passes"] >= max_epochs - 0.01:
        return "paper's budget"
    if row.kind != "nll":
        # the flow configs train until 30 epochs bring no better validation likelihood, or to
        # their cap; a session that ended below the epochs it was allowed was stopped early
        passes = budget["passes"]
        sessions = budget.get("sessions") or [{}]
        allowed = sessions[-1].get("max_epochs")
        minutes = sessions[-1].get("max_minutes")
        # TimeBudget records whether it ended the session; before it, Lightning's Timer ended
        # sessions after the first epoch past the minutes
        timed_out = sessions[-1].get("stopped_by_time", minutes is not None
                                     and sessions[-1].get("wall_clock_s", 0.0) >= 60 * minutes)
        # a session the machine's restart cut short (its budget.json written by hand from its
        # last checkpoint) did not converge either
        timed_out = timed_out or sessions[-1].get("interrupted", False)
        if max_epochs is not None and passes >= max_epochs - 0.01:
            return f"stopped at the config's cap of {max_epochs} passes"
        if allowed is not None and budget.get("epochs", passes) < allowed and not timed_out:
            return f"converged: early stopping after {passes:g} passes"
        return f"partial: {passes:g} passes (the config trains up to {max_epochs}, with early stopping)"
    return f"partial: {budget['passes']:g} of {max_epochs} passes"


def _cells(result: dict[str, Any]) -> list[str]:
    row = ROWS[result["row"]]
    budget = result["budget"]
    arrow = "higher" if row.higher_is_better else "lower"
    return [
        row.label,
        f"{row.paper:.2f}",
        f"{result['ours']:.2f} ± {result['stderr']:.2f}",
        f"{result['ours'] - row.paper:+.2f} ({arrow} is better)",
        f"{result['num_particles']} / {result['num_points']}",
        f"{budget['passes']:g} passes ({budget['steps']} steps of {budget['batch_size']})",
        f"{budget['wall_clock_s'] / 60:.1f} min",
        budget["device"],
        str(budget["seed"]),
        _status(row, budget, result["quick"]) + _evaluated_at(row, result),
    ]


def _evaluated_at(row: Row, result: dict[str, Any]) -> str:
    passes = result.get("checkpoint_passes")
    if row.kind == "nll" or passes is None or abs(passes - result["budget"]["passes"]) < 0.01:
        return ""
    return f"; evaluated at pass {passes}, its best validation log-likelihood"


HEADER = ["row", "paper", "ours", "ours - paper", "K / test points", "budget", "wall-clock", "device", "seed", "status"]


BEYOND_HEADER = ["row", "baseline row", "baseline (ours)", "this row (ours)", "target (paper, 2 layers)",
                 "gap closed", "budgets (passes)"]


def format_beyond(results: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """The beyond-the-paper rows against their one-layer baselines, as Markdown and reStructuredText.

    The gap closed is :math:`(b - o) / (b - t)`: ``b`` the baseline row's test NLL, ``o`` this
    row's, ``t`` the paper's two-layer number; 100% would reach the two-layer model. It is
    stated for rows whose baseline ran the same number of passes; otherwise the budgets differ
    and the cell says so.
    """
    by_name = {r["row"]: r for r in results}
    rows = []
    for result in results:
        row = ROWS[result["row"]]
        base = by_name.get(row.baseline) if row.baseline else None
        if base is None:
            continue
        b, o, t = base["ours"], result["ours"], row.paper
        same = abs(base["budget"]["passes"] - result["budget"]["passes"]) < 0.01
        closed = f"{100 * (b - o) / (b - t):.0f}%" if same and b > t else "-- (budgets differ)" if not same else "--"
        rows.append([row.label, row.baseline, f"{b:.2f} ± {base['stderr']:.2f}", f"{o:.2f} ± {result['stderr']:.2f}",
                     f"{t:.2f}", closed, f"{base['budget']['passes']:g} / {result['budget']['passes']:g}"])
    return _tables(BEYOND_HEADER, rows)


def _tables(header: list[str], rows: list[list[str]]) -> tuple[str, str]:
    markdown = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join(cells) + " |" for cells in rows]
    rst = [".. list-table::", "   :header-rows: 1", ""]
    for cells in [header, *rows]:
        rst.append("   * - " + cells[0])
        rst += [f"     - {cell}" for cell in cells[1:]]
    return "\n".join(markdown) + "\n", "\n".join(rst) + "\n"


def format_tables(results: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """The results as a Markdown table and a reStructuredText list-table."""
    return _tables(HEADER, [_cells(r) for r in results])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--rows", default=None, help=f"comma-separated rows, or 'all' (default: all; --quick: "
                        f"{','.join(QUICK['rows'])}). Rows: {', '.join(ROWS)}")
    parser.add_argument("--quick", action="store_true", help=f"reduced budget for a CPU: {QUICK}")
    parser.add_argument("--resume", action="store_true", help="continue each row's run from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="start a row's run again if its folder exists")
    parser.add_argument("--evaluate-only", action="store_true", help="evaluate the rows' existing last checkpoints")
    parser.add_argument("--out", default=str(REPO / "runs" / "reproduce"), metavar="DIR", help="default: runs/reproduce")
    parser.add_argument("--data", default=os.environ.get("PYRO_LVM_DATA", str(DEFAULT_DATA)), metavar="DIR",
                        help="folder holding mnist/ and binarized_mnist/ (default: $PYRO_LVM_DATA or ../shared/data)")
    parser.add_argument("--num-particles", type=int, default=None, help="K of the evaluation (default 5000; --quick 100)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate N test images drawn at random with --seed only (--quick: 1000)")
    parser.add_argument("--max-epochs", type=int, default=None, help="override the config's epoch budget")
    parser.add_argument("--max-steps", type=int, default=None, help="override the config's step budget")
    parser.add_argument("--limit-train-batches", type=int, default=None, metavar="N",
                        help="train on N batches per epoch only (smoke tests of a row)")
    parser.add_argument("--max-minutes", type=float, default=None, metavar="M",
                        help="end this session on the last epoch boundary that fits in M minutes of training "
                             "(resume it later with --resume)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the config's batch size")
    parser.add_argument("--accelerator", default=None, help="override trainer.accelerator (cpu, gpu, auto)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the training and evaluation")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="run N rows at once, each in its own process (a GPU trains several small models "
                             "side by side; on a CPU give each --threads 1); default 1")
    parser.add_argument("--chunk-size", type=int, default=100,
                        help="particles per vectorized run of the evaluation (memory; 1000 suits a GPU); default 100")
    parser.add_argument("--compile", choices=["auto", "true", "false"], default="auto",
                        help="the evaluation's fused Bernoulli kernel (pyro-lvm evaluate --compile); default auto")
    parser.add_argument("--seed", type=int, default=0, help="seed_everything of training and the evaluation's seed")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    """Run the chosen rows; returns their results (also written to ``OUT/ROW/result.json`` and the tables)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if str(REPO) not in sys.path:  # pyro_lvm from this checkout, as the subprocesses get it (_env)
        sys.path.insert(0, str(REPO))
    if args.quick:
        for key in ("max_steps", "batch_size", "num_particles", "limit"):
            if getattr(args, key) is None:
                setattr(args, key, QUICK[key])
    args.num_particles = 5000 if args.num_particles is None else args.num_particles
    names = QUICK["rows"] if args.rows is None and args.quick else (
        list(ROWS) if args.rows in (None, "all") else [n.strip() for n in args.rows.split(",") if n.strip()])
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    for key in ("num_particles", "limit", "max_epochs", "max_steps", "batch_size", "threads",
                "limit_train_batches", "jobs", "chunk_size"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key.replace('_', '-')} must be a positive integer; got {value}")
    if args.max_minutes is not None and not args.max_minutes > 0:
        parser.error(f"--max-minutes must be a positive number of minutes; got {args.max_minutes}")
    out, data = Path(args.out).resolve(), Path(args.data).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not Path(_data_root(ROWS[name], data)).is_dir():
            parser.error(f"row {name} needs {data / ROWS[name].data}; pass --data or set PYRO_LVM_DATA")
    if args.jobs > 1 and len(names) > 1:
        results = _run_jobs(names, out, args.jobs, list(sys.argv[1:] if argv is None else argv))
    else:
        results = [_run_row(ROWS[name], out, data, args) for name in names]
    _write_tables(out)
    return results


def _run_row(row: Row, out: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train (unless ``--evaluate-only``) and evaluate one row; writes ``OUT/ROW/result.json``."""
    name = row.name
    if args.evaluate_only:
        budget = json.loads((out / name / "budget.json").read_text())
    else:
        print(f"[{name}] training ({row.config.relative_to(REPO)}) ...", flush=True)
        budget = train(row, out, data, args)
    print(f"[{name}] evaluating with K={args.num_particles} ...", flush=True)
    result = {"row": name, "paper": row.paper, "source": row.source, **evaluate(row, out, data, args),
              "budget": budget, "quick": args.quick}
    result["status"] = _status(row, budget, args.quick)
    (out / name / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"[{name}] ours {result['ours']:.2f} ± {result['stderr']:.2f}, paper {row.paper:.2f}", flush=True)
    return result


def _child_argv(argv: list[str], row: str) -> list[str]:
    """The runner's own arguments for one row: ``--rows ROW`` in place of ``--rows`` and ``--jobs``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--rows", "--jobs"):
            skip = True
        elif not arg.startswith(("--rows=", "--jobs=")):
            kept.append(arg)
    return [*kept, "--rows", row]


def _run_jobs(names: list[str], out: Path, jobs: int, argv: list[str]) -> list[dict[str, Any]]:
    """Each row in its own runner process, ``jobs`` at a time; its output in ``OUT/ROW/runner.log``.

    A row that fails does not stop the others: its log's tail is printed, and the runner exits
    with an error once every row has ended (after writing the tables of those that finished).
    """
    waiting, running, failed = list(names), {}, []
    while waiting or running:
        while waiting and len(running) < jobs:
            name = waiting.pop(0)
            log = out / name / "runner.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            stream = log.open("w")
            command = [sys.executable, str(Path(__file__).resolve()), *_child_argv(argv, name)]
            running[name] = (subprocess.Popen(command, cwd=REPO, env=_env(None), stdout=stream,
                                              stderr=subprocess.STDOUT), stream)
            print(f"[{name}] started ({log})", flush=True)
        time.sleep(1.0)
        for name, (process, stream) in list(running.items()):
            if process.poll() is None:
                continue
            stream.close()
            del running[name]
            text = (out / name / "runner.log").read_text()
            if process.returncode != 0:
                failed.append(name)
                print(f"[{name}] FAILED (exit {process.returncode}):\n" + "\n".join(text.splitlines()[-15:]), flush=True)
            else:
                print(next((line for line in reversed(text.splitlines()) if line.startswith(f"[{name}] ours")),
                           f"[{name}] done"), flush=True)
    results = [json.loads((out / n / "result.json").read_text()) for n in names
               if n not in failed and (out / n / "result.json").is_file()]
    if failed:
        _write_tables(out)
        raise SystemExit(f"rows that failed: {', '.join(failed)} (logs: OUT/ROW/runner.log and OUT/ROW/log.txt)")
    return results


def _write_tables(out: Path) -> None:
    """``OUT/results.md|rst`` (and ``beyond.md|rst``) of every row with a ``result.json`` in ``OUT``."""
    # the table holds every row with a result in OUT, in the order of ROWS
    everything = [json.loads((out / n / "result.json").read_text()) for n in ROWS if (out / n / "result.json").is_file()]
    markdown, rst = format_tables(everything)
    (out / "results.md").write_text(markdown)
    (out / "results.rst").write_text(rst)
    print(markdown + f"Wrote {out / 'results.md'} and {out / 'results.rst'}")
    beyond_md, beyond_rst = format_beyond(everything)
    if beyond_md.count("\n") > 2:
        (out / "beyond.md").write_text(beyond_md)
        (out / "beyond.rst").write_text(beyond_rst)
        print(beyond_md + f"Wrote {out / 'beyond.md'} and {out / 'beyond.rst'}")


if __name__ == "__main__":
    main()
