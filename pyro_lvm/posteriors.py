r"""Posterior families q(z | x) as parts: Gaussians of three covariances and flows, over an encoder.

The encoder maps ``x`` to a vector ``h`` of the size :attr:`Posterior.head_dim` that the family asks for;
the family turns ``h`` into a distribution over ``z`` of shape ``(latent_dim,)``:

.. list-table::
   :header-rows: 1

   * - family
     - :math:`q(z \mid x)`
     - encoder outputs
   * - :class:`DiagonalGaussian`
     - :math:`\mathcal N(\mu, \operatorname{diag}\sigma^2)`
     - :math:`2d`
   * - :class:`LowRankGaussian`
     - :math:`\mathcal N(\mu, W W^\top + \operatorname{diag}\sigma^2)`, :math:`W` of rank :math:`r`
     - :math:`2d + rd`
   * - :class:`FullGaussian`
     - :math:`\mathcal N(\mu, L L^\top)`, :math:`L` lower triangular
     - :math:`d + d(d+1)/2`
   * - :class:`FlowPosterior`
     - :math:`g_{c\#}\mathcal N(\mu, \operatorname{diag}\sigma^2)`
     - :math:`2d + |c|`

In Python, ``VAE(..., posterior=IAFPosterior(num_layers=4))``; in YAML,
``posterior: {class_path: pyro_lvm.posteriors.IAFPosterior, init_args: {num_layers: 4}}``.
Only the diagonal Gaussian has the fast training step's closed forms; the others train through
their distributions (reparameterized: every one has ``rsample``). The KL from a full or low-rank
Gaussian to :math:`\mathcal N(0, I)` is registered in closed form here, so ``analytic_kl`` takes them.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import pyro.distributions as dist
import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import nn
from torch.distributions import Independent, LowRankMultivariateNormal, MultivariateNormal, Normal
from torch.distributions.kl import register_kl
from torch.nn.functional import softplus

from .flows.vae_flows import POSTERIOR_FLOWS, FlowDistribution, flow_posterior, posterior_flow

__all__ = ["Posterior", "DiagonalGaussian", "LowRankGaussian", "FullGaussian", "FlowPosterior", "IAFPosterior",
           "make_posterior", "POSTERIORS"]

#: the names :func:`make_posterior` (and the models' ``posterior`` argument) accept
POSTERIORS = ("diagonal", "low_rank", "full", *POSTERIOR_FLOWS)

_MIN_SCALE = 1e-5  # the floor of every standard deviation the encoder emits


class Posterior(nn.Module):
    r"""Base class of the posterior families: ``h`` (the encoder's output) to :math:`q(z \mid x)`.

    A subclass sets :attr:`diagonal` if :meth:`summary` gives :math:`q` exactly as
    :math:`\mathcal N(\mu, \operatorname{diag}\sigma^2)`, and implements :attr:`head_dim`,
    :meth:`distribution` and :meth:`summary`.
    """

    #: whether :meth:`summary` is exactly q's mean and standard deviation of a diagonal Gaussian
    diagonal: bool = False
    latent_dim: Optional[int] = None
    #: the init arguments as plain data (``None``: built from objects no configuration rebuilds)
    config: Optional[dict] = {}

    def bind(self, latent_dim: int, build: bool = True) -> "Posterior":
        """Fix the latent size and (with ``build``) create the parameters; returns ``self``.

        A model binds it twice: first without ``build`` (to size its encoder by :attr:`head_dim`), then
        with it, after its networks, so that the networks' random initialization does not depend on the family.
        """
        if self.latent_dim is not None and self.latent_dim != latent_dim:
            raise ValueError(
                f"This {type(self).__name__} is already part of a model with latent_dim={self.latent_dim}; "
                f"this model has latent_dim={latent_dim}. Give each model a posterior of its own."
            )
        self.latent_dim = latent_dim
        if build and not self._built:
            self._built = True
            self.build()
        return self

    _built = False

    def build(self) -> None:
        """Create the parameters that depend on ``latent_dim`` (none here)."""

    @property
    def head_dim(self) -> int:
        """How many numbers per data point the encoder must output."""
        raise NotImplementedError

    def distribution(self, h: torch.Tensor) -> dist.TorchDistribution:
        """:math:`q(z \\mid x)` from the encoder's output ``h`` of shape ``(..., head_dim)``: batch ``h.shape[:-1]``."""
        raise NotImplementedError

    def summary(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A point and a spread per latent dimension (``encode``'s answer): for a Gaussian its mean and marginal
        standard deviations."""
        raise NotImplementedError

    def base_gaussian(self, h: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The diagonal Gaussian the family starts from (its mean and standard deviation), or ``None``.

        The family itself for :class:`DiagonalGaussian`, the Gaussian before the flow for a
        :class:`FlowPosterior`; ``None`` for the correlated Gaussians.
        """
        return None

    def _split(self, h: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
        if h.shape[-1] != self.head_dim:
            raise ValueError(
                f"{type(self).__name__} with latent_dim={self.latent_dim} needs {self.head_dim} encoder outputs per "
                f"data point; the encoder gives {h.shape[-1]}. Build the encoder with out_dim={self.head_dim} "
                f"(posterior.head_dim)."
            )
        return list(h.split(list(sizes), dim=-1))

    def extra_repr(self) -> str:
        return "" if self.latent_dim is None else f"latent_dim={self.latent_dim}"


class DiagonalGaussian(Posterior):
    r""":math:`q(z \mid x) = \mathcal N\big(\mu(x), \operatorname{diag}\sigma(x)^2\big)`, :math:`\sigma = \operatorname{softplus}(\cdot) + 10^{-5}`.

    The VAE's default and the only family with the fast training step's closed forms.

    Example:
        >>> q = DiagonalGaussian().bind(2)
        >>> q.head_dim
        4
        >>> q.distribution(torch.zeros(3, 4)).batch_shape
        torch.Size([3])
    """

    diagonal = True

    @property
    def head_dim(self) -> int:
        return 2 * self.latent_dim

    def summary(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = self._split(h, [self.latent_dim, self.latent_dim])
        return loc, softplus(raw) + _MIN_SCALE

    def distribution(self, h: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(*self.summary(h)).to_event(1)

    def base_gaussian(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.summary(h)


class LowRankGaussian(Posterior):
    r""":math:`q(z \mid x) = \mathcal N\big(\mu, W W^\top + \operatorname{diag}\sigma^2\big)` with :math:`W \in \mathbb R^{d \times r}`.

    Correlations between latent dimensions at :math:`rd` extra encoder outputs (Rezende et al. 2014 use
    rank one). :meth:`summary`'s spread is the marginal standard deviation
    :math:`\sqrt{\sigma_i^2 + \sum_j W_{ij}^2}`.

    Arguments:
        rank: :math:`r`.

    Example:
        >>> q = LowRankGaussian(rank=1).bind(3)
        >>> q.head_dim
        9
        >>> q.distribution(torch.zeros(2, 9)).covariance_matrix.shape
        torch.Size([2, 3, 3])
    """

    def __init__(self, rank: int = 1):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be a positive integer; got {rank}.")
        self.rank = rank
        self.config = dict(rank=rank)

    @property
    def head_dim(self) -> int:
        return (2 + self.rank) * self.latent_dim

    def _parts(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.latent_dim
        loc, raw, factor = self._split(h, [d, d, self.rank * d])
        return loc, factor.reshape(factor.shape[:-1] + (d, self.rank)), (softplus(raw) + _MIN_SCALE) ** 2

    def distribution(self, h: torch.Tensor) -> dist.TorchDistribution:
        return dist.LowRankMultivariateNormal(*self._parts(h))

    def summary(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, factor, diag = self._parts(h)
        return loc, (diag + factor.pow(2).sum(-1)).sqrt()

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class FullGaussian(Posterior):
    r""":math:`q(z \mid x) = \mathcal N(\mu, L L^\top)`, :math:`L` lower triangular with a softplus diagonal.

    Every correlation, at :math:`d(d+1)/2` encoder outputs for :math:`L`. :meth:`summary`'s spread is
    :math:`\sqrt{(L L^\top)_{ii}}`, the norm of :math:`L`'s rows.

    Example:
        >>> q = FullGaussian().bind(2)
        >>> q.head_dim
        5
        >>> q.distribution(torch.zeros(5)).scale_tril
        tensor([[0.6932, 0.0000],
                [0.0000, 0.6932]])
    """

    @property
    def head_dim(self) -> int:
        d = self.latent_dim
        return d + d * (d + 1) // 2

    def _parts(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.latent_dim
        loc, entries = self._split(h, [d, d * (d + 1) // 2])
        rows, cols = torch.tril_indices(d, d, device=h.device)
        tril = h.new_zeros(h.shape[:-1] + (d, d))
        tril[..., rows, cols] = entries
        diagonal = softplus(tril.diagonal(dim1=-2, dim2=-1)) + _MIN_SCALE
        tril = tril.tril(-1) + torch.diag_embed(diagonal)
        return loc, tril

    def distribution(self, h: torch.Tensor) -> dist.TorchDistribution:
        loc, tril = self._parts(h)
        return dist.MultivariateNormal(loc, scale_tril=tril)

    def summary(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, tril = self._parts(h)
        return loc, tril.norm(dim=-1)


class FlowPosterior(Posterior):
    r"""A flow posterior :math:`q(z \mid x) = g_{c(x)\#}\mathcal N\big(\mu(x), \operatorname{diag}\sigma(x)^2\big)`.

    .. math::

        \log q(z \mid x) = \log \mathcal N(u \mid \mu, \operatorname{diag}\sigma^2)
        - \log\big\lvert\det J_{g_c}(u)\big\rvert, \qquad z = g_c(u),

    with the layers of :math:`g` seeing a context :math:`c(x)`, an extra head of the encoder
    (``context_dim`` numbers). A draw and its density are one pass.

    Arguments:
        flow: ``"iaf"`` (inverse autoregressive flow: Pyro's conditional affine autoregressive layers with
            reversals between them) or ``"coupling"`` (conditional affine couplings), built by
            :func:`pyro_lvm.flows.vae_flows.posterior_flow` once the latent size is known; or a transform
            of your own over ``(latent_dim,)``: a Pyro ``ConditionalTransformModule`` (e.g.
            ``pyro.distributions.transforms.conditional_spline(d, context_dim)``), which sees :math:`c(x)`,
            or a ``TransformModule``, shared by all inputs (then ``context_dim`` is ignored).
        num_layers: layers of a named flow.
        hidden: hidden widths of each layer's net (named flows).
        context_dim: size of :math:`c(x)`.

    Example:
        >>> q = FlowPosterior("iaf", num_layers=2, hidden=[8], context_dim=3).bind(2)
        >>> q.head_dim
        7
        >>> d = q.distribution(torch.zeros(5, 7))
        >>> d.log_prob(d.rsample()).shape
        torch.Size([5])
    """

    def __init__(self, flow: Union[str, nn.Module] = "iaf", num_layers: int = 4, hidden: Sequence[int] = (64, 64),
                 context_dim: int = 16):
        super().__init__()
        self.kind = flow if isinstance(flow, str) else None
        if self.kind is not None and self.kind not in POSTERIOR_FLOWS:
            raise ValueError(
                f"FlowPosterior's flow must be one of {POSTERIOR_FLOWS} or a Pyro (Conditional)TransformModule; "
                f"got {flow!r}."
            )
        if context_dim < 1:
            raise ValueError(f"context_dim must be a positive integer; got {context_dim}.")
        self.num_layers, self.hidden = num_layers, tuple(hidden)
        self.config = None if self.kind is None else dict(flow=flow, num_layers=num_layers, hidden=list(hidden),
                                                           context_dim=context_dim)
        self.flow: Optional[nn.Module] = None if self.kind is not None else flow
        conditional = self.kind is not None or isinstance(flow, ConditionalTransformModule) or hasattr(flow, "condition")
        self.context_dim = context_dim if conditional else 0

    def build(self) -> None:
        if self.kind is not None:
            self.flow = posterior_flow(self.latent_dim, self.context_dim, self.kind, self.num_layers, self.hidden)

    @property
    def head_dim(self) -> int:
        return 2 * self.latent_dim + self.context_dim

    def base(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The base Gaussian's mean and standard deviation, and the context (``None`` for an unconditional flow)."""
        d = self.latent_dim
        loc, raw, context = self._split(h, [d, d, self.context_dim])
        return loc, softplus(raw) + _MIN_SCALE, (context if self.context_dim else None)

    def base_gaussian(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base(h)[:2]

    def layers(self, context: Optional[torch.Tensor]) -> list:
        """The flow's transforms, given the context where they take one."""
        if context is None:
            return [self.flow]
        return [self.flow.condition(context)]

    def distribution(self, h: torch.Tensor) -> dist.TorchDistribution:
        loc, scale, context = self.base(h)
        base = dist.Normal(loc, scale).to_event(1)
        if context is None:
            return FlowDistribution(base, [self.flow])
        return flow_posterior(base, self.flow, context)

    def summary(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The flow applied to the base mean, :math:`g_c(\\mu)`, and the base's :math:`\\sigma` (a rough spread)."""
        loc, scale, context = self.base(h)
        for layer in self.layers(context):
            loc = layer(loc)
        return loc, scale

    def extra_repr(self) -> str:
        return f"flow={self.kind or type(self.flow).__name__}, context_dim={self.context_dim}"


class IAFPosterior(FlowPosterior):
    r"""An inverse autoregressive flow posterior (Kingma et al. 2016): :class:`FlowPosterior` with ``flow="iaf"``.

    Each layer is :math:`z' = \mu_t(z, c) + \sigma_t(z, c) \odot z` with :math:`\mu_t, \sigma_t`
    autoregressive in :math:`z` (Pyro's ``ConditionalAffineAutoregressive``), so the Jacobian is triangular,
    :math:`\log\lvert\det J\rvert = \sum_i \log \sigma_{t,i}`, and a draw with its density is one pass per layer.

    References:
        Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016),
        https://arxiv.org/abs/1606.04934

    Example:
        >>> q = IAFPosterior(num_layers=2, hidden=[8], context_dim=3).bind(2)
        >>> [type(t).__name__ for t in q.flow]
        ['ConditionalAffineAutoregressive', '_Reverse', 'ConditionalAffineAutoregressive']
    """

    def __init__(self, num_layers: int = 4, hidden: Sequence[int] = (64, 64), context_dim: int = 16):
        super().__init__("iaf", num_layers, hidden, context_dim)
        self.config = dict(num_layers=num_layers, hidden=list(hidden), context_dim=context_dim)


def make_posterior(posterior: Union[str, Posterior], num_layers: int = 4, hidden: Sequence[int] = (64, 64),
                   context_dim: int = 16) -> Posterior:
    """A posterior part from a name (``"diagonal"``, ``"low_rank"``, ``"full"``, ``"iaf"``, ``"coupling"``) or as given.

    ``num_layers``, ``hidden`` and ``context_dim`` shape a named flow posterior.

    Example:
        >>> make_posterior("low_rank")
        LowRankGaussian(rank=1)
    """
    if isinstance(posterior, Posterior):
        return posterior
    if posterior == "diagonal":
        return DiagonalGaussian()
    if posterior == "low_rank":
        return LowRankGaussian()
    if posterior == "full":
        return FullGaussian()
    if posterior in POSTERIOR_FLOWS:
        return FlowPosterior(posterior, num_layers, hidden, context_dim)
    raise ValueError(
        f"Unknown posterior {posterior!r}; choose one of {', '.join(map(repr, POSTERIORS))}, or pass a part from "
        "pyro_lvm.posteriors (e.g. IAFPosterior(num_layers=4), FlowPosterior(my_conditional_transform))."
    )


# ----- KL(full or low-rank Gaussian || diagonal Gaussian) in closed form, for analytic_kl -----------------
def _kl_gaussian_to_diagonal(q: Union[MultivariateNormal, LowRankMultivariateNormal], p: Independent) -> torch.Tensor:
    r""":math:`\tfrac12\big[\operatorname{tr}(S^{-1}\Sigma) + (m - \mu)^\top S^{-1}(m - \mu) - d + \log|S| - \log|\Sigma|\big]`.

    :math:`\log|\Sigma| = 2H(q) - d(1 + \log 2\pi)` from q's entropy; :math:`S = \operatorname{diag} s^2`.
    """
    base = p.base_dist
    if not (isinstance(base, Normal) and p.reinterpreted_batch_ndims == 1):
        raise NotImplementedError
    d = q.event_shape[-1]
    var = base.scale.pow(2)
    trace = (q.covariance_matrix.diagonal(dim1=-2, dim2=-1) / var).sum(-1)
    mahalanobis = ((base.loc - q.loc).pow(2) / var).sum(-1)
    log_det_q = 2 * q.entropy() - d * (1 + math.log(2 * math.pi))
    return 0.5 * (trace + mahalanobis - d + var.log().sum(-1) - log_det_q)


register_kl(MultivariateNormal, Independent)(_kl_gaussian_to_diagonal)
register_kl(LowRankMultivariateNormal, Independent)(_kl_gaussian_to_diagonal)
