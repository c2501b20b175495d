"""Networks: the residual convolutional encoder and decoder keep the plain ones' shape contract."""

import pytest
import torch
from torch import nn

from pyro_lvm.nets import ConvDecoder, ConvEncoder, ResConvDecoder, ResConvEncoder, ResidualBlock


def stride_2_layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.stride == (2, 2)]


def perturb(net: nn.Module) -> nn.Module:
    """Nonzero weights everywhere, the zero-initialized last convolutions of the blocks included."""
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return net


# ----- the residual block ----------------------------------------------------------------------
def test_residual_block_with_its_zero_initialized_last_conv_is_the_identity():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 7)
    for act in ("relu", "elu", "tanh"):
        assert torch.equal(ResidualBlock(6, act)(x), x)


def test_residual_block_adds_its_residual_to_the_input():
    torch.manual_seed(0)
    block = perturb(ResidualBlock(3))
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(block(x), x + block.residual(x))
    assert not torch.allclose(block(x), x)


def test_residual_block_takes_any_leading_dims():
    torch.manual_seed(0)
    block = perturb(ResidualBlock(3))
    x = torch.randn(2, 5, 3, 4, 4)
    torch.testing.assert_close(block(x), block(x.flatten(0, 1)).reshape(2, 5, 3, 4, 4))


def test_gradient_flows_through_a_residual_block_at_initialization_and_after():
    block = ResidualBlock(3)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    block(x).square().sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach())  # the skip path: d/dx of |x|^2
    last = block.residual[-1]
    assert last.weight.grad.abs().sum() > 0  # the zero-initialized conv learns from the first step
    perturb(block).zero_grad()
    block(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


# ----- the encoder and decoder ------------------------------------------------------------------
@pytest.mark.parametrize("blocks_per_stage", [0, 1, 2])
@pytest.mark.parametrize("size, channels", [((8, 8), [4, 8]), ((28, 28), [4, 8]), ((32, 16), [4, 8, 8])])
def test_res_conv_nets_have_the_shapes_of_the_plain_ones(size, channels, blocks_per_stage):
    x = torch.randn(3, 2, *size)
    encoder = ResConvEncoder(2, channels, "elu", blocks_per_stage)
    features = encoder(x)
    assert features.shape == ConvEncoder(2, channels, "elu")(x).shape
    assert features.shape == (3, channels[-1], size[0] // 2 ** len(channels), size[1] // 2 ** len(channels))
    decoder = ResConvDecoder(list(reversed(channels)), 2, "elu", blocks_per_stage)
    assert decoder(features).shape == ConvDecoder(list(reversed(channels)), 2, "elu")(features).shape == x.shape


@pytest.mark.parametrize("leading", [(), (5,), (2, 3)])
def test_res_conv_nets_take_any_leading_dims(leading):
    torch.manual_seed(0)
    encoder, decoder = perturb(ResConvEncoder(1, [4, 8])), perturb(ResConvDecoder([8, 4], 1))
    x = torch.randn(*leading, 4, 1, 8, 8)
    h = encoder(x)
    assert h.shape == (*leading, 4, 8, 2, 2)
    torch.testing.assert_close(h, encoder(x.reshape(-1, 1, 8, 8)).reshape(h.shape))
    out = decoder(h)
    assert out.shape == x.shape
    torch.testing.assert_close(out, decoder(h.reshape(-1, 8, 2, 2)).reshape(out.shape))


@pytest.mark.parametrize("blocks_per_stage", [0, 3])
def test_res_conv_nets_start_as_the_plain_nets_with_the_same_stride_2_weights(blocks_per_stage):
    torch.manual_seed(0)
    x = torch.randn(3, 1, 16, 16)
    pairs = [(ConvEncoder(1, [4, 8], "elu"), ResConvEncoder(1, [4, 8], "elu", blocks_per_stage)),
             (ConvDecoder([1, 4, 8], 2, "elu"), ResConvDecoder([1, 4, 8], 2, "elu", blocks_per_stage))]
    for plain, residual in pairs:
        for source, target in zip(stride_2_layers(plain), stride_2_layers(residual), strict=True):
            target.load_state_dict(source.state_dict())
        torch.testing.assert_close(residual(x), plain(x))


def test_gradient_reaches_every_stage_of_deep_res_conv_nets_at_initialization():
    # through eight identity blocks per stage, every stride-2 layer and every block's last conv learns at once
    torch.manual_seed(0)
    encoder = ResConvEncoder(1, [4, 8], blocks_per_stage=8)
    decoder = ResConvDecoder([8, 4], 1, blocks_per_stage=8)
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    decoder(encoder(x)).square().sum().backward()
    for net in (encoder, decoder):
        blocks = [m for m in net.modules() if isinstance(m, ResidualBlock)]
        assert len(blocks) == 16
        for layer in stride_2_layers(net) + [block.residual[-1] for block in blocks]:
            assert layer.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("make", [lambda: ResConvEncoder(1, []), lambda: ResConvDecoder([], 1),
                                  lambda: ResConvEncoder(1, [4], blocks_per_stage=-1)])
def test_res_conv_nets_refuse_no_stages_and_negative_blocks(make):
    with pytest.raises(ValueError, match="at least one stage and blocks_per_stage >= 0"):
        make()
