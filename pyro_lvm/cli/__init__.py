r"""The ``pyro-lvm`` command line: one file per command, each a thin parser over the library.

* ``pyro-lvm fit --config FILE.yaml`` trains (LightningCLI, :mod:`pyro_lvm.cli.fit`; also ``validate``,
  ``test``, ``predict``);
* ``pyro-lvm evaluate --ckpt RUN/checkpoints/X.ckpt`` prints and saves (JSON) the held-out log-likelihood of
  a trained run (:mod:`pyro_lvm.cli.evaluate`, :func:`pyro_lvm.diagnostics.evaluate`);
* ``pyro-lvm diagnose --ckpt ...`` writes pictures and a Markdown report on its approximate posterior
  (:mod:`pyro_lvm.cli.diagnose`, :mod:`pyro_lvm.diagnostics.report`);
* ``pyro-lvm gradient-variance`` prints the variance and signal-to-noise ratio of several estimators'
  gradients on a run's model and data (:mod:`pyro_lvm.cli.gradient_variance`).

``pyro-lvm --help`` lists them all; ``pyro-lvm COMMAND --help`` describes one.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable, Optional

__all__ = ["main", "COMMANDS"]

# command -> (module, function, one line): the commands LightningCLI does not know, and its own
COMMANDS: dict[str, tuple[str, str, str]] = {
    "fit": ("fit", "", "train a model (a YAML config: pyro-lvm fit --config FILE.yaml)"),
    "validate": ("fit", "", "the validation metrics of a checkpoint"),
    "test": ("fit", "", "the test metrics of a checkpoint"),
    "predict": ("fit", "", "predictions of a checkpoint"),
    "evaluate": ("evaluate", "evaluate_main", "the held-out log-likelihood of a trained run (JSON and a table)"),
    "diagnose": ("diagnose", "diagnose_main", "a report on the approximate posterior of a trained run"),
    "gradient-variance": ("gradient_variance", "gradient_variance_main",
                          "the variance and SNR of several estimators' gradients on a run's model"),
}


def _usage() -> str:
    lines = ["usage: pyro-lvm COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<18} {text}" for name, (_, _, text) in COMMANDS.items()]
    lines += ["", "pyro-lvm COMMAND --help describes a command; with no command, pyro-lvm fit trains the default VAE."]
    return "\n".join(lines)


def _command(module: str, function: str) -> Callable:
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{module}"), function)


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``pyro-lvm`` console script."""
    # Version-compatibility notices between Lightning, jsonargparse and torch that a
    # user can do nothing about; they would precede every run.
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] in (["-h"], ["--help"]):
        print(_usage())
        return
    import torch

    torch.set_float32_matmul_precision("high")
    module, function, _ = COMMANDS.get(argv[0], ("fit", "", "")) if argv else ("fit", "", "")
    if function:  # not a Trainer subcommand: LightningCLI does not know it
        _command(module, function)(argv[1:])
        return
    _command("fit", "LVMCLI")(args=args)
