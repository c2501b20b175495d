"""The ``pyro-lvm`` command line: ``pyro-lvm fit --config FILE.yaml`` (LightningCLI).

Every constructor argument of the model (:class:`pyro_lvm.LVMModule` and the
pair it wraps, e.g. :class:`pyro_lvm.VAE`), the estimator, the data module and
the ``Trainer`` is a YAML key and a ``--flag``; ``pyro-lvm fit --help`` lists
them and ``pyro-lvm fit --print_config`` prints a complete config. With no
arguments, ``pyro-lvm fit`` trains a VAE on scikit-learn's 8x8 digits and writes
a run folder with the checkpoints, ``metrics.csv``, ``config.yaml`` and
pictures.

``pyro-lvm gradient-variance`` reads the same configuration and prints the
variance and signal-to-noise ratio of several estimators' gradients on its
model and data (:func:`pyro_lvm.diagnostics.gradient_variance`).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import inspect
import itertools
import json
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from .checkpoints import load_checkpoint
from .plots import (
    plot_completions,
    plot_latent_usage,
    plot_interpolation,
    plot_latent_space,
    plot_loss_curves,
    plot_manifold,
    plot_reconstructions,
    plot_samples,
    plot_traversals,
)
from .training import LVMModule

__all__ = ["RunReport", "LVMCLI", "main", "gradient_variance_main", "DEFAULT_CONFIG"]

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


class RunReport(pl.Callback):
    r"""At the end of ``fit``, write pictures into the run folder and say where everything is.

    ``loss_curves.png`` (from ``metrics.csv``), and for image-like data, drawn
    from the first validation batch by :mod:`pyro_lvm.plots` in evaluation mode,
    without gradients, on the model's device:

    * ``reconstructions.png`` (inputs above their reconstructions) and
      ``samples.png`` (draws from the prior), for models with
      ``reconstruct``/``sample`` such as :class:`pyro_lvm.VAE`;
    * ``traversals.png`` and ``interpolation.png``, for a Gaussian
      :math:`q(z \mid x)` (``encode(x) -> (loc, scale)``);
    * ``manifold.png`` and ``latent_space.png`` (posterior means of the
      validation set, coloured by ``batch["y"]`` if the data have labels), when
      the latent has two coordinates;
    * ``completions.png`` instead of all these, for a conditional model (one
      with ``predict``) whose batches carry the full images as ``batch["y"]``;
    * ``latent_usage.png``: KL per latent dimension and active units per epoch
      (and the KL per location of a spatial latent map), from the module's
      :class:`~pyro_lvm.monitoring.LatentMonitor`; ``latent_stats.csv`` holds the numbers.

    A model with no latent variable (:class:`pyro_lvm.FlowModel`) gets
    ``samples.png`` only. A picture the model cannot draw (a ``ValueError`` or
    ``NotImplementedError``, e.g. traversals of a discrete latent) is skipped; the
    printed summary names it on one line and :attr:`skipped` keeps the reasons.

    At the end of ``test`` (``pyro-lvm test``, or ``pyro-lvm fit`` with
    ``test_after_fit: true``) it prints the test metrics (``test/elbo`` per data
    point, and ``test/bits_per_dim`` for a flow) and writes them to
    ``test_metrics.json`` in the run folder.
    """

    def __init__(self) -> None:
        self.skipped: dict[str, str] = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # trainer.log_dir is a collective under DDP: every rank must ask for it
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            self._report(trainer, pl_module, run_dir)

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        written = []
        self.skipped = {}
        metrics = run_dir / "metrics.csv"
        if metrics.is_file():
            written.append(plot_loss_curves(metrics, run_dir / "loss_curves.png"))
        lvm = getattr(pl_module, "lvm", None)
        if lvm is not None:
            written += self._pictures(trainer, lvm, run_dir)
        monitor = getattr(pl_module, "latent_monitor", None)
        if monitor is not None and monitor.history and monitor.history[-1]["sites"]:
            try:
                written.append(plot_latent_usage(monitor.history, run_dir / "latent_usage.png"))
            except ValueError as err:
                self.skipped["latent_usage.png"] = f"ValueError: {err}"
        ckpt = trainer.checkpoint_callback
        lines = [f"Run folder: {run_dir.resolve()}"]
        if ckpt is not None and ckpt.best_model_path:
            lines.append(f"  best checkpoint: {ckpt.best_model_path}")
        if ckpt is not None and ckpt.last_model_path:
            lines.append(f"  last checkpoint: {ckpt.last_model_path}")
        lines += [f"  {p.name}: {p}" for p in written]
        if self.skipped:
            lines.append(f"  not drawn (the model or data cannot): {', '.join(self.skipped)}")
        lines += self._metric_lines(trainer, "val", "validation")
        print("\n".join(lines))

    @staticmethod
    def _metric_lines(trainer: pl.Trainer, stage: str, label: str) -> list[str]:
        metrics = trainer.callback_metrics
        lines = []
        if f"{stage}/elbo" in metrics:
            lines.append(f"  {label} ELBO: {float(metrics[f'{stage}/elbo']):.3f} nats per data point")
        if f"{stage}/bits_per_dim" in metrics:
            lines.append(f"  {label} bits/dim: {float(metrics[f'{stage}/bits_per_dim']):.4f}")
        return lines

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        metrics = {
            key: float(value) for key, value in trainer.callback_metrics.items()
            if key.startswith("test/") and isinstance(value, (torch.Tensor, float, int)) and torch.as_tensor(value).numel() == 1
        }
        if not metrics:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "test_metrics.json"
        path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        print("\n".join([f"Test set ({path}):"] + self._metric_lines(trainer, "test", "test")))

    def _pictures(self, trainer: pl.Trainer, lvm, run_dir: Path) -> list[Path]:
        datamodule = trainer.datamodule
        loader = datamodule.val_dataloader() if datamodule is not None else None
        if loader is None:
            return []
        parameter = next(lvm.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        batch = next(iter(loader))
        batch = dict(batch) if isinstance(batch, dict) else {"x": batch}
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        x, y = batch["x"], batch.get("y")
        pictures: dict[str, Callable[[Path], Path]] = {}
        if hasattr(lvm, "predict") and isinstance(y, torch.Tensor) and y.shape == x.shape:
            pictures["completions.png"] = lambda path: plot_completions(lvm, x, y, path)
        elif not hasattr(lvm, "encode"):  # no latent variable, e.g. a flow: draws only
            if hasattr(lvm, "sample"):
                pictures["samples.png"] = lambda path: plot_samples(lvm, path, title="draws from the model")
        else:
            pairs = min(4, len(x) // 2)
            pictures.update({
                "reconstructions.png": lambda path: plot_reconstructions(lvm, x, path),
                "samples.png": lambda path: plot_samples(lvm, path),
                "traversals.png": lambda path: plot_traversals(lvm, x, path),
                "interpolation.png": lambda path: plot_interpolation(lvm, x[:pairs], x[pairs : 2 * pairs], path),
            })
            if math.prod(getattr(lvm, "latent_shape", ())) == 2 and len(getattr(lvm, "latent_shape", ())):
                pictures["manifold.png"] = lambda path: plot_manifold(lvm, path)
                pictures["latent_space.png"] = lambda path: self._latent_space(lvm, loader, device, path)
        was_training = lvm.training
        lvm.eval()
        written = []
        try:
            with torch.no_grad():
                for name, draw in pictures.items():
                    try:
                        written.append(draw(run_dir / name))
                    except (ValueError, NotImplementedError) as err:  # e.g. data that are not images
                        self.skipped[name] = f"{type(err).__name__}: {err}"
        finally:
            lvm.train(was_training)
        return written

    @staticmethod
    def _latent_space(lvm, loader, device: torch.device, path: Path, max_points: int = 2000) -> Path:
        xs, labels = [], []
        for batch in loader:
            batch = batch if isinstance(batch, dict) else {"x": batch}
            xs.append(batch["x"])
            y = batch.get("y")
            labels.append(y if isinstance(y, torch.Tensor) and y.dim() == 1 else None)
            if sum(len(x) for x in xs) >= max_points:
                break
        x = torch.cat(xs)[:max_points].to(device)
        y = torch.cat(labels)[:max_points] if all(label is not None for label in labels) else None
        return plot_latent_space(lvm, x, path, labels=y)


def _valid_keys(parser: LightningArgumentParser, key: str) -> list[str]:
    """Names that are accepted next to ``key`` (siblings in the config tree)."""
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    names = set()
    for action in parser._actions:
        dest = getattr(action, "dest", "")
        if dest.startswith(prefix) and dest != prefix:
            names.add(dest[len(prefix) :].split(".")[0])
    return sorted(n for n in names if n not in ("help", "config", "print_config"))


def _class_options(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


class _Parser(LightningArgumentParser):
    """Adds the valid keys (and the closest match) to jsonargparse's unknown-key errors."""

    def error(self, message: str, ex: Optional[Exception] = None):
        hints = []
        unknown = re.findall(r"(?:Subcommand '(\w+)' )?does not accept option '([\w.]+)'", message)
        unknown += [("", key) for key in re.findall(r"unrecognized arguments:.*?--([\w.]+)", message)]
        for subcommand, key in unknown:
            parser = self._subcommands_action._name_parser_map[subcommand] if subcommand else self
            valid = _valid_keys(parser, key)
            close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
            hints.append(
                f"Unknown key '{key}'."
                + (f" Did you mean '{close[0]}'?" if close else "")
                + f" Valid keys there: {', '.join(valid)}."
            )
        for class_path, option in re.findall(
            r"class_path '([\w.]+)'[^\n]*\n\s*Option '(\w+)' is not accepted", message
        ):
            valid = _class_options(class_path)
            close = difflib.get_close_matches(option, valid, n=1)
            hints.append(
                f"Unknown key '{option}' for {class_path}."
                + (f" Did you mean '{close[0]}'?" if close else "")
                + f" Valid keys: {', '.join(valid)}."
            )
        if hints:
            message = message + "\n" + "\n".join(hints)
        super().error(message, ex)


