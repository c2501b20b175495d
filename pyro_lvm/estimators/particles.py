r"""Per-data-point log importance weights of vectorized particles: the machinery of the multi-sample estimators.

For particles :math:`z^{(1..K)} \sim q(z \mid x)` drawn in one vectorized pass,
the log importance weight of particle :math:`k` and data point :math:`i` is

.. math::

    \log w_{ik} = \log p(x_i, z_i^{(k)}) - \log q(z_i^{(k)} \mid x_i),

summed over every site inside the *data plate* (``pyro.plate("data")``, the
pyro_lvm convention; any plate name can be given). Sites outside it (global
latents, ...) break the per-data-point factorization; the weights are then one
joint weight per particle for the whole batch, which is still a valid (looser)
bound.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, check_site_shape

from .base import BetaMixin

__all__ = ["ParticleELBO", "LogWeights"]

PARTICLES = "num_particles_vectorized"


class LogWeights(NamedTuple):
    """Log-density terms of one vectorized run, each of dimension ``ndim``.

    ``local[k, ..., i]`` holds the terms of data point ``i`` (unscaled by the
    subsampling factor ``data_scale``), ``other[k]`` the remaining terms (scaled).
    ``local_q`` / ``other_q`` are the guide's latent log-densities among them,
    without any scale (the score functions' ``log q``), ``particle_dim`` the
    (negative) dim of the particles and ``data_dims`` those of the data plate.
    """

    local: torch.Tensor
    other: torch.Tensor
    local_q: torch.Tensor
    other_q: torch.Tensor
    has_other: bool
    data_scale: float
    particle_dim: int
    data_dims: tuple

    @property
    def factorizes(self) -> bool:
        """Whether the weights are per data point (no term outside the data plate)."""
        return not self.has_other

    def joint(self) -> torch.Tensor:
        """``log w`` per particle, as one tensor of dimension ``ndim``: per data point if it
        factorizes, else one joint weight for the batch (shape ``(K, 1, ..., 1)``)."""
        if self.factorizes:
            return self.local
        return self.other + self.data_scale * _sum_except(self.local, self.particle_dim)

    def total(self, per_point: torch.Tensor) -> torch.Tensor:
        """Sum a per-data-point quantity (``joint()``-shaped, particles reduced) over the batch."""
        return (self.data_scale if self.factorizes else 1.0) * per_point.sum()


def _sum_except(value: torch.Tensor, keep: int) -> torch.Tensor:
    dims = [d for d in range(-value.dim(), 0) if d != keep]
    return value.sum(dims, keepdim=True) if dims else value


def _reduce(value: torch.Tensor, keep: Sequence[int], ndim: int) -> torch.Tensor:
    """Pad ``value`` to ``ndim`` dims and sum it over every dim not in ``keep``."""
    if value.dim() < ndim:
        value = value.reshape((1,) * (ndim - value.dim()) + value.shape)
    elif value.dim() > ndim:
        raise ValueError(
            f"A log-density of shape {tuple(value.shape)} has more batch dims than the "
            f"{ndim - 1} plates plus particles expected: is a site enumerated, or "
            "max_plate_nesting too small?"
        )
    dims = [d for d in range(-ndim, 0) if d not in keep and value.shape[d] > 1]
    return value.sum(dims, keepdim=True) if dims else value


class ParticleELBO(BetaMixin, ELBO):
    """Base class: runs the pair with ``num_particles`` vectorized particles and
    returns :class:`LogWeights`. Subclasses implement :meth:`_surrogate`.

    Arguments:
        num_particles: particles ``K`` per data point.
        beta: weight of the latent sites' log-densities (see :mod:`pyro_lvm.estimators`).
        beta_sites: latent sites that ``beta`` applies to (default: all).
        vectorize_particles: must be ``True`` (the weights of all particles are needed at once).
        max_plate_nesting: as in Pyro; guessed by a dry run if ``None``.
        data_plate: the plate of independent data points (default ``"data"``); if
            the pair has no plate of that name, the plates that every site is in.
    """

    min_particles = 1

    def __init__(
        self,
        num_particles: int = 1,
        beta: float = 1.0,
        beta_sites: Optional[Sequence[str]] = None,
        vectorize_particles: bool = True,
        max_plate_nesting: Optional[int] = None,
        data_plate: str = "data",
    ):
        if not vectorize_particles:
            raise ValueError(
                f"{type(self).__name__} always draws its particles in one vectorized pass; "
                "drop vectorize_particles=False (the model must broadcast over a leading "
                "particle dimension, as models written with pyro.plate do)."
            )
        super().__init__(num_particles, beta, beta_sites, False, max_plate_nesting)
        if num_particles < self.min_particles:
            raise ValueError(
                f"{type(self).__name__} needs num_particles >= {self.min_particles}; "
                f"got {num_particles}."
            )
        self.data_plate = data_plate

    def check(self, model: Callable, guide: Callable, *args, **kwargs) -> None:
        super().check(model, guide, *args, **kwargs)
        # the dry run that sizes the particle dim happens here, not in the first
        # training step, so a resumed run draws the same random numbers
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)

    # ----- traces ---------------------------------------------------------------------
    def _particles(self, fn: Callable) -> Callable:
        dim = -(self.max_plate_nesting + 1)

        def particles(*args, **kwargs):
            with pyro.plate(PARTICLES, self.num_particles, dim=dim):
                return fn(*args, **kwargs)

        return particles

    def _wrap_guide(self, guide: Callable) -> Callable:
        """Hook for subclasses (e.g. hide ``rsample`` for score-function estimators)."""
        return guide

    def _traces(self, model, guide, args, kwargs):
        """Run the guide with vectorized particles, then the model against it.

        Returns the wrapped guide (for replays) and both traces.
        """
        guide, guide_trace = self._run_guide(model, guide, args, kwargs)
        return guide, self._run_model(model, guide_trace, args, kwargs), guide_trace

    def _run_guide(self, model, guide, args, kwargs):
        self._check_once(model, guide, args, kwargs)
        guide = self._wrap_guide(self._particles(self._scaled(guide)))
        return guide, prune_subsample_sites(poutine.trace(guide).get_trace(*args, **kwargs))

    def _wrap_model(self, model: Callable) -> Callable:
        """Hook for subclasses (e.g. relax discrete priors)."""
        return model

    def _validated(self, name: str, site: dict) -> bool:
        """Whether validation computes the site's log-density (subclasses may skip some)."""
        return True

    def _run_model(self, model, guide_trace, args, kwargs):
        model = self._wrap_model(self._particles(self._scaled(model)))
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        model_trace = prune_subsample_sites(model_trace)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting + 1)
            for trace in (model_trace, guide_trace):
                trace.compute_log_prob(self._validated)  # memoized: log_weights reuses it
                for name, site in trace.nodes.items():
                    if site["type"] == "sample" and self._validated(name, site):
                        check_site_shape(site, self.max_plate_nesting + 1)
        return model_trace

    def _replay_guide(self, guide: Callable, guide_trace, values: dict, args, kwargs):
        """Re-run the (wrapped) guide with its latent values replaced by ``values``."""
        trace = guide_trace.copy()
        for name, value in values.items():
            trace.nodes[name] = dict(trace.nodes[name], value=value)
        replayed = poutine.trace(poutine.replay(guide, trace=trace)).get_trace(*args, **kwargs)
        return prune_subsample_sites(replayed)

    # ----- log weights ------------------------------------------------------------------
    def _data_frames(self, sites: list) -> frozenset:
        frames = [
            frozenset(f for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLES)
            for site in sites
        ]
        named = {f for fs in frames for f in fs if f.name == self.data_plate}
        if named:
            return frozenset(named)
        return frozenset.intersection(*frames) if frames else frozenset()

    def log_weights(
        self,
        model_trace,
        guide_trace,
        guide_log_probs: Optional[dict] = None,
        model_log_probs: Optional[dict] = None,
    ) -> LogWeights:
        """Split ``log p(x, z) - log q(z | x)`` into per-data-point and other terms.

        ``guide_log_probs`` (``model_log_probs``) replaces the guide's (model's)
        log-density of the named sites (unscaled, with the site's batch shape),
        e.g. by a path-only version.
        """
        overrides = {1.0: model_log_probs or {}, -1.0: guide_log_probs or {}}
        ndim = self.max_plate_nesting + 1
        particle_dim = -ndim
        sites = [
            (sign, site)
            for sign, trace in ((1.0, model_trace), (-1.0, guide_trace))
            for site in trace.nodes.values()
            if site["type"] == "sample" and (sign > 0 or not site["is_observed"])
        ]
        data_frames = self._data_frames([site for _, site in sites])
        keep = (particle_dim, *sorted(f.dim for f in data_frames))
        data_scale = 1.0
        for frame in data_frames:
            data_scale *= frame.full_size / frame.size if frame.full_size else 1.0
        parts: dict[str, list] = {"local": [], "other": [], "local_q": [], "other_q": []}
        for sign, site in sites:
            if site["name"] in overrides[sign]:
                log_p = overrides[sign][site["name"]]
            elif "unscaled_log_prob" in site:
                log_p = site["unscaled_log_prob"]
            else:
                log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
            is_local = bool(data_frames) and data_frames <= set(site["cond_indep_stack"])
            scale = site["scale"] / data_scale if is_local else site["scale"]
            dims = keep if is_local else (particle_dim,)
            kind = "local" if is_local else "other"
            parts[kind].append(_reduce(scale_and_mask(sign * log_p, scale, site["mask"]), dims, ndim))
            if sign < 0:
                parts[kind + "_q"].append(_reduce(scale_and_mask(log_p, 1.0, site["mask"]), dims, ndim))
        device = next(t.device for ts in parts.values() for t in ts)
        zero = torch.zeros((1,) * ndim, device=device)
        total = {k: sum(ts, zero) for k, ts in parts.items()}
        return LogWeights(
            total["local"], total["other"], total["local_q"], total["other_q"],
            bool(parts["other"]), data_scale, particle_dim, keep[1:],
        )

    # ----- the ELBO interface -------------------------------------------------------------
    def _surrogate(self, model, guide, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(bound, surrogate)``: the objective's value and a tensor whose
        gradient is the estimator's gradient of it."""
        raise NotImplementedError

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """``-bound`` in value; its gradient is this estimator's gradient of ``-bound``."""
        bound, surrogate = self._surrogate(model, guide, args, kwargs)
        return -surrogate + (surrogate - bound).detach()

    def loss(self, model, guide, *args, **kwargs) -> float:
        """``-bound`` as a float, without gradients."""
        with torch.no_grad():
            bound, _ = self._surrogate(model, guide, args, kwargs)
        return -float(bound)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Compute ``-bound`` and accumulate its gradient (for :class:`pyro.infer.SVI`)."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return float(loss.detach())


def log_mean_exp(value: torch.Tensor, dim: int) -> torch.Tensor:
    """``log(mean(exp(value)))`` along ``dim``, keeping it, computed stably."""
    return torch.logsumexp(value, dim, keepdim=True) - math.log(value.shape[dim])
