r"""Control of the KL term beyond a weight: capacity control and free bits.

Both change only the KL part of the negative ELBO per data point,
:math:`-\mathbb E_q[\log p(x \mid z)] + \beta\,\mathrm{KL}(q(z \mid x)\,\|\,p(z))`, and
need the KL separated from the reconstruction, per latent dimension; the estimators
``"reparam"`` (Monte-Carlo KL per dimension) and ``"analytic_kl"`` (closed form) take
them as ``kl_control``, and so does :class:`pyro_lvm.LVMModule`. In YAML::

    model:
      estimator: analytic_kl
      kl_control:
        class_path: pyro_lvm.estimators.FreeBits
        init_args: {nats: 0.25}
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from pyro.distributions import Independent, TransformedDistribution
from pyro.distributions.kl import kl_divergence

from ..pairs import auxiliary_sites, latent_sites
from ..schedules import Constant, Schedule

__all__ = ["KLControl", "Capacity", "FreeBits", "kl_per_variable", "kl_per_variable_mc"]


def unwrap_independent(d):
    """The factorized base of ``d`` and how many event dims the wrapping reinterpreted."""
    dims = 0
    while isinstance(d, (Independent, torch.distributions.Independent)):
        dims += d.reinterpreted_batch_ndims
        d = d.base_dist
    return d, dims


def kl_per_variable(q, p, value: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""KL(q || p) of one latent site, per data point and per latent variable.

    For ``Independent`` distributions (e.g. ``Normal(loc, scale).to_event(1)``) whose
    bases have a closed-form KL, the result has shape ``batch_shape + event_shape``
    of the base (one entry per scalar latent of a Gaussian; per categorical variable of
    a one-hot); summed over the event dims it is the site's KL. Without a closed form
    it is the one-sample Monte-Carlo estimate :math:`\log q(z_d) - \log p(z_d)` at
    ``value``, which is per variable when both factorize the same way.

    Example:
        >>> import pyro.distributions as dist
        >>> q = dist.Normal(torch.tensor([[1.0, 0.0]]), 1.0).to_event(1)
        >>> kl_per_variable(q, dist.Normal(torch.zeros(2), 1.0).to_event(1))
        tensor([[0.5000, 0.0000]])
    """
    q_base, q_dims = unwrap_independent(q)
    p_base, p_dims = unwrap_independent(p)
    if q_dims == p_dims:
        try:
            kl = kl_divergence(q_base, p_base)
        except NotImplementedError:
            kl = None
        if kl is None and value is not None:
            kl = q_base.log_prob(value) - p_base.log_prob(value)
        if kl is not None:
            shape = q.batch_shape + q_base.batch_shape[len(q_base.batch_shape) - q_dims:]
            return kl.expand(shape) if kl.shape != shape else kl
    # differently factorized: only the site's total is meaningful
    try:
        return kl_divergence(q, p).expand(q.batch_shape)
    except NotImplementedError:
        if value is None:
            raise
        return q.log_prob(value) - p.log_prob(value)


def is_flow(d) -> bool:
    """Whether ``d`` (possibly in ``Independent``) is a plain TransformedDistribution, e.g. a flow.

    Subclasses with their own densities and KLs (LogNormal, RelaxedBernoulli, ...) are not; a subclass that
    is a flow says so by a true class attribute ``is_flow`` (:class:`pyro_lvm.flows.vae_flows.FlowDistribution`).
    """
    base = unwrap_independent(d)[0]
    return type(base) in (torch.distributions.TransformedDistribution, TransformedDistribution) or bool(
        getattr(base, "is_flow", False))


class KLControl:
    """Base class: replaces ``beta * KL`` in the loss by :meth:`penalty` of the KL per variable."""

    def set_step(self, step: int) -> None:
        """Called by :class:`pyro_lvm.LVMModule` before every training step."""

    def penalty(self, kl: dict[str, tuple[torch.Tensor, int, torch.Tensor]], beta: float) -> torch.Tensor:
        """The KL part of the loss for the batch.

        ``kl`` maps each latent site to ``(kl_per_variable, num_var_dims, weight)``: the KL of
        shape ``batch_shape + var_shape``, the number of trailing variable dims, and each
        batch entry's weight (the plate's subsampling scale), broadcastable to the batch.
        """
        raise NotImplementedError

    def state(self) -> dict[str, float]:
        """Values worth logging (e.g. the current capacity)."""
        return {}