class LVMCLI(LightningCLI):
    """LightningCLI for :class:`pyro_lvm.LVMModule` and any Lightning data module."""

    def __init__(self, args: Optional[list[str]] = None, **kwargs):
        kwargs.setdefault("parser_kwargs", {}).setdefault(
            "fit", {"default_config_files": [str(DEFAULT_CONFIG)]}
        )
        kwargs.setdefault("trainer_defaults", {"callbacks": [RunReport()]})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", _Parser)
        super().__init__(
            LVMModule,
            pl.LightningDataModule,
            subclass_mode_data=True,
            args=args,
            **kwargs,
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint while parsing; check it first so that a
        # corrupt or foreign file gets pyro_lvm's message, not a pickle traceback.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config.get(subcommand, {}).get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            load_checkpoint(ckpt_path)
        super()._parse_ckpt_path()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=False,
            help="fit only: evaluate the best checkpoint (the last weights without one) on the data "
            "module's test split after training, print the metrics and write test_metrics.json",
        )

    def after_fit(self) -> None:
        """With ``test_after_fit: true``, test the best checkpoint on the test split."""
        if not self.config.get(self.subcommand, {}).get("test_after_fit"):
            return
        ckpt = self.trainer.checkpoint_callback
        best = ckpt.best_model_path if ckpt is not None and getattr(ckpt, "best_model_path", "") else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best, weights_only=True)

    def fit(self, model, datamodule=None, ckpt_path: Optional[str] = None, weights_only: Optional[bool] = None, **kwargs) -> None:
        """``Trainer.fit``, loading a checkpoint with ``weights_only=True`` by default."""
        self.trainer.fit(
            model, datamodule=datamodule, ckpt_path=ckpt_path,
            weights_only=True if weights_only is None else weights_only, **kwargs,
        )


