r"""Priors p(z) as parts: a standard normal, a flow prior, a VampPrior, a mixture of Gaussians.

A prior is a small :class:`torch.nn.Module` that a model binds to its latent size and then asks for
:math:`p(z)` with a batch shape:

.. code-block:: python

    VAE(data_shape=784, latent_dim=40, prior=VampPrior(num_pseudo_inputs=500))

or in YAML (``pyro-lvm fit``)::

    model:
      model:
        class_path: pyro_lvm.VAE
        init_args:
          latent_dim: 40
          prior: {class_path: pyro_lvm.priors.VampPrior, init_args: {num_pseudo_inputs: 500}}

The model calls :meth:`Prior.bind` once with its latent size and one data point's shape (so neither is
repeated in the part's arguments), and :meth:`Prior.distribution` with itself, since a VampPrior reads
the model's own posterior at its pseudo-inputs. Where a prior's log-density has a written-out form it
says so through :meth:`Prior.log_density`, which the fast training step uses; the distribution it returns
is what Pyro's estimators and the diagnostics see, and the two agree (tested).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import pyro.distributions as dist
import torch
from pyro.distributions.torch_transform import ComposeTransformModule
from torch import nn
from torch.distributions import constraints
from torch.nn.functional import softplus

from .flows.vae_flows import PRIOR_FLOWS, flow_prior, prior_flow
from .ops import standard_normal_log_prob

__all__ = ["Prior", "StandardNormalPrior", "FlowPrior", "VampPrior", "MixturePrior", "GaussianMixture",
           "make_prior", "PRIORS"]

#: the names :func:`make_prior` (and the models' ``prior`` argument) accept
PRIORS = ("standard_normal", "vamp", "mixture", *PRIOR_FLOWS)


class Prior(nn.Module):
    r"""Base class of the priors :math:`p(z)` over a flat latent ``z`` of shape ``(latent_dim,)``.

    A subclass implements :meth:`distribution` and may implement :meth:`log_density` (a written-out
    :math:`\log p(z)`) and :meth:`build` (parameters that depend on the sizes :meth:`bind` gives).
    """

    latent_dim: Optional[int] = None
    data_shape: Optional[torch.Size] = None
    #: the init arguments as plain data (``None``: built from objects no configuration rebuilds)
    config: Optional[dict] = {}
    #: whether p(z) is N(0, I) (the closed-form KL and the latent monitor's KL per dimension apply)
    standard_normal: bool = False

    def bind(self, latent_dim: int, data_shape: Union[int, Sequence[int]]) -> "Prior":
        """Fix the latent size and one data point's shape (the model calls this once); returns ``self``."""
        shape = torch.Size([data_shape] if isinstance(data_shape, int) else data_shape)
        if self.latent_dim is not None:
            if (self.latent_dim, self.data_shape) != (latent_dim, shape):
                raise ValueError(
                    f"This {type(self).__name__} is already part of a model with latent_dim={self.latent_dim} and "
                    f"data_shape={tuple(self.data_shape)}; this model has latent_dim={latent_dim} and data_shape="
                    f"{tuple(shape)}. Give each model a prior of its own."
                )
            return self
        self.latent_dim, self.data_shape = latent_dim, shape
        self.build()
        return self

    def build(self) -> None:
        """Create the parameters that depend on ``latent_dim`` and ``data_shape`` (none here)."""

    def _bound(self) -> int:
        if self.latent_dim is None:
            raise RuntimeError(
                f"{type(self).__name__} is not bound to a model yet: pass it to a model (e.g. VAE(prior=...)), "
                "or call .bind(latent_dim, data_shape)."
            )
        return self.latent_dim

    def distribution(self, owner: Any, batch_shape: torch.Size = torch.Size()) -> dist.TorchDistribution:
        """:math:`p(z)` with the given batch shape and event shape ``(latent_dim,)``; ``owner`` is the model."""
        raise NotImplementedError

    def log_density(self, owner: Any, z: torch.Tensor) -> Optional[torch.Tensor]:
        r""":math:`\log p(z)` per draw (summed over the latent dimension), written out; ``None`` if there is none.

        The fast training step (:mod:`pyro_lvm.training.fast_step`) uses it where the posterior is the
        encoder's diagonal Gaussian; it equals ``self.distribution(owner).log_prob(z)``.
        """
        return None

    def extra_repr(self) -> str:
        return "" if self.latent_dim is None else f"latent_dim={self.latent_dim}"


