"""Single-sample ELBOs: reparameterized Monte Carlo, and the KL in closed form."""

from __future__ import annotations

import warnings

from pyro.distributions import Delta
from pyro.distributions.kl import kl_divergence
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from ..pairs import drawn_sites, latent_sites, later_dependencies
from .base import (
    BetaMixin,
    guide_covers_model,
    guide_order_matches_model,
    refuse_model_enumeration,
)
from .kl_control import KLControlMixin, is_flow, unwrap_independent

__all__ = ["ReparamELBO", "AnalyticKLELBO"]


class ReparamELBO(KLControlMixin, BetaMixin, Trace_ELBO):
    r"""Reparameterized Monte-Carlo ELBO (Pyro's :class:`~pyro.infer.Trace_ELBO`).

    With :math:`z = g_\phi(\epsilon, x)`, :math:`\epsilon \sim p(\epsilon)`, the gradient
    :math:`\nabla_\phi \mathbb E_q[f(z)] = \mathbb E_\epsilon[\nabla_\phi f(g_\phi(\epsilon, x))]`
    is estimated by pathwise derivatives: the reparameterization trick. Sites
    without ``rsample`` (discrete latents) fall back to the score function
    without a baseline, as in Pyro; prefer ``"score_function"``, ``"vimco"``,
    ``"relaxed"`` or ``"enum"`` for those.

    Arguments:
        num_particles: samples of ``z`` per data point.
        beta: weight of the KL term (see :mod:`pyro_lvm.estimators`).
        beta_sites: latent sites that ``beta`` applies to (default: all).
        vectorize_particles: draw the particles in one vectorized pass.
        max_plate_nesting: as in Pyro; guessed by a dry run if ``None``.
        kl_control: a :class:`~pyro_lvm.estimators.FreeBits` or
            :class:`~pyro_lvm.estimators.Capacity` in place of ``beta * KL``; the KL per
            latent variable is then the Monte-Carlo ``log q(z_d) - log p(z_d)``.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> pyro.clear_param_store()
        >>> def model(x):
        ...     z = pyro.sample("z", dist.Normal(0., 1.))
        ...     pyro.sample("x", dist.Normal(z, 1.), obs=x)
        >>> def guide(x):
        ...     pyro.sample("z", dist.Normal(x / 2, 0.5 ** 0.5))  # the exact posterior
        >>> round(-ReparamELBO().loss(model, guide, torch.tensor(0.)), 4)  # = log N(0 | 0, 2)
        -1.2655
    """

    def _check_traces(self, model_trace, guide_trace, args, kwargs) -> None:
        refuse_model_enumeration("reparam", model_trace, guide_trace)
        self._check_kl_control(model_trace, guide_trace, "reparam")


