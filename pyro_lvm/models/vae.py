"""The variational autoencoder as a Pyro model/guide pair."""

from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import pyro
import pyro.distributions as dist
import torch
from torch.nn.functional import softplus

from ..flows import vae_flows
from ..likelihoods import Likelihood, make_likelihood
from ..nets import MLP
from .base import LatentVariableModel

__all__ = ["VAE"]


class VAE(LatentVariableModel):
    r"""Variational autoencoder (Kingma & Welling 2014; Rezende et al. 2014).

    The generative model and the amortized guide are

    .. math::

        p_\theta(x, z) = \mathcal N(z \mid 0, I)\, p_\theta(x \mid z), \qquad
        q_\phi(z \mid x) = \mathcal N\big(z \mid \mu_\phi(x), \operatorname{diag}\sigma_\phi(x)^2\big),

    and training maximizes the evidence lower bound (Jensen's inequality)

    .. math::

        \log p_\theta(x) = \log \mathbb E_{q}\Big[\frac{p_\theta(x, z)}{q_\phi(z\mid x)}\Big]
        \ \ge\ \mathbb E_{q}[\log p_\theta(x \mid z)] - \mathrm{KL}(q_\phi(z\mid x)\,\|\,p(z)).

    :meth:`model` and :meth:`guide` are the pair that :class:`pyro.infer.SVI`
    and :class:`pyro_lvm.LVMModule` take. The latent ``z`` is the sample site
    ``"z"`` inside ``pyro.plate("data")``; pass ``num_data`` to scale a
    mini-batch up to the full data set (subsampling).

    References:
        Auto-Encoding Variational Bayes (Kingma & Welling, 2014), https://arxiv.org/abs/1312.6114

    Arguments:
        data_shape: shape of one data point (an int for flat vectors).
        latent_dim: dimension of ``z``.
        hidden_dims: widths of the encoder's hidden layers; the decoder mirrors them.
        likelihood: ``"bernoulli"`` (binary data), ``"continuous_bernoulli"`` (grey levels in [0, 1]) or ``"gaussian"``.
        likelihood_scale: Gaussian only: a fixed ``sigma`` or ``"learned"`` (per dimension).
        activation: nonlinearity of both networks.
        prior_flow: ``None`` (:math:`\mathcal N(0, I)`), or a flow prior
            :math:`p(z) = f_\#\mathcal N(0, I)`: ``"realnvp"`` (affine couplings) or
            ``"nice"`` (additive couplings and a diagonal scaling); see
            :func:`pyro_lvm.flows.vae_flows.prior_flow`.
        posterior_flow: ``None`` (the diagonal Gaussian), or a flow posterior
            :math:`q(z \mid x) = g_{c(x)\#}\mathcal N(\mu(x), \operatorname{diag}\sigma(x)^2)`
            whose layers see a context :math:`c(x)`, an extra head of the encoder:
            ``"coupling"`` (conditional affine couplings) or ``"iaf"`` (inverse
            autoregressive flow); see :func:`pyro_lvm.flows.vae_flows.posterior_flow`.
        flow_layers: number of layers of each flow.
        flow_hidden: hidden widths of each flow layer's net.
        flow_context_dim: size of the context :math:`c(x)` (flow posterior only).

    A flow prior or posterior has no closed-form KL: train with ``"reparam"``,
    ``"stl"``, ``"iwae"`` or ``"dreg"``; ``"analytic_kl"`` and ``kl_control`` refuse it.
    With a flow posterior, :meth:`encode` returns the flow applied to the base mean,
    :math:`g_{c(x)}(\mu(x))`, and the base's :math:`\sigma(x)` (a rough spread: q is
    not Gaussian), and :meth:`reconstruct` decodes that point (or a posterior draw).

    Example:
        >>> import pyro
        >>> vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8])
        >>> x = torch.bernoulli(torch.full((5, 4), 0.5))
        >>> elbo = pyro.infer.Trace_ELBO()
        >>> float(elbo.loss(vae.model, vae.guide, x)) > 0
        True
        >>> vae.sample(3).shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        data_shape: Union[int, Sequence[int]] = 64,
        latent_dim: int = 2,
        hidden_dims: Sequence[int] = (256, 128),
        likelihood: Literal["bernoulli", "continuous_bernoulli", "gaussian"] = "bernoulli",
        likelihood_scale: Union[float, Literal["learned"]] = "learned",
        activation: str = "relu",
        prior_flow: Optional[Literal["realnvp", "nice"]] = None,
        posterior_flow: Optional[Literal["coupling", "iaf"]] = None,
        flow_layers: int = 4,
        flow_hidden: Sequence[int] = (64, 64),
        flow_context_dim: int = 16,
    ):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer; got {latent_dim}.")
        self.config = dict(
            data_shape=data_shape if isinstance(data_shape, int) else list(data_shape),
            latent_dim=latent_dim,
            hidden_dims=list(hidden_dims),
            likelihood=likelihood,
            likelihood_scale=likelihood_scale,
            activation=activation,
            prior_flow=prior_flow,
            posterior_flow=posterior_flow,
            flow_layers=flow_layers,
            flow_hidden=list(flow_hidden),
            flow_context_dim=flow_context_dim,
        )
        self.latent_dim = latent_dim
        self.latent_shape = torch.Size([latent_dim])
        self.likelihood: Likelihood = make_likelihood(
            likelihood, data_shape, scale=likelihood_scale
        )
        self.event_shape = self.likelihood.event_shape
        data_dim = self.likelihood.data_dim
        # a flow posterior's context c(x) is an extra head of the encoder
        context_dim = flow_context_dim if posterior_flow is not None else 0
        self.encoder = MLP(data_dim, hidden_dims, 2 * latent_dim + context_dim, activation)
        self.decoder = MLP(latent_dim, list(reversed(hidden_dims)), data_dim, activation)
        # built only when asked for, so that the default VAE's parameters and random
        # numbers are those of the VAE without flows
        self.prior_flow = None
        self.posterior_flow = None
        if prior_flow is not None:
            self.prior_flow = vae_flows.prior_flow(latent_dim, prior_flow, flow_layers, flow_hidden)
        if posterior_flow is not None:
            self.posterior_flow = vae_flows.posterior_flow(
                latent_dim, flow_context_dim, posterior_flow, flow_layers, flow_hidden
            )

    # model/guide only register the flows; prior/posterior are the base's without them
    keeps_base_meaning = ("model", "guide", "prior", "posterior")

    def standard_gaussian_latents(self) -> bool:
        """Whether q(z | x) and p(z) are the base class's Gaussians: no flow prior or posterior."""
        return self.prior_flow is None and self.posterior_flow is None and super().standard_gaussian_latents()

    # ----- conveniences --------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of q(z | x) (with a flow posterior: see the class docstring)."""
        loc, scale, context = self._heads(x)
        if self.posterior_flow is not None:
            for layer in self.posterior_flow:
                loc = layer.condition(context)(loc)
        return loc, scale

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The base Gaussian's mean and standard deviation, and the flow's context (or None)."""
        h = self.encoder(x.reshape(x.shape[: x.dim() - len(self.event_shape)] + (-1,)))
        if self.posterior_flow is None:
            loc, raw = h.split(self.latent_dim, dim=-1)
            context = None
        else:
            loc, raw, context = h.split([self.latent_dim, self.latent_dim, h.shape[-1] - 2 * self.latent_dim], dim=-1)
        return loc, softplus(raw) + 1e-5, context

    # ----- the flows -------------------------------------------------------------------
    def model(self, x: torch.Tensor, num_data: Optional[int] = None) -> torch.Tensor:
        """p(x, z): ``z ~ p(z)`` (:meth:`prior`, registering a flow prior as ``prior_flow``), ``x ~ p(x | z)``."""
        if self.prior_flow is not None:
            pyro.module("prior_flow", self.prior_flow)
        return super().model(x, num_data)

    def guide(self, x: torch.Tensor, num_data: Optional[int] = None) -> torch.Tensor:
        """q(z | x) (:meth:`posterior`), registering a flow posterior as ``posterior_flow``."""
        if self.posterior_flow is not None:
            pyro.module("posterior_flow", self.posterior_flow)
        return super().guide(x, num_data)

    def prior(self, batch_shape: torch.Size = torch.Size()) -> dist.TorchDistribution:
        """p(z): N(0, I), or with ``prior_flow`` the flow applied to it, with the given batch shape."""
        base = super().prior(batch_shape)
        return base if self.prior_flow is None else vae_flows.flow_prior(base, self.prior_flow)

    def posterior(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(z | x): N(mu(x), diag sigma(x)^2), or with ``posterior_flow`` the flow given c(x) applied to it."""
        if self.posterior_flow is None:
            return super().posterior(x)
        loc, scale, context = self._heads(x)
        return vae_flows.flow_posterior(dist.Normal(loc, scale).to_event(1), self.posterior_flow, context)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """E[x | z] at z = :meth:`encode`'s point (or a posterior draw if ``sample``)."""
        if sample and self.posterior_flow is not None:
            return self.decode(self.posterior(x).sample())
        return super().reconstruct(x, sample)

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)
