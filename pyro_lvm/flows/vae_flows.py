"""Normalizing flows inside a VAE: a flow prior p(z) and a flow posterior q(z | x)."""

from __future__ import annotations

from typing import Optional, Sequence

import pyro.distributions as dist
import torch
from pyro.distributions.conditional import ConditionalComposeTransformModule, ConditionalTransformModule
from pyro.distributions.torch_transform import ComposeTransformModule
from pyro.distributions.transforms import ConditionalAffineAutoregressive, Permute
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn
from torch.distributions import Transform

from .coupling import AdditiveCoupling, AffineCoupling, ConditionalAffineCoupling
from .layers import DiagonalScaling
from .stacks import transform_parts

__all__ = ["PRIOR_FLOWS", "POSTERIOR_FLOWS", "prior_flow", "posterior_flow", "flow_prior", "flow_posterior",
           "FlowDistribution"]

PRIOR_FLOWS = ("realnvp", "nice")
POSTERIOR_FLOWS = ("coupling", "iaf")


def _check(kind: Optional[str], kinds: tuple, argument: str, latent_dim: int, num_layers: int) -> None:
    if kind not in kinds:
        raise ValueError(f"{argument} must be one of {', '.join(map(repr, kinds))} (or None); got {kind!r}.")
    if latent_dim < 2:
        raise ValueError(
            f"{argument}={kind!r} needs latent_dim >= 2 (a coupling layer splits z in two); "
            f"got latent_dim={latent_dim}. Use a larger latent_dim or {argument}=None."
        )
    if num_layers < 1:
        raise ValueError(f"flow_layers must be a positive integer; got {num_layers}.")


def prior_flow(
    latent_dim: int, kind: str = "realnvp", num_layers: int = 4, hidden: Sequence[int] = (64, 64)
) -> ComposeTransformModule:
    r"""The flow of a flow prior over ``z`` of shape ``(latent_dim,)``, base to ``z``, as one Pyro transform.

    ``"realnvp"``: ``num_layers`` affine couplings (:class:`~pyro_lvm.flows.AffineCoupling`)
    with alternating ``"half"`` masks; ``"nice"``: additive couplings
    (:class:`~pyro_lvm.flows.AdditiveCoupling`) followed by a learned
    :class:`~pyro_lvm.flows.DiagonalScaling`, NICE's only volume change. Every coupling
    starts as the identity, so a fresh flow prior is :math:`\mathcal N(0, I)`. The layers
    are composed in a :class:`~pyro.distributions.torch_transform.ComposeTransformModule`
    (iterating it gives them).

    References:
        Density estimation using Real NVP (Dinh et al., 2016), https://arxiv.org/abs/1605.08803 ;
        NICE (Dinh et al., 2014), https://arxiv.org/abs/1410.8516

    Arguments:
        latent_dim: dimension of ``z`` (at least 2).
        kind: ``"realnvp"`` or ``"nice"``.
        num_layers: number of coupling layers.
        hidden: hidden widths of each coupling's MLP.

    Example:
        >>> flow = prior_flow(2, "realnvp", num_layers=2, hidden=(8,))
        >>> [type(t).__name__ for t in flow]
        ['AffineCoupling', 'AffineCoupling']
        >>> z = torch.randn(3, 2)
        >>> torch.allclose(flow(flow.inv(z)), z, atol=1e-6)
        True
    """
    _check(kind, PRIOR_FLOWS, "prior_flow", latent_dim, num_layers)
    hidden = tuple(hidden)
    if kind == "realnvp":
        layers: list[nn.Module] = [
            AffineCoupling(latent_dim, hidden=hidden, mask="half", parity=i % 2) for i in range(num_layers)
        ]
    else:
        layers = [AdditiveCoupling(latent_dim, hidden=hidden, mask="half", parity=i % 2) for i in range(num_layers)]
        layers.append(DiagonalScaling(latent_dim))
    return ComposeTransformModule(layers)


