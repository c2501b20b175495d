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

import logging
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, check_site_shape

from ..ops import sum_except, surrogate_loss
from ..pairs import (
    PARTICLES,
    Vectorization,
    check_vectorization,
    data_frames,
    is_local,
    subsample_scale,
    vectorization_advice,
    with_particles,
)
from .base import BetaMixin

__all__ = ["ParticleELBO", "LogWeights", "PARTICLES"]

_log = logging.getLogger("pyro_lvm")


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
        return self.other + self.data_scale * sum_except(self.local, self.particle_dim)

    def total(self, per_point: torch.Tensor) -> torch.Tensor:
        """Sum a per-data-point quantity (``joint()``-shaped, particles reduced) over the batch."""
        return (self.data_scale if self.factorizes else 1.0) * per_point.sum()

    @staticmethod
    def cat(parts: Sequence["LogWeights"]) -> "LogWeights":
        """The weights of several runs (e.g. one particle each) as one, along the particle dim."""
        first = parts[0]
        if len(parts) == 1:
            return first
        pd = first.particle_dim
        return first._replace(**{
            key: torch.cat([getattr(part, key) for part in parts], pd)
            for key in ("local", "other", "local_q", "other_q")
        })


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
        vectorize_particles: ``True``: all particles in one pass, inside a plate of
            ``num_particles`` left of the pair's plates (the model must broadcast over it, as
            models written with ``pyro.plate`` and ``...`` indexing do); ``False``: one pass per
            particle, for a model written for exactly the batch's shape (boolean indexing,
            ``view(batch_size, -1)``); ``None`` (default): decided by :meth:`check` on the first
            batch with :func:`pyro_lvm.pairs.check_vectorization`, which compares one vectorized
            run with one run per particle (:attr:`vectorization` says which path and why). One
            particle never adds a particle dimension.
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
        vectorize_particles: Optional[bool] = None,
        max_plate_nesting: Optional[int] = None,
        data_plate: str = "data",
    ):
        if vectorize_particles not in (None, True, False):
            raise ValueError(f"vectorize_particles must be True, False or None (decide); got {vectorize_particles!r}.")
        super().__init__(num_particles, beta, beta_sites, False, max_plate_nesting)
        if num_particles < self.min_particles:
            raise ValueError(
                f"{type(self).__name__} needs num_particles >= {self.min_particles}; "
                f"got {num_particles}."
            )
        self.data_plate = data_plate
        # not Pyro's own vectorize_particles attribute, which sizes max_plate_nesting for its plate
        self.vectorize_choice = vectorize_particles
        #: how the particles run, once decided (see ``vectorize_particles``)
        self.vectorization: Optional[Vectorization] = None
        self._plate_size: Optional[int] = None
        self._ran_vectorized = False  # a forced vectorized run that succeeded once needs no more care

    def check(self, model: Callable, guide: Callable, *args, **kwargs) -> None:
        super().check(model, guide, *args, **kwargs)
        # the dry run that sizes the particle dim happens here, not in the first
        # training step, so a resumed run draws the same random numbers
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        self.decide_vectorization(model, guide, args, kwargs)

    def decide_vectorization(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Vectorization:
        """Decide (once per pair) whether the particles run in one vectorized pass, and say why.

        ``vectorize_particles=None`` runs :func:`pyro_lvm.pairs.check_vectorization` on this
        batch (and logs a warning naming the site and what to change in the model when the
        particles must run one at a time); ``True`` and ``False`` force a path without a check,
        as does one particle (which has no particle dimension).
        """
        name = type(self).__name__
        if self.num_particles == 1:
            result = Vectorization(False, "one particle: no particle dimension")
        elif self.vectorize_choice is not None:
            result = Vectorization(self.vectorize_choice, f"vectorize_particles={self.vectorize_choice}")
        else:
            if self.max_plate_nesting == float("inf"):
                self._guess_max_plate_nesting(model, guide, args, kwargs)
            result = check_vectorization(model, guide, args, kwargs, int(self.max_plate_nesting))
            if result:
                result.reason = "the pair broadcasts over a leading particle dimension"
            else:
                _log.warning("pyro_lvm: %s runs its %d particles one at a time (%d passes of the pair per step). %s",
                             name, self.num_particles, self.num_particles, vectorization_advice(result))
        self.vectorization = result
        return result

    @property
    def vectorized(self) -> bool:
        """Whether the particles run in one vectorized pass (decided by :meth:`decide_vectorization`)."""
        if self.vectorization is None:
            return bool(self.vectorize_choice) and self.num_particles > 1
        return bool(self.vectorization)

    # ----- traces ---------------------------------------------------------------------
    def _particles(self, fn: Callable) -> Callable:
        return with_particles(fn, self._plate_size, int(self.max_plate_nesting))

    def _over_particles(self, run: Callable[[], Any]) -> list:
        """``run()`` once with the particles vectorized, or once per particle without a particle dim."""
        if self.vectorized:
            self._plate_size = self.num_particles
            if self.vectorize_choice is not True or self._ran_vectorized:
                return [run()]
            try:  # forced without a check: a pair that does not broadcast fails at its first run, say why
                out = [run()]
            except Exception as err:
                result = Vectorization(False, f"the pair raised {type(err).__name__} inside the particle plate ({err})")
                raise ValueError(f"{type(self).__name__}: " + vectorization_advice(result)) from err
            self._ran_vectorized = True
            return out
        self._plate_size = None
        return [run() for _ in range(self.num_particles)]

    def _runs(self, model, guide, args, kwargs, read: Callable) -> list:
        """``read(model_trace, guide_trace)`` of each run of the pair (see :meth:`_over_particles`)."""
        self._check_once(model, guide, args, kwargs)

        def once():
            _, model_trace, guide_trace = self._traces(model, guide, args, kwargs)
            return read(model_trace, guide_trace)

        return self._over_particles(once)

    def particle_weights(self, model: Callable, guide: Callable, *args, **kwargs) -> "LogWeights":
        r"""The log weights :math:`\log p(x, z^{(k)}) - \log q(z^{(k)} \mid x)` of ``num_particles`` draws.

        One vectorized run or one run per particle, as :meth:`decide_vectorization` decided;
        ``.joint()`` is ``(K, ..., B)`` for a pair whose weights factorize over data points.

        Example:
            >>> import pyro, pyro.distributions as dist, torch
            >>> def model(x):
            ...     with pyro.plate("data", len(x)):
            ...         pyro.sample("x", dist.Normal(pyro.sample("z", dist.Normal(0., 1.)), 1.), obs=x)
            >>> def guide(x):
            ...     with pyro.plate("data", len(x)):
            ...         pyro.sample("z", dist.Normal(x / 2, 0.5 ** 0.5))
            >>> tuple(ParticleELBO(num_particles=7).particle_weights(model, guide, torch.zeros(3)).joint().shape)
            (7, 3)
        """
        return LogWeights.cat(self._runs(model, guide, args, kwargs, self.log_weights))

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
        frames = data_frames([site for _, site in sites], self.data_plate)
        keep = (particle_dim, *sorted(f.dim for f in frames))
        data_scale = subsample_scale(frames)
        parts: dict[str, list] = {"local": [], "other": [], "local_q": [], "other_q": []}
        for sign, site in sites:
            if site["name"] in overrides[sign]:
                log_p = overrides[sign][site["name"]]
            elif "unscaled_log_prob" in site:
                log_p = site["unscaled_log_prob"]
            else:
                log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
            local = is_local(site, frames)
            scale = site["scale"] / data_scale if local else site["scale"]
            dims = keep if local else (particle_dim,)
            kind = "local" if local else "other"
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
        return surrogate_loss(bound, surrogate)

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
