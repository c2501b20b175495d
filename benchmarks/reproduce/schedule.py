"""Callbacks of the reproduction runs: Burda et al. (2015)'s learning-rate schedule, and a
wall-clock budget that ends a session on the last epoch boundary that fits in it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import pytorch_lightning as pl

__all__ = ["BurdaSchedule", "TimeBudget", "burda_stage"]


def burda_stage(epoch: int, num_stages: int = 8) -> int:
    r"""The stage :math:`i` of Burda et al.'s schedule that the 0-based ``epoch`` falls in.

    Stage :math:`i` lasts :math:`3^i` passes over the data, so it starts at epoch
    :math:`\sum_{j<i} 3^j = (3^i - 1) / 2`; epochs past the last stage stay in it.

    Arguments:
        epoch: the 0-based epoch (``trainer.current_epoch``).
        num_stages: the number of stages (8 in the paper: 3280 passes in all).

    Example:
        >>> [burda_stage(e) for e in (0, 1, 3, 4, 12, 13, 3279, 5000)]
        [0, 1, 1, 2, 2, 3, 7, 7]
    """
    if epoch < 0:
        raise ValueError(f"epoch must be 0 or more; got {epoch}.")
    stage, start = 0, 0
    while stage < num_stages - 1 and epoch >= start + 3**stage:
        start += 3**stage
        stage += 1
    return stage


class BurdaSchedule(pl.Callback):
    r"""Sets Adam's learning rate (and :math:`\epsilon`) at each epoch as in Burda et al. (2015).

    In stage :math:`i = 0, \dots, 7`, which lasts :math:`3^i` passes over the training set
    (3280 passes in all), the learning rate is

    .. math::

        \eta_i = \eta_0 \, 10^{-i/7}, \qquad \eta_0 = 10^{-3},

    with Adam's :math:`\beta_1 = 0.9, \beta_2 = 0.999, \epsilon = 10^{-4}`. The rate is a
    function of ``trainer.current_epoch`` only, so a run resumed from a checkpoint continues on
    the same schedule. Every parameter group gets the same rate (a group with its own ``own_lr``
    is scaled by the same factor relative to the rate it had at the start).

    References:
        Burda, Grosse and Salakhutdinov, Importance Weighted Autoencoders, 2015,
        https://arxiv.org/abs/1509.00519 (Section 5.1).

    Arguments:
        lr: the first stage's rate :math:`\eta_0`.
        num_stages: the number of stages.
        eps: Adam's :math:`\epsilon`, set on every group (``None`` leaves it as it is).

    Example:
        >>> schedule = BurdaSchedule()
        >>> [f"{schedule.lr_at(e):.2e}" for e in (0, 1, 4, 3279)]
        ['1.00e-03', '7.20e-04', '5.18e-04', '1.00e-04']
    """

    def __init__(self, lr: float = 1e-3, num_stages: int = 8, eps: float | None = 1e-4) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be positive; got {lr}.")
        if num_stages < 1:
            raise ValueError(f"num_stages must be at least 1; got {num_stages}.")
        self.lr = lr
        self.num_stages = num_stages
        self.eps = eps
        self._base: list[float] | None = None

    @property
    def total_epochs(self) -> int:
        """The passes of all stages together, :math:`\\sum_i 3^i` (3280 for 8 stages)."""
        return (3**self.num_stages - 1) // 2

    def lr_at(self, epoch: int) -> float:
        """The learning rate of the 0-based ``epoch``."""
        return self.lr * 10.0 ** (-burda_stage(epoch, self.num_stages) / 7.0)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        factor = self.lr_at(trainer.current_epoch) / self.lr
        for optimizer in trainer.optimizers:
            groups = optimizer.param_groups
            if self._base is None or len(self._base) != len(groups):
                # the rates the module chose (LVMModule: ``lr``, and any ``own_lr``); the first
                # group is the model's and follows the paper's rate
                self._base = [float(g.get("initial_lr", g["lr"])) for g in groups]
                self._base[0] = self.lr
                for group, base in zip(groups, self._base):
                    group.setdefault("initial_lr", base)
            for group, base in zip(groups, self._base):
                group["lr"] = base * factor
                if self.eps is not None:
                    group["eps"] = self.eps


class TimeBudget(pl.Callback):
    r"""Ends training at the last epoch boundary that fits in ``seconds`` of wall-clock.

    At the end of each epoch (its validation and checkpoint included: the clock runs from one
    epoch end to the next), training stops when one more epoch, as long as the longest one of
    this session so far, would end past the budget:

    .. math::

        t_{\text{elapsed}} + \max_{e \le n} \Delta t_e > T .

    So a session on a lease (a GPU booked for ten minutes, a batch job's time limit) ends on
    a checkpoint that ``--resume`` continues, without running past its time, unlike
    Lightning's ``Timer``, which checks after the epoch that crosses the limit. Only the
    first epoch can overrun (nothing is known of its length before it ends). The budget is
    this session's: a resumed run gets ``seconds`` again.

    Arguments:
        seconds: the wall-clock budget of this session, from the start of training.
        record: a JSON file written when the budget ends training (``{"stopped": true,
            "epoch": ..., "elapsed_s": ..., "longest_epoch_s": ...}``), so that a caller
            can tell a session cut by time from one that early stopping or its epoch cap ended.
        clock: the clock, in seconds (``time.monotonic``; a test passes its own).

    Example:
        >>> ticks = iter([0.0, 40.0, 70.0])          # train start, then two epoch ends
        >>> budget = TimeBudget(100.0, clock=lambda: next(ticks))
        >>> class Trainer:
        ...     should_stop = False
        ...     current_epoch = 0
        >>> trainer = Trainer()
        >>> budget.on_train_start(trainer, None)
        >>> budget.on_train_epoch_end(trainer, None)   # 40 s in, the longest epoch 40 s: 80 <= 100
        >>> trainer.should_stop
        False
        >>> budget.on_train_epoch_end(trainer, None)   # 70 s in: another 40 s epoch would end at 110
        >>> trainer.should_stop
        True
    """

    def __init__(self, seconds: float, record: Optional[str] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not seconds > 0:
            raise ValueError(f"seconds must be positive; got {seconds}.")
        self.seconds = float(seconds)
        self.record = record
        self.clock = clock
        self._start: Optional[float] = None
        self._last = 0.0
        self.longest_epoch = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last = self.clock()
        self.longest_epoch = 0.0
        if self.record is not None:
            Path(self.record).unlink(missing_ok=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is None:
            return
        now = self.clock()
        self.longest_epoch = max(self.longest_epoch, now - self._last)
        self._last = now
        elapsed = now - self._start
        if not trainer.should_stop and elapsed + self.longest_epoch > self.seconds:
            trainer.should_stop = True
            if self.record is not None:
                Path(self.record).write_text(json.dumps({
                    "stopped": True, "epoch": int(trainer.current_epoch), "elapsed_s": round(elapsed, 1),
                    "longest_epoch_s": round(self.longest_epoch, 1), "budget_s": self.seconds}) + "\n")
