"""What the guides share: their plate, the model's log joint, autograd inside inference mode."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Optional

import pyro
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

__all__ = ["guide_plate", "log_joint", "autograd_on", "normal_tensor", "inverse_softplus"]


def guide_plate(name: str, x: torch.Tensor, num_data: Optional[int]) -> pyro.plate:
    """pyro_lvm's plate convention (see :class:`pyro_lvm.VAE`): the batch, or a subsample of ``num_data``."""
    batch = x.shape[0]
    if num_data is None:
        return pyro.plate(name, batch)
    return pyro.plate(name, num_data, subsample=torch.arange(batch, device=x.device))


def log_joint(trace: Trace) -> torch.Tensor:
    """``sum log p`` over the sample sites of a model trace, unscaled (no num_data / batch factor)."""
    total = torch.zeros(())
    for site in trace.nodes.values():
        if site["type"] == "sample" and not site_is_subsample(site):
            total = total + scale_and_mask(site["fn"].log_prob(site["value"]), mask=site["mask"]).sum()
    return total


@contextlib.contextmanager
def autograd_on() -> Iterator[None]:
    """Gradients on, also inside ``torch.inference_mode`` (Lightning's validate / test)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def normal_tensor(value: Any) -> Any:
    """A normal copy of an inference-mode tensor, which autograd could not save for backward."""
    return value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value


def inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))