class AnalyticKLELBO(KLControlMixin, BetaMixin, TraceMeanField_ELBO):
    r"""ELBO with the KL term in closed form (Pyro's :class:`~pyro.infer.TraceMeanField_ELBO`).

    .. math::

        \mathcal L = \mathbb E_{q}[\log p(x\mid z)] - \mathrm{KL}(q(z\mid x)\,\|\,p(z)),

    where the KL uses :func:`torch.distributions.kl_divergence`. It assumes the
    mean-field condition: every latent site's prior depends only on latents the
    guide draws before it; otherwise the result is biased. Where model and guide
    draw in different orders (Pyro's sufficient test, on which it warns),
    :meth:`check` tests the dependence itself
    (:func:`pyro_lvm.pairs.later_dependencies`): it refuses a prior that depends on a
    later draw (the two-layer :class:`~pyro_lvm.HierarchicalVAE`), accepts independent
    ones, and warns as Pyro does where a later draw has integer values and cannot be
    tested. It removes
    the KL's Monte-Carlo noise, so it usually has lower variance than
    :class:`ReparamELBO`. Pyro would fall back to a Monte-Carlo KL where no
    closed form is registered; here :meth:`check` refuses such a pair instead,
    naming the site, so that "analytic" always means analytic, with one
    exception that Pyro's autoguides need: a site the guide returns as a ``Delta``
    (an :class:`~pyro.infer.autoguide.AutoNormal` or ``AutoDiagonalNormal`` site, whose
    density lives on its auxiliary draw, or an ``AutoDelta`` point estimate) has its
    term :math:`\log p(z) - \log q(z)` estimated at the draw, as in
    :class:`~pyro.infer.TraceMeanField_ELBO`. Every guide latent must be reparameterizable
    (a closed-form KL has no score-function term); discrete latents are refused.

    Arguments: as :class:`ReparamELBO`; with ``kl_control`` the KL per latent variable
    is in closed form.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> pyro.clear_param_store()
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0., 1.))
        >>> def guide():
        ...     pyro.sample("z", dist.Normal(1., 1.))
        >>> AnalyticKLELBO(beta=2.0).loss(model, guide)  # 2 * KL(N(1,1) || N(0,1)) = 1
        1.0
    """

    _analytic_kl = True

    def check(self, model, guide, *args, **kwargs):
        model_trace, guide_trace = super().check(model, guide, *args, **kwargs)
        self._mean_field = True
        if not guide_order_matches_model(model_trace, guide_trace):
            dependencies, untested = later_dependencies(model, guide, args, kwargs)
            if dependencies:
                name, later = next(iter(dependencies.items()))
                raise ValueError(
                    "'analytic_kl' needs the mean-field condition: the prior of each latent may depend only on "
                    f"latents the guide draws before it, but the prior of {name!r} depends on {later}, which the "
                    f"guide draws later (the model draws {list(latent_sites(model_trace))}, the guide "
                    f"{list(latent_sites(guide_trace))}). A closed-form KL at a draw of {later[0]!r} made after "
                    f"{name!r} is biased (e.g. the two-layer HierarchicalVAE). Use 'reparam' (or 'iwae'/'dreg'), or "
                    "reorder the guide."
                )
            if untested:
                warnings.warn(
                    "'analytic_kl' could not verify the mean-field condition: the guide draws the latents in "
                    f"another order than the model ({list(latent_sites(guide_trace))} against "
                    f"{list(latent_sites(model_trace))}) and {untested} have integer values, so whether the "
                    "priors depend on them was not tested. The closed-form KL is biased if they do.",
                    stacklevel=2,
                )
            else:
                self._mean_field = False  # the orders differ, and no prior depends on a later draw
        return model_trace, guide_trace

    def _get_trace(self, model, guide, args, kwargs):
        if getattr(self, "_mean_field", True):
            return super()._get_trace(model, guide, args, kwargs)
        with warnings.catch_warnings():  # Pyro's order test; the dependence itself was tested
            warnings.filterwarnings("ignore", message="Failed to verify mean field restriction")
            return super()._get_trace(model, guide, args, kwargs)

    def _check_traces(self, model_trace, guide_trace, args, kwargs) -> None:
        refuse_model_enumeration("analytic_kl", model_trace, guide_trace)
        guide_covers_model("analytic_kl", model_trace, guide_trace)
        self._check_kl_control(model_trace, guide_trace, "analytic_kl")
        for name, site in drawn_sites(guide_trace).items():
            if not site["fn"].has_rsample:
                raise ValueError(
                    f"'analytic_kl' needs reparameterizable latents (a closed-form KL has no score-function term "
                    f"for what the draw feeds downstream), but the guide's site {name!r} is "
                    f"{type(site['fn']).__name__}. Sum a discrete latent out with 'enum', or use 'score_function', "
                    "'vimco' or 'relaxed'."
                )
        model_sites = latent_sites(model_trace)
        for name, site in latent_sites(guide_trace).items():
            q, p = site["fn"], model_sites[name]["fn"]
            if isinstance(unwrap_independent(q)[0], Delta):
                continue  # an autoguide's site: its density is on the auxiliary draw (Monte Carlo, as in Pyro)
            try:
                kl_divergence(q, p)
            except NotImplementedError:
                if is_flow(q) or is_flow(p):
                    raise ValueError(
                        f"'analytic_kl' needs KL(q || p) in closed form, but site {name!r} has a "
                        f"normalizing flow ({'q' if is_flow(q) else 'p'} is a TransformedDistribution, "
                        "e.g. VAE(prior_flow=...) or VAE(posterior_flow=...)), which has none. Use "
                        "'reparam' or 'iwae' (Monte-Carlo log q - log p)."
                    ) from None
                raise ValueError(
                    f"'analytic_kl' needs KL(q || p) in closed form, but none is registered "
                    f"for site {name!r}: q = {type(q).__name__}, p = {type(p).__name__}. "
                    "Use 'reparam' (Monte-Carlo KL) or register one with "
                    "torch.distributions.kl.register_kl."
                ) from None
