"""Encoder and decoder networks (plain :mod:`torch.nn`)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["MLP", "ConvEncoder", "ConvDecoder", "ResidualBlock", "ResConvEncoder", "ResConvDecoder", "activation"]

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


def over_images(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D convolutional ``net`` to ``x`` of shape ``(..., C, H, W)``, any leading dims."""
    batch = x.shape[:-3]
    h = net(x.reshape((-1,) + x.shape[-3:]))
    return h.reshape(batch + h.shape[1:])


class ConvEncoder(nn.Sequential):
    r"""A stack of stride-2 convolutions, each halving the height and width of an image.

    Stage :math:`k` is ``Conv2d(kernel_size=4, stride=2, padding=1)`` to
    ``channels[k]`` maps followed by the activation, so that an input of size
    :math:`H \times W` leaves as ``channels[-1]`` maps of size
    :math:`H / 2^K \times W / 2^K` (:math:`K` = ``len(channels)``; ``H`` and ``W``
    divisible by :math:`2^K`). Inputs may carry any leading dimensions, ``(..., C, H, W)``.

    Arguments:
        in_channels: channels of the input image.
        channels: output channels of each stage (one stage per entry).
        act: activation after each stage (see :func:`activation`).

    Example:
        >>> net = ConvEncoder(1, [8, 16])
        >>> net(torch.zeros(3, 1, 28, 28)).shape
        torch.Size([3, 16, 7, 7])
        >>> net(torch.zeros(2, 3, 1, 28, 28)).shape  # extra leading dims
        torch.Size([2, 3, 16, 7, 7])
    """

    def __init__(self, in_channels: int, channels: Sequence[int], act: str = "relu"):
        if len(channels) == 0:
            raise ValueError("ConvEncoder needs at least one stage; got channels=[].")
        layers: list[nn.Module] = []
        for c_in, c_out in zip([in_channels, *channels[:-1]], channels):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1), activation(act)]
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return over_images(super().forward, x)


