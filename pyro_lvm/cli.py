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

``pyro-lvm evaluate --ckpt RUN/checkpoints/X.ckpt`` prints and saves (JSON) the
held-out log-likelihood of a trained run (:func:`pyro_lvm.evaluation.evaluate`);
``pyro-lvm diagnose --ckpt ...`` writes pictures and a Markdown report on its
approximate posterior (:mod:`pyro_lvm.posterior_checks`).
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
from typing import Any, Callable, Iterator, Optional, Union

import pytorch_lightning as pl
import numpy as np
import torch
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from .callbacks import RunCheckpoint, use_run_checkpoint
from .checkpoints import load_checkpoint, load_run
from .plots import (
    _save_tiles,
    as_images,
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
from .runs import check_run_folder, claim_version, release_if_empty, version_folder
from .training import LVMModule

__all__ = [
    "RunReport", "LVMCLI", "main", "gradient_variance_main", "evaluate_main", "diagnose_main",
    "instantiate_run", "DEFAULT_CONFIG",
]

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
        loader, batch = self._first_batch(trainer.datamodule)
        if loader is None:
            return []
        parameter = next(lvm.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
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
    def _first_batch(datamodule) -> tuple[Any, Any]:
        """A loader and its first batch: the validation split's, else the test's, else the training's."""
        if datamodule is None:
            return None, None
        for name in ("val_dataloader", "test_dataloader", "train_dataloader"):
            try:  # a data module without the split (e.g. val_size=0) raises, or yields nothing
                loader = getattr(datamodule, name)()
                return loader, next(iter(loader))
            except Exception:
                continue
        return None, None

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
            # the deepest level of the key that exists: its first unknown part is the one to name
            parts = key.split(".")
            depth = len(parts) - 1
            while depth > 0 and not _valid_keys(parser, ".".join(parts[:depth]) + ".x"):
                depth -= 1
            valid = _valid_keys(parser, ".".join(parts[:depth] + ["x"]))
            wrong = parts[depth]
            close = difflib.get_close_matches(wrong, valid, n=1)
            where = "there" if depth else "at the top level"
            hints.append(
                f"Unknown key '{key}'" + (f" ('{wrong}')" if wrong != key else "") + "."
                + (f" Did you mean '{close[0]}'?" if close else "")
                + f" Valid keys {where}: {', '.join(valid)}."
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
    """LightningCLI for :class:`pyro_lvm.LVMModule` and any Lightning data module.

    Beyond LightningCLI: checkpoints are read with ``weights_only=True`` (a corrupt or
    foreign file gets a message, not a pickle traceback), ``--test_after_fit`` tests the
    best checkpoint, and an ``optimizer:`` key builds its optimizer (and ``lr_scheduler:``
    its schedule) on :meth:`pyro_lvm.LVMModule.parameter_groups`, so submodules with an
    ``own_lr`` keep their rate.
    """

    def __init__(self, args: Optional[list[str]] = None, **kwargs):
        kwargs.setdefault("parser_kwargs", {}).setdefault(
            "fit", {"default_config_files": [str(DEFAULT_CONFIG)]}
        )
        kwargs.setdefault("trainer_defaults", {"callbacks": [RunReport()]})
        # the run folder is claimed (a new version) or checked (an explicit one) before anything is written
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", _Parser)
        self._claimed: Optional[Path] = None
        self._resuming_into = False
        try:
            super().__init__(
                LVMModule,
                pl.LightningDataModule,
                subclass_mode_data=True,
                args=args,
                **kwargs,
            )
        except BaseException:
            release_if_empty(self._claimed)  # a run that failed before it began leaves no empty version_N
            raise

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The Trainer, with :class:`~pyro_lvm.callbacks.RunCheckpoint` where Lightning would add its default
        checkpoint callback (best epoch and ``last.ckpt`` at every epoch, written atomically)."""
        trainer = super().instantiate_trainer(**kwargs)
        use_run_checkpoint(trainer)
        return trainer

    def before_instantiate_classes(self) -> None:
        """``fit``: claim a new ``version_N`` for the logger, or check that an explicit one holds no run."""
        if self.subcommand != "fit" or os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
            return  # other DDP processes write nothing of their own
        config = self.config["fit"]
        logger = config["trainer"].get("logger")
        init = getattr(logger, "init_args", None)
        if init is None or getattr(init, "save_dir", None) is None:
            return  # no logger, or one without a folder of ours
        root = Path(init.save_dir) / (init.name if getattr(init, "name", None) else "")
        if getattr(init, "version", None) is None:
            init.version, self._claimed = claim_version(root)
        else:
            self._resuming_into = check_run_folder(version_folder(root, init.version), config.get("ckpt_path"),
                                                   config.get("overwrite"))

    def before_fit(self) -> None:
        """Check the data before anything is written; tell the checkpoints how this run resumes."""
        if isinstance(self.model, LVMModule) and self.datamodule is not None:
            self.datamodule.setup("fit")  # NaN, shapes: a data error leaves no run folder behind
            self.model.check_data_module(self.datamodule)
        config_path = Path(self.trainer.log_dir or ".") / "config.yaml"
        for callback in self.trainer.callbacks:
            if isinstance(callback, RunCheckpoint) and callback.resume_command is None:
                callback.resume_command = f"pyro-lvm fit --config {config_path} --ckpt_path {{ckpt}}"
        if isinstance(self.model, LVMModule) and self.model.run_config is None:
            # the architecture: a resume with another one is refused (lr, estimator and the like may change)
            model = _plain_config(self.config["fit"].get("model")) or {}
            self.model.run_config = {key: model.get(key) for key in ("model", "guide")}

    def _add_configure_optimizers_method_to_model(self, subcommand: Optional[str]) -> None:
        # LightningCLI builds an ``optimizer:`` on ``model.parameters()``, one group at the
        # optimizer's rate: hand it LVMModule.parameter_groups() instead, so that a learned
        # baseline or a per-datapoint guide keeps its own rate under any optimizer and scheduler.
        # Lightning warns that the module's configure_optimizers is overridden: the override is
        # the point of the key, and the groups it would have lost are kept.
        model = self.model
        if isinstance(model, LVMModule):
            groups = model.parameter_groups()
            model.parameters = lambda recurse=True: iter(groups)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*configure_optimizers` will be overridden")
                super()._add_configure_optimizers_method_to_model(subcommand)
        finally:
            if "parameters" in vars(model):
                del model.parameters

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
        parser.add_argument(
            "--overwrite", type=bool, default=False,
            help="fit only: write into a run folder (an explicit logger version) that already holds a run",
        )

    def after_fit(self) -> None:
        """With ``test_after_fit: true``, test the best checkpoint on the test split."""
        if not self.config.get(self.subcommand, {}).get("test_after_fit"):
            return
        ckpt = self.trainer.checkpoint_callback
        best = ckpt.best_model_path if ckpt is not None and getattr(ckpt, "best_model_path", "") else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best, weights_only=True)

    def fit(self, model, datamodule=None, ckpt_path: Optional[str] = None, weights_only: Optional[bool] = None, **kwargs) -> None:
        """``Trainer.fit``, reading a checkpoint with ``weights_only=True`` (``False`` is refused)."""
        with warnings.catch_warnings():
            if self._resuming_into or self.config["fit"].get("overwrite"):  # asked for: the folder is checked
                warnings.filterwarnings("ignore", message=r"(Experiment logs|Checkpoint) directory .* exists and is not empty")
            self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path,
                             weights_only=_weights_only(weights_only), **kwargs)

    def validate(self, model, datamodule=None, ckpt_path: Optional[str] = None, weights_only: Optional[bool] = None,
                 **kwargs) -> Any:
        """``Trainer.validate``, reading a checkpoint (a path, ``last``, ``best``) with ``weights_only=True``."""
        return self.trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt_path,
                                     weights_only=_weights_only(weights_only), **kwargs)

    def test(self, model, datamodule=None, ckpt_path: Optional[str] = None, weights_only: Optional[bool] = None,
             **kwargs) -> Any:
        """``Trainer.test``, reading a checkpoint (a path, ``last``, ``best``) with ``weights_only=True``."""
        return self.trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path,
                                 weights_only=_weights_only(weights_only), **kwargs)

    def predict(self, model, datamodule=None, ckpt_path: Optional[str] = None, weights_only: Optional[bool] = None,
                **kwargs) -> Any:
        """``Trainer.predict``, reading a checkpoint (a path, ``last``, ``best``) with ``weights_only=True``."""
        return self.trainer.predict(model, datamodule=datamodule, ckpt_path=ckpt_path,
                                    weights_only=_weights_only(weights_only), **kwargs)


def _weights_only(value: Optional[bool]) -> bool:
    if value is False:
        raise SystemExit(
            "pyro-lvm: --weights_only false is refused: pyro_lvm checkpoints hold tensors and plain data only and "
            "load with weights_only=True, which runs no pickled code (a crafted checkpoint could run anything)."
        )
    return True


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


# Keys that `pyro-lvm fit` writes into a run's config.yaml but that only its subcommand accepts.
_RUN_ONLY_KEYS = ("ckpt_path", "weights_only", "overwrite")


def _plain_config(value: Any) -> Any:
    """A parsed configuration (jsonargparse Namespaces) as plain dicts, lists and numbers."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_config(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def instantiate_run(config: Union[str, os.PathLike]) -> tuple[LVMModule, pl.LightningDataModule]:
    """The :class:`~pyro_lvm.LVMModule` and the data module that a ``pyro-lvm fit`` configuration names.

    Parsed as ``pyro-lvm fit`` parses it (a run's ``config.yaml`` is accepted as written),
    with a quiet ``Trainer`` (no logger, checkpoints or progress bar) that is built and not used.
    """
    import yaml

    path = Path(config)
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"Configuration {path} cannot be read ({err}). Pass the run's config.yaml.") from err
    if not isinstance(values, dict) or "model" not in values:
        raise ValueError(f"Configuration {path} has no 'model:' section; pass the config.yaml of a pyro-lvm fit run.")
    for key in _RUN_ONLY_KEYS:
        values.pop(key, None)
    values["trainer"] = {
        "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
        "enable_model_summary": False, "callbacks": None,
    }
    with warnings.catch_warnings(), _quiet("pytorch_lightning", "lightning_fabric"):
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = LVMCLI(args=values, run=False, trainer_defaults={})
    return cli.model, cli.datamodule


def _run_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False, description=description)
    parser.add_argument("--ckpt", required=True, metavar="RUN/checkpoints/X.ckpt", help="a checkpoint of a pyro-lvm fit run")
    parser.add_argument(
        "--config", default=None, metavar="FILE.yaml",
        help="the run's configuration, for its data (and for a user's own model/guide pair); default RUN/config.yaml",
    )
    parser.add_argument("--split", choices=("test", "val"), default="test", help="the data split (default: %(default)s)")
    parser.add_argument("--chunk-size", type=int, default=100, help="particles per vectorized run: bounds the memory (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=100, help="data points per vectorized run (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo draws (default: %(default)s)")
    return parser


def subset_indices(n: int, limit: int, seed: int) -> torch.Tensor:
    """``limit`` of ``n`` indices drawn uniformly without replacement with ``seed``, in increasing order.

    The subset ``pyro-lvm evaluate --limit N --subset random`` evaluates: a simple random sample,
    so its mean and standard error estimate the whole split's. (The first ``N`` points are not
    one: MNIST's test set puts the writers of its two sources in its two halves, and the static
    binarized test set holds blocks of very different images.)

    Example:
        >>> subset_indices(10, 4, seed=0).tolist() == sorted(subset_indices(10, 4, seed=0).tolist())
        True
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[: min(limit, n)].sort().values


def _split_data(
    datamodule: pl.LightningDataModule, split: str, limit: Optional[int], subset: str = "first", seed: int = 0
) -> dict[str, torch.Tensor]:
    """The split's batches concatenated: ``{"x": ..., other per-point keys}``, ``limit`` points of it.

    ``subset="first"``: the first ``limit`` points; ``"random"``: :func:`subset_indices` with ``seed``.
    """
    if subset == "random" and limit is not None:
        everything = _split_data(datamodule, split, None)
        n = len(everything["x"])
        index = subset_indices(n, limit, seed)
        return {key: value[index] if len(value) == n else value for key, value in everything.items()}
    datamodule.setup("test" if split == "test" else "validate")
    loader = getattr(datamodule, f"{split}_dataloader")()
    parts: dict[str, list] = {}
    count = 0
    for batch in loader:
        batch = batch if isinstance(batch, dict) else {"x": batch[0] if isinstance(batch, (tuple, list)) else batch}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                parts.setdefault(key, []).append(value)
        count += len(batch["x"])
        if limit is not None and count >= limit:
            break
    if not parts:
        raise ValueError(f"The data module's {split} split is empty; evaluate another split (--split).")
    return {key: torch.cat(values)[:limit] for key, values in parts.items()}


def _run_dir(ckpt: str) -> Path:
    """``RUN`` for ``RUN/checkpoints/X.ckpt``; the checkpoint's folder otherwise."""
    folder = Path(ckpt).resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def _pair(module: torch.nn.Module) -> tuple[Callable, Callable, Any]:
    """The model, the guide and the parameter scope to run them in, for a built-in model or an LVMModule."""
    from .pairs import accepting, call_keys

    if isinstance(module, LVMModule):  # its model and guide run in its parameter store, keys renamed
        return module.model, module.guide, contextlib.nullcontext()
    return accepting(module.model), accepting(module.guide, call_keys(module.guide, module.model)), contextlib.nullcontext()


def _kwargs(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in data.items() if key != "x"}


def _load(parser: argparse.ArgumentParser, options: argparse.Namespace, need_data: bool = True):
    for name in ("chunk_size", "batch_size"):
        if getattr(options, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer; got {getattr(options, name)}")
    try:
        return load_run(options.ckpt, options.config, need_data=need_data)
    except FileNotFoundError as err:
        parser.error(str(err))


def evaluate_main(args: list[str]) -> dict[str, Any]:
    """``pyro-lvm evaluate``: the held-out log-likelihood of a run, printed and saved as JSON.

    The model is rebuilt from the checkpoint (:func:`pyro_lvm.checkpoints.load_run`), the
    data from the run's ``config.yaml``; :func:`pyro_lvm.evaluation.evaluate` computes the
    importance-sampled log-likelihood with its standard error, bits/dim, the ELBO and its
    terms, the KL, active units and :math:`I(x; z)` (a flow: its exact log-likelihood).
    Returns the saved numbers.

    .. code-block:: console

       $ pyro-lvm evaluate --ckpt runs/vae_digits/version_0/checkpoints/last.ckpt
       $ pyro-lvm evaluate --ckpt RUN/checkpoints/last.ckpt --split val --num-particles 1000 --limit 500
    """
    from .evaluation import evaluate
    from .models.flow import FlowModel

    parser = _run_parser(
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
    module, datamodule = _load(parser, options)
    data = _split_data(datamodule, options.split, options.limit, options.subset, options.seed)
    module = module.to(device)
    data = {key: value.to(device) for key, value in data.items()}
    pl.seed_everything(options.seed, verbose=False)
    common = dict(num_particles=options.num_particles, chunk_size=options.chunk_size,
                  batch_size=options.batch_size, progress=options.progress)
    flow = getattr(module, "lvm", module)
    if isinstance(flow, FlowModel):
        result = evaluate(flow, data["x"], **common)
    else:
        model, guide, scope = _pair(module)
        with scope:
            latent = _has_latents(guide, data["x"], _kwargs(data))
            result = evaluate(model, data["x"], guide=guide, compile={"true": True, "false": False}.get(
                options.compile, "auto"), **common, **_kwargs(data))
    exact = isinstance(flow, FlowModel) or not latent
    numbers = {"checkpoint": str(Path(options.ckpt).resolve()), "split": options.split,
               "model": type(flow).__name__, "flow": isinstance(flow, FlowModel), "exact": exact, "device": str(device),
               "subset": "all" if options.limit is None else f"{options.subset} {options.limit} (seed {options.seed})",
               **result.as_dict()}
    output = Path(options.output) if options.output else _run_dir(options.ckpt) / f"evaluate_{options.split}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(numbers, indent=2) + "\n")
    print(_evaluation_table(numbers))
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


def _has_latents(guide: Callable, x: torch.Tensor, kwargs: dict) -> bool:
    """Whether the guide draws any latent sample site for the first data point."""
    from pyro import poutine

    from .pairs import rows

    with torch.no_grad(), poutine.block():
        trace = poutine.trace(guide).get_trace(x[:1], **rows(kwargs, slice(0, 1), len(x)))
    return any(site["type"] == "sample" and not site["is_observed"] for site in trace.nodes.values())


def _evaluation_table(n: dict[str, Any]) -> str:
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


def diagnose_main(args: list[str]) -> Path:
    """``pyro-lvm diagnose``: pictures and a Markdown report on the approximate posterior of a run.

    Writes into ``--output-dir`` (default ``RUN/diagnose``) ``report.md`` and the PNGs it
    shows: the Pareto k-hat of each input's importance weights
    (:func:`pyro_lvm.posterior_checks.psis_khat`) as a histogram, the inputs with the
    largest k-hat, the KL per latent dimension (posterior collapse), the amortization gap,
    SBC rank histograms and NUTS against the guide (:mod:`pyro_lvm.posterior_checks`), on
    any run: a built-in model's pair (several latent sites, a conditional model given the
    split's ``y`` and ``mask``, a flow posterior) or a user's own. A check that cannot work
    on the model says why in the report (NUTS and the gap on a discrete latent). A flow has
    no latent: the report says so.
    Returns the report's path.

    .. code-block:: console

       $ pyro-lvm diagnose --ckpt runs/vae_digits/version_0/checkpoints/last.ckpt --num-inputs 200
    """
    from . import posterior_checks
    from .models.flow import FlowModel

    parser = _run_parser(
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
    module, datamodule = _load(parser, options)
    out = Path(options.output_dir) if options.output_dir else _run_dir(options.ckpt) / "diagnose"
    out.mkdir(parents=True, exist_ok=True)
    lvm = getattr(module, "lvm", module)
    lines = [f"# Posterior diagnostics of {type(lvm).__name__}", "",
             f"Checkpoint: `{Path(options.ckpt).resolve()}`; {options.split} split.", ""]
    if isinstance(lvm, FlowModel):
        lines += ["A normalizing flow has no latent variable: its log-likelihood is exact, so there is no "
                  "approximate posterior to diagnose (no k-hat, amortization gap, SBC or NUTS). "
                  "Use `pyro-lvm evaluate` for its log-likelihood and bits/dim.", ""]
        return _write_report(out, lines)
    data = _split_data(datamodule, options.split, options.num_inputs)
    x, kwargs = data["x"], _kwargs(data)
    model, guide, scope = _pair(module)
    pl.seed_everything(options.seed, verbose=False)
    with scope:
        if not _has_latents(guide, x, kwargs):
            lines += [f"{type(lvm).__name__}'s guide draws no latent variable: its log-likelihood is exact, so "
                      "there is no approximate posterior to diagnose (no k-hat, amortization gap, SBC or NUTS). "
                      "Use `pyro-lvm evaluate` for its log-likelihood and bits/dim.", ""]
            return _write_report(out, lines)
        try:
            lines += _khat_section(posterior_checks, model, guide, x, kwargs, options, out)
        except ValueError as err:  # e.g. global latents: no importance weights per input
            lines += ["## Pareto k-hat of the importance weights", "", f"Not run for this model: {err}", ""]
        lines += _kl_section(model, guide, x, kwargs, options, out)
        lines += _optional_sections(posterior_checks, model, guide, x, kwargs, options, out)
    return _write_report(out, lines)


def _write_report(out: Path, lines: list[str]) -> Path:
    path = out / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    print("\n".join(lines))
    print(f"Wrote {path}")
    return path


def _khat_section(posterior_checks, model, guide, x, kwargs, options, out: Path) -> list[str]:
    from matplotlib.figure import Figure

    khat = posterior_checks.psis_khat(model, guide, x, num_particles=options.num_particles,
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
        _save_tiles(tiles[None], out / "worst_inputs.png", col_labels=[f"{float(khat[i]):.2f}" for i in worst],
                    title="inputs with the largest k-hat")
        lines += ["![worst inputs](worst_inputs.png)", ""]
    except (ValueError, RuntimeError) as err:  # data that are not images
        lines += [f"(The worst inputs are not drawn: {err})", ""]
    (out / "khat.json").write_text(json.dumps([float(k) for k in khat]) + "\n")
    return lines


def _kl_section(model, guide, x, kwargs, options, out: Path) -> list[str]:
    from matplotlib.figure import Figure

    from .evaluation import evaluate

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


def _optional_sections(posterior_checks, model, guide, x, kwargs, options, out: Path) -> list[str]:
    """Amortization gap, SBC and NUTS against q, where :mod:`pyro_lvm.posterior_checks` has them.

    They run on the pair as trained (a built-in model's or a user's own), with the split's
    other per-point tensors (a conditional model's ``y`` and ``mask``) passed along; a check
    that cannot work on the model (NUTS or the gap on a discrete latent) says why.
    """
    sections = (
        ("Amortization gap", "amortization_gap", _gap_section, "gap_inputs"),
        ("Simulation-based calibration", "sbc", _sbc_section, "num_simulations"),
        ("NUTS against the guide", "compare_with_nuts", _nuts_section, "nuts_inputs"),
    )
    lines = []
    for title, name, section, count in sections:
        lines += [f"## {title}", ""]
        fn = getattr(posterior_checks, name, None)
        if getattr(options, count) == 0:
            lines += [f"Skipped (--{count.replace('_', '-')} 0).", ""]
        elif fn is None:
            lines += [f"Not available: this pyro_lvm has no posterior_checks.{name}.", ""]
        else:
            try:
                lines += section(posterior_checks, model, guide, x, kwargs, options, out)
            except (ValueError, NotImplementedError) as err:  # e.g. a discrete latent
                lines += [f"Not run for this model: {err}", ""]
    return lines


def _gap_section(posterior_checks, model, guide, x, kwargs, options, out: Path) -> list[str]:
    from matplotlib.figure import Figure

    x, kwargs = posterior_checks._take(x, kwargs, torch.arange(min(options.gap_inputs, len(x))))
    gap = posterior_checks.amortization_gap(
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


def _sbc_section(posterior_checks, model, guide, x, kwargs, options, out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    result = posterior_checks.sbc(model, guide, num_simulations=options.num_simulations, num_draws=99, num_bins=20,
                                  batch_size=min(500, options.num_simulations), x=x, **kwargs)
    panels = 16
    fig = posterior_checks.plot_sbc(result, str(out / "sbc_ranks.png"), max_panels=panels)
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


def _nuts_section(posterior_checks, model, guide, x, kwargs, options, out: Path) -> list[str]:
    from matplotlib.figure import Figure

    x, kwargs = posterior_checks._take(x, kwargs, torch.arange(min(options.nuts_inputs, len(x))))
    result = posterior_checks.compare_with_nuts(
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
    if argv[:1] == ["evaluate"]:
        evaluate_main(argv[1:])
        return
    if argv[:1] == ["diagnose"]:
        diagnose_main(argv[1:])
        return
    LVMCLI(args=args)


if __name__ == "__main__":
    main()
