r"""The training loss of a built-in model computed without Pyro's tracing: the same numbers, faster.

A Pyro training step runs the guide and the model under effect handlers, which record
every sample site in a trace, broadcast it over its plates, scale and mask its
log-density, and validate every distribution's arguments; the ELBO is then assembled
from the traces. For the built-in models (:class:`pyro_lvm.models.base.LatentVariableModel`
whose ``model`` and ``guide`` are the base class's own) the structure is known in advance,

.. math::

    z \sim q_\phi(z \mid x) \ \text{(guide)}, \qquad
    \log p_\theta(x, z) = \log p(z) + \log p_\theta(x \mid z) \ \text{(model, replayed at } z),

so :class:`FastLoss` computes the estimator's loss directly from the model's own
distributions (:meth:`~pyro_lvm.models.base.LatentVariableModel.posterior`,
:meth:`~pyro_lvm.models.base.LatentVariableModel.prior`, the likelihood):

* ``"reparam"`` (Pyro's :class:`~pyro.infer.Trace_ELBO`):
  :math:`-\big[\log p_\theta(x \mid z) + \beta\,(\log p(z) - \log q_\phi(z \mid x))\big]`
  at one reparameterized draw :math:`z = \mu + \sigma \epsilon`;
* ``"analytic_kl"`` (Pyro's :class:`~pyro.infer.TraceMeanField_ELBO`):
  :math:`-\big[\log p_\theta(x \mid z) - \beta\,\mathrm{KL}(q_\phi(z \mid x) \,\|\, p(z))\big]`;
* ``"score_function"`` (:class:`~pyro_lvm.estimators.ScoreFunctionELBO`, its decaying-average
  or no baseline; Gaussian :math:`q` and :math:`p(z)` only): the REINFORCE surrogate
  Rao-Blackwellized per data point, without the trace bookkeeping: with :math:`z_i` drawn
  without a gradient and the signal :math:`\ell_i = \log p_\theta(x_i \mid z_i) + \beta(\log p(z_i) - \log q_\phi(z_i \mid x_i))`,
  the value :math:`-\sum_i \ell_i` with the gradient of
  :math:`-\sum_i [\ell_i + (\ell_i - b) \log q_\phi(z_i \mid x_i)]` (the estimator's running-average baseline :math:`b`);
* ``"iwae"`` (:class:`~pyro_lvm.estimators.IWAEELBO`) and ``"dreg"``
  (:class:`~pyro_lvm.estimators.DReGELBO`; Gaussian :math:`q` and :math:`p(z)` only): with
  :math:`K` draws :math:`z_k = \mu + \sigma \epsilon_k` and
  :math:`\log w_k = \log p_\theta(x \mid z_k) + \beta(\log p(z_k) - \log q_\phi(z_k \mid x))`,
  the loss :math:`-\big[\log \sum_k w_k - \log K\big]`; for DReG, :math:`\log q` is
  differentiated through :math:`z_k` only and the gradient reaching each :math:`z_k` is
  scaled by its normalized weight :math:`\tilde w_k`, which gives the guide's gradient
  :math:`\sum_k \tilde w_k^2\, \partial \log w_k / \partial z_k \cdot \partial z_k / \partial \phi`,

summed over the batch. Where :math:`q` is the encoder's diagonal Gaussian,
:math:`p(z) = \mathcal N(0, I)` and the likelihood a Bernoulli or Gaussian (a plain
:class:`pyro_lvm.VAE` or :class:`pyro_lvm.ConvVAE`), the terms are written out in closed
form without distribution objects (the per-step overhead that dominates small models);
otherwise the model's distributions are used. The draws are those the guide's
``rsample`` makes, in the same order, so for the same seed the loss and its gradients equal Pyro's to float32
rounding (tested against :class:`~pyro.infer.Trace_ELBO` and
:class:`~pyro.infer.TraceMeanField_ELBO`). Validation changes from every step to once:
:class:`pyro_lvm.LVMModule` runs its first step through Pyro (all of Pyro's checks and
the estimator's :meth:`~pyro_lvm.estimators.base.BetaMixin.check`); afterwards the
distributions' argument checks are off, the data's shape is checked on every batch, and
their values (NaNs, a Bernoulli likelihood's binary values) on the first batch of every
epoch and every 50th batch (:attr:`FastLoss.check_every`).

Anything else (other estimators, several particles for the single-sample estimators, ``kl_control``, the NVIL baseline,
a replaced guide, a model with its own ``model``/``guide``, extra model arguments such as
``num_data``, a latent without ``rsample``) runs through Pyro as before; :func:`fast_path_blocker` names the reason.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import pyro
import torch
from pyro.distributions.kl import kl_divergence
from torch.nn.functional import binary_cross_entropy_with_logits

from .iwae import DReGELBO, IWAEELBO, _ScaleGrad
from .score_function import ScoreFunctionELBO
from .trace import AnalyticKLELBO, ReparamELBO

__all__ = ["FastLoss", "fast_path_blocker"]


def fast_path_blocker(lvm: Any, guide: Callable, estimator: Any) -> Optional[str]:
    """Why :class:`FastLoss` cannot replace Pyro's loss for this pair, or ``None`` if it can.

    Arguments:
        lvm: the module behind the pair (``None`` for a user's own callables).
        guide: the guide the pair trains with.
        estimator: the ELBO estimator.

    Example:
        >>> from pyro_lvm import VAE
        >>> from pyro_lvm.estimators import make_elbo
        >>> vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8])
        >>> fast_path_blocker(vae, vae.guide, make_elbo("analytic_kl")) is None
        True
        >>> fast_path_blocker(vae, vae.guide, make_elbo("iwae", num_particles=5)) is None
        True
        >>> fast_path_blocker(vae, vae.guide, make_elbo("vimco", num_particles=5))
        'estimator VIMCOELBO (only reparam, analytic_kl, score_function, iwae and dreg have a fast path)'
    """
    from ..models.base import LatentVariableModel
    from ..models.vae import VAE

    if not isinstance(lvm, LatentVariableModel):
        return "not a built-in model"
    cls = type(lvm)
    # the base class's pair, or the VAE's (which only registers its flows with pyro.module)
    if cls.model not in (LatentVariableModel.model, VAE.model) or cls.guide not in (
        LatentVariableModel.guide, VAE.guide
    ):
        return f"{cls.__name__} has a model/guide of its own"
    if guide != lvm.guide:
        return "the guide is not the model's own"
    particles = type(estimator) in (IWAEELBO, DReGELBO)
    if type(estimator) is ScoreFunctionELBO or particles:
        if _closed_form_family(lvm) is None:
            return f"{estimator._name} needs a Gaussian q(z | x) and p(z) = N(0, I) for its fast path (no flows)"
        if getattr(estimator, "baseline", None) == "nvil":
            return "the NVIL baseline"
    elif type(estimator) not in (ReparamELBO, AnalyticKLELBO):
        return (f"estimator {type(estimator).__name__} (only reparam, analytic_kl, score_function, iwae and dreg "
                "have a fast path)")
    if estimator.num_particles != 1 and not particles:
        return f"num_particles={estimator.num_particles}"
    if getattr(estimator, "kl_control", None) is not None:
        return "kl_control"
    if estimator.beta_sites is not None and estimator.beta_sites != frozenset({"z"}):
        return f"beta_sites={sorted(estimator.beta_sites)}"
    return None


class FastLoss:
    r"""``-ELBO_beta`` summed over a batch, for a pair that :func:`fast_path_blocker` accepts.

    See the module's description for the formulas and the exactness guarantee.

    Arguments:
        lvm: the built-in model.
        estimator: its :class:`~pyro_lvm.estimators.ReparamELBO` or
            :class:`~pyro_lvm.estimators.AnalyticKLELBO`; its ``beta`` is read at every call.

    Example:
        >>> from pyro_lvm import VAE
        >>> from pyro_lvm.estimators import make_elbo
        >>> vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8])
        >>> x = torch.bernoulli(torch.full((8, 4), 0.5))
        >>> elbo = make_elbo("analytic_kl")
        >>> _ = elbo.differentiable_loss(vae.model, vae.guide, x)  # Pyro's first call checks the pair
        >>> _ = torch.manual_seed(0)
        >>> slow = elbo.differentiable_loss(vae.model, vae.guide, x)
        >>> _ = torch.manual_seed(0)
        >>> fast = FastLoss(vae, elbo)(x)
        >>> bool(torch.allclose(fast, slow))
        True
    """

    def __init__(self, lvm: Any, estimator: Any):
        reason = fast_path_blocker(lvm, lvm.guide, estimator)
        if reason is not None:
            raise ValueError(f"No fast path for this pair: {reason}. Train it through Pyro (LVMModule(fast_step=False)).")
        self.lvm = lvm
        self.estimator = estimator
        self.analytic = isinstance(estimator, AnalyticKLELBO)
        self.score_function = isinstance(estimator, ScoreFunctionELBO)
        self.particles = isinstance(estimator, IWAEELBO)  # IWAE, or DReG (its subclass)
        self.dreg = isinstance(estimator, DReGELBO)
        self.closed_form = _closed_form_family(lvm)
        self.check_next = True
        self._calls = 0

    #: the data's values (NaNs, a Bernoulli likelihood's binary values) are checked on the first
    #: call, every ``check_every`` calls, and whenever ``check_next`` is set (by LVMModule at each
    #: epoch's start); their shape on every call. (A full check costs about 3% of a
    #: 1024 x 784 step on a CPU.)
    check_every: int = 50

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lvm = self.lvm
        self._calls += 1
        if self.check_next or self._calls % self.check_every == 1:
            lvm._check(x)  # shape and support, as the model checks them (before validation is off)
            self.check_next = False
        elif x.shape[1:] != lvm.event_shape:
            lvm._check(x)  # the message that names the expected shape
        beta = float(self.estimator.beta)
        if self.score_function:
            return self._score_function_loss(x, beta)
        if self.particles:
            return self._particle_loss(x, beta)
        if self.closed_form is not None:
            return self._closed_form_loss(x, beta)
        with pyro.validation_enabled(False):
            q = lvm.posterior(x)
            if not q.has_rsample:
                raise ValueError(f"{type(lvm).__name__}'s q(z | x) has no rsample: no fast path.")
            z = q.rsample()
            log_lik = lvm.likelihood(lvm._decoder_output(z)).log_prob(x)
            prior = lvm.prior(q.batch_shape)
            if beta == 0.0:
                latent = 0.0
            elif self.analytic:
                latent = -beta * kl_divergence(q, prior).sum()
            else:
                latent = beta * (prior.log_prob(z).sum() - q.log_prob(z).sum())
        return -(log_lik.sum() + latent)

    def _closed_form_loss(self, x: torch.Tensor, beta: float) -> torch.Tensor:
        r"""The same loss without distribution objects: :math:`q = \mathcal N(\mu, \sigma^2)`, :math:`p(z) = \mathcal N(0, I)`.

        :math:`z = \mu + \sigma \epsilon` with :math:`\epsilon` drawn as ``Normal.rsample``
        draws it; :math:`\log p(z) - \log q(z) = \sum -z^2/2 + \epsilon^2/2 + \log \sigma`
        (the same function of the parameters and :math:`\epsilon`, so the same gradients);
        :math:`\mathrm{KL} = \sum \tfrac12(\mu^2 + \sigma^2 - 1) - \log \sigma`; the
        Bernoulli log-likelihood as one reduction of the binary cross-entropy.
        """
        lvm = self.lvm
        loc, scale = lvm.encode(x)
        eps = torch.empty(loc.shape, dtype=loc.dtype, device=loc.device).normal_()
        z = loc + eps * scale
        h = lvm._decoder_output(z).reshape(x.shape)
        if self.closed_form == "bernoulli":
            log_lik = -binary_cross_entropy_with_logits(h, x, reduction="sum")
        else:
            sigma = lvm.likelihood.scale
            log_lik = -(0.5 * ((x - h) / sigma) ** 2 + sigma.log() + _HALF_LOG_2PI).sum()
        if beta == 0.0:
            return -log_lik
        if self.analytic:
            kl = 0.5 * (loc * loc + scale * scale - 1.0) - scale.log()
            return beta * kl.sum() - log_lik
        log_ratio = 0.5 * (eps * eps - z * z) + scale.log()
        return -(log_lik + beta * log_ratio.sum())


    def _score_function_loss(self, x: torch.Tensor, beta: float) -> torch.Tensor:
        r""":class:`~pyro_lvm.estimators.ScoreFunctionELBO`'s surrogate, Rao-Blackwellized per data point.

        With :math:`z_i` drawn without a gradient and the per-point signal
        :math:`\ell_i = \log p(x_i \mid z_i) + \beta (\log p(z_i) - \log q(z_i \mid x_i))`,
        the loss is :math:`-\sum_i \ell_i` in value, with the gradient of
        :math:`-\sum_i [\ell_i + (\ell_i - b)\, \log q(z_i \mid x_i)]` (:math:`\ell_i` and
        :math:`b` held fixed in the second term): each point's score is weighed by its own
        signal only, since the model's structure says no other term depends on :math:`z_i`.
        The baseline :math:`b` is the estimator's own running average (the same state, so
        checkpoints and a switch to Pyro's path continue it).
        """
        lvm, estimator = self.lvm, self.estimator
        loc, scale = lvm.encode(x)
        with torch.no_grad():
            z = torch.empty(loc.shape, dtype=loc.dtype, device=loc.device).normal_() * scale + loc
        dims = tuple(range(1, loc.dim()))
        log_q = (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - _HALF_LOG_2PI).sum(dims)
        log_prior = (-0.5 * z * z - _HALF_LOG_2PI).sum(dims)
        h = lvm._decoder_output(z).reshape(x.shape)
        if self.closed_form == "bernoulli":
            log_lik = -binary_cross_entropy_with_logits(h, x, reduction="none")
        else:
            sigma = lvm.likelihood.scale
            log_lik = -(0.5 * ((x - h) / sigma) ** 2 + sigma.log() + _HALF_LOG_2PI)
        signal = log_lik.reshape(len(x), -1).sum(-1) + beta * (log_prior - log_q)
        bound = signal.sum()
        local = signal.detach()
        baseline = local.new_zeros(()) if estimator.baseline == "none" else estimator._average("local", local.mean())
        surrogate = bound + ((local - baseline) * log_q).sum()
        return -surrogate + (surrogate - bound).detach()


    def _particle_loss(self, x: torch.Tensor, beta: float) -> torch.Tensor:
        r"""The IWAE bound's loss for :math:`K` particles (DReG's gradient for ``"dreg"``), summed over the batch.

        The particles are drawn as Pyro's vectorized particle plate draws them: one
        :math:`\epsilon` of shape ``(K, *loc.shape)``. The latent terms are written as in
        :meth:`_closed_form_loss`; DReG evaluates :math:`\log q` at stopped
        :math:`\mu, \sigma` (the path through :math:`z` only) and scales the gradient reaching
        :math:`z_k` by :math:`\tilde w_k` (:class:`~pyro_lvm.estimators.iwae._ScaleGrad`, as
        :class:`~pyro_lvm.estimators.DReGELBO` does).
        """
        lvm, k = self.lvm, self.estimator.num_particles
        loc, scale = lvm.encode(x)
        eps = torch.empty((k,) + loc.shape, dtype=loc.dtype, device=loc.device).normal_()
        z = loc + eps * scale
        dims = tuple(range(2, z.dim()))
        holder: dict = {}
        if self.dreg:
            z = _ScaleGrad.apply(z, holder)
            loc_stopped, scale_stopped = loc.detach(), scale.detach()
            u = (z - loc_stopped) / scale_stopped
            log_ratio = (0.5 * (u * u - z * z) + scale_stopped.log()).sum(dims)
        else:
            log_ratio = (0.5 * (eps * eps - z * z) + scale.log()).sum(dims)
        h = lvm._decoder_output(z).reshape((k,) + x.shape)
        target = x.expand_as(h)
        if self.closed_form == "bernoulli":
            log_lik = -binary_cross_entropy_with_logits(h, target, reduction="none")
        else:
            sigma = lvm.likelihood.scale
            log_lik = -(0.5 * ((target - h) / sigma) ** 2 + sigma.log() + _HALF_LOG_2PI)
        log_w = log_lik.reshape(k, len(x), -1).sum(-1) + beta * log_ratio
        bound = (torch.logsumexp(log_w, 0) - math.log(k)).sum()
        if self.dreg and bound.requires_grad:
            holder["weight"] = torch.softmax(log_w.detach(), 0).reshape(log_w.shape + (1,) * len(dims))
        return -bound


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _closed_form_family(lvm: Any) -> Optional[str]:
    """``"bernoulli"``/``"gaussian"`` where q is the encoder's diagonal Gaussian, p(z) = N(0, I) and
    the likelihood a built-in Bernoulli or Gaussian; ``None`` otherwise (flows, other likelihoods)."""
    from ..likelihoods import BernoulliLikelihood, GaussianLikelihood
    from ..models.base import LatentVariableModel
    from ..models.vae import VAE

    cls = type(lvm)
    if getattr(lvm, "prior_flow", None) is not None or getattr(lvm, "posterior_flow", None) is not None:
        return None
    if cls.prior not in (LatentVariableModel.prior, VAE.prior):
        return None
    if cls.posterior not in (LatentVariableModel.posterior, VAE.posterior):
        return None
    return {BernoulliLikelihood: "bernoulli", GaussianLikelihood: "gaussian"}.get(type(lvm.likelihood))
