"""What ``pyro-lvm evaluate`` and ``diagnose`` share: a trained run and its data, loaded from a checkpoint."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import pytorch_lightning as pl
import torch
from torch import nn

from ..training.checkpoints import (
    is_builtin,
    load_checkpoint,
    model_from_checkpoint,
    run_config,
)
from ..training.module import LVMModule
from .fit import instantiate_run

PathLike = Union[str, os.PathLike]

__all__ = [
    "run_parser",
    "subset_indices",
    "split_data",
    "run_dir",
    "pair_of",
    "other_entries",
    "load_parsed",
    "load_run",
]

def run_parser(prog: str, description: str) -> argparse.ArgumentParser:
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


def split_data(
    datamodule: pl.LightningDataModule, split: str, limit: Optional[int], subset: str = "first", seed: int = 0
) -> dict[str, torch.Tensor]:
    """The split's batches concatenated: ``{"x": ..., other per-point keys}``, ``limit`` points of it.

    ``subset="first"``: the first ``limit`` points; ``"random"``: :func:`subset_indices` with ``seed``.
    """
    if subset == "random" and limit is not None:
        everything = split_data(datamodule, split, None)
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


def run_dir(ckpt: str) -> Path:
    """``RUN`` for ``RUN/checkpoints/X.ckpt``; the checkpoint's folder otherwise."""
    folder = Path(ckpt).resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def pair_of(module: torch.nn.Module) -> tuple[Callable, Callable, Any]:
    """The model, the guide and the parameter scope to run them in, for a built-in model or an LVMModule."""
    from ..pairs import accepting, call_keys

    if isinstance(module, LVMModule):  # its model and guide run in its parameter store, keys renamed
        return module.model, module.guide, contextlib.nullcontext()
    return accepting(module.model), accepting(module.guide, call_keys(module.guide, module.model)), contextlib.nullcontext()


def other_entries(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in data.items() if key != "x"}


def load_parsed(parser: argparse.ArgumentParser, options: argparse.Namespace, need_data: bool = True):
    for name in ("chunk_size", "batch_size"):
        if getattr(options, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer; got {getattr(options, name)}")
    try:
        return load_run(options.ckpt, options.config, need_data=need_data)
    except FileNotFoundError as err:
        parser.error(str(err))


def load_run(ckpt_path: PathLike, config: Optional[PathLike] = None, need_data: bool = True) -> tuple[nn.Module, Any]:
    """The trained model of a run and its data module, from a checkpoint and the run's ``config.yaml``.

    A built-in model is rebuilt by :func:`~pyro_lvm.training.checkpoints.model_from_checkpoint`. A user's own pair (or a
    built-in model trained with another guide) is built as ``pyro-lvm fit`` built it, from
    the configuration (:func:`~pyro_lvm.training.checkpoints.run_config`: ``--config``, or the ``config.yaml`` of the run
    folder), initialized on one training batch and loaded with the checkpoint's weights; it
    is returned as the :class:`pyro_lvm.LVMModule` that holds the pair. Building from a
    configuration imports the classes it names: use configurations you trust. The data
    module is the configuration's ``data:`` (``None`` when ``need_data`` is false and no
    configuration is needed).

    Arguments:
        ckpt_path: a checkpoint of the run (``RUN/checkpoints/X.ckpt``).
        config: the run's configuration; default ``RUN/config.yaml``.
        need_data: whether the data module is needed (it always is for a user's own pair).
    """

    checkpoint = load_checkpoint(ckpt_path)
    if is_builtin(checkpoint):
        model = model_from_checkpoint(checkpoint)  # refuses a foreign class before anything is imported
        datamodule = instantiate_run(run_config(ckpt_path, config))[1] if need_data else None
        return model, datamodule
    module, datamodule = instantiate_run(run_config(ckpt_path, config))
    datamodule.setup("fit")
    module.initialize(next(iter(datamodule.train_dataloader())))
    module.on_load_checkpoint(checkpoint)  # checks the shapes, restores buffers and baselines
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval(), datamodule