# Keys of a fit configuration that gradient-variance passes on: the pair, its data, the seed.
_CONFIG_OVERRIDES = ("--model.", "--model=", "--data.", "--data=", "--seed_everything")


def _gradient_variance_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-lvm gradient-variance",
        allow_abbrev=False,
        description=(
            "Print the Monte-Carlo variance and signal-to-noise ratio of ELBO-gradient "
            "estimators, per parameter group, for the model and data of a `pyro-lvm fit` "
            "configuration (default: the packaged digits VAE). All estimators are measured "
            "at the same parameters (the initial ones, or --ckpt_path) with the same seeds. "
            "Options --model.KEY=VALUE, --data.KEY=VALUE and --seed_everything=N override "
            "the configuration as in `pyro-lvm fit`."
        ),
    )
    parser.add_argument(
        "-c", "--config", action="append", default=[], metavar="FILE.yaml",
        help="a fit configuration; repeat to layer several, later ones win",
    )
    parser.add_argument(
        "--estimators", default="reparam,analytic_kl,score_function", metavar="NAMES",
        help="comma-separated names for pyro_lvm.make_elbo (with default options); "
        "'config' is the configuration's own estimator (default: %(default)s)",
    )
    parser.add_argument("--num_draws", type=int, default=100, help="gradient draws per estimator (default: %(default)s)")
    parser.add_argument(
        "--batches", type=int, default=1,
        help="training batches to measure on; the table is their mean (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the first draw (default: %(default)s)")
    parser.add_argument("--ckpt_path", default=None, help="measure at the parameters of this checkpoint of a run")
    parser.add_argument("--output", default=None, metavar="FILE.csv", help="also write the table as CSV")
    return parser


