"""The variational autoencoder with a discrete latent layer, as a Pyro model/guide pair."""

from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import pyro.distributions as dist
import torch
from torch.nn.functional import one_hot

from ..likelihoods import Likelihood, LikelihoodName, likelihood_config, make_likelihood
from ..nets import MLP
from .base import LatentVariableModel

__all__ = ["DiscreteVAE"]


class DiscreteVAE(LatentVariableModel):
    r"""Variational autoencoder whose latent ``z`` is discrete: categorical or binary.

    With ``latent="categorical"``, ``z`` is ``num_latents`` (:math:`M`) independent
    one-hot vectors of ``num_categories`` (:math:`K`) classes; with
    ``latent="bernoulli"``, :math:`z \in \{0, 1\}^M`. The priors are uniform and
    the guide is mean-field, with logits from an encoder:

    .. math::

        p_\theta(x, z) = p_\theta(x \mid z) \prod_{m=1}^M \mathrm{Cat}(z_m \mid \tfrac1K),
        \qquad
        q_\phi(z \mid x) = \prod_{m=1}^M \mathrm{Cat}\big(z_m \mid \operatorname{softmax}
            \ell_\phi(x)_m\big)

    (:math:`\mathrm{Bern}(z_m \mid \tfrac12)` and :math:`\mathrm{Bern}(z_m \mid
    \sigma(\ell_\phi(x)_m))` for binary ``z``). Training maximizes the ELBO

    .. math::

        \log p_\theta(x) \ \ge\ \mathcal L(x) = \sum_z q_\phi(z \mid x)
            \big[\log p_\theta(x \mid z) + \log p(z) - \log q_\phi(z \mid x)\big],

    a sum of :math:`K^M` (or :math:`2^M`) terms. ``z`` has no ``rsample``, so
    :class:`pyro.infer.Trace_ELBO` and :func:`pyro_lvm.make_elbo`'s
    ``"reparam"`` fall back to the score function without a baseline (unbiased,
    but noisy). The estimators made for this model are ``"score_function"``
    (REINFORCE with a baseline), ``"vimco"`` (multi-sample, leave-one-out
    baselines), ``"relaxed"`` (Gumbel-softmax / Concrete: biased, pathwise)
    and, when :attr:`has_enumerable_latent` (``num_latents == 1``), ``"enum"``
    (:class:`pyro.infer.TraceEnum_ELBO`: the sum above, exactly).

    The latent is the sample site ``"z"`` inside ``pyro.plate("data")``; pass
    ``num_data`` to scale a mini-batch up to the full data set (subsampling).
    Its value has shape ``(batch, M, K)`` (categorical) or ``(batch, M)``
    (bernoulli). With ``num_latents == 1`` the site drops its ``M`` dimension
    (``(batch, K)``, resp. ``(batch,)``) and is a plain :class:`~pyro.distributions.OneHotCategorical`
    or :class:`~pyro.distributions.Bernoulli`, not wrapped in
    :class:`~pyro.distributions.Independent`, which has no ``enumerate_support``.
    :meth:`decode` takes ``z`` in the site's shape, with any leading dimensions
    (particles, enumeration).

    References:
        | Categorical Reparameterization with Gumbel-Softmax (Jang et al., 2017), https://arxiv.org/abs/1611.01144
        | Variational Inference for Monte Carlo Objectives (Mnih & Rezende, 2016), https://arxiv.org/abs/1602.06725

    Arguments:
        data_shape: shape of one data point (an int for flat vectors).
        num_latents: number :math:`M` of independent discrete latents.
        num_categories: classes :math:`K` of each categorical latent (at least 2);
            ignored when ``latent="bernoulli"`` (the attribute is then ``None``).
        latent: ``"categorical"`` (one-hot ``z``) or ``"bernoulli"`` (binary ``z``).
        hidden_dims: widths of the encoder's hidden layers; the decoder mirrors them.
        likelihood: a name, ``"bernoulli"`` (binary data), ``"continuous_bernoulli"`` (grey levels in [0, 1]),
            ``"gaussian"``, ``"discretized_logistic"`` or ``"categorical"`` (8-bit data, k/255), or a
            :class:`~pyro_lvm.likelihoods.Likelihood` object (YAML: ``{class_path: ..., init_args: ...}``), which
            the model binds to ``data_shape``; the decoder ends in its ``output_dim`` numbers.
        likelihood_scale: Gaussian (by name) only: a fixed ``sigma`` or ``"learned"`` (per dimension).
        activation: nonlinearity of both networks.

    Example:
        >>> import pyro
        >>> vae = DiscreteVAE(data_shape=4, num_latents=2, num_categories=3, hidden_dims=[8])
        >>> x = torch.bernoulli(torch.full((5, 4), 0.5))
        >>> elbo = pyro.infer.TraceGraph_ELBO()
        >>> float(elbo.loss(vae.model, vae.guide, x)) > 0
        True
        >>> vae.encode(x).shape, vae.has_enumerable_latent
        (torch.Size([5, 2, 3]), False)
        >>> vae.sample(3).shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        data_shape: Union[int, Sequence[int]] = 64,
        num_latents: int = 8,
        num_categories: int = 4,
        latent: Literal["categorical", "bernoulli"] = "categorical",
        hidden_dims: Sequence[int] = (256, 128),
        likelihood: Union[LikelihoodName, Likelihood] = "bernoulli",
        likelihood_scale: Union[float, Literal["learned"]] = "learned",
        activation: str = "relu",
    ):
        super().__init__()
        if latent not in ("categorical", "bernoulli"):
            raise ValueError(f"Unknown latent {latent!r}; choose 'categorical' or 'bernoulli'.")
        if isinstance(num_latents, bool) or not isinstance(num_latents, int) or num_latents < 1:
            raise ValueError(f"num_latents must be a positive integer; got {num_latents!r}.")
        if latent == "categorical" and (
            isinstance(num_categories, bool)
            or not isinstance(num_categories, int)
            or num_categories < 2
        ):
            raise ValueError(
                f"num_categories must be an integer >= 2 for a categorical latent; got "
                f"{num_categories!r}. For binary latents use latent='bernoulli'."
            )
        self.config = dict(
            data_shape=data_shape if isinstance(data_shape, int) else list(data_shape),
            num_latents=num_latents,
            num_categories=num_categories,
            latent=latent,
            hidden_dims=list(hidden_dims),
            likelihood=likelihood_config(likelihood),
            likelihood_scale=likelihood_scale,
            activation=activation,
        )
        self.latent = latent
        self.num_latents = num_latents
        self.num_categories: Optional[int] = num_categories if latent == "categorical" else None
        # the shape of the encoder's logits for one data point
        self.logits_shape = torch.Size(
            (num_latents, num_categories) if latent == "categorical" else (num_latents,)
        )
        # dims of the site "z" per data point: a one-hot vector is one event dim, and
        # num_latents == 1 drops the M dim so that the site stays enumerable
        self.latent_event_dim = (1 if latent == "categorical" else 0) + (num_latents > 1)
        self.likelihood: Likelihood = make_likelihood(
            likelihood, data_shape, scale=likelihood_scale
        )
        self.event_shape = self.likelihood.event_shape
        self.latent_shape = self.logits_shape
        data_dim = self.likelihood.data_dim
        latent_dim = self.logits_shape.numel()
        self.encoder = MLP(data_dim, hidden_dims, latent_dim, activation)
        self.decoder = MLP(latent_dim, list(reversed(hidden_dims)), self.likelihood.output_dim, activation)

    @property
    def has_enumerable_latent(self) -> bool:
        """Whether ``"z"`` can be enumerated site-wise (:class:`pyro.infer.TraceEnum_ELBO`)."""
        return self.num_latents == 1

    # ----- the Pyro model/guide pair -------------------------------------------------
    def latent_dist(self, logits: torch.Tensor) -> dist.TorchDistribution:
        """The distribution of the site ``"z"`` given logits of shape ``(..., *logits_shape)``."""
        if self.latent == "categorical":
            if self.num_latents == 1:
                return dist.OneHotCategorical(logits=logits.squeeze(-2))
            return dist.OneHotCategorical(logits=logits).to_event(1)
        if self.num_latents == 1:
            return dist.Bernoulli(logits=logits.squeeze(-1))
        return dist.Bernoulli(logits=logits).to_event(1)

    def prior(self, batch_shape: torch.Size = torch.Size()) -> dist.TorchDistribution:
        """p(z): uniform over the categories (or Bernoulli(1/2)), with the given batch shape."""
        zeros = self.encoder[0].weight.new_zeros(batch_shape + self.logits_shape)
        return self.latent_dist(zeros)

    def posterior(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(z | x): independent categoricals (or Bernoullis) with logits from the encoder."""
        return self.latent_dist(self.encode(x))

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        # flatten only the per-data-point dims of z: leading dims may be particles or
        # enumerated values; with latent_event_dim == 0 this appends the M = 1 dim
        flat = z.reshape(z.shape[: z.dim() - self.latent_event_dim] + (-1,))
        return self.decoder(flat)

    # ----- conveniences --------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of q(z | x), of shape ``(..., num_latents, num_categories)`` or ``(..., num_latents)``."""
        h = self.encoder(x.reshape(x.shape[: x.dim() - len(self.event_shape)] + (-1,)))
        return h.reshape(h.shape[:-1] + self.logits_shape)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """E[x | z] for ``z`` in the site's shape, e.g. pixel probabilities for a Bernoulli likelihood."""
        return self.likelihood.mean(self.decoder_output(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """E[x | z] at z = the mode of q(z | x) (or a posterior draw if ``sample``)."""
        logits = self.encode(x)
        q = self.latent_dist(logits)
        if sample:
            z = q.sample()
        elif self.latent == "categorical":
            z = one_hot(logits.argmax(-1), self.num_categories).to(logits)
        else:
            z = (logits > 0).to(logits)
        return self.decode(z.reshape(q.shape()))

    def extra_repr(self) -> str:
        categories = f", num_categories={self.num_categories}" if self.num_categories else ""
        return (
            f"latent={self.latent!r}, num_latents={self.num_latents}{categories}, "
            f"event_shape={tuple(self.event_shape)}"
        )
