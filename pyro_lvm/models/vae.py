"""The variational autoencoder as a Pyro model/guide pair."""

from __future__ import annotations

from typing import Literal, Sequence, Union

import torch
from torch.nn.functional import softplus

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
        likelihood: ``"bernoulli"`` (binary data) or ``"gaussian"``.
        likelihood_scale: Gaussian only: a fixed ``sigma`` or ``"learned"`` (per dimension).
        activation: nonlinearity of both networks.

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
        likelihood: Literal["bernoulli", "gaussian"] = "bernoulli",
        likelihood_scale: Union[float, Literal["learned"]] = "learned",
        activation: str = "relu",
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
        )
        self.latent_dim = latent_dim
        self.latent_shape = torch.Size([latent_dim])
        self.likelihood: Likelihood = make_likelihood(
            likelihood, data_shape, scale=likelihood_scale
        )
        self.event_shape = self.likelihood.event_shape
        data_dim = self.likelihood.data_dim
        self.encoder = MLP(data_dim, hidden_dims, 2 * latent_dim, activation)
        self.decoder = MLP(latent_dim, list(reversed(hidden_dims)), data_dim, activation)

    # ----- conveniences --------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of q(z | x)."""
        h = self.encoder(x.reshape(x.shape[: x.dim() - len(self.event_shape)] + (-1,)))
        loc, raw = h.split(self.latent_dim, dim=-1)
        return loc, softplus(raw) + 1e-5

    def _decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)