class StandardNormalPrior(Prior):
    r""":math:`p(z) = \mathcal N(z \mid 0, I)`, the VAE's default; the only prior with a closed-form KL here.

    Example:
        >>> p = StandardNormalPrior().bind(2, 4)
        >>> p.distribution(None, torch.Size([3])).log_prob(torch.zeros(3, 2))
        tensor([-1.8379, -1.8379, -1.8379])
    """

    standard_normal = True

    def build(self) -> None:
        self.register_buffer("zero", torch.zeros(()), persistent=False)

    def distribution(self, owner: Any, batch_shape: torch.Size = torch.Size()) -> dist.TorchDistribution:
        zeros = self.zero.new_zeros(torch.Size(batch_shape) + (self._bound(),))
        return dist.Normal(zeros, 1.0).to_event(1)

    def log_density(self, owner: Any, z: torch.Tensor) -> torch.Tensor:
        return standard_normal_log_prob(z).sum(-1)


class FlowPrior(Prior):
    r"""A flow prior :math:`p(z) = f_\# \mathcal N(0, I)`: any Pyro transform, pyro_lvm's stacks by name.

    .. math::

        \log p(z) = \log \mathcal N\big(f^{-1}(z) \mid 0, I\big) - \log\lvert\det J_f(f^{-1}(z))\rvert .

    Arguments:
        flow: ``"realnvp"`` or ``"nice"`` (built by :func:`pyro_lvm.flows.vae_flows.prior_flow` once the
            latent size is known), or a transform over ``(latent_dim,)``: a Pyro
            :class:`~pyro.distributions.torch_transform.TransformModule` (e.g.
            ``pyro.distributions.transforms.spline_coupling(d)``, a zuko flow's transform through
            ``pyro.contrib.zuko``) or a list of them.
        num_layers: layers of a named flow.
        hidden: hidden widths of each layer's net (named flows).

    Example:
        >>> p = FlowPrior("realnvp", num_layers=2, hidden=[8]).bind(2, 4)
        >>> p.distribution(None, torch.Size([5])).rsample().shape
        torch.Size([5, 2])
    """

    def __init__(self, flow: Union[str, nn.Module, Sequence[nn.Module]] = "realnvp", num_layers: int = 4,
                 hidden: Sequence[int] = (64, 64)):
        super().__init__()
        self.kind = flow if isinstance(flow, str) else None
        if self.kind is not None and self.kind not in PRIOR_FLOWS:
            raise ValueError(f"FlowPrior's flow must be one of {PRIOR_FLOWS} or a Pyro TransformModule; got {flow!r}.")
        self.num_layers, self.hidden = num_layers, tuple(hidden)
        self.config = None if self.kind is None else dict(flow=flow, num_layers=num_layers, hidden=list(hidden))
        self.flow: Optional[nn.Module] = None
        if self.kind is None:
            self.flow = flow if isinstance(flow, nn.Module) else ComposeTransformModule(list(flow))

    def build(self) -> None:
        if self.kind is not None:
            self.flow = prior_flow(self.latent_dim, self.kind, self.num_layers, self.hidden)

    def distribution(self, owner: Any, batch_shape: torch.Size = torch.Size()) -> dist.TorchDistribution:
        zeros = _reference(self, owner).new_zeros(torch.Size(batch_shape) + (self._bound(),))
        return flow_prior(dist.Normal(zeros, 1.0).to_event(1), self.flow)


