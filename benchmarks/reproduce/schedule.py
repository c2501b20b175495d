"""Burda et al. (2015)'s learning-rate schedule as a Lightning callback, for the reproduction configs."""

from __future__ import annotations

import pytorch_lightning as pl

__all__ = ["BurdaSchedule", "burda_stage"]


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
