"""Gumbel-softmax / Concrete relaxation of discrete latents, with a temperature schedule."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import pyro.distributions as dist
import torch
from pyro.distributions.kl import kl_divergence
from pyro.poutine.messenger import Messenger

from ..schedules import Constant, Schedule
from .base import guide_covers_model, latent_sites
from .particles import LogWeights, ParticleELBO

__all__ = ["RelaxedELBO"]


def _relax(fn, temperature: float, straight_through: bool):
    """The relaxed counterpart of a discrete distribution, or ``None``."""
    if isinstance(fn, dist.Independent):
        base = _relax(fn.base_dist, temperature, straight_through)
        return None if base is None else base.to_event(fn.reinterpreted_batch_ndims)
    if isinstance(fn, torch.distributions.OneHotCategorical):
        cls = (
            dist.RelaxedOneHotCategoricalStraightThrough
            if straight_through
            else dist.RelaxedOneHotCategorical
        )
    elif isinstance(fn, torch.distributions.Bernoulli):
        cls = dist.RelaxedBernoulliStraightThrough if straight_through else dist.RelaxedBernoulli
    else:
        return None
    logits = fn.logits
    return cls(torch.tensor(temperature, dtype=logits.dtype, device=logits.device), logits=logits)


class _Relax(Messenger):
    """Sample relaxed values; remember each site's discrete distribution in ``originals``.

    (Not in the site's ``infer`` dict: replaying the model copies the guide's.)
    """

    def __init__(self, temperature: float, straight_through: bool):
        super().__init__()
        self.temperature = temperature
        self.straight_through = straight_through
        self.originals: dict = {}

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"]:
            return
        relaxed = _relax(msg["fn"], self.temperature, self.straight_through)
        if relaxed is not None:
            self.originals[msg["name"]] = msg["fn"]
            msg["fn"] = relaxed


class RelaxedELBO(ParticleELBO):
    r"""Reparameterized ELBO of discrete latents relaxed to Concrete / Gumbel-softmax samples.

    A one-hot categorical latent with logits :math:`\alpha` is sampled from its
    continuous relaxation on the simplex (Maddison et al. 2017; Jang et al. 2017)

    .. math::

        \tilde z = \operatorname{softmax}\big((\alpha + g) / \tau\big), \qquad g_c \sim \mathrm{Gumbel}(0, 1),

    (a Bernoulli by the binary Concrete), which is reparameterizable, so the
    gradient is pathwise and has low variance. As in Jang et al., the objective is

    .. math::

        \mathbb E_{\tilde z}\big[\log p(x \mid \tilde z)\big] - \mathrm{KL}\big(q(z\mid x)\,\|\,p(z)\big),

    with the KL between the *discrete* distributions in closed form. It is a
    biased surrogate of the ELBO whose bias vanishes as the temperature
    :math:`\tau \to 0` (the relaxed sample becomes one-hot) while the gradient's
    variance grows, hence a schedule that anneals it (e.g.
    :class:`pyro_lvm.schedules.Exponential`, as in Jang et al.). (With the
    Concrete densities in the KL term instead, as in Maddison et al., the bias
    does not vanish as :math:`\tau \to 0`.) ``straight_through=True`` feeds the
    model the one-hot :math:`\arg\max` of :math:`\tilde z` in the forward pass
    and the relaxed gradient in the backward pass. Integer ``Categorical``
    sites cannot be relaxed (use ``OneHotCategorical``); continuous latents are
    sampled as usual.

    References:
        The Concrete Distribution (Maddison, Mnih & Teh, 2017), https://arxiv.org/abs/1611.00712;
        Categorical Reparameterization with Gumbel-Softmax (Jang, Gu & Poole, 2017),
        https://arxiv.org/abs/1611.01144

    Arguments:
        num_particles: samples of ``z`` per data point.
        beta: weight of the KL term.
        beta_sites: latent sites that ``beta`` applies to (default: all).
        temperature: :math:`\tau > 0`, a number or a :class:`~pyro_lvm.schedules.Schedule`
            of the global step (:class:`pyro_lvm.LVMModule` advances it).
        straight_through: one-hot values forward, relaxed gradients backward.
        vectorize_particles, max_plate_nesting, data_plate: see
            :class:`~pyro_lvm.estimators.particles.ParticleELBO`.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> pyro.clear_param_store()
        >>> def model():
        ...     pyro.sample("z", dist.OneHotCategorical(logits=torch.zeros(3)))
        >>> def guide():
        ...     logits = pyro.param("logits", torch.zeros(3))
        ...     pyro.sample("z", dist.OneHotCategorical(logits=logits))
        >>> elbo = RelaxedELBO(temperature=0.5)
        >>> elbo.differentiable_loss(model, guide).backward()  # a pathwise gradient
        >>> pyro.param("logits").grad.shape
        torch.Size([3])
    """

    _name = "relaxed"

    def __init__(
        self,
        num_particles: int = 1,
        beta: float = 1.0,
        beta_sites: Optional[Sequence[str]] = None,
        temperature: Union[float, Schedule] = 0.5,
        straight_through: bool = False,
        vectorize_particles: Optional[bool] = None,
        max_plate_nesting: Optional[int] = None,
        data_plate: str = "data",
    ):
        super().__init__(
            num_particles, beta, beta_sites, vectorize_particles, max_plate_nesting, data_plate
        )
        self.temperature_schedule = (
            temperature if isinstance(temperature, Schedule) else Constant(float(temperature))
        )
        self.straight_through = straight_through
        self.set_step(0)

    def set_step(self, step: int) -> None:
        """Set the temperature for the global ``step`` (called by :class:`pyro_lvm.LVMModule`)."""
        temperature = float(self.temperature_schedule(step))
        if not temperature > 0:
            raise ValueError(
                f"The temperature must be > 0; the schedule gave {temperature} at step {step}."
            )
        self.temperature = temperature

    def _wrap_guide(self, guide):
        self._guide_relax = _Relax(self.temperature, self.straight_through)
        return self._guide_relax(guide)

    def _wrap_model(self, model):
        self._model_relax = _Relax(self.temperature, self.straight_through)
        return self._model_relax(model)

    def _validated(self, name: str, site: dict) -> bool:
        # a relaxed value's Concrete density is never used (and overflows at low temperature)
        return name not in self._guide_relax.originals

    def _surrogate(self, model, guide, args, kwargs):
        weights = LogWeights.cat(self._runs(model, guide, args, kwargs, self._relaxed_weights))
        log_w = weights.joint()
        bound = weights.total(log_w.mean(weights.particle_dim, keepdim=True))
        return bound, bound

    def _relaxed_weights(self, model_trace, guide_trace) -> LogWeights:
        """One run's log weights, the relaxed sites' KL in closed form (in the model's terms)."""
        model_kl, guide_zero = {}, {}
        for name, q in self._guide_relax.originals.items():
            p = self._model_relax.originals.get(name)
            if p is None:
                raise ValueError(
                    f"The guide's site {name!r} is discrete but the model's is "
                    f"{type(model_trace.nodes[name]['fn']).__name__}: 'relaxed' needs both discrete."
                )
            model_kl[name] = -kl_divergence(q, p)
            guide_zero[name] = torch.zeros_like(model_kl[name])
        return self.log_weights(model_trace, guide_trace, guide_zero, model_kl)

    def _check_traces(self, model_trace, guide_trace, args, kwargs) -> None:
        guide_covers_model(self._name, model_trace, guide_trace)
        discrete = {n: s for n, s in latent_sites(guide_trace).items() if s["fn"].support.is_discrete}
        if not discrete:
            raise ValueError(
                "'relaxed' found no discrete latent in the guide to relax. For continuous "
                "latents use 'reparam' or 'analytic_kl'."
            )
        model_sites = latent_sites(model_trace)
        for name, site in discrete.items():
            if _relax(site["fn"], 1.0, False) is None:
                raise ValueError(
                    f"'relaxed' cannot relax the guide's site {name!r} ({type(site['fn']).__name__}): "
                    "only OneHotCategorical and Bernoulli latents have a Concrete relaxation. "
                    "Use OneHotCategorical instead of Categorical, or 'score_function' / 'vimco'."
                )
            try:
                kl_divergence(site["fn"], model_sites[name]["fn"])
            except NotImplementedError:
                raise ValueError(
                    f"'relaxed' needs KL(q || p) in closed form at site {name!r} "
                    f"(q = {type(site['fn']).__name__}, p = {type(model_sites[name]['fn']).__name__}). "
                    "Use 'score_function' or 'vimco'."
                ) from None
