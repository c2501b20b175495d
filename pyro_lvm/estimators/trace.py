"""Single-sample ELBOs: reparameterized Monte Carlo, and the KL in closed form."""

from __future__ import annotations

import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.distributions.kl import kl_divergence

from .base import BetaMixin, _guide_covers_model, guide_order_matches_model, latent_sites
from .kl_control import KLControlMixin, _is_flow

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
        self._check_kl_control(model_trace, guide_trace, "reparam")


class AnalyticKLELBO(KLControlMixin, BetaMixin, TraceMeanField_ELBO):
    r"""ELBO with the KL term in closed form (Pyro's :class:`~pyro.infer.TraceMeanField_ELBO`).

    .. math::

        \mathcal L = \mathbb E_{q}[\log p(x\mid z)] - \mathrm{KL}(q(z\mid x)\,\|\,p(z)),

    where the KL uses :func:`torch.distributions.kl_divergence`. It assumes the
    mean-field condition: every latent site's prior depends only on sites
    upstream in both model and guide; otherwise the result is biased, so
    :meth:`check` refuses a guide that draws the latents in another order than the
    model (where Pyro only warns). It removes
    the KL's Monte-Carlo noise, so it usually has lower variance than
    :class:`ReparamELBO`. Pyro would fall back to a Monte-Carlo KL where no
    closed form is registered; here :meth:`check` refuses such a pair instead,
    naming the site, so that "analytic" always means analytic.

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

    def _check_traces(self, model_trace, guide_trace, args, kwargs) -> None:
        _guide_covers_model("analytic_kl", model_trace, guide_trace)
        self._check_kl_control(model_trace, guide_trace, "analytic_kl")
        if not guide_order_matches_model(model_trace, guide_trace):
            raise ValueError(
                "'analytic_kl' needs the mean-field condition: the guide must draw the latents "
                f"in the model's order, but the model draws {list(latent_sites(model_trace))} and "
                f"the guide {list(latent_sites(guide_trace))}. A closed-form KL of a site whose "
                "prior depends on a latent the guide draws later is biased (e.g. the two-layer "
                "HierarchicalVAE). Use 'reparam' (or 'iwae'/'dreg')."
            )
        model_sites = latent_sites(model_trace)
        for name, site in latent_sites(guide_trace).items():
            q, p = site["fn"], model_sites[name]["fn"]
            try:
                kl_divergence(q, p)
            except NotImplementedError:
                if _is_flow(q) or _is_flow(p):
                    raise ValueError(
                        f"'analytic_kl' needs KL(q || p) in closed form, but site {name!r} has a "
                        f"normalizing flow ({'q' if _is_flow(q) else 'p'} is a TransformedDistribution, "
                        "e.g. VAE(prior_flow=...) or VAE(posterior_flow=...)), which has none. Use "
                        "'reparam' or 'iwae' (Monte-Carlo log q - log p)."
                    ) from None
                raise ValueError(
                    f"'analytic_kl' needs KL(q || p) in closed form, but none is registered "
                    f"for site {name!r}: q = {type(q).__name__}, p = {type(p).__name__}. "
                    "Use 'reparam' (Monte-Carlo KL) or register one with "
                    "torch.distributions.kl.register_kl."
                ) from None
