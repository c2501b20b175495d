"""Encoder and decoder networks (plain :mod:`torch.nn`)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["MLP", "activation"]

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}


def activation(name: str) -> nn.Module:
    """Return a fresh activation module by name.

    Example:
        >>> activation("tanh")
        Tanh()
    """
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"Unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}."
        ) from None


class MLP(nn.Sequential):
    """A multi-layer perceptron ``in_dim -> hidden_dims... -> out_dim``.

    The last layer is linear (no activation): callers split or squash its output
    as their distribution needs.

    Arguments:
        in_dim: input features.
        hidden_dims: widths of the hidden layers (may be empty).
        out_dim: output features.
        act: activation between layers (see :func:`activation`).

    Example:
        >>> net = MLP(4, [8, 8], 2)
        >>> net(torch.zeros(3, 4)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self, in_dim: int, hidden_dims: Sequence[int], out_dim: int, act: str = "relu"
    ):
        layers: list[nn.Module] = []
        dims = [in_dim, *hidden_dims]
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), activation(act)]
        layers.append(nn.Linear(dims[-1], out_dim))
        super().__init__(*layers)
