"""What every pyro_lvm estimator shares: the KL weight ``beta`` and the compatibility check."""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger

from ..pairs import drawn_sites, latent_sites

__all__ = ["BetaMixin", "latent_sites", "refuse_model_enumeration"]


class _ScaleLatents(Messenger):
    """Multiply the scale of latent (unobserved) sample sites by ``beta >= 0``."""

    def __init__(self, beta: float, sites: Optional[frozenset] = None):
        super().__init__()
        self.beta = beta
        self.sites = sites

    def _pyro_sample(self, msg) -> None:
        if not msg["is_observed"] and (self.sites is None or msg["name"] in self.sites):
            msg["scale"] = msg["scale"] * self.beta


class BetaMixin:
    """Give a Pyro ELBO a ``beta`` weight on KL(q || p) of the latent sites, and a check.

    ``beta`` is a plain attribute, so a schedule can change it between steps.
    ``beta_sites`` restricts the weight to the named latent sites (default: all).

    :meth:`check` runs the pair once and raises a ``ValueError`` that says what to
    use instead when the estimator cannot work on it (IWAE on a discrete latent,
    analytic KL without a closed form, ...). :class:`pyro_lvm.LVMModule` calls it
    before training; the first loss computation calls it otherwise.
    """

    def __init__(
        self,
        num_particles: int = 1,
        beta: float = 1.0,
        beta_sites: Optional[Sequence[str]] = None,
        vectorize_particles: bool = False,
        max_plate_nesting: Optional[int] = None,
    ):
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer; got {num_particles!r}.")
        super().__init__(
            num_particles=num_particles,
            vectorize_particles=vectorize_particles,
            max_plate_nesting=float("inf") if max_plate_nesting is None else max_plate_nesting,
        )
        if beta < 0:
            raise ValueError(f"beta must be >= 0; got {beta}.")
        self.beta = beta
        self.beta_sites = None if beta_sites is None else frozenset(beta_sites)
        self._checked = False

    def _scaled(self, fn: Callable) -> Callable:
        if self.beta == 1.0:
            return fn
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0; got {self.beta}.")
        return _ScaleLatents(float(self.beta), self.beta_sites)(fn)

    def _get_trace(self, model, guide, args, kwargs):
        self._check_once(model, guide, args, kwargs)
        return super()._get_trace(self._scaled(model), self._scaled(guide), args, kwargs)

    def _guess_max_plate_nesting(self, model, guide, args, kwargs) -> None:
        # Pyro announces its guess at INFO level on stderr at every first use; quiet it
        logger = logging.getLogger("pyro.infer.elbo")
        level = logger.level
        logger.setLevel(max(level, logging.WARNING))
        try:
            super()._guess_max_plate_nesting(model, guide, args, kwargs)
        finally:
            logger.setLevel(level)

    # ----- compatibility ------------------------------------------------------------
    def check(self, model: Callable, guide: Callable, *args, **kwargs) -> None:
        """Raise a ``ValueError`` if this estimator cannot work on the pair.

        Runs the guide once and the model against it (without gradients).
        """
        with poutine.block(), torch.no_grad():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
        self._check_traces(model_trace, guide_trace, args, kwargs)
        self._checked = True
        return model_trace, guide_trace

    def _check_once(self, model, guide, args, kwargs) -> None:
        if not self._checked:
            self.check(model, guide, *args, **kwargs)

    def _check_traces(self, model_trace, guide_trace, args, kwargs) -> None:
        """Subclasses raise here; the traces are one unvectorized run of the pair."""


def guide_order_matches_model(model_trace, guide_trace) -> bool:
    """Whether the shared latent sites are drawn in the same order by model and guide.

    This is Pyro's test of the mean-field condition of
    :class:`~pyro.infer.TraceMeanField_ELBO`: where it fails (e.g. a hierarchical VAE
    whose model draws ``z2`` before ``z1`` and whose guide draws ``z1`` before ``z2``),
    ``KL(q(z1 | x) || p(z1 | z2))`` in closed form at a sampled ``z2`` ignores that ``z2``
    depends on ``z1``, and the "ELBO" is biased.
    """
    guide_names = list(latent_sites(guide_trace))
    model_names = [name for name in latent_sites(model_trace) if name in guide_names]
    return model_names == [name for name in guide_names if name in model_names]


def needs_rsample(estimator: str, guide_trace, alternatives: str) -> None:
    for name, site in drawn_sites(guide_trace).items():
        if not site["fn"].has_rsample:
            raise ValueError(
                f"'{estimator}' needs reparameterizable latents, but the guide's site {name!r} "
                f"({type(site['fn']).__name__}) has no rsample. {alternatives}"
            )


def refuse_model_enumeration(estimator: str, model_trace, guide_trace) -> None:
    """Refuse model sites marked for enumeration that the guide does not draw: only 'enum' sums them out."""
    marked = sorted(
        name for name, site in latent_sites(model_trace).items()
        if name not in guide_trace.nodes and site["infer"].get("enumerate") == "parallel"
    )
    if marked:
        raise ValueError(
            f"The model marks {', '.join(map(repr, marked))} for enumeration (infer={{'enumerate': 'parallel'}}, "
            f"or config_enumerate) and the guide does not draw it: only estimator 'enum' (TraceEnum_ELBO) sums it "
            f"out; '{estimator}' would draw it from the prior, whatever the data say. Use 'enum'."
        )


def guide_covers_model(estimator: str, model_trace, guide_trace) -> None:
    refuse_model_enumeration(estimator, model_trace, guide_trace)
    missing = sorted(set(latent_sites(model_trace)) - set(latent_sites(guide_trace)))
    if missing:
        raise ValueError(
            f"'{estimator}' needs a guide site for every latent of the model; "
            f"{', '.join(map(repr, missing))} has none. Add it to the guide, or "
            "marginalize it with estimator 'enum' (TraceEnum_ELBO)."
        )
