"""Helpers shared by the flow tests: non-identity parameters, passes with log-determinants, autograd Jacobians."""

from typing import Optional

import torch


def perturb(module: torch.nn.Module, std: float = 0.1, seed: int = 0,
            generator: Optional[bool] = True) -> torch.nn.Module:
    """Move every parameter off its (identity) initialization so that the checks can fail.

    The noise comes from a private generator seeded with ``seed``, or, with
    ``generator=False``, from torch's global one after ``torch.manual_seed(seed)``.
    """
    g = torch.Generator().manual_seed(seed) if generator else None
    if g is None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def forward(layers, u):
    """Generative pass through ``layers`` with the summed log|det J| of each layer."""
    ld = 0.0
    for t in layers:
        x = t(u)
        ld = ld + t.log_abs_det_jacobian(u, x)
        u = x
    return u, ld


def forward_map(layers):
    """The composed map base -> x of ``layers`` as a plain function (for autograd's Jacobian)."""
    return lambda u: forward(layers, u)[0]


def inverse(layers, x):
    """Data-to-base pass through ``layers`` (a list in the generative direction)."""
    for t in reversed(list(layers)):
        x = t.inv(x)
    return x


def autograd_logdet(f, u):
    """Sign and log|det| of the Jacobian of ``f`` at one example ``u`` (event flattened)."""
    jac = torch.autograd.functional.jacobian(lambda v: f(v.reshape(u.shape)).reshape(-1), u.reshape(-1))
    return torch.linalg.slogdet(jac)
