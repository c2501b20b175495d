r"""``pyro-lvm fit`` (and ``validate``, ``test``, ``predict``): LightningCLI for :class:`pyro_lvm.LVMModule`.

Every constructor argument of the model (:class:`pyro_lvm.LVMModule` and the pair it wraps, e.g.
:class:`pyro_lvm.VAE`), the estimator, the data module and the ``Trainer`` is a YAML key and a ``--flag``;
``pyro-lvm fit --help`` lists them and ``pyro-lvm fit --print_config`` prints a complete config. With no
arguments, ``pyro-lvm fit`` trains a VAE on scikit-learn's 8x8 digits and writes a run folder with the
checkpoints, ``metrics.csv``, ``config.yaml`` and pictures.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
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
import torch
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from ..plots import (
    plot_completions,
    plot_interpolation,
    plot_latent_space,
    plot_latent_usage,
    plot_loss_curves,
    plot_manifold,
    plot_reconstructions,
    plot_samples,
    plot_traversals,
)
from ..estimators import ESTIMATORS, MOVED_TO_ESTIMATOR
from ..training.callbacks import RunCheckpoint, use_run_checkpoint
from ..training.checkpoints import load_checkpoint
from ..training.module import LVMModule
from ..training.runs import (
    check_run_folder,
    claim_version,
    release_if_empty,
    version_folder,
)

__all__ = ["DEFAULT_CONFIG", "RunReport", "LVMCLI", "quiet", "instantiate_run"]

DEFAULT_CONFIG = Path(__file__).parent.parent / "configs" / "default.yaml"  # `pyro-lvm fit` alone: the demo
#: what a `pyro-lvm fit --config FILE` run reads before FILE: the demo's own choices (its likelihood, grey levels,
#: learning rate) would otherwise reach every config that leaves those keys out
BASE_CONFIG = Path(__file__).parent.parent / "configs" / "base.yaml"


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
      :class:`~pyro_lvm.training.monitor.LatentMonitor`; ``latent_stats.csv`` holds the numbers.

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


def _moved_hint(option: str) -> str:
    names = ", ".join(f"{name} = {cls.__name__}" for name, cls in ESTIMATORS.items())
    example = {"num_particles": "num_particles: 5", "kl_control": "kl_control: {class_path: "
               "pyro_lvm.estimators.FreeBits, init_args: {nats: 0.25}}", "estimator_options": "baseline: nvil"}[option]
    flag = {"num_particles": "--model.estimator.num_particles 5", "kl_control": "--model.estimator.kl_control "
            "pyro_lvm.estimators.FreeBits", "estimator_options": "--model.estimator.baseline nvil"}[option]
    cls = {"num_particles": "IWAEELBO", "kl_control": "AnalyticKLELBO", "estimator_options": "ScoreFunctionELBO"}[option]
    return (
        f"'model.{option}' is the estimator's own option now. In YAML: estimator: {{class_path: "
        f"pyro_lvm.estimators.{cls}, init_args: {{{example}}}}}; as flags: --model.estimator "
        f"pyro_lvm.estimators.{cls} {flag}. The class of each estimator name: {names}."
    )


class _Parser(LightningArgumentParser):
    """Adds the valid keys (and the closest match) to jsonargparse's unknown-key errors."""

    def error(self, message: str, ex: Optional[Exception] = None):
        hints = []
        unknown = re.findall(r"(?:Subcommand '(\w+)' )?does not accept option '([\w.]+)'", message)
        unknown += [("", key) for key in re.findall(r"unrecognized arguments:.*?--([\w.]+)", message)]
        for subcommand, key in unknown:
            if key.split(".")[-1] in MOVED_TO_ESTIMATOR and key.startswith("model."):
                hints.append(_moved_hint(key.split(".")[-1]))
                continue
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
            "fit", {"default_config_files": [str(BASE_CONFIG if _names_a_config(args) else DEFAULT_CONFIG)]}
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
        """The Trainer, with :class:`~pyro_lvm.training.callbacks.RunCheckpoint` where Lightning would add its default
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


def _names_a_config(args: Any) -> bool:
    """Whether the command line (``args``, else ``sys.argv``) gives a ``--config`` file."""
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, dict):
        return "config" in argv
    return any(str(a) == "--config" or str(a).startswith("--config=") for a in argv)


def _weights_only(value: Optional[bool]) -> bool:
    if value is False:
        raise SystemExit(
            "pyro-lvm: --weights_only false is refused: pyro_lvm checkpoints hold tensors and plain data only and "
            "load with weights_only=True, which runs no pickled code (a crafted checkpoint could run anything)."
        )
    return True


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


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
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


def upgrade_estimator_keys(model: dict) -> dict:
    """A ``model:`` section of an earlier version's run (``estimator`` a name, with ``num_particles``,
    ``estimator_options`` and ``kl_control`` beside it), with those options moved onto the estimator.

    Example:
        >>> upgrade_estimator_keys({"estimator": "iwae", "num_particles": 5, "lr": 0.001})
        {'lr': 0.001, 'estimator': {'class_path': 'pyro_lvm.estimators.IWAEELBO', 'init_args': {'num_particles': 5}}}
        >>> upgrade_estimator_keys({"estimator": "reparam", "num_particles": 1})
        {'estimator': 'reparam'}
    """
    model = dict(model)
    moved = {key: model.pop(key) for key in MOVED_TO_ESTIMATOR if key in model}
    options = {k: v for k, v in moved.items() if k != "estimator_options" and v not in (None, 1)}
    options.update(moved.get("estimator_options") or {})
    estimator = model.pop("estimator", "reparam")
    if options and isinstance(estimator, str):
        estimator = {"class_path": f"pyro_lvm.estimators.{ESTIMATORS[estimator].__name__}", "init_args": options}
    model["estimator"] = estimator
    return model


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
    if isinstance(values["model"], dict):
        values["model"] = upgrade_estimator_keys(values["model"])  # a run written by an earlier version
    values["trainer"] = {
        "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
        "enable_model_summary": False, "callbacks": None,
    }
    with warnings.catch_warnings(), quiet("pytorch_lightning", "lightning_fabric"):
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = LVMCLI(args=values, run=False, trainer_defaults={})
    return cli.model, cli.datamodule
