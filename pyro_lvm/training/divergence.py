"""The divergence guard: a non-finite loss or gradient never reaches the parameters or a checkpoint."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["DivergedError", "check_nonfinite_option", "all_finite", "drop_gradients", "divergence_message"]


class DivergedError(FloatingPointError):
    """Training produced a non-finite loss or gradient; the message says where and what to try."""


def check_nonfinite_option(nonfinite: str) -> str:
    """``nonfinite``, checked: ``"stop"`` (end the run at a non-finite loss or gradient) or ``"skip"`` (the step)."""
    if nonfinite not in ("stop", "skip"):
        raise ValueError(f"nonfinite must be 'stop' (end the run at a non-finite loss or gradient) or 'skip' "
                         f"(skip such steps); got {nonfinite!r}.")
    return nonfinite


def all_finite(optimizer: torch.optim.Optimizer, loss: Optional[torch.Tensor]) -> bool:
    """Whether the loss and every gradient the optimizer would apply are finite (one host sync).

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> optimizer = torch.optim.SGD([p], lr=0.1)
        >>> p.grad = torch.tensor([0.0, float("nan")])
        >>> all_finite(optimizer, torch.tensor(1.0)), all_finite(optimizer, None)
        (False, False)
        >>> p.grad = torch.ones(2)
        >>> all_finite(optimizer, torch.tensor(float("inf"))), all_finite(optimizer, torch.tensor(1.0))
        (False, True)
        >>> p.grad = torch.tensor([3e38, 3e38])  # finite entries whose norm overflows: finite
        >>> all_finite(optimizer, torch.tensor(1.0))
        True
    """
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    # one fused kernel for all gradients and a single host sync: a gradient's 2-norm is finite if every
    # entry is; only when it is not (a non-finite entry, or a norm overflowing float) are the entries read
    values = list(torch._foreach_norm(grads)) if grads else []
    if loss is not None:
        values.append(loss.detach().sum())
    if not values or bool(torch.isfinite(_stack(values)).all()):
        return True
    exact = [torch.isfinite(g).all() for g in grads] + ([torch.isfinite(loss).all()] if loss is not None else [])
    return bool(_stack(exact).all())


def _stack(values: list[torch.Tensor]) -> torch.Tensor:
    """One tensor of scalars, moved to one device only if they are on several (a model split across devices)."""
    device = values[0].device
    if any(v.device != device for v in values):
        values = [v.to(device) for v in values]
    return torch.stack(values)


def drop_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Skip the coming step: Adam leaves a parameter without a gradient (and its state) as it is."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def divergence_message(step: int, epoch: int, optimizer: torch.optim.Optimizer, loss: Optional[torch.Tensor],
                       last_checkpoint: str) -> str:
    """Where training diverged, what is safe (the parameters before the step, the last checkpoint) and what to try."""
    lr = optimizer.param_groups[0].get("lr")
    what = (f"the loss is {float(loss):.4g}" if loss is not None and not torch.isfinite(loss).all()
            else "a gradient is not finite")
    where = f"The last good checkpoint: {last_checkpoint}." if last_checkpoint else "No checkpoint was written yet."
    return (
        f"Training diverged at step {step} (epoch {epoch}): {what}, with learning rate "
        f"{lr}. The parameters are those before this step (nothing non-finite was applied or saved). {where} "
        f"Try a smaller learning rate (lr={lr / 10 if isinstance(lr, float) else lr}), gradient clipping "
        "(Trainer(gradient_clip_val=...)), a KL warm-up (beta=pyro_lvm.schedules.LinearWarmup(...)), a check of "
        "the data for extreme values; or skip such steps with nonfinite='skip' (counted in train/skipped_steps)."
    )
