"""The hierarchical VAE of Burda et al. (2015): a chain of Gaussian stochastic layers."""

from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..likelihoods import Likelihood, LikelihoodName, likelihood_config, make_likelihood
from ..nets import MLP
from .base import LatentVariableModel, data_plate

__all__ = ["HierarchicalVAE"]


class HierarchicalVAE(LatentVariableModel):
    r"""Variational autoencoder with :math:`L` stochastic layers (Burda, Grosse & Salakhutdinov 2015).

    The generative model is a top-down chain and the guide a bottom-up one,

    .. math::

        p_\theta(x, z_{1:L}) = \mathcal N(z_L \mid 0, I)
            \prod_{l=1}^{L-1} \mathcal N\big(z_l \mid \mu_\theta^{(l)}(z_{l+1}),
            \operatorname{diag} \sigma_\theta^{(l)}(z_{l+1})^2\big)\; p_\theta(x \mid z_1),

    .. math::

        q_\phi(z_{1:L} \mid x) = \prod_{l=1}^{L} \mathcal N\big(z_l \mid \mu_\phi^{(l)}(z_{l-1}),
            \operatorname{diag} \sigma_\phi^{(l)}(z_{l-1})^2\big), \qquad z_0 = x,

    so the ELBO is :math:`\mathbb E_q[\log p_\theta(x, z_{1:L}) - \log q_\phi(z_{1:L} \mid x)]`,
    and every layer's density enters ``log w`` of the multi-sample bounds. Each
    conditional Gaussian is an MLP of ``tanh`` (by default) hidden layers whose last
    hidden layer feeds two linear heads: the mean, and the log standard deviation,
    so :math:`\sigma = \exp(\text{linear})` as in Burda et al.'s code (no floor).
    The network of :math:`q(z_l \mid z_{l-1})` has the widths ``hidden_dims[l-1]``,
    the one of :math:`p(z_{l-1} \mid z_l)` (and of :math:`p(x \mid z_1)`) the same
    widths reversed. The defaults are Burda et al.'s two-layer MNIST architecture,
    784-200-200-100-100-50 (:math:`x \to` 200 :math:`\to` 200 :math:`\to z_1`
    (100) :math:`\to` 100 :math:`\to` 100 :math:`\to z_2` (50), and back), 521,084
    parameters; their output bias is initialized to the data's mean logits, here
    PyTorch's default initialization is kept.

    The latents are the sample sites ``"z1"``, ..., ``"zL"`` (``"z1"`` nearest the
    data; :attr:`latent_sites` lists them with their sizes), all inside
    ``pyro.plate("data")``; pass ``num_data`` to scale a mini-batch up to the full
    data set. There is no site ``"z"``. The image conveniences of the base class
    work on the top latent :math:`z_L`: ``latent_shape`` is ``(latent_dims[-1],)``,
    :meth:`prior` is :math:`\mathcal N(0, I)` over :math:`z_L`, :meth:`encode` passes
    the guide's *means* up the chain and :meth:`decode` the model's conditional
    means down it.

    Every estimator that draws pathwise samples works (``reparam``, ``stl``,
    ``iwae``, ``dreg``, ``score_function``, ``vimco``). ``analytic_kl`` does not
    give the ELBO here: Pyro's :class:`~pyro.infer.TraceMeanField_ELBO` computes
    :math:`\mathrm{KL}(q(z_1 \mid x) \,\|\, p(z_1 \mid z_2))` at a :math:`z_2` drawn
    from :math:`q(z_2 \mid z_1)`, i.e. it treats :math:`z_2` as independent of the
    :math:`z_1` it was drawn from (the parent of :math:`z_1` in the model is its
    child in the guide, which breaks its mean-field condition), and Pyro warns
    "Failed to verify mean field restriction". Use ``reparam`` instead.

    References:
        Importance Weighted Autoencoders (Burda, Grosse & Salakhutdinov, 2015),
        https://arxiv.org/abs/1509.00519

    Arguments:
        data_shape: shape of one data point (an int for flat vectors).
        latent_dims: sizes of :math:`z_1, \dots, z_L`, bottom (nearest the data) first.
        hidden_dims: one list of deterministic widths per stochastic layer: those of :math:`q(z_l \mid z_{l-1})`.
        likelihood: a name, ``"bernoulli"`` (binary data), ``"continuous_bernoulli"`` (grey levels in [0, 1]),
            ``"gaussian"``, ``"discretized_logistic"`` or ``"categorical"`` (8-bit data, k/255), or a
            :class:`~pyro_lvm.likelihoods.Likelihood` object (YAML: ``{class_path: ..., init_args: ...}``), which
            the model binds to ``data_shape``; :math:`p(x \mid z_1)`'s network ends in its ``output_dim`` numbers.
        likelihood_scale: Gaussian (by name) only: a fixed ``sigma`` or ``"learned"`` (per dimension).
        activation: nonlinearity of every network (Burda et al.: ``"tanh"``).

    Example:
        >>> import pyro
        >>> hvae = HierarchicalVAE(data_shape=6, latent_dims=[4, 2], hidden_dims=[[8], [8]])
        >>> hvae.latent_sites
        {'z1': torch.Size([4]), 'z2': torch.Size([2])}
        >>> x = torch.bernoulli(torch.full((5, 6), 0.5))
        >>> trace = pyro.poutine.trace(hvae.guide).get_trace(x)
        >>> trace.nodes["z1"]["value"].shape, trace.nodes["z2"]["value"].shape
        (torch.Size([5, 4]), torch.Size([5, 2]))
        >>> float(pyro.infer.Trace_ELBO().loss(hvae.model, hvae.guide, x)) > 0
        True
        >>> hvae.sample(3).shape, hvae.encode(x)[0].shape
        (torch.Size([3, 6]), torch.Size([5, 2]))
    """

    def __init__(
        self,
        data_shape: Union[int, Sequence[int]] = 784,
        latent_dims: Sequence[int] = (100, 50),
        hidden_dims: Sequence[Sequence[int]] = ((200, 200), (100, 100)),
        likelihood: Union[LikelihoodName, Likelihood] = "bernoulli",
        likelihood_scale: Union[float, Literal["learned"]] = "learned",
        activation: str = "tanh",
    ):
        super().__init__()
        latent_dims, hidden_dims = _checked_dims(latent_dims, hidden_dims)
        self.config = dict(
            data_shape=data_shape if isinstance(data_shape, int) else list(data_shape),
            latent_dims=latent_dims,
            hidden_dims=hidden_dims,
            likelihood=likelihood_config(likelihood),
            likelihood_scale=likelihood_scale,
            activation=activation,
        )
        self.latent_dims = latent_dims
        self.latent_shape = torch.Size([latent_dims[-1]])
        self.likelihood: Likelihood = make_likelihood(likelihood, data_shape, scale=likelihood_scale)
        self.event_shape = self.likelihood.event_shape
        data_dim = self.likelihood.data_dim
        below = [data_dim, *latent_dims[:-1]]  # the input of q(z_l | .) and the output of p(. | z_l)
        # encoder[l-1]: z_{l-1} -> (mu, log sigma) of q(z_l | z_{l-1}), with z_0 = x
        self.encoder = nn.ModuleList(
            MLP(d_in, widths, 2 * d, activation) for d_in, widths, d in zip(below, hidden_dims, latent_dims)
        )
        # decoder[0]: z_1 -> the likelihood's input (output_dim numbers); decoder[l] (l >= 1):
        # z_{l+1} -> (mu, log sigma) of p(z_l | z_{l+1})
        self.decoder = nn.ModuleList(
            MLP(d, widths[::-1], self.likelihood.output_dim if l == 0 else 2 * d_out, activation)
            for l, (d, widths, d_out) in enumerate(zip(latent_dims, hidden_dims, below))
        )

    @property
    def latent_sites(self) -> dict[str, torch.Size]:
        """The latent sample sites, bottom first: ``{"z1": Size([latent_dims[0]]), ...}``."""
        return {f"z{l}": torch.Size([d]) for l, d in enumerate(self.latent_dims, 1)}

    @property
    def num_layers(self) -> int:
        """The number :math:`L` of stochastic layers."""
        return len(self.latent_dims)

    # ----- the Pyro model/guide pair -------------------------------------------------
    def model(self, x: torch.Tensor, num_data: Optional[int] = None) -> torch.Tensor:
        """p(x, z_1..z_L): ``zL ~ N(0, I)``, ``z(l) ~ p(z(l) | z(l+1))``, ``x ~ p(x | z1)``; observes ``x``."""
        self.check_batch(x)
        pyro.module("decoder", self.decoder)
        pyro.module("likelihood", self.likelihood)
        with data_plate(x, num_data):
            z = pyro.sample(f"z{self.num_layers}", self.prior())
            for l in range(self.num_layers - 1, 0, -1):
                z = pyro.sample(f"z{l}", self._gaussian(self.decoder[l](z)))
            return pyro.sample("x", self.likelihood(self.decoder[0](z)), obs=x)

    def guide(self, x: torch.Tensor, num_data: Optional[int] = None) -> torch.Tensor:
        """q(z_1..z_L | x) = prod_l q(z(l) | z(l-1)): the bottom-up recognition chain; returns ``zL``."""
        self.check_batch(x, support=False)
        pyro.module("encoder", self.encoder)
        with data_plate(x, num_data):
            h = self._flat(x)
            for l, net in enumerate(self.encoder, 1):
                h = pyro.sample(f"z{l}", self._gaussian(net(h)))
            return h

    # ----- conveniences --------------------------------------------------------------
    @staticmethod
    def _loc_scale(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, log_scale = out.chunk(2, dim=-1)
        return loc, log_scale.exp()

    def _gaussian(self, out: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(*self._loc_scale(out)).to_event(1)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[: x.dim() - len(self.event_shape)] + (-1,))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Mean and standard deviation of q(z_L | z_{L-1}) with every lower layer at its mean.

        The means are passed up the chain: :math:`m_0 = x`, :math:`m_l = \mu_\phi^{(l)}(m_{l-1})`;
        the result is :math:`(\mu_\phi^{(L)}(m_{L-1}), \sigma_\phi^{(L)}(m_{L-1}))`, not the
        moments of the marginal :math:`q(z_L \mid x)` (which is not Gaussian for :math:`L > 1`).
        """
        return self._up(x)[-1]

    def _up(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(loc, scale) of every q(z_l | m_{l-1}), bottom first, the means passed up."""
        h, moments = self._flat(x), []
        for net in self.encoder:
            moments.append(self._loc_scale(net(h)))
            h = moments[-1][0]
        return moments

    def _down(self, z: torch.Tensor, sample: bool) -> torch.Tensor:
        """The likelihood's input from a top latent ``z`` (``(..., latent_dims[-1])``): means or draws down the chain."""
        for net in self.decoder[:0:-1]:
            loc, scale = self._loc_scale(net(z))
            z = loc + scale * torch.randn_like(scale) if sample else loc
        return self.decoder[0](z)

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's input for a top latent ``z``, every lower layer at its conditional mean."""
        return self._down(z, sample=False)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """E[x | z_1] at z_1 = the mean of q(z_1 | x) (or a draw of it if ``sample``).

        This is the reconstruction the ELBO scores (``x`` depends on :math:`z_1` only);
        ``decode(encode(x)[0])`` instead reconstructs through the top latent.
        """
        loc, scale = self._up(x)[0]
        return self.likelihood.mean(self.decoder[0](loc + scale * torch.randn_like(scale) if sample else loc))

    @torch.no_grad()
    def sample(self, num_samples: int, mean: bool = True) -> torch.Tensor:
        """Draw from the model: ``zL ~ N(0, I)``, then conditional means down to E[x | z_1] (``mean=True``),
        or ancestral draws of every layer and of ``x`` (``mean=False``)."""
        z = self.prior(torch.Size([num_samples])).sample()
        h = self._down(z, sample=not mean)
        return self.likelihood.mean(h) if mean else self.likelihood(h).sample()

    def extra_repr(self) -> str:
        return f"latent_dims={list(self.latent_dims)}, event_shape={tuple(self.event_shape)}"


def _checked_dims(
    latent_dims: Sequence[int], hidden_dims: Sequence[Sequence[int]]
) -> tuple[list[int], list[list[int]]]:
    if isinstance(latent_dims, int) or len(latent_dims) == 0 or not all(
        isinstance(d, int) and d >= 1 for d in latent_dims
    ):
        raise ValueError(
            f"latent_dims must be a non-empty list of positive integers, one per stochastic layer "
            f"(bottom first, e.g. [100, 50]); got {latent_dims!r}."
        )
    if isinstance(hidden_dims, int) or any(isinstance(w, int) for w in hidden_dims):
        raise ValueError(
            f"hidden_dims needs one list of widths per stochastic layer; got {hidden_dims!r}. "
            f"Give {len(latent_dims)} list(s), e.g. [[200, 200], [100, 100]] for two layers."
        )
    if len(hidden_dims) != len(latent_dims):
        raise ValueError(
            f"hidden_dims needs one list of widths per stochastic layer: {len(latent_dims)} for "
            f"latent_dims={list(latent_dims)}; got {len(hidden_dims)} ({hidden_dims!r})."
        )
    hidden = [list(w) for w in hidden_dims]
    if not all(isinstance(d, int) and d >= 1 for w in hidden for d in w):
        raise ValueError(f"hidden_dims must hold positive integer widths; got {hidden_dims!r}.")
    return list(latent_dims), hidden
