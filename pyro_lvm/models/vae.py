"""The variational autoencoder as a Pyro model/guide pair."""

from __future__ import annotations

from functools import partial
from typing import Callable, Literal, Optional, Sequence, Union

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..flows.vae_flows import POSTERIOR_FLOWS, PRIOR_FLOWS
from ..likelihoods import Likelihood, LikelihoodName, likelihood_config, make_likelihood
from ..nets import MLP
from ..parts import CUSTOM, build_part, part_config
from ..posteriors import Posterior, make_posterior
from ..priors import Prior, make_prior
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
        likelihood: ``"bernoulli"`` (binary data), ``"continuous_bernoulli"`` (grey levels in [0, 1]),
            ``"gaussian"``, or a part from :mod:`pyro_lvm.likelihoods` (the decoder then emits its
            ``output_dim`` numbers).
        likelihood_scale: Gaussian by name only: a fixed ``sigma`` or ``"learned"`` (per dimension).
        activation: nonlinearity of both networks.
        prior: :math:`p(z)`: a part from :mod:`pyro_lvm.priors`
            (:class:`~pyro_lvm.priors.StandardNormalPrior`, :class:`~pyro_lvm.priors.VampPrior`,
            :class:`~pyro_lvm.priors.MixturePrior`, :class:`~pyro_lvm.priors.FlowPrior` over any Pyro
            transform), or its name: ``"standard_normal"``, ``"vamp"``, ``"mixture"``, ``"realnvp"``, ``"nice"``.
        posterior: the family of :math:`q(z \mid x)` over the encoder: a part from :mod:`pyro_lvm.posteriors`
            (:class:`~pyro_lvm.posteriors.DiagonalGaussian`, :class:`~pyro_lvm.posteriors.LowRankGaussian`,
            :class:`~pyro_lvm.posteriors.FullGaussian`, :class:`~pyro_lvm.posteriors.FlowPosterior`,
            :class:`~pyro_lvm.posteriors.IAFPosterior`), or its name: ``"diagonal"``, ``"low_rank"``,
            ``"full"``, ``"iaf"``, ``"coupling"``.
        encoder: a network of your own from the flat ``x`` to the posterior's ``head_dim`` numbers
            (default: an MLP through ``hidden_dims``).
        decoder: a network of your own from ``z`` to the likelihood's input (default: the mirrored MLP).
        prior_flow: shorthand for ``prior="realnvp"`` or ``"nice"`` (older spelling).
        posterior_flow: shorthand for ``posterior="coupling"`` or ``"iaf"`` (older spelling).
        flow_layers: number of layers of a flow named by a string.
        flow_hidden: hidden widths of each layer's net (flows named by a string).
        flow_context_dim: size of the context :math:`c(x)` (a flow posterior named by a string).

    Only :math:`\mathcal N(0, I)` with a Gaussian posterior has a closed-form KL: with another prior or a
    flow posterior train with ``"reparam"``, ``"stl"``, ``"iwae"`` or ``"dreg"``; ``"analytic_kl"`` and
    ``kl_control`` refuse it. The fast training step applies to the diagonal Gaussian posterior with any prior
    whose log-density is written out (standard normal, VampPrior, mixture).
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

        From parts: a VampPrior and an inverse autoregressive flow posterior,

        >>> from pyro_lvm.priors import VampPrior
        >>> from pyro_lvm.posteriors import IAFPosterior
        >>> vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8], prior=VampPrior(num_pseudo_inputs=10),
        ...           posterior=IAFPosterior(num_layers=2, hidden=[8]))
        >>> float(elbo.loss(vae.model, vae.guide, x)) > 0
        True
    """

    def __init__(
        self,
        data_shape: Union[int, Sequence[int]] = 64,
        latent_dim: int = 2,
        hidden_dims: Sequence[int] = (256, 128),
        likelihood: Union[LikelihoodName, Likelihood] = "bernoulli",
        likelihood_scale: Union[float, Literal["learned"]] = "learned",
        activation: str = "relu",
        prior: Union[str, Prior] = "standard_normal",
        posterior: Union[str, Posterior] = "diagonal",
        encoder: Optional[nn.Module] = None,
        decoder: Optional[nn.Module] = None,
        prior_flow: Optional[Literal["realnvp", "nice"]] = None,
        posterior_flow: Optional[Literal["coupling", "iaf"]] = None,
        flow_layers: int = 4,
        flow_hidden: Sequence[int] = (64, 64),
        flow_context_dim: int = 16,
    ):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer; got {latent_dim}.")
        prior, posterior = _shorthands(prior, posterior, prior_flow, posterior_flow)
        self.latent_dim = latent_dim
        self.latent_shape = torch.Size([latent_dim])
        self.likelihood: Likelihood = make_likelihood(likelihood, data_shape, scale=likelihood_scale)
        self.event_shape = self.likelihood.event_shape
        self.prior_part: Prior = (make_prior(prior, flow_layers, flow_hidden) if isinstance(prior, str) and prior != CUSTOM
                                  else build_part(prior, Prior, "prior", "pyro_lvm.priors.VampPrior"))
        self.posterior_part: Posterior = (
            make_posterior(posterior, flow_layers, flow_hidden, flow_context_dim)
            if isinstance(posterior, str) and posterior != CUSTOM
            else build_part(posterior, Posterior, "posterior", "pyro_lvm.posteriors.IAFPosterior"))
        self.posterior_part.bind(latent_dim, build=False)  # its size now, its parameters after the networks'
        data_dim = self.likelihood.data_dim
        self.encoder = encoder if encoder is not None else MLP(
            data_dim, hidden_dims, self.posterior_part.head_dim, activation)
        self.decoder = decoder if decoder is not None else MLP(
            latent_dim, list(reversed(hidden_dims)), self.likelihood.output_dim, activation)
        # the parts' own parameters after the networks', so that the default VAE's parameters and random
        # numbers are those of the VAE without them
        self.prior_part.bind(latent_dim, self.event_shape)
        self.posterior_part.bind(latent_dim)
        self.config = dict(
            data_shape=data_shape if isinstance(data_shape, int) else list(data_shape),
            latent_dim=latent_dim,
            hidden_dims=list(hidden_dims),
            likelihood=likelihood_config(likelihood),
            likelihood_scale=likelihood_scale,
            activation=activation,
            prior=part_config(self.prior_part),
            posterior=part_config(self.posterior_part),
            encoder=None if encoder is None else CUSTOM,
            decoder=None if decoder is None else CUSTOM,
        )

    # model/guide only register the parts; prior/posterior are the base's with them
    keeps_base_meaning = ("model", "guide", "prior", "posterior")

    @property
    def prior_flow(self) -> Optional[nn.Module]:
        """The flow prior's transform (``None`` unless ``prior`` is a :class:`~pyro_lvm.priors.FlowPrior`)."""
        return getattr(self.prior_part, "flow", None)

    @property
    def posterior_flow(self) -> Optional[nn.Module]:
        """The flow posterior's transform (``None`` unless ``posterior`` is a :class:`~pyro_lvm.posteriors.FlowPosterior`)."""
        return getattr(self.posterior_part, "flow", None)

    def standard_gaussian_latents(self) -> bool:
        """Whether q(z | x) is the encoder's diagonal Gaussian and p(z) = N(0, I) (the closed forms apply)."""
        return (self.prior_part.standard_normal and self.posterior_part.diagonal
                and super().standard_gaussian_latents())

    def written_out_prior(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        r"""``z -> log p(z)`` per draw, written out, where q is the encoder's diagonal Gaussian and the prior has one.

        A VampPrior's or a mixture's (:meth:`pyro_lvm.priors.Prior.log_density`); ``None`` otherwise.
        The fast training step uses it.
        """
        if not self.posterior_part.diagonal or self._redefined(("prior", "posterior")):
            return None
        if type(self.prior_part).log_density is Prior.log_density:
            return None
        return partial(self.prior_part.log_density, self)

    # ----- conveniences --------------------------------------------------------------
    def encoder_output(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's output for ``x`` (flattened): the ``head_dim`` numbers the posterior family reads."""
        return self.encoder(x.reshape(x.shape[: x.dim() - len(self.event_shape)] + (-1,)))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of q(z | x) (for a non-diagonal posterior, see its ``summary``)."""
        return self.posterior_part.summary(self.encoder_output(x))

    # ----- the parts -------------------------------------------------------------------
    def model(self, x: torch.Tensor, num_data: Optional[int] = None) -> torch.Tensor:
        """p(x, z): ``z ~ p(z)`` (:meth:`prior`, registering the prior's parameters as ``prior``), ``x ~ p(x | z)``."""
        if _has_parameters(self.prior_part):
            pyro.module("prior", self.prior_part)
        return super().model(x, num_data)

    def guide(self, x: torch.Tensor, num_data: Optional[int] = None) -> torch.Tensor:
        """q(z | x) (:meth:`posterior`), registering the posterior family's parameters as ``posterior``."""
        if _has_parameters(self.posterior_part):
            pyro.module("posterior", self.posterior_part)
        return super().guide(x, num_data)

    def prior(self, batch_shape: torch.Size = torch.Size()) -> dist.TorchDistribution:
        """p(z) from the prior part, with the given batch shape."""
        return self.prior_part.distribution(self, batch_shape)

    def posterior(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(z | x) from the posterior part over the encoder's output."""
        return self.posterior_part.distribution(self.encoder_output(x))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """E[x | z] at z = :meth:`encode`'s point (or a posterior draw if ``sample``)."""
        if sample and not self.posterior_part.diagonal:
            return self.decode(self.posterior(x).sample())
        return super().reconstruct(x, sample)

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


def _has_parameters(part: nn.Module) -> bool:
    return next(part.parameters(), None) is not None


def _shorthands(prior: Union[str, Prior, dict], posterior: Union[str, Posterior, dict], prior_flow: Optional[str],
                posterior_flow: Optional[str]) -> tuple:
    """The parts that ``prior``/``posterior`` and the older ``prior_flow``/``posterior_flow`` shorthands name."""
    for value, kinds, name in ((prior_flow, PRIOR_FLOWS, "prior_flow"), (posterior_flow, POSTERIOR_FLOWS, "posterior_flow")):
        if value not in (None, *kinds):
            raise ValueError(f"{name} must be one of {', '.join(map(repr, kinds))} (or None); got {value!r}.")
    if prior_flow is not None:
        if prior != "standard_normal":
            raise ValueError(f"Give the prior once: prior={prior!r} or prior_flow={prior_flow!r} (a shorthand for "
                             f"prior=FlowPrior({prior_flow!r}, ...)).")
        prior = prior_flow
    if posterior_flow is not None:
        if posterior != "diagonal":
            raise ValueError(f"Give the posterior once: posterior={posterior!r} or posterior_flow={posterior_flow!r} "
                             f"(a shorthand for posterior=FlowPosterior({posterior_flow!r}, ...)).")
        posterior = posterior_flow
    return prior, posterior