def _config_overrides(parser: argparse.ArgumentParser, extra: list[str]) -> list[str]:
    """The ``--model.*``/``--data.*`` options among ``extra`` (values joined); others are errors."""
    overrides, unknown = [], []
    tokens = iter(extra)
    for token in tokens:
        if not token.startswith(_CONFIG_OVERRIDES):
            unknown.append(token)
        elif "=" in token:
            overrides.append(token)
        else:
            value = next(tokens, None)
            if value is None:
                parser.error(f"option {token} needs a value ({token}=VALUE)")
            overrides.append(f"{token}={value}")
    if unknown:
        parser.error(
            f"unrecognized arguments: {' '.join(unknown)}. Valid options: "
            f"{', '.join(a.option_strings[-1] for a in parser._actions if a.option_strings)}, "
            "and --model.*, --data.*, --seed_everything to override the configuration."
        )
    return overrides


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Only warnings and errors from these loggers."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def gradient_variance_main(args: list[str]) -> None:
    """``pyro-lvm gradient-variance``: the table of :func:`pyro_lvm.diagnostics.gradient_variance`
    for the model and data of a fit configuration.

    .. code-block:: console

       $ pyro-lvm gradient-variance --num_draws 200
       $ pyro-lvm gradient-variance --config my_run.yaml --estimators reparam,config \\
             --ckpt_path runs/my_run/version_0/checkpoints/last.ckpt --output table.csv
    """
    import pandas as pd

    from .diagnostics import format_table, gradient_variance
    from .estimators import make_elbo

    parser = _gradient_variance_parser()
    options, extra = parser.parse_known_args(args)
    overrides = _config_overrides(parser, extra)
    if options.num_draws < 2:
        parser.error(f"--num_draws must be at least 2; got {options.num_draws}")
    if options.batches < 1:
        parser.error(f"--batches must be at least 1; got {options.batches}")
    names = [name.strip() for name in options.estimators.split(",") if name.strip()]
    if not names:
        parser.error("--estimators is empty; give names such as reparam,score_function")

    estimators = {}
    for name in names:
        try:
            estimators[name] = None if name == "config" else make_elbo(name)
        except ValueError as err:
            parser.error(f"--estimators: {err}")

    with warnings.catch_warnings(), _quiet("pytorch_lightning", "lightning_fabric"):
        # the Trainer is built but not used: its notices (accelerators, seed) would only confuse
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = LVMCLI(
            args=[f"--config={path}" for path in options.config] + overrides,
            run=False,
            parser_kwargs={"default_config_files": [str(DEFAULT_CONFIG)]},
        )
    module, datamodule = cli.model, cli.datamodule
    if "config" in estimators:
        estimators["config"] = module.estimator
    datamodule.setup("fit")
    batches = list(itertools.islice(datamodule.train_dataloader(), options.batches))
    if len(batches) < options.batches:
        parser.error(f"--batches {options.batches}: the training data have only {len(batches)} batches")
    module.initialize(batches[0])
    if options.ckpt_path is not None:
        checkpoint = load_checkpoint(options.ckpt_path)
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"])

    tables = [
        gradient_variance(module, None, estimators, batch, num_draws=options.num_draws, seed=options.seed)
        for batch in batches
    ]
    # the Monte-Carlo noise given a batch, averaged over batches (not the mini-batch noise)
    table = pd.concat(tables).groupby(["estimator", "group"], sort=False, as_index=False).mean()
    table["num_params"] = table["num_params"].astype(int)
    x = batches[0]["x"] if isinstance(batches[0], dict) else batches[0]
    x = x[0] if isinstance(x, (tuple, list)) else x
    print(
        f"Gradients of -ELBO per data point: {options.num_draws} draws (seed {options.seed}) on "
        f"{len(batches)} training batch{'es' if len(batches) > 1 else ''} of {x.shape[0]} "
        f"from {type(datamodule).__name__}, at "
        + (f"the parameters of {options.ckpt_path}" if options.ckpt_path else "the initial parameters")
        + "."
    )
    print(format_table(table))
    if options.output is not None:
        table.to_csv(options.output, index=False)
        print(f"Wrote {options.output}")


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``pyro-lvm`` console script."""
    # Version-compatibility notices between Lightning, jsonargparse and torch that a
    # user can do nothing about; they would precede every run.
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    torch.set_float32_matmul_precision("high")
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["gradient-variance"]:  # not a Trainer subcommand: LightningCLI does not know it
        gradient_variance_main(argv[1:])
        return
    LVMCLI(args=args)


if __name__ == "__main__":
    main()
