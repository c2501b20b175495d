r"""Estimators of the ELBO and its gradient, chosen by name.

Every estimator here is a :class:`pyro.infer.ELBO`, so it works with
:class:`pyro.infer.SVI`, with Pyro's :class:`~pyro.infer.elbo.ELBOModule`
(``elbo(model, guide)``) and with :class:`pyro_lvm.LVMModule`. Each adds one
attribute, ``beta``, the weight of the KL term:

.. math::

    \mathcal L_\beta(x) = \mathbb E_{q(z\mid x)}[\log p(x\mid z)]
        - \beta\,\mathrm{KL}\big(q(z\mid x)\,\|\,p(z)\big),

implemented by scaling the log-densities of the latent sites in *both* the
model and the guide by ``beta`` (scaling only the model's ``log p(z)`` would
give ``beta log p(z) - log q(z)``, which is not ``beta`` times the KL). Any
``beta >= 0`` works, including 0 (pure reconstruction), which
:func:`pyro.poutine.scale` would reject.
"""

from __future__ import annotations

import inspect
from typing import Literal, Optional, Sequence

import torch
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.infer import ELBO, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger

__all__ = [
    "BetaMixin",
    "ReparamELBO",
    "AnalyticKLELBO",
    "ScoreFunctionELBO",
    "ESTIMATORS",
    "make_elbo",
]


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
    """Give a Pyro ELBO a ``beta`` weight on KL(q || p) of the latent sites.

    ``beta`` is a plain attribute, so a schedule can change it between steps.
    ``beta_sites`` restricts the weight to the named latent sites (default: all).
    """

    def __init__(
        self,
        num_particles: int = 1,
        beta: float = 1.0,
        beta_sites: Optional[Sequence[str]] = None,
        vectorize_particles: bool = False,
        max_plate_nesting: Optional[int] = None,
    ):
        super().__init__(
            num_particles=num_particles,
            vectorize_particles=vectorize_particles,
            max_plate_nesting=float("inf") if max_plate_nesting is None else max_plate_nesting,
        )
        if beta < 0:
            raise ValueError(f"beta must be >= 0; got {beta}.")
        self.beta = beta
        self.beta_sites = None if beta_sites is None else frozenset(beta_sites)

    def _get_trace(self, model, guide, args, kwargs):
        if self.beta != 1.0:
            if self.beta < 0:
                raise ValueError(f"beta must be >= 0; got {self.beta}.")
            scale = _ScaleLatents(float(self.beta), self.beta_sites)
            model, guide = scale(model), scale(guide)
        return super()._get_trace(model, guide, args, kwargs)


class ReparamELBO(BetaMixin, Trace_ELBO):
    r"""Reparameterized Monte-Carlo ELBO (Pyro's :class:`~pyro.infer.Trace_ELBO`).

    With :math:`z = g_\phi(\epsilon, x)`, :math:`\epsilon \sim p(\epsilon)`, the gradient
    :math:`\nabla_\phi \mathbb E_q[f(z)] = \mathbb E_\epsilon[\nabla_\phi f(g_\phi(\epsilon, x))]`
    is estimated by pathwise derivatives: the reparameterization trick. Sites
    without ``rsample`` fall back to the score function.

    Arguments:
        num_particles: samples of ``z`` per data point.
        beta: weight of the KL term (see :mod:`pyro_lvm.estimators`).
        beta_sites: latent sites that ``beta`` applies to (default: all).
        vectorize_particles: draw the particles in one vectorized pass.
        max_plate_nesting: as in Pyro; guessed by a dry run if ``None``.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model(x):
        ...     z = pyro.sample("z", dist.Normal(0., 1.))
        ...     pyro.sample("x", dist.Normal(z, 1.), obs=x)
        >>> def guide(x):
        ...     pyro.sample("z", dist.Normal(x / 2, 0.5 ** 0.5))  # the exact posterior
        >>> round(-ReparamELBO().loss(model, guide, torch.tensor(0.)), 4)  # = log N(0 | 0, 2)
        -1.2655
    """


class AnalyticKLELBO(BetaMixin, TraceMeanField_ELBO):
    r"""ELBO with the KL term in closed form (Pyro's :class:`~pyro.infer.TraceMeanField_ELBO`).

    .. math::

        \mathcal L = \mathbb E_{q}[\log p(x\mid z)] - \mathrm{KL}(q(z\mid x)\,\|\,p(z)),

    where the KL uses :func:`torch.distributions.kl_divergence` wherever a closed
    form is registered (falling back to a Monte-Carlo estimate elsewhere). It
    assumes the mean-field condition: every latent site's prior depends only
    on sites upstream in both model and guide; otherwise the result is biased.
    It removes the KL's Monte-Carlo noise, so it usually has lower variance than
    :class:`ReparamELBO`.

    Arguments: as :class:`ReparamELBO`.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0., 1.))
        >>> def guide():
        ...     pyro.sample("z", dist.Normal(1., 1.))
        >>> AnalyticKLELBO(beta=2.0).loss(model, guide)  # 2 * KL(N(1,1) || N(0,1)) = 1
        1.0
    """