class ConvDecoder(nn.Sequential):
    r"""A stack of stride-2 transposed convolutions, each doubling the height and width.

    The mirror of :class:`ConvEncoder`: ``channels[0]`` input maps pass through
    ``ConvTranspose2d(kernel_size=4, stride=2, padding=1)`` layers to
    ``channels[1:]`` and finally ``out_channels`` maps, with the activation between
    layers and none after the last (its output is, e.g., the logits of a
    likelihood). There are ``len(channels)`` layers, so the size grows by
    :math:`2^K`. Inputs may carry any leading dimensions, ``(..., C, H, W)``.

    Arguments:
        channels: channels entering each layer (the first is the input's).
        out_channels: channels of the output image.
        act: activation between layers (see :func:`activation`).

    Example:
        >>> net = ConvDecoder([16, 8], 1)
        >>> net(torch.zeros(3, 16, 7, 7)).shape
        torch.Size([3, 1, 28, 28])
    """

    def __init__(self, channels: Sequence[int], out_channels: int, act: str = "relu"):
        if len(channels) == 0:
            raise ValueError("ConvDecoder needs at least one stage; got channels=[].")
        layers: list[nn.Module] = []
        dims = [*channels, out_channels]
        for c_in, c_out in zip(dims[:-1], dims[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1),
                       activation(act)]
        super().__init__(*layers[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return over_images(super().forward, x)


class ResidualBlock(nn.Module):
    r"""A pre-activation residual block that keeps the shape: :math:`x + F(x)`.

    :math:`F(x) = \mathrm{conv}_2(a(\mathrm{conv}_1(a(x))))`, two 3x3 convolutions of
    ``channels`` maps with the activation :math:`a` before each (He et al., 2016). The last
    convolution starts at zero (weights and bias), so the block starts as the identity: a
    network starts as the same network without its blocks, whatever their number, and the
    gradient reaches the layers below each block through its skip path, with no normalization
    layers (Zhang et al., 2019; De & Smith, 2020). Inputs may carry any leading dimensions, ``(..., C, H, W)``.

    References:
        | Identity Mappings in Deep Residual Networks (He et al., 2016), https://arxiv.org/abs/1603.05027
        | Fixup Initialization: Residual Learning Without Normalization (Zhang et al., 2019), https://arxiv.org/abs/1901.09321
        | Batch Normalization Biases Residual Blocks Towards the Identity Function in Deep Networks
          (De & Smith, 2020), https://arxiv.org/abs/2002.10444

    Arguments:
        channels: maps in and out (and between the two convolutions).
        act: activation before each convolution (see :func:`activation`).

    Example:
        >>> block = ResidualBlock(8)
        >>> x = torch.randn(2, 3, 8, 5, 5)
        >>> block(x).shape
        torch.Size([2, 3, 8, 5, 5])
        >>> torch.equal(block(x), x)  # the identity until trained
        True
    """

    def __init__(self, channels: int, act: str = "relu"):
        super().__init__()
        self.residual = nn.Sequential(
            activation(act), nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            activation(act), nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        )
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + over_images(self.residual, x)


class ResConvEncoder(nn.Sequential):
    r""":class:`ConvEncoder` with residual blocks (:class:`ResidualBlock`) after each stride-2 convolution.

    Stage :math:`k` is ``Conv2d(kernel_size=4, stride=2, padding=1)`` to ``channels[k]``
    maps, ``blocks_per_stage`` residual blocks at that size, then the activation: an
    :math:`H \times W` input leaves as ``channels[-1]`` maps of size
    :math:`H / 2^K \times W / 2^K` (:math:`K` = ``len(channels)``), as from
    :class:`ConvEncoder` with the same arguments, for which it can be swapped in. The blocks
    start as the identity, so at initialization it computes what a :class:`ConvEncoder`
    with the same stride-2 weights computes; ``blocks_per_stage=0`` is that encoder.
    Inputs may carry any leading dimensions, ``(..., C, H, W)``.

    References:
        Deep Residual Learning for Image Recognition (He et al., 2016), https://arxiv.org/abs/1512.03385

    Arguments:
        in_channels: channels of the input image.
        channels: output channels of each stage (one stage per entry).
        act: activation (see :func:`activation`).
        blocks_per_stage: residual blocks after each stride-2 convolution.

    Example:
        >>> net = ResConvEncoder(1, [8, 16], blocks_per_stage=2)
        >>> net(torch.zeros(3, 1, 28, 28)).shape
        torch.Size([3, 16, 7, 7])
        >>> net(torch.zeros(2, 3, 1, 28, 28)).shape  # extra leading dims
        torch.Size([2, 3, 16, 7, 7])
    """

    def __init__(self, in_channels: int, channels: Sequence[int], act: str = "relu", blocks_per_stage: int = 1):
        if len(channels) == 0 or blocks_per_stage < 0:
            raise ValueError(
                f"ResConvEncoder needs at least one stage and blocks_per_stage >= 0; got channels={list(channels)}, "
                f"blocks_per_stage={blocks_per_stage}."
            )
        stages = [
            nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1),
                *(ResidualBlock(c_out, act) for _ in range(blocks_per_stage)),
                activation(act),
            )
            for c_in, c_out in zip([in_channels, *channels[:-1]], channels)
        ]
        super().__init__(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return over_images(super().forward, x)


class ResConvDecoder(nn.Sequential):
    r""":class:`ConvDecoder` with residual blocks (:class:`ResidualBlock`) before each stride-2 transposed convolution.

    The mirror of :class:`ResConvEncoder`: stage :math:`k` runs ``blocks_per_stage``
    residual blocks on its ``channels[k]`` input maps, then
    ``ConvTranspose2d(kernel_size=4, stride=2, padding=1)`` to ``channels[k + 1]`` maps
    (``out_channels`` at the last stage) and the activation, none after the last (its
    output is, e.g., the logits of a likelihood). The size grows by :math:`2^K`
    (:math:`K` = ``len(channels)``), as in :class:`ConvDecoder` with the same arguments,
    for which it can be swapped in; at initialization the blocks are the identity, and
    ``blocks_per_stage=0`` is that decoder. Inputs may carry any leading dimensions,
    ``(..., C, H, W)``.

    References:
        Deep Residual Learning for Image Recognition (He et al., 2016), https://arxiv.org/abs/1512.03385

    Arguments:
        channels: channels entering each stage (the first is the input's).
        out_channels: channels of the output image.
        act: activation (see :func:`activation`).
        blocks_per_stage: residual blocks before each stride-2 transposed convolution.

    Example:
        >>> net = ResConvDecoder([16, 8], 1, blocks_per_stage=2)
        >>> net(torch.zeros(3, 16, 7, 7)).shape
        torch.Size([3, 1, 28, 28])
        >>> net(torch.zeros(2, 3, 16, 7, 7)).shape  # extra leading dims
        torch.Size([2, 3, 1, 28, 28])
    """

    def __init__(self, channels: Sequence[int], out_channels: int, act: str = "relu", blocks_per_stage: int = 1):
        if len(channels) == 0 or blocks_per_stage < 0:
            raise ValueError(
                f"ResConvDecoder needs at least one stage and blocks_per_stage >= 0; got channels={list(channels)}, "
                f"blocks_per_stage={blocks_per_stage}."
            )
        dims = [*channels, out_channels]
        stages = [
            nn.Sequential(
                *(ResidualBlock(c_in, act) for _ in range(blocks_per_stage)),
                nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1),
                *([activation(act)] if k < len(channels) - 1 else []),
            )
            for k, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:]))
        ]
        super().__init__(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return over_images(super().forward, x)
