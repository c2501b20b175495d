"""Exact enumeration of discrete latents (Pyro's TraceEnum_ELBO), chosen by name."""

from __future__ import annotations

from pyro.infer import TraceEnum_ELBO, config_enumerate

from .base import BetaMixin, latent_sites

__all__ = ["EnumELBO"]


class EnumELBO(BetaMixin, TraceEnum_ELBO):
    r"""The ELBO with the expectation over discrete latents computed exactly.

    For a guide site with finite support :math:`\{1..C\}`,

    .. math::

        \mathbb E_{q(c\mid x)}[f(c)] = \sum_{c=1}^{C} q(c \mid x)\, f(c),

    so neither the value nor the gradient has Monte-Carlo noise in :math:`c`
    (continuous latents are still sampled). Every discrete guide site is
    enumerated in parallel (Pyro's :class:`~pyro.infer.TraceEnum_ELBO` with
    ``config_enumerate(guide, "parallel")``); model-side enumeration of sites
    that the guide does not sample (``infer={"enumerate": "parallel"}`` in the
    model) also works. The cost grows with the number of values: one site of
    ``C`` values per data point is ``C`` model evaluations. A site whose values
    cannot be listed site by site (``OneHotCategorical(...).to_event(1)`` over
    ``M`` independent variables has :math:`C^M` joint values and no
    ``enumerate_support``) is refused by :meth:`check`.

    Arguments: as :class:`~pyro_lvm.estimators.ReparamELBO`.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> pyro.clear_param_store()
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         c = pyro.sample("c", dist.Bernoulli(0.5))
        ...         pyro.sample("x", dist.Normal(2 * c - 1, 1.), obs=x)
        >>> def guide(x):
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("c", dist.Bernoulli(0.5))  # the prior as guide: ELBO = log p(x) - KL(prior || posterior)
        >>> x = torch.tensor([0.])
        >>> exact = -0.5 * dist.Normal(-1., 1.).log_prob(x) - 0.5 * dist.Normal(1., 1.).log_prob(x)
        >>> bool(abs(EnumELBO().loss(model, guide, x) - float(exact)) < 1e-6)  # no Monte-Carlo noise
        True
    """

    _name = "enum"

    def _enumerated(self, guide):
        return config_enumerate(guide, "parallel")

    def loss(self, model, guide, *args, **kwargs):
        return super().loss(model, self._enumerated(guide), *args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        return super().differentiable_loss(model, self._enumerated(guide), *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        return super().loss_and_grads(model, self._enumerated(guide), *args, **kwargs)

    def _get_traces(self, model, guide, args, kwargs):
        self._check_once(model, guide, args, kwargs)  # before Pyro wraps the guide in a queue
        yield from super()._get_traces(model, guide, args, kwargs)

    def _check_traces(self, model_trace, guide_trace, args, kwargs) -> None:
        discrete = {
            name: site
            for name, site in latent_sites(guide_trace).items()
            if site["fn"].support.is_discrete
        }
        model_enumerated = [
            name
            for name, site in latent_sites(model_trace).items()
            if name not in guide_trace.nodes and site["infer"].get("enumerate") == "parallel"
        ]
        for name, site in discrete.items():
            if not site["fn"].has_enumerate_support:
                raise ValueError(
                    f"'enum' cannot list the values of the guide's site {name!r} "
                    f"({type(site['fn']).__name__}, event shape {tuple(site['fn'].event_shape)}): "
                    "it has no enumerate_support (e.g. several independent categoricals "
                    "declared with .to_event(1) have C**M joint values). Make it one categorical "
                    "per data point, or use 'vimco', 'relaxed' or 'score_function'."
                )
        if not discrete and not model_enumerated:
            raise ValueError(
                "'enum' found no discrete latent to enumerate in the guide (nor a model site "
                "marked infer={'enumerate': 'parallel'}). For continuous latents use 'reparam' "
                "or 'analytic_kl'."
            )
