"""Normalizing flows as Pyro ``TransformModule`` s: coupling layers, ActNorm, 1x1 convolutions, squeezing.

Every layer is a :class:`pyro.distributions.torch_transform.TransformModule`, so the
same layer serves in a :class:`pyro.distributions.TransformedDistribution` as a density
model, a prior :math:`p(z)` or a posterior :math:`q(z \\mid x)`. By the change of variables,
for :math:`x = f(u)`, :math:`u \\sim p_U`,

.. math::

    \\log p_X(x) = \\log p_U(f^{-1}(x)) - \\log\\,\\big|\\det J_f(f^{-1}(x))\\big|,

exact, with no lower bound. :class:`NICE` and :class:`RealNVP` (built by :func:`nice` and
:func:`realnvp`) are stacks of them that are themselves one Pyro transform (a
:class:`~pyro.distributions.torch_transform.ComposeTransformModule`), and
:class:`pyro_lvm.FlowModel` trains any transform by maximum likelihood (multi-scale RealNVP
with :class:`FactorOut`). The same layers make flow priors and posteriors of a VAE (see
:class:`pyro_lvm.VAE`'s ``prior_flow`` and ``posterior_flow``).

The layers with parameters cache their last input and output (``cache_size=1``), as torch's
transforms do, so ``log_prob`` of a value the flow has just sampled costs no inversion. Unlike
torch's cache, theirs is also keyed on the parameters' versions: a loop that trains on one
fixed tensor (full-batch training) recomputes after every optimizer step instead of reusing
the previous step's output, whose graph ``backward`` has already freed.
"""

from .coupling import AdditiveCoupling, AffineCoupling, ConditionalAffineCoupling, coupling_mask
from .layers import ActNorm, DiagonalScaling, InvertibleConv1x1, Squeeze
from .preprocessing import Logit, bits_per_dim, dequantize
from .multiscale import FactorOut
from .stacks import NICE, RealNVP, initialize_actnorm, nice, realnvp, transform_parts
from .vae_flows import flow_posterior, flow_prior, posterior_flow, prior_flow

__all__ = [
    "coupling_mask",
    "AdditiveCoupling",
    "AffineCoupling",
    "ConditionalAffineCoupling",
    "ActNorm",
    "DiagonalScaling",
    "InvertibleConv1x1",
    "Squeeze",
    "Logit",
    "bits_per_dim",
    "dequantize",
    "FactorOut",
    "NICE",
    "RealNVP",
    "initialize_actnorm",
    "nice",
    "realnvp",
    "transform_parts",
    "prior_flow",
    "posterior_flow",
    "flow_prior",
    "flow_posterior",
]
