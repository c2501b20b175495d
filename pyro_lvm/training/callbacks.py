r"""Lightning callbacks that keep a run's work: checkpoints that mean what they say, written atomically.

:class:`RunCheckpoint` is the checkpoint callback of every shipped config, of ``pyro-lvm fit``'s default
and of :func:`pyro_lvm.fit`: the best epoch by the validation ELBO, and ``last.ckpt`` at the end of *every*
epoch (what a resume continues), each written to a temporary file and renamed over its name
(:class:`AtomicCheckpointIO`), so a crash or a full disk never leaves a truncated file under a checkpoint's
name. On Ctrl-C or an error it saves the interrupted state where it can and prints the command that
resumes the run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

__all__ = ["AtomicCheckpointIO", "RunCheckpoint", "make_checkpoint_io_atomic", "finite_parameters",
           "use_run_checkpoint"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint to a temporary file in its folder, flush it to disk, then rename it over its name.

    A rename within a folder is atomic: a reader sees the previous file or the complete new one, never a
    part; a failed write (a full disk, a killed process) removes its temporary file and leaves the previous
    checkpoint as it was. Paths with a URL scheme (``s3://``) go to Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def make_checkpoint_io_atomic(trainer: pl.Trainer) -> None:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` unless it was given a checkpoint writer of its own."""
    strategy = trainer.strategy
    current = getattr(strategy, "checkpoint_io", None)
    if type(current) is TorchCheckpointIO:  # Lightning's default: replace; a user's own plugin: keep
        strategy.checkpoint_io = AtomicCheckpointIO()


def finite_parameters(module: torch.nn.Module) -> bool:
    """Whether every parameter of ``module`` is finite (one host sync)."""
    params = [p.detach() for p in module.parameters()]
    if not params:
        return True
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


class RunCheckpoint(ModelCheckpoint):
    """The best epoch by the validation ELBO, and ``last.ckpt`` at the end of every epoch.

    Lightning's ``ModelCheckpoint(monitor=..., save_last=True)`` writes ``last.ckpt`` only when the
    monitored number improves, so after a crash ``--ckpt_path last`` would silently go back to the last
    improving epoch. This callback writes ``last.ckpt`` at the end of every training epoch (after its
    validation), keeps the best ``save_top_k`` epochs by ``monitor`` beside it, writes every file
    atomically (:class:`AtomicCheckpointIO`), and never writes non-finite parameters. On an exception
    (Ctrl-C included) it saves the interrupted state as ``interrupted.ckpt`` when its parameters are
    finite, and prints how to resume: from ``last.ckpt``, the end of the latest completed epoch, exactly
    as an uninterrupted run (or from ``interrupted.ckpt``, mid-epoch).

    Arguments:
        monitor: the logged number that ranks the epochs (``None``: keep the latest ``save_top_k``).
        mode: ``"max"`` (an ELBO) or ``"min"``.
        filename: the name of the best epochs' files.
        resume_command: how to resume, with ``{ckpt}`` where the checkpoint goes (``pyro-lvm fit`` and
            :func:`pyro_lvm.fit` set it); printed on an interruption.
        kwargs: further arguments of :class:`~pytorch_lightning.callbacks.ModelCheckpoint`.

    Example:
        >>> callback = RunCheckpoint()
        >>> callback.monitor, callback.mode, callback.save_last
        ('val/elbo', 'max', True)
    """

    CHECKPOINT_NAME_INTERRUPTED = "interrupted"

    def __init__(self, monitor: Optional[str] = "val/elbo", mode: str = "max", filename: Optional[str] = "epoch{epoch:03d}",
                 resume_command: Optional[str] = None, **kwargs: Any):
        kwargs.setdefault("save_last", True)
        kwargs.setdefault("auto_insert_metric_name", False)
        kwargs.setdefault("enable_version_counter", False)  # last.ckpt is one file, rewritten
        super().__init__(monitor=monitor, mode=mode, filename=filename, **kwargs)
        self.resume_command = resume_command
        self._last_written_step: Optional[int] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        make_checkpoint_io_atomic(trainer)

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        if self.monitor is not None and self.monitor not in monitor_candidates and not any(trainer.num_val_batches):
            return  # a run without validation has no best epoch to keep: last.ckpt alone
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if not finite_parameters(trainer.lightning_module):
            rank_zero_warn(f"Not writing {filepath}: the parameters are not finite (the run diverged).")
            return
        super()._save_checkpoint(trainer, filepath)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_step = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # after the epoch's validation: last.ckpt, whether or not the monitored number improved
        skip = bool(trainer.fast_dev_run) or trainer.sanity_checking
        if self.save_last and not skip and self._last_written_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if not trainer.is_global_zero or trainer.sanity_checking or self.dirpath is None:
            return
        lines = [f"The run stopped at epoch {trainer.current_epoch}, step {trainer.global_step} "
                 f"({type(exception).__name__})."]
        interrupted = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_INTERRUPTED}{self.FILE_EXTENSION}"
        if isinstance(exception, KeyboardInterrupt) and trainer.global_step > 0 and finite_parameters(pl_module):
            try:
                trainer.save_checkpoint(interrupted, self.save_weights_only)
                lines.append(f"Its state at this step: {interrupted} (mid-epoch).")
            except Exception as err:  # e.g. the disk is full: say so, keep last.ckpt
                lines.append(f"Its state at this step could not be saved ({err}).")
        last = self.last_model_path
        if last and Path(last).is_file():
            template = self.resume_command or "pyro_lvm.fit(<the same arguments>, ckpt_path={ckpt!r})"
            lines.append(f"The last completed epoch is in {last}; resume it, exactly as an uninterrupted run, with:")
            lines.append("    " + template.format(ckpt=str(last)))
        else:
            lines.append("No epoch was completed: there is no last.ckpt to resume from.")
        print("\n".join(lines), flush=True)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        # a resumed run writes last.ckpt where the run wrote it
        state["last_written_step"] = self._last_written_step
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._last_written_step = state_dict.get("last_written_step")


def use_run_checkpoint(trainer: pl.Trainer) -> None:
    """Replace the ``ModelCheckpoint()`` that Lightning adds by default with a :class:`RunCheckpoint`.

    Lightning's default keeps the latest epoch as ``epoch=N-step=M.ckpt`` and no ``last.ckpt``; a
    checkpoint callback the user configured is kept as it is.
    """
    for i, callback in enumerate(trainer.callbacks):
        if (type(callback) is ModelCheckpoint and callback.monitor is None and not callback.save_last
                and callback.dirpath is None):
            trainer.callbacks[i] = RunCheckpoint(dirpath=None)