class _ScoreFunctionOnly(TorchDistribution):
    """A view of a distribution that hides its ``rsample``.

    Estimators then use its score function ``grad log q(z)`` instead of pathwise
    derivatives. (Setting ``has_rsample_(False)`` on the instance does not survive
    the ``expand`` that ``pyro.plate`` applies, hence a wrapper.)
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, base_dist: TorchDistribution):
        self.base_dist = base_dist
        super().__init__(base_dist.batch_shape, base_dist.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base_dist.support

    def expand(self, batch_shape, _instance=None):
        return _ScoreFunctionOnly(self.base_dist.expand(batch_shape))

    def sample(self, sample_shape=torch.Size()):
        return self.base_dist.sample(sample_shape)

    def log_prob(self, value):
        return self.base_dist.log_prob(value)

    @property
    def mean(self):
        return self.base_dist.mean

    @property
    def variance(self):
        return self.base_dist.variance


class _ScoreFunctionGuide(Messenger):
    """Treat every latent site of a guide as non-reparameterizable, with a baseline."""

    def __init__(self, baseline: Optional[dict]):
        super().__init__()
        self.baseline = baseline

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"]:
            return
        if msg["fn"].has_rsample:
            msg["fn"] = _ScoreFunctionOnly(msg["fn"])
        if self.baseline is not None and "baseline" not in msg["infer"]:
            msg["infer"] = {**msg["infer"], "baseline": dict(self.baseline)}


class ScoreFunctionELBO(BetaMixin, TraceGraph_ELBO):
    r"""Score-function (REINFORCE, likelihood-ratio) gradient estimator.

    Every latent site of the guide is treated as non-reparameterizable, and

    .. math::

        \nabla_\phi \mathcal L = \mathbb E_{q_\phi}\big[
            (\log p(x, z) - \log q_\phi(z\mid x) - b)\,\nabla_\phi \log q_\phi(z\mid x)\big]

    is estimated by Pyro's :class:`~pyro.infer.TraceGraph_ELBO`, which
    Rao-Blackwellizes the cost (each site sees only its downstream terms, per
    data point inside plates). The baseline ``b`` does not bias the gradient,
    since :math:`\mathbb E_q[\nabla_\phi \log q_\phi] = 0`; a decaying average of
    the cost (Williams 1992) reduces its variance. This is the lecture's policy-gradient estimator, to
    compare with :class:`ReparamELBO` on the same model.

    .. warning:: Pyro's decaying-average baseline keeps one average per
        position in the mini-batch, so the batch size must stay constant
        (``drop_last=True``, as pyro_lvm's data modules do).

    Arguments:
        num_particles: samples of ``z`` per data point.
        beta: weight of the KL term.
        beta_sites: latent sites that ``beta`` applies to (default: all).
        baseline: ``"decaying_average"`` or ``"none"``; a guide site that sets
            its own ``infer={"baseline": ...}`` keeps it.
        baseline_beta: decay of the average, ``b <- baseline_beta b + (1 - baseline_beta) cost``.
        vectorize_particles, max_plate_nesting: as in Pyro.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0., 1.))
        >>> def guide():
        ...     loc = pyro.param("loc", torch.tensor(1.))
        ...     pyro.sample("z", dist.Normal(loc, 1.))
        >>> loss = ScoreFunctionELBO(num_particles=10).differentiable_loss(model, guide)
        >>> loss.requires_grad
        True
    """

    def __init__(
        self,
        num_particles: int = 1,
        beta: float = 1.0,
        beta_sites: Optional[Sequence[str]] = None,
        baseline: Literal["decaying_average", "none"] = "decaying_average",
        baseline_beta: float = 0.9,
        vectorize_particles: bool = False,
        max_plate_nesting: Optional[int] = None,
    ):
        super().__init__(
            num_particles, beta, beta_sites, vectorize_particles, max_plate_nesting
        )
        if baseline == "decaying_average":
            if not 0 <= baseline_beta < 1:
                raise ValueError(f"baseline_beta must be in [0, 1); got {baseline_beta}.")
            options = {"use_decaying_avg_baseline": True, "baseline_beta": baseline_beta}
        elif baseline == "none":
            options = None
        else:
            raise ValueError(
                f"Unknown baseline {baseline!r}; choose 'decaying_average' or 'none'."
            )
        self._score_function_guide = _ScoreFunctionGuide(options)

    def _get_trace(self, model, guide, args, kwargs):
        return super()._get_trace(model, self._score_function_guide(guide), args, kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """A loss whose value is ``-ELBO`` and whose gradient is the score-function estimate.

        :class:`~pyro.infer.TraceGraph_ELBO` only offers ``loss_and_grads``; this
        makes it usable as a plain torch loss (``ELBOModule``, Lightning, DDP).
        """
        elbo, surrogate_loss = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        return surrogate_loss + (-elbo - surrogate_loss).detach()


ESTIMATORS: dict[str, type[ELBO]] = {
    "reparam": ReparamELBO,
    "analytic_kl": AnalyticKLELBO,
    "score_function": ScoreFunctionELBO,
}


def make_elbo(name: str, **options) -> ELBO:
    """Build an estimator by name; ``options`` are its constructor arguments.

    Names: ``"reparam"`` (:class:`ReparamELBO`), ``"analytic_kl"``
    (:class:`AnalyticKLELBO`), ``"score_function"`` (:class:`ScoreFunctionELBO`).

    Example:
        >>> elbo = make_elbo("score_function", num_particles=4, beta=0.5)
        >>> type(elbo).__name__, elbo.num_particles, elbo.beta
        ('ScoreFunctionELBO', 4, 0.5)
    """
    try:
        cls = ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"Unknown estimator {name!r}; valid names: {', '.join(sorted(ESTIMATORS))}."
        ) from None
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"Estimator {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(valid)}."
        )
    return cls(**options)
