"""The convolutional VAE: conv encoder and decoder, with a spatial latent map or a flat latent vector."""

from __future__ import annotations

import math
from typing import Literal, Sequence, Union

import torch
from torch import nn
from torch.nn.functional import softplus

from ..estimators.kl_control import kl_per_variable
from ..likelihoods import Likelihood, LikelihoodName, likelihood_config, make_likelihood
from ..nets import MLP, ConvDecoder, ConvEncoder, over_images
from ..nets import activation as _activation
from .base import LatentVariableModel

__all__ = ["ConvVAE"]


class ConvVAE(LatentVariableModel):
    r"""Convolutional variational autoencoder, with a spatial latent map or a flat latent.

    The pair is the one of :class:`pyro_lvm.VAE`,

    .. math::

        p_\theta(x, z) = \mathcal N(z \mid 0, I)\, p_\theta(x \mid z), \qquad
        q_\phi(z \mid x) = \mathcal N\big(z \mid \mu_\phi(x), \operatorname{diag}\sigma_\phi(x)^2\big),

    with convolutional networks. The encoder has :math:`K` = ``len(channels)``
    stages of stride-2 convolutions (kernel 4, padding 1), each halving the height
    and width, so an image of size :math:`H \times W` is downsampled by
    :math:`f = 2^K` to :math:`H' \times W' = H/f \times W/f`; the decoder mirrors it
    with transposed convolutions. Any image size divisible by :math:`f` works.

    * ``latent="spatial"`` (fully convolutional): :math:`z` is a map of
      ``latent_channels`` :math:`\times H' \times W'`, the prior :math:`\mathcal N(0, I)`
      over all of it. A 3x3 convolution turns the encoder's maps into the mean and
      (softplus) standard deviation of every location, and one turns :math:`z` back
      into the decoder's maps. The KL term then splits over locations,

      .. math::

          \mathrm{KL}(q_\phi(z \mid x) \,\|\, p(z)) = \sum_{h, w} \sum_c
          \mathrm{KL}\big(\mathcal N(\mu_{chw}, \sigma_{chw}^2) \,\|\, \mathcal N(0, 1)\big),

      which :meth:`kl_per_location` reports as a map of nats per location.
    * ``latent="flat"``: the encoder's maps are flattened, and an MLP with one
      hidden layer of ``hidden_dim`` units gives a vector :math:`z` of
      ``latent_dim``; the decoder's MLP maps it back to ``channels[-1]`` maps of
      :math:`H' \times W'`.

    Like every built-in model, :meth:`model` and :meth:`guide` put ``"z"`` in
    ``pyro.plate("data")`` and accept extra leading (particle) dimensions of
    ``z``, so every estimator and guide swaps in as for the plain VAE.

    References:
        Auto-Encoding Variational Bayes (Kingma & Welling, 2014), https://arxiv.org/abs/1312.6114

    Arguments:
        data_shape: shape of one image, ``(C, H, W)``; ``H`` and ``W`` divisible by ``2 ** len(channels)``.
        latent: ``"spatial"`` (a latent map) or ``"flat"`` (a latent vector).
        latent_channels: spatial only: channels of the latent map.
        latent_dim: flat only: dimension of ``z``.
        channels: output channels of the encoder's stages (each halves H and W); the decoder mirrors them.
        hidden_dim: flat only: width of the hidden layer between the maps and ``z``.
        likelihood: a name, ``"bernoulli"`` (binary pixels), ``"continuous_bernoulli"`` (grey levels in
            [0, 1]), ``"gaussian"``, ``"discretized_logistic"`` or ``"categorical"`` (8-bit pixels, k/255), or a
            :class:`~pyro_lvm.likelihoods.Likelihood` object (YAML: ``{class_path: ..., init_args: ...}``), which
            the model binds to ``data_shape``; the decoder's last layer has ``params_per_value * C`` channels.
        likelihood_scale: Gaussian (by name) only: a fixed ``sigma`` or ``"learned"`` (per pixel).
        activation: nonlinearity of both networks. ELU by default: on the 8x8 digits
            (``latent_channels=4``, ``channels=[16, 32]``, Adam at 3e-3), ReLU networks let the
            posterior collapse (KL < 0.1 nats, no active unit) for about ten epochs, ELU ones
            used all 16 units from the fifth epoch on.

    Example:
        >>> import pyro
        >>> vae = ConvVAE(data_shape=[1, 28, 28], latent_channels=4, channels=[8, 16])
        >>> vae.latent_shape  # 28 / 2**2 = 7
        torch.Size([4, 7, 7])
        >>> x = torch.bernoulli(torch.full((5, 1, 28, 28), 0.5))
        >>> float(pyro.infer.Trace_ELBO().loss(vae.model, vae.guide, x)) > 0
        True
        >>> vae.kl_per_location(x).shape  # nats per location; sums to the KL
        torch.Size([5, 7, 7])
        >>> ConvVAE([3, 32, 32], latent="flat", latent_dim=10, channels=[8, 16, 32]).sample(2).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 28, 28),
        latent: Literal["spatial", "flat"] = "spatial",
        latent_channels: int = 8,
        latent_dim: int = 16,
        channels: Sequence[int] = (32, 64),
        hidden_dim: int = 256,
        likelihood: Union[LikelihoodName, Likelihood] = "bernoulli",
        likelihood_scale: Union[float, Literal["learned"]] = "learned",
        activation: str = "elu",
    ):
        super().__init__()
        shape = self._check_config(data_shape, latent, latent_channels, latent_dim, channels, hidden_dim)
        self.config = dict(
            data_shape=list(shape),
            latent=latent,
            latent_channels=latent_channels,
            latent_dim=latent_dim,
            channels=list(channels),
            hidden_dim=hidden_dim,
            likelihood=likelihood_config(likelihood),
            likelihood_scale=likelihood_scale,
            activation=activation,
        )
        self.latent = latent
        self.downsampling = 2 ** len(channels)
        in_channels, height, width = shape
        self.feature_shape = torch.Size(
            [channels[-1], height // self.downsampling, width // self.downsampling]
        )
        self.likelihood: Likelihood = make_likelihood(likelihood, shape, scale=likelihood_scale)
        self.event_shape = self.likelihood.event_shape
        features = ConvEncoder(in_channels, channels, activation)
        # P parameter maps per image channel (the likelihood reads (P, C, H, W), P outermost)
        out_channels = self.likelihood.params_per_value * in_channels
        upsample = ConvDecoder(list(reversed(channels)), out_channels, activation)
        if latent == "spatial":
            self.latent_dim = None
            self.latent_shape = torch.Size([latent_channels, *self.feature_shape[1:]])
            self.encoder = nn.Sequential(
                features, nn.Conv2d(channels[-1], 2 * latent_channels, kernel_size=3, padding=1)
            )
            self.decoder = nn.Sequential(
                nn.Conv2d(latent_channels, channels[-1], kernel_size=3, padding=1),
                _activation(activation),
                upsample,
            )
        else:
            self.latent_dim = latent_dim
            self.latent_shape = torch.Size([latent_dim])
            num_features = math.prod(self.feature_shape)
            self.encoder = nn.Sequential(
                features, nn.Flatten(), MLP(num_features, [hidden_dim], 2 * latent_dim, activation)
            )
            self.decoder = nn.Sequential(
                MLP(latent_dim, [hidden_dim], num_features, activation),
                _activation(activation),
                nn.Unflatten(-1, self.feature_shape),
                upsample,
            )

    @staticmethod
    def _check_config(data_shape, latent, latent_channels, latent_dim, channels, hidden_dim) -> tuple:
        shape = tuple(data_shape) if not isinstance(data_shape, int) else (data_shape,)
        if len(shape) != 3 or any(not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(
                f"ConvVAE needs data_shape = (channels, height, width) of positive integers; got "
                f"{data_shape!r}. Use e.g. data_shape=[1, 28, 28] with unflattened images "
                "(flatten=False in the data module)."
            )
        if latent not in ("spatial", "flat"):
            raise ValueError(f"latent must be 'spatial' or 'flat'; got {latent!r}.")
        if len(channels) == 0 or any(not isinstance(c, int) or c < 1 for c in channels):
            raise ValueError(
                f"channels must list one positive width per downsampling stage; got {list(channels)!r}."
            )
        for name, value in (("latent_channels", latent_channels), ("latent_dim", latent_dim),
                            ("hidden_dim", hidden_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        factor = 2 ** len(channels)
        _, height, width = shape
        if height % factor or width % factor:
            stages = max((k for k in range(len(channels)) if height % 2**k == 0 and width % 2**k == 0))
            fewer = f"use {stages} stage(s) (channels={list(channels[:stages])}), or " if stages else ""
            raise ValueError(
                f"ConvVAE halves the image size at each of its {len(channels)} stages "
                f"(channels={list(channels)}), so height and width must be divisible by "
                f"2**{len(channels)} = {factor}; got {height}x{width}. To fix it, {fewer}pad or crop "
                f"the images to a multiple of {factor} (e.g. {-(-height // factor) * factor}x"
                f"{-(-width // factor) * factor})."
            )
        return shape

    # ----- conveniences --------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of q(z | x), each of shape ``(..., *latent_shape)``."""
        h = over_images(self.encoder, x)
        loc, raw = h.chunk(2, dim=-len(self.latent_shape))  # the channel dim, or the vector's
        return loc, softplus(raw) + 1e-5

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[: z.dim() - len(self.latent_shape)]
        h = self.decoder(z.reshape((-1,) + self.latent_shape))
        return h.reshape(batch + (-1,))

    def kl_per_dimension(self, x: torch.Tensor) -> torch.Tensor:
        r"""Closed-form KL of each latent scalar, shape ``(batch, *latent_shape)``, in nats.

        For the Gaussian :math:`q_\phi(z \mid x)` and the prior :math:`\mathcal N(0, 1)`
        of each coordinate,

        .. math::

            \mathrm{KL}_j = \tfrac12\big(\mu_j^2 + \sigma_j^2 - 1\big) - \log\sigma_j ,

        and the sum over all coordinates is :math:`\mathrm{KL}(q_\phi(z \mid x) \,\|\, p(z))`,
        the term that ``estimator="analytic_kl"`` subtracts from the expected log-likelihood.
        """
        q = self.posterior(x)
        return kl_per_variable(q, self.prior(q.batch_shape))

    def kl_per_location(self, x: torch.Tensor) -> torch.Tensor:
        r"""The spatial latent's KL per location, shape ``(batch, H', W')``, in nats.

        :math:`\mathrm{KL}_{hw} = \sum_c \mathrm{KL}_{chw}` (see :meth:`kl_per_dimension`):
        how much information the code at each location of the latent map carries
        about ``x``. The map sums to the total :math:`\mathrm{KL}(q_\phi(z \mid x) \,\|\, p(z))`.
        Only for ``latent="spatial"``.
        """
        if self.latent != "spatial":
            raise ValueError(
                "kl_per_location needs a spatial latent map, but this ConvVAE has latent='flat' "
                f"(z of shape {tuple(self.latent_shape)}). Use kl_per_dimension, or latent='spatial'."
            )
        return self.kl_per_dimension(x).sum(-3)

    def extra_repr(self) -> str:
        return f"latent={self.latent!r}, downsampling={self.downsampling}, " + super().extra_repr()