def _batch_mean(kl: torch.Tensor, var_dims: int, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the batch of a per-variable KL, and the batch's total weight."""
    batch_dims = tuple(range(kl.dim() - var_dims))
    weight = torch.as_tensor(weight, dtype=kl.dtype, device=kl.device).expand(kl.shape[: kl.dim() - var_dims])
    total = weight.sum()
    w = weight.reshape(weight.shape + (1,) * var_dims)
    return (kl * w).sum(batch_dims) / total if batch_dims else kl, total


class Capacity(KLControl):
    r"""Capacity control (Burgess et al. 2018): penalize :math:`\gamma\,|\mathrm{KL} - C(t)|`.

    The KL per data point (the batch mean of the total over latents) is pulled
    towards a target capacity :math:`C(t)` in nats that grows during training, so
    that the code gains information at a controlled rate; per batch the loss is

    .. math::

        -\sum_i \mathbb E_q[\log p(x_i \mid z)] + N \gamma\, \Big|\frac1N\sum_i
        \mathrm{KL}(q(z \mid x_i)\,\|\,p(z)) - C(t)\Big|.

    ``beta`` is not used with it (``gamma`` is its weight).

    References:
        Understanding disentangling in beta-VAE (Burgess et al., 2018), https://arxiv.org/abs/1804.03599

    Arguments:
        capacity: :math:`C` in nats, a number or a schedule of the training step, e.g.
            ``LinearWarmup(start=0, end=25, warmup_steps=100_000)`` as in the paper.
        gamma: weight of the absolute deviation (the paper uses 1000 for a Bernoulli
            likelihood on 64x64 images).

    Example:
        >>> from pyro_lvm.schedules import LinearWarmup
        >>> control = Capacity(LinearWarmup(start=0.0, end=10.0, warmup_steps=100), gamma=2.0)
        >>> control.set_step(50)
        >>> control.state()
        {'capacity': 5.0}
        >>> kl = torch.tensor([[3.0], [5.0]])          # two data points, one latent each
        >>> float(control.penalty({"z": (kl, 1, torch.tensor(1.0))}, beta=1.0))  # 2 * 2 * |4 - 5|
        4.0
    """

    def __init__(self, capacity: Union[float, Schedule] = 25.0, gamma: float = 1000.0):
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0; got {gamma}.")
        self.capacity = capacity if isinstance(capacity, Schedule) else Constant(float(capacity))
        self.gamma = gamma
        self._value = self.capacity(0)

    def set_step(self, step: int) -> None:
        self._value = float(self.capacity(step))

    def penalty(self, kl, beta):
        per_point, total_weight = 0.0, None
        for value, var_dims, weight in kl.values():
            mean, total = _batch_mean(value, var_dims, weight)
            per_point = per_point + mean.sum()
            total_weight = total if total_weight is None else total_weight
        return total_weight * self.gamma * (per_point - self._value).abs()

    def state(self) -> dict[str, float]:
        return {"capacity": self._value}

    def __repr__(self) -> str:
        return f"Capacity(capacity={self.capacity!r}, gamma={self.gamma})"


class FreeBits(KLControl):
    r"""Free bits (Kingma et al. 2016): a floor of ``nats`` on each latent variable's KL.

    Each latent variable :math:`j` (each scalar of a Gaussian latent) gets
    :math:`\lambda` nats for free: per batch of :math:`N` points the KL term is

    .. math::

        \beta\, N \sum_j \max\Big(\lambda,\ \frac1N \sum_i \mathrm{KL}_j(x_i)\Big),

    so a dimension whose batch-average KL is below :math:`\lambda` gets no gradient
    pushing it further towards the prior, which keeps units from collapsing early.
    The floor applies to the batch average, as in the paper. Note the name: the
    paper's "bits" are nats here.

    References:
        Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016),
        Appendix C.8, https://arxiv.org/abs/1606.04934

    Arguments:
        nats: :math:`\lambda`, the free KL per latent variable, in nats.

    Example:
        >>> control = FreeBits(nats=0.5)
        >>> kl = torch.tensor([[0.1, 2.0], [0.3, 1.0]])   # two data points, two dims
        >>> float(control.penalty({"z": (kl, 1, torch.tensor(1.0))}, beta=1.0))  # 2 * (0.5 + 1.5)
        4.0
    """

    def __init__(self, nats: float = 0.25):
        if nats < 0:
            raise ValueError(f"nats must be >= 0; got {nats}.")
        self.nats = nats

    def penalty(self, kl, beta):
        out = 0.0
        for value, var_dims, weight in kl.values():
            mean, total = _batch_mean(value, var_dims, weight)
            out = out + total * mean.clamp(min=self.nats).sum()
        return beta * out

    def __repr__(self) -> str:
        return f"FreeBits(nats={self.nats})"


class KLControlMixin:
    """For estimators with a separable KL: compute ``-recon + control.penalty(KL per variable)``.

    Used by :class:`~pyro_lvm.estimators.ReparamELBO` (Monte-Carlo KL per variable at
    the sampled ``z``) and :class:`~pyro_lvm.estimators.AnalyticKLELBO` (closed form).
    """

    kl_control: Optional[KLControl] = None
    _analytic_kl = False

    def __init__(
        self,
        num_particles: int = 1,
        beta: float = 1.0,
        beta_sites: Optional[Sequence[str]] = None,
        vectorize_particles: bool = False,
        max_plate_nesting: Optional[int] = None,
        kl_control: Optional[KLControl] = None,
    ):
        super().__init__(num_particles, beta, beta_sites, vectorize_particles, max_plate_nesting)
        self._init_kl_control(kl_control)

    def _init_kl_control(self, kl_control: Optional[KLControl]) -> None:
        if kl_control is not None and not isinstance(kl_control, KLControl):
            raise TypeError(
                f"kl_control must be a pyro_lvm.estimators.KLControl such as FreeBits or Capacity; "
                f"got {type(kl_control).__name__}."
            )
        if kl_control is not None and getattr(self, "vectorize_particles", False):
            raise ValueError("kl_control needs vectorize_particles=False (one trace per particle).")
        self.kl_control = kl_control

    def set_step(self, step: int) -> None:
        if self.kl_control is not None:
            self.kl_control.set_step(step)

    def _scaled(self, fn):
        # with a KL control, beta enters through the control's penalty
        return fn if self.kl_control is not None else super()._scaled(fn)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        if self.kl_control is None:
            return super().differentiable_loss(model, guide, *args, **kwargs)
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss = loss + self._controlled_loss(model_trace, guide_trace)
        return loss / self.num_particles

    def loss(self, model, guide, *args, **kwargs):
        if self.kl_control is None:
            return super().loss(model, guide, *args, **kwargs)
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def _controlled_loss(self, model_trace, guide_trace) -> torch.Tensor:
        reconstruction = 0.0
        for site in model_trace.nodes.values():
            if site["type"] == "sample" and site["is_observed"]:
                reconstruction = reconstruction + site["log_prob_sum"]
        model_latents = latent_sites(model_trace)
        kl = {}
        for name, site in latent_sites(guide_trace).items():
            q, p = site["fn"], model_latents[name]["fn"]
            if self._analytic_kl:
                value = kl_per_variable(q, p)
            else:  # Monte Carlo at the sampled z: log q(z) - log p(z), per variable
                value = kl_per_variable_mc(q, p, site["value"])
            var_dims = value.dim() - len(q.batch_shape)
            kl[name] = (value, var_dims, torch.as_tensor(site["scale"]))
        return -reconstruction + self.kl_control.penalty(kl, float(self.beta))

    def _check_kl_control(self, model_trace, guide_trace, estimator: str) -> None:
        if self.kl_control is None:
            return
        auxiliary = auxiliary_sites(guide_trace)
        if auxiliary:
            raise ValueError(
                f"kl_control (free bits, capacity) needs the guide's density per latent dimension, but the guide "
                f"(an autoguide) keeps it on the auxiliary site(s) {sorted(auxiliary)} and returns each latent as a "
                "Delta. Use a guide that draws its latents directly (pyro_lvm.guides.AmortizedGuide, a hand-written "
                "guide), or drop kl_control (beta still weighs the KL)."
            )
        model_latents = latent_sites(model_trace)
        for name, site in latent_sites(guide_trace).items():
            p = model_latents[name]["fn"] if name in model_latents else None
            if is_flow(site["fn"]) or is_flow(p):
                raise ValueError(
                    f"kl_control (free bits, capacity) needs the KL per latent dimension, but site "
                    f"{name!r} has a normalizing flow prior or posterior (a TransformedDistribution, "
                    "e.g. VAE(prior_flow=...)), whose KL does not factorize over dimensions. Use "
                    "estimator 'reparam' or 'iwae' without kl_control (beta still weighs the KL)."
                )
            if not site["fn"].has_rsample:
                raise ValueError(
                    f"kl_control with '{estimator}' needs reparameterizable latents; site {name!r} "
                    f"({type(site['fn']).__name__}) has no rsample."
                )


def kl_per_variable_mc(q, p, value: torch.Tensor) -> torch.Tensor:
    """One-sample estimate of KL(q || p) per latent variable: ``log q(z_d) - log p(z_d)``."""
    q_base, q_dims = unwrap_independent(q)
    p_base, p_dims = unwrap_independent(p)
    if q_dims == p_dims:
        return q_base.log_prob(value) - p_base.log_prob(value)
    return q.log_prob(value) - p.log_prob(value)
