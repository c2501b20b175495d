r"""Importance weights of a pair's particles, streamed in chunks: the machinery of the log-likelihood and the checks.

For :math:`K` draws :math:`z^{(k)} \sim q(z \mid x_i)` the log importance weights
:math:`\log w_{ik} = \log p(x_i, z^{(k)}) - \log q(z^{(k)} \mid x_i)` are drawn ``chunk_size`` particles and
``batch_size`` data points at a time (vectorized, or one particle at a time for a model that does not
broadcast over them: :func:`pyro_lvm.pairs.check_vectorization`), so memory is bounded whatever :math:`K`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import pyro
import torch
from pyro.poutine.util import site_is_subsample

from ..estimators.particles import LogWeights, ParticleELBO
from ..pairs import (
    data_frames,
    drawn_sites,
    enumerated_sites,
    is_local,
    latent_sites,
    resolve,
    rows,
)

__all__ = [
    "ParticleDraws",
    "ImportanceWeights",
    "per_point",
    "GLOBAL_MESSAGE",
    "resolve_with_data",
    "chunk_sizes",
    "particle_chunks",
    "importance_draws",
]

@dataclass
class ParticleDraws:
    r"""What :meth:`ImportanceWeights.run` reads off ``K`` particles of the pair on one batch.

    Arguments:
        weights: the log importance weights (:class:`~pyro_lvm.estimators.LogWeights`).
        reconstruction: the same with every latent term zeroed: :math:`\log p(x \mid z)`.
        latents: per latent site, the draws, ``(K, B, D)`` for a site in the data plate (its
            dims right of the data plate flattened) and ``(K, D)`` for a global one.
    """

    weights: LogWeights
    reconstruction: Optional[LogWeights] = None
    latents: Optional[dict] = None


class ImportanceWeights(ParticleELBO):
    """The particle machinery of the multi-sample bounds, used to read log weights and draws.

    Its particles run vectorized or one at a time as :class:`~pyro_lvm.estimators.particles.ParticleELBO`
    decides (``vectorize_particles``), the decision made on the first batch by :meth:`prepare`.
    """

    per_point = True  # refuse global sites (the weights would not factorize over data points)

    def prepare(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> None:
        """Size the plates and decide how the particles run, on a first batch (once)."""
        if self.vectorization is None:
            self.check(model, guide, *args, **kwargs)

    def _check_traces(self, model_trace, guide_trace, args, kwargs) -> None:
        if self.per_point:
            sites = [s for t in (model_trace, guide_trace) for s in t.nodes.values()
                     if s["type"] == "sample" and not site_is_subsample(s) and not s["infer"].get("_deterministic")]
            frames = data_frames(sites, self.data_plate)
            outside = sorted({s["name"] for s in sites if not is_local(s, frames)})
            if outside:
                raise ValueError(f"Sites {outside} are outside the data plate. " + GLOBAL_MESSAGE)
        summed = enumerated_sites(model_trace, guide_trace)
        if summed:  # importance weights need a q for every latent
            raise ValueError(
                f"The model sums {summed} out by enumeration and the guide does not draw them, so there are no "
                "importance weights p(x, z) / q(z | x) to draw; use evaluate(...).elbo, which sums them out with "
                "TraceEnum_ELBO as training did."
            )

    def run(self, model: Callable, guide: Callable, args, kwargs, reconstruction: bool = False,
            latents: bool = False) -> ParticleDraws:
        """All ``num_particles`` particles on one batch: the log weights, and on request the
        reconstruction terms and the draws."""
        n = args[0].shape[0] if args and isinstance(args[0], torch.Tensor) and args[0].dim() else 1

        def read(model_trace, guide_trace) -> ParticleDraws:
            # memoized in the traces: a second log_weights (the reconstruction term) reuses them
            model_trace.compute_log_prob()
            guide_trace.compute_log_prob()
            draws = ParticleDraws(self.log_weights(model_trace, guide_trace))
            if reconstruction:
                zeros = {}
                for trace, sites in ((model_trace, latent_sites(model_trace)), (guide_trace, drawn_sites(guide_trace))):
                    for name, site in sites.items():
                        zeros[name] = site["value"].new_zeros(site["fn"].batch_shape)
                draws.reconstruction = self.log_weights(model_trace, guide_trace, guide_log_probs=zeros,
                                                        model_log_probs=zeros)
            if latents:
                frames = draws.weights.data_dims
                draws.latents = {}
                size = self._plate_size or 1
                for name, site in latent_sites(guide_trace).items():
                    local = any(f.dim in frames and f.vectorized for f in site["cond_indep_stack"])
                    value = site["value"].detach()
                    draws.latents[name] = value.reshape((size, n, -1) if local else (size, -1))
            return draws

        runs = self._runs(model, guide, args, kwargs, read)
        first = runs[0]
        out = ParticleDraws(LogWeights.cat([r.weights for r in runs]))
        if first.reconstruction is not None:
            out.reconstruction = LogWeights.cat([r.reconstruction for r in runs])
        if first.latents is not None:
            out.latents = {name: torch.cat([r.latents[name] for r in runs]) for name in first.latents}
        return out


def per_point(weights: LogWeights, tensor: torch.Tensor) -> torch.Tensor:
    """A ``joint()``-shaped tensor as ``(K, B)``: particles by data points."""
    if not weights.factorizes:
        raise ValueError(GLOBAL_MESSAGE)
    return tensor.reshape(tensor.shape[0], -1)


GLOBAL_MESSAGE = (
    "The pair has sample sites outside its data plate (pyro.plate('data'), or data_plate=...): global "
    "latents or observations, so its importance weights do not factorize into one log p(x_i) per data "
    "point (log p(x) is one integral over the whole data set). Per data point, condition the model on "
    "the global latents, e.g. pyro.condition(model, data=autoguide.median()), or use evaluate(...).elbo, "
    "which counts the global terms once. (If the sites are local, put them in the data plate, or pass "
    "its name as data_plate=...)"
)


def resolve_with_data(model: Any, guide: Any, x: Any, who: str = "log_likelihood") -> tuple[Callable, Callable, torch.Tensor]:
    """Accept ``(model, guide, x)``, ``(module, x)`` or ``(module, None, x)``: the model, the guide and the data."""
    if isinstance(guide, torch.Tensor) and x is None:
        guide, x = None, guide
    if x is None:
        raise ValueError(f"No data given: call {who}(model, guide, x) or {who}(module, x).")
    model, guide = resolve(model, guide, who)
    return model, guide, x


def chunk_sizes(num_particles: int, chunk_size: int) -> Iterator[int]:
    full, rest = divmod(num_particles, chunk_size)
    yield from [chunk_size] * full + ([rest] if rest else [])


def particle_chunks(
    model: Callable, guide: Callable, x: torch.Tensor, num_particles: int, chunk_size: int,
    batch_size: int, data_plate: str, kwargs: dict, vectorize_particles: Optional[bool] = None,
    reconstruction: bool = False, latents: bool = False, per_point: bool = True,
) -> Iterator[tuple[int, Iterator[ParticleDraws]]]:
    """Per batch of data points, its size and an iterator over its chunks of particles (:class:`ParticleDraws`).

    The particles run vectorized or one at a time (``vectorize_particles``; ``None`` decides on the
    first batch). ``per_point`` refuses, on the first chunk, a pair whose weights do not factorize
    over data points (global latents), before any further work.
    """
    runner = ImportanceWeights(num_particles=min(chunk_size, num_particles), data_plate=data_plate,
                               vectorize_particles=vectorize_particles)
    runner.per_point = per_point

    def chunks(xb: torch.Tensor, kw: dict) -> Iterator[ParticleDraws]:
        for i, size in enumerate(chunk_sizes(num_particles, chunk_size)):
            runner.num_particles = size
            # Pyro's argument and support checks run on a batch's first chunk only: the
            # later ones see the same data (they cost about 8% of a MNIST run's time)
            with pyro.validation_enabled(False) if i else contextlib.nullcontext():
                draws = runner.run(model, guide, (xb,), kw, reconstruction=reconstruction, latents=latents)
            if per_point and not draws.weights.factorizes:
                raise ValueError(GLOBAL_MESSAGE)
            yield draws

    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        kw = rows(kwargs, slice(start, start + batch_size), len(x))
        if start == 0:
            runner.num_particles = min(chunk_size, num_particles)
            runner.prepare(model, guide, (xb,), kw)
        yield len(xb), chunks(xb, kw)


def importance_draws(
    model: Callable, guide: Callable, x: torch.Tensor, num_particles: int, chunk_size: int,
    batch_size: int, data_plate: str, kwargs: dict, keep_latents: bool, vectorize_particles: Optional[bool] = None,
) -> dict[str, Any]:
    """Per data point, ``num_particles`` log weights (and optionally the draws and log p(x | z))."""
    log_w, recon, latents = [], [], {}
    for n, runs in particle_chunks(model, guide, x, num_particles, chunk_size, batch_size, data_plate, kwargs,
                                   vectorize_particles, reconstruction=keep_latents, latents=keep_latents):
        parts_w, parts_r, parts_z = [], [], {}
        for draws in runs:
            weights = draws.weights
            parts_w.append(per_point(weights, weights.joint()).double())
            if keep_latents:
                parts_r.append(per_point(draws.reconstruction, draws.reconstruction.joint()).double())
                for name, value in draws.latents.items():  # (K, B, prod(site shape))
                    parts_z.setdefault(name, []).append(value.double())
        log_w.append(torch.cat(parts_w))
        if keep_latents:
            recon.append(torch.cat(parts_r))
            for name, values in parts_z.items():
                latents.setdefault(name, []).append(torch.cat(values))
    out = {"log_weights": torch.cat(log_w, 1)}
    if keep_latents:
        out["reconstruction"] = torch.cat(recon, 1)
        out["latents"] = {name: torch.cat(values, 1) for name, values in latents.items()}
    return out