def posterior_flow(
    latent_dim: int,
    context_dim: int,
    kind: str = "coupling",
    num_layers: int = 4,
    hidden: Sequence[int] = (64, 64),
) -> ConditionalComposeTransformModule:
    r"""The conditional flow of a flow posterior, applied after the Gaussian base, as one Pyro conditional transform.

    ``"coupling"``: ``num_layers`` :class:`~pyro_lvm.flows.ConditionalAffineCoupling` with
    alternating ``"half"`` masks whose nets also see the context :math:`c(x)` (each starts
    as the identity); ``"iaf"``: inverse autoregressive flow, Pyro's
    :class:`~pyro.distributions.transforms.ConditionalAffineAutoregressive` layers with a
    reversal of ``z`` between them (sampling and the density of a sample are one pass each;
    the density of another value inverts the layer in ``latent_dim`` passes). The layers are
    composed in a :class:`~pyro.distributions.conditional.ConditionalComposeTransformModule`
    (iterating it gives them; ``flow.condition(c)`` is the composed transform given :math:`c`).

    References:
        Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016),
        https://arxiv.org/abs/1606.04934

    Arguments:
        latent_dim: dimension of ``z`` (at least 2).
        context_dim: size of the context vector :math:`c(x)` from the encoder.
        kind: ``"coupling"`` or ``"iaf"``.
        num_layers: number of conditional layers.
        hidden: hidden widths of each layer's net.

    Example:
        >>> flow = posterior_flow(2, context_dim=3, num_layers=2, hidden=(8,))
        >>> [type(t).__name__ for t in flow]
        ['ConditionalAffineCoupling', 'ConditionalAffineCoupling']
        >>> z, c = torch.randn(4, 2), torch.randn(4, 3)
        >>> torch.allclose(flow.condition(c)(flow.condition(c).inv(z)), z, atol=1e-6)
        True
    """
    _check(kind, POSTERIOR_FLOWS, "posterior_flow", latent_dim, num_layers)
    if context_dim < 1:
        raise ValueError(f"flow_context_dim must be a positive integer; got {context_dim}.")
    hidden = tuple(hidden)
    if kind == "coupling":
        return ConditionalComposeTransformModule([
            ConditionalAffineCoupling(latent_dim, context_dim, hidden=hidden, mask="half", parity=i % 2)
            for i in range(num_layers)
        ])
    layers: list[nn.Module] = []
    reverse = torch.arange(latent_dim - 1, -1, -1)
    for i in range(num_layers):
        if i:
            layers.append(_Reverse(reverse))
        arn = ConditionalAutoRegressiveNN(latent_dim, context_dim, list(hidden), permutation=torch.arange(latent_dim))
        layers.append(ConditionalAffineAutoregressive(arn))
    return ConditionalComposeTransformModule(layers)


class _Reverse(ConditionalTransformModule):
    """A fixed permutation of ``z`` that ignores the context (between IAF layers)."""

    def __init__(self, permutation: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("permutation", permutation)

    def condition(self, context: torch.Tensor) -> Permute:
        return Permute(self.permutation)


def flow_prior(base: dist.TorchDistribution, flow: Transform | Sequence[Transform]) -> dist.TransformedDistribution:
    r"""p(z): ``base`` (e.g. :math:`\mathcal N(0, I)`) pushed through ``flow`` (a transform, or a list of them).

    .. math::

        \log p(z) = \log p_0(f^{-1}(z)) - \log\lvert\det J_f(f^{-1}(z))\rvert .

    Example:
        >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> p = flow_prior(base, prior_flow(2, num_layers=2, hidden=(8,)))
        >>> p.rsample((5,)).shape, p.event_shape
        (torch.Size([5, 2]), torch.Size([2]))
    """
    return dist.TransformedDistribution(base, transform_parts(flow))


def flow_posterior(
    base: dist.TorchDistribution, flow: Sequence[ConditionalTransformModule], context: torch.Tensor
) -> dist.TransformedDistribution:
    r"""q(z | x): ``base`` :math:`\mathcal N(\mu(x), \operatorname{diag}\sigma(x)^2)` pushed through ``flow`` given :math:`c(x)`.

    The context has shape ``(..., context_dim)`` and broadcasts against the batch
    dims of ``z`` (e.g. a particle dim on the left of the data dim).

    Example:
        >>> base = dist.Normal(torch.zeros(4, 2), 1.0).to_event(1)
        >>> q = flow_posterior(base, posterior_flow(2, 3, hidden=(8,)), torch.randn(4, 3))
        >>> z = q.rsample()
        >>> q.log_prob(z).shape
        torch.Size([4])
    """
    if isinstance(flow, ConditionalComposeTransformModule):
        layers = flow.transforms
    elif isinstance(flow, ConditionalTransformModule) or hasattr(flow, "condition"):
        layers = [flow]  # one conditional transform of the user's
    else:
        layers = flow
    return FlowDistribution(base, [layer.condition(context) for layer in layers])


class FlowDistribution(dist.TransformedDistribution):
    r"""A :class:`~pyro.distributions.TransformedDistribution` whose draws without a gradient are fresh tensors.

    A transform with a cache (Pyro's autoregressive and coupling layers) answers :math:`f^{-1}(z)` for the
    tensor it produced from its cache, with the intermediate values it computed then. For ``rsample`` that is
    exact and cheap. For ``sample`` those values were computed without a gradient, so :math:`\log q(z)` at
    such a draw (the score function's :math:`\nabla_\phi \log q_\phi(z)`) would carry no gradient to the
    flow's parameters. Its draws are therefore copies, and their density is computed by the inverse pass,
    with its gradient.

    Example:
        >>> from pyro.distributions.transforms import affine_autoregressive
        >>> flow = affine_autoregressive(2, hidden_dims=[8])
        >>> q = FlowDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])
        >>> q.log_prob(q.sample()).requires_grad
        True
    """

    is_flow = True  # for pyro_lvm.estimators.kl_control.is_flow: no closed-form KL

    def sample(self, sample_shape=torch.Size()):
        return super().sample(sample_shape).clone()