class GaussianMixture(dist.TorchDistribution):
    r"""An equally or unequally weighted mixture of diagonal Gaussians, batched, with a fast log-density.

    .. math::

        \log p(z) = \operatorname{logsumexp}_k \Big[\log \pi_k + \sum_d \log \mathcal N(z_d \mid \mu_{kd}, \sigma_{kd}^2)\Big],

    computed in chunks of draws (:meth:`component_log_prob`), so that many draws against many components take
    bounded memory. ``loc`` and ``scale`` are ``(K, D)``; ``logits``
    ``(K,)`` (``None``: equal weights). The batch shape is a broadcast shape of the draws, the event shape ``(D,)``.
    It has no ``rsample`` (the component is discrete); :meth:`sample` picks a component, then a Gaussian draw.

    Example:
        >>> m = GaussianMixture(torch.zeros(3, 2), torch.ones(3, 2))
        >>> m.log_prob(torch.zeros(2))  # three identical components: N(0, I)
        tensor(-1.8379)
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, logits: Optional[torch.Tensor] = None,
                 batch_shape: torch.Size = torch.Size(), validate_args: Optional[bool] = None):
        self.loc, self.scale, self.logits = loc, scale, logits
        k = loc.shape[0]
        self.log_weights = (loc.new_full((k,), -math.log(k)) if logits is None
                            else torch.log_softmax(logits, -1))
        super().__init__(torch.Size(batch_shape), loc.shape[-1:], validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return GaussianMixture(self.loc, self.scale, self.logits, torch.Size(batch_shape))

    #: how many (draw, component, dimension) terms :meth:`component_log_prob` holds at once
    chunk_elements: int = 2**22

    def component_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`\\log \\mathcal N(z \\mid \\mu_k, \\sigma_k^2)` for every component: shape ``(..., K)``.

        Written as :math:`-\\tfrac12 \\sum_d u_{kd}^2 - \\sum_d \\log\\sigma_{kd} - \\tfrac D2 \\log 2\\pi` with the
        standardized :math:`u_{kd} = (z_d - \\mu_{kd}) / \\sigma_{kd}`, which keeps float32's precision for the
        narrow components a trained encoder gives (expanding the square into matrix products does not: at
        :math:`\\sigma \\approx 0.005` it loses several nats). The draws go through in chunks of
        :attr:`chunk_elements` terms, so memory stays bounded for many draws against many components.
        """
        k, d = self.loc.shape
        flat = z.reshape(-1, d)
        inverse = self.scale.reciprocal()
        constant = -self.scale.log().sum(-1) - 0.5 * d * math.log(2 * math.pi)
        rows = max(1, self.chunk_elements // (k * d))
        parts = [
            constant - 0.5 * ((flat[start:start + rows, None, :] - self.loc) * inverse).pow(2).sum(-1)
            for start in range(0, len(flat), rows)
        ]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.reshape(z.shape[:-1] + (k,))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        out = torch.logsumexp(self.component_log_prob(value) + self.log_weights, -1)
        return out.expand(shape)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        k = torch.distributions.Categorical(logits=self.log_weights).sample(shape)
        eps = torch.randn(shape + self.event_shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc[k] + self.scale[k] * eps

    @property
    def mean(self) -> torch.Tensor:
        return (self.log_weights.exp()[:, None] * self.loc).sum(0).expand(self.batch_shape + self.event_shape)


class VampPrior(Prior):
    r"""The VampPrior: the mixture of the model's own posteriors at :math:`K` learned pseudo-inputs.

    .. math::

        p_\lambda(z) = \frac1K \sum_{k=1}^K q_\phi(z \mid u_k), \qquad
        u_k = \operatorname{hardtanh}_{[0,1]}(W e_k),

    the aggregate posterior :math:`\frac1N\sum_n q_\phi(z \mid x_n)` (the prior that maximizes the ELBO)
    approximated by :math:`K \ll N` learned inputs :math:`u_k` of the data's shape. The encoder is shared
    with the posterior, so the prior moves with it; only :math:`W` (``num_pseudo_inputs`` x the data's size,
    drawn from :math:`\mathcal N(0.05, 0.01^2)` as in the paper for MNIST) is the prior's own. With the
    encoder's diagonal Gaussian posterior, :math:`\log p(z)` is a :class:`GaussianMixture` written out
    (:meth:`log_density`; the fast training step applies); with another posterior family
    (a flow, a full covariance) the mixture of those posteriors, component by component.
    The KL to it has no closed form: train with ``reparam``, ``stl``, ``iwae``, ``dreg`` or ``score_function``.

    References:
        VAE with a VampPrior (Tomczak & Welling, 2018), https://arxiv.org/abs/1705.07120

    Arguments:
        num_pseudo_inputs: :math:`K`.
        init_mean, init_std: the normal draws that initialize :math:`W`.
        lower, upper: the hardtanh's range: the data's range (``[0, 1]`` for pixels; for other data pass
            e.g. ``-inf`` and ``inf`` for no clipping).
        components: ``"posterior"``: the mixture of the posteriors :math:`q_\phi(z \mid u_k)` themselves;
            ``"base"``: of the diagonal Gaussians the posterior family starts from (for a flow posterior, the
            Gaussian before the flow). The two coincide for the diagonal Gaussian posterior. With an IAF
            posterior, ``"posterior"`` evaluates every component's density by inverting the flow, one pass per
            latent dimension for every (draw, pseudo-input) pair, which is exact but slow; ``"base"`` is a
            mixture of Gaussians, as cheap as with the plain posterior (a different prior, still a proper one).

    Example:
        >>> from pyro_lvm import VAE
        >>> vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8], prior=VampPrior(num_pseudo_inputs=3))
        >>> vae.prior_part.pseudo_inputs().shape
        torch.Size([3, 4])
        >>> p = vae.prior(torch.Size([5]))
        >>> p.log_prob(torch.zeros(5, 2)).shape
        torch.Size([5])
    """

    def __init__(self, num_pseudo_inputs: int = 500, init_mean: float = 0.05, init_std: float = 0.01,
                 lower: float = 0.0, upper: float = 1.0, components: str = "posterior"):
        super().__init__()
        if components not in ("posterior", "base"):
            raise ValueError(f"VampPrior's components must be 'posterior' or 'base'; got {components!r}.")
        self.components = components
        if num_pseudo_inputs < 1:
            raise ValueError(f"num_pseudo_inputs must be a positive integer; got {num_pseudo_inputs}.")
        self.num_pseudo_inputs = num_pseudo_inputs
        self.init_mean, self.init_std = init_mean, init_std
        self.lower, self.upper = lower, upper
        self.config = dict(num_pseudo_inputs=num_pseudo_inputs, init_mean=init_mean, init_std=init_std,
                           lower=lower, upper=upper, components=components)

    def build(self) -> None:
        self.weight = nn.Parameter(
            torch.empty(self.num_pseudo_inputs, math.prod(self.data_shape)).normal_(self.init_mean, self.init_std)
        )

    def pseudo_inputs(self) -> torch.Tensor:
        r"""The pseudo-inputs :math:`u_k`, of shape ``(K, *data_shape)``."""
        self._bound()
        u = self.weight.clamp(self.lower, self.upper)  # hardtanh(W e_k): W's k-th row, clipped
        return u.reshape((self.num_pseudo_inputs,) + tuple(self.data_shape))

    def _gaussians(self, owner: Any) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The components' means and standard deviations where they are diagonal Gaussians, else ``None``."""
        family = owner.posterior_part
        if family.diagonal or self.components == "base":
            gaussian = family.base_gaussian(owner.encoder_output(self.pseudo_inputs()))
            if gaussian is None:
                raise ValueError(
                    f"VampPrior(components='base') needs a posterior family that starts from a diagonal Gaussian "
                    f"(DiagonalGaussian, a FlowPosterior); {type(family).__name__} does not. Use components='posterior'."
                )
            return gaussian
        return None

    def distribution(self, owner: Any, batch_shape: torch.Size = torch.Size()) -> dist.TorchDistribution:
        gaussians = self._gaussians(owner)
        if gaussians is not None:
            return GaussianMixture(*gaussians, batch_shape=torch.Size(batch_shape))
        return _PosteriorMixture(owner.posterior(self.pseudo_inputs()), torch.Size(batch_shape))

    def log_density(self, owner: Any, z: torch.Tensor) -> Optional[torch.Tensor]:
        gaussians = self._gaussians(owner)
        return None if gaussians is None else GaussianMixture(*gaussians).log_prob(z)

    def extra_repr(self) -> str:
        extra = "" if self.components == "posterior" else ", components='base'"
        return f"num_pseudo_inputs={self.num_pseudo_inputs}{extra}"


class _PosteriorMixture(dist.TorchDistribution):
    """The equal-weight mixture of ``components`` (batch shape ``(K,)``): a VampPrior over another posterior family."""

    support = constraints.real_vector
    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, components: dist.TorchDistribution, batch_shape: torch.Size = torch.Size()):
        self.components = components
        super().__init__(torch.Size(batch_shape), components.event_shape, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return _PosteriorMixture(self.components, torch.Size(batch_shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        k = self.components.batch_shape[0]
        # every draw against every component (expanded: a conditional flow's nets do not broadcast their context)
        log_q = self.components.log_prob(value.unsqueeze(-2).expand(value.shape[:-1] + (k, value.shape[-1])))
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        return (torch.logsumexp(log_q, -1) - math.log(k)).expand(shape)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        n, k = math.prod(shape), self.components.batch_shape[0]
        draws = self.components.sample((n,))  # (n, K, D)
        pick = torch.randint(k, (n,), device=draws.device)
        return draws[torch.arange(n, device=draws.device), pick].reshape(shape + self.event_shape)


class MixturePrior(Prior):
    r"""A mixture of :math:`K` diagonal Gaussians with learned weights, means and scales.

    .. math::

        p(z) = \sum_{k=1}^K \pi_k\, \mathcal N\big(z \mid \mu_k, \operatorname{diag}\sigma_k^2\big),
        \qquad \pi = \operatorname{softmax}(a),\ \sigma_k = \operatorname{softplus}(s_k),

    with the means drawn from :math:`\mathcal N(0, I)` at the start (so that the components differ) and
    every :math:`\sigma_k = 1`. A learned multimodal prior; the fast training step applies (its
    :meth:`log_density` is the :class:`GaussianMixture`'s).

    Arguments:
        num_components: :math:`K`.
        learn_weights: learn :math:`\pi` (else equal weights).

    Example:
        >>> p = MixturePrior(num_components=4).bind(2, 8)
        >>> p.distribution(None, torch.Size([3])).sample().shape
        torch.Size([3, 2])
    """

    def __init__(self, num_components: int = 10, learn_weights: bool = True):
        super().__init__()
        if num_components < 1:
            raise ValueError(f"num_components must be a positive integer; got {num_components}.")
        self.num_components, self.learn_weights = num_components, learn_weights
        self.config = dict(num_components=num_components, learn_weights=learn_weights)

    def build(self) -> None:
        k, d = self.num_components, self.latent_dim
        self.loc = nn.Parameter(torch.randn(k, d))
        self.raw_scale = nn.Parameter(torch.full((k, d), math.log(math.expm1(1.0))))
        self.logits = nn.Parameter(torch.zeros(k), requires_grad=self.learn_weights)

    def mixture(self, batch_shape: torch.Size = torch.Size()) -> GaussianMixture:
        self._bound()
        return GaussianMixture(self.loc, softplus(self.raw_scale), self.logits, torch.Size(batch_shape))

    def distribution(self, owner: Any, batch_shape: torch.Size = torch.Size()) -> dist.TorchDistribution:
        return self.mixture(batch_shape)

    def log_density(self, owner: Any, z: torch.Tensor) -> torch.Tensor:
        return self.mixture().log_prob(z)

    def extra_repr(self) -> str:
        return f"num_components={self.num_components}"


def _reference(part: nn.Module, owner: Any) -> torch.Tensor:
    """A tensor with the device and dtype of the part's (or else the model's) parameters."""
    for t in part.parameters():
        return t
    return next(owner.parameters())


def make_prior(prior: Union[str, Prior], num_layers: int = 4, hidden: Sequence[int] = (64, 64)) -> Prior:
    """A prior part from a name (``"standard_normal"``, ``"vamp"``, ``"mixture"``, ``"realnvp"``, ``"nice"``) or as given.

    ``num_layers`` and ``hidden`` shape a named flow prior.

    Example:
        >>> make_prior("vamp")
        VampPrior(num_pseudo_inputs=500)
    """
    if isinstance(prior, Prior):
        return prior
    if prior == "standard_normal":
        return StandardNormalPrior()
    if prior == "vamp":
        return VampPrior()
    if prior == "mixture":
        return MixturePrior()
    if prior in PRIOR_FLOWS:
        return FlowPrior(prior, num_layers, hidden)
    raise ValueError(
        f"Unknown prior {prior!r}; choose one of {', '.join(map(repr, PRIORS))}, or pass a part from "
        "pyro_lvm.priors (e.g. VampPrior(num_pseudo_inputs=500), FlowPrior(my_transform))."
    )
