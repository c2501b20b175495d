"""Train a model/guide pair in one call: :func:`fit`."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Union

import numpy as np
import pytorch_lightning as pl
import torch
from pyro.infer import ELBO
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import nn

from ..data.datasets import check_data
from ..data.modules import TensorDataModule
from ..estimators import refuse_moved_options
from ..schedules import Schedule
from .callbacks import use_run_checkpoint
from .checkpoints import load_checkpoint
from .module import LVMModule
from .monitor import LatentMonitor
from .runs import check_run_folder

__all__ = ["fit"]

def fit(
    model: Union[nn.Module, Callable],
    guide: Optional[Callable] = None,
    data: Union[pl.LightningDataModule, torch.Tensor, None] = None,
    estimator: Union[ELBO, str] = "reparam",
    *,
    beta: Union[float, Schedule] = 1.0,
    lr: float = 1e-3,
    latent_monitor: Union[bool, LatentMonitor] = True,
    seed: Optional[int] = 0,
    ckpt_path: Optional[str] = None,
    rename: Optional[dict[str, str]] = None,
    data_plate: str = "data",
    **trainer_kwargs: Any,
) -> LVMModule:
    """Train a model/guide pair in one call and return the trained :class:`LVMModule`.

    The arguments from ``model`` to ``latent_monitor``, ``rename`` and ``data_plate`` are those
    of :class:`LVMModule`: the estimator is an object with its own options, e.g.
    ``fit(vae, data=x, estimator=pyro_lvm.estimators.IWAEELBO(num_particles=5))``, or a name for
    one with its defaults (``estimator="iwae"``).

    ``data`` is a Lightning data module or a tensor with one row per data point,
    of which a random tenth (seeded by ``seed``) is held out for the validation
    ELBO. ``trainer_kwargs`` go to :class:`pytorch_lightning.Trainer`
    (``max_epochs``, ``accelerator``, ``devices``, ``strategy``, ``callbacks``, ...);
    the trainer stays reachable as ``module.trainer``. ``ckpt_path`` resumes a
    run from its checkpoint (loaded with ``weights_only=True``); with the same
    ``seed`` the result equals an uninterrupted run. ``seed`` seeds training, not
    the model's initial weights, which exist before ``fit`` is called: seed
    (``pytorch_lightning.seed_everything``) before building the model for
    identical initial weights.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model(x):                          # z ~ N(loc, I), x ~ N(z, I)
        ...     loc = pyro.param("loc", torch.zeros(2))
        ...     with pyro.plate("data", x.shape[0]):
        ...         z = pyro.sample("z", dist.Normal(loc, 1.).to_event(1))
        ...         pyro.sample("x", dist.Normal(z, 1.).to_event(1), obs=x)
        >>> def guide(x):                          # the exact posterior N((x + loc) / 2, I / 2)
        ...     loc = pyro.param("loc", torch.zeros(2))
        ...     with pyro.plate("data", x.shape[0]):
        ...         pyro.sample("z", dist.Normal((x + loc) / 2, 0.5 ** 0.5).to_event(1))
        >>> x = torch.randn(256, 2) + 3.0
        >>> module = fit(model, guide, data=x, lr=0.1, max_epochs=100, enable_progress_bar=False,
        ...              logger=False, enable_checkpointing=False, enable_model_summary=False)
        >>> bool((module.pyro_params["loc"] - x.mean(0)).abs().max() < 0.3)  # the MLE of loc
        True
    """
    refuse_moved_options("fit", estimator, trainer_kwargs)  # before anything runs: the new spelling
    if seed is not None:
        pl.seed_everything(seed, verbose=False)
    if isinstance(data, np.ndarray):
        data = torch.as_tensor(data)
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or len(data) == 0:
            raise ValueError(f"fit() needs at least one data point (a tensor with one row per point); got shape "
                             f"{tuple(data.shape)}.")
        check_data(data, "data")  # before the split: a bad value's index is the row the user knows
        check_rows = getattr(model, "check_data", None)
        if callable(check_rows):  # a built-in model: shape and support of every row, by the user's row
            check_rows(data, "data")
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed or 0))
        n_val = max(1, len(data) // 10) if len(data) > 1 else 0  # one point: all of it to train on
        data = TensorDataModule(data[order[n_val:]], val=data[order[:n_val]] if n_val else None)
    if data is None:
        raise ValueError("fit() needs data: a LightningDataModule or a tensor of data points.")
    if not isinstance(data, pl.LightningDataModule):
        raise TypeError(f"fit() takes data as a tensor (or NumPy array) with one row per data point, or a "
                        f"LightningDataModule; got {type(data).__name__}.")
    module = LVMModule(
        model, guide, estimator=estimator, beta=beta, lr=lr, latent_monitor=latent_monitor, rename=rename,
        data_plate=data_plate,
    )
    if ckpt_path is not None:
        load_checkpoint(ckpt_path)
    trainer = pl.Trainer(**trainer_kwargs)
    use_run_checkpoint(trainer)  # last.ckpt at every epoch and the best one, written atomically
    logger = trainer.logger
    if logger is not None and getattr(logger, "log_dir", None):
        check_run_folder(logger.log_dir, ckpt_path)  # an explicit version that holds a run is not written over
    with warnings.catch_warnings():
        if not is_overridden("val_dataloader", data, pl.LightningDataModule):  # data without a held-out split: fine
            warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no `val_dataloader`")
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    return module
