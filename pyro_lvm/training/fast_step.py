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
:math:`p(z) = \mathcal N(0, I)` and the likelihood has its own ``log_density`` (a
:class:`pyro_lvm.VAE` without flows or a :class:`pyro_lvm.ConvVAE`, Bernoulli or Gaussian), the terms are written out in closed
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

from ..estimators.iwae import DReGELBO, IWAEELBO, ScaleGrad
from ..estimators.particles import LogWeights
from ..estimators.score_function import ScoreFunctionELBO
from ..estimators.trace import AnalyticKLELBO, ReparamELBO
from ..likelihoods import Likelihood
from ..ops import log_mean_exp, normal_log_prob, standard_normal_kl, standard_normal_log_prob, surrogate_loss

__all__ = ["fast_path_blocker", "FastLoss"]


def fast_path_blocker(lvm: Any, guide: Callable, estimator: Any) -> Optional[str]:
    """Why :class:`FastLoss` cannot replace Pyro's loss for this pair, or ``None`` if it can.

    It asks the model (its ``fast_path_blocker()`` and ``standard_gaussian_latents()``, see
    :class:`pyro_lvm.models.base.LatentVariableModel`) and its likelihood (``log_density``); it tests no
    model class.

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
    ask = getattr(lvm, "fast_path_blocker", None)
    if not callable(ask):
        return "not a built-in model"
    reason = ask()
    if reason is not None:
        return reason
    if guide != lvm.guide:
        return "the guide is not the model's own"
    particles = type(estimator) in (IWAEELBO, DReGELBO)
    if type(estimator) is ScoreFunctionELBO or particles:
        if not _closed_form(lvm):
            return (f"{estimator._name} needs the encoder's diagonal Gaussian q(z | x) and a prior with a written-out "
                    "log-density (N(0, I), VampPrior, mixture) and a likelihood with its own log_density for its fast path")
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


def _closed_form(lvm: Any) -> bool:
    """``q`` the encoder's diagonal Gaussian, ``p(z)`` either N(0, I) or a prior with a written-out log-density
    (:meth:`~pyro_lvm.models.base.LatentVariableModel.written_out_prior`), and a likelihood with a written-out
    ``log_density``."""
    own = getattr(type(lvm.likelihood), "log_density", None)
    if own in (None, Likelihood.log_density):
        return False
    written_out = getattr(lvm, "written_out_prior", None)
    return bool(lvm.standard_gaussian_latents()) or (callable(written_out) and written_out() is not None)


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
        written_out = _closed_form(lvm)
        self.standard = bool(lvm.standard_gaussian_latents())
        #: whether the terms are written out without distribution objects, p(z) = N(0, I) (the held-out
        #: terms and the KL per dimension of the latent monitor then have closed forms too)
        self.closed_form = written_out and self.standard
        #: log p(z) of another written-out prior (a VampPrior, a mixture), or None
        self.log_prior = None if (self.standard or not written_out) else lvm.written_out_prior()
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
            lvm.check_batch(x)  # shape and support, as the model checks them (before validation is off)
            self.check_next = False
        elif x.shape[1:] != lvm.event_shape:
            lvm.check_batch(x)  # the message that names the expected shape
        beta = float(self.estimator.beta)
        if self.score_function:
            return self._score_function_loss(x, beta)
        if self.particles:
            return self._particle_loss(x, beta)
        if self.closed_form or (self.log_prior is not None and not self.analytic):
            return self._closed_form_loss(x, beta)
        with pyro.validation_enabled(False):
            q = lvm.posterior(x)
            if not q.has_rsample:
                raise ValueError(f"{type(lvm).__name__}'s q(z | x) has no rsample: no fast path.")
            z = q.rsample()
            log_lik = lvm.likelihood(lvm.decoder_output(z)).log_prob(x)
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
        the KL from :func:`pyro_lvm.ops.standard_normal_kl`; the likelihood's own ``log_density``
        (a Bernoulli's as one reduction of the binary cross-entropy).
        """
        lvm = self.lvm
        loc, scale = lvm.encode(x)
        eps = torch.empty(loc.shape, dtype=loc.dtype, device=loc.device).normal_()
        z = loc + eps * scale
        log_lik = lvm.likelihood.log_density(lvm.decoder_output(z), x, reduce=True)
        if beta == 0.0:
            return -log_lik
        if self.analytic:
            return beta * standard_normal_kl(loc, scale).sum() - log_lik
        return -(log_lik + beta * self._log_ratio(z, eps, scale).sum())

    def _log_ratio(self, z: torch.Tensor, eps: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(z) - \log q(z \mid x)` per draw at :math:`z = \mu + \sigma\epsilon` (per coordinate for N(0, I)).

        For :math:`\mathcal N(0, I)`, :math:`\sum -z^2/2 + \epsilon^2/2 + \log\sigma` per coordinate (the constants
        cancel); for another written-out prior, its :math:`\log p(z)` per draw minus
        :math:`\sum_d -\epsilon_d^2/2 - \log\sigma_d - \tfrac12\log 2\pi`.
        """
        if self.log_prior is None:
            return 0.5 * (eps * eps - z * z) + scale.log()
        log_q = (-0.5 * eps * eps - scale.log()).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)
        return self.log_prior(z) - log_q

    def held_out_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""The held-out ELBO's terms of a closed-form model at one draw, as Pyro's traces give them.

        With :math:`z = \mu + \sigma\epsilon` drawn as the guide draws it: ``reconstruction``
        :math:`\sum_i \log p(x_i \mid z_i)`, ``kl`` :math:`\sum_i \log q(z_i \mid x_i) - \log p(z_i)`
        (at the draw, as :func:`pyro_lvm.pairs.elbo_parts` counts it), and for the latent monitor the
        posterior means :math:`\mu` and the closed-form KL per latent variable,
        :func:`pyro_lvm.ops.standard_normal_kl`. The batch is checked as the model checks it.

        Example:
            >>> from pyro_lvm import VAE
            >>> from pyro_lvm.estimators import make_elbo
            >>> vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8])
            >>> x = torch.bernoulli(torch.full((5, 4), 0.5))
            >>> reconstruction, kl, loc, kl_per_dim = FastLoss(vae, make_elbo("reparam")).held_out_terms(x)
            >>> reconstruction.shape, kl.shape, loc.shape, kl_per_dim.shape
            (torch.Size([]), torch.Size([]), torch.Size([5, 2]), torch.Size([5, 2]))
        """
        lvm = self.lvm
        lvm.check_batch(x)
        loc, scale = lvm.encode(x)
        eps = torch.empty(loc.shape, dtype=loc.dtype, device=loc.device).normal_()
        z = loc + eps * scale
        reconstruction = lvm.likelihood.log_density(lvm.decoder_output(z), x, reduce=True)
        kl = (0.5 * (z * z - eps * eps) - scale.log()).sum()
        return reconstruction, kl, loc, standard_normal_kl(loc, scale)

    def _score_function_loss(self, x: torch.Tensor, beta: float) -> torch.Tensor:
        r""":class:`~pyro_lvm.estimators.ScoreFunctionELBO`'s surrogate, Rao-Blackwellized per data point.

        With :math:`z_i` drawn without a gradient and the per-point signal
        :math:`\ell_i = \log p(x_i \mid z_i) + \beta (\log p(z_i) - \log q(z_i \mid x_i))`,
        the loss is :math:`-\sum_i \ell_i` in value, with the gradient of
        :math:`-\sum_i [\ell_i + (\ell_i - b)\, \log q(z_i \mid x_i)]` (:math:`\ell_i` and
        :math:`b` held fixed in the second term): each point's score is weighed by its own
        signal only, since the model's structure says no other term depends on :math:`z_i`.
        The surrogate and its baseline :math:`b` are the estimator's own
        (:meth:`~pyro_lvm.estimators.ScoreFunctionELBO.surrogate`, the same running average, so
        checkpoints and a switch to Pyro's path continue it).
        """
        lvm = self.lvm
        loc, scale = lvm.encode(x)
        with torch.no_grad():
            z = torch.empty(loc.shape, dtype=loc.dtype, device=loc.device).normal_() * scale + loc
        dims = tuple(range(1, loc.dim()))
        log_q = normal_log_prob(z, loc, scale).sum(dims)
        log_prior = standard_normal_log_prob(z).sum(dims) if self.log_prior is None else self.log_prior(z)
        log_lik = lvm.likelihood.log_density(lvm.decoder_output(z), x)
        signal = log_lik.reshape(len(x), -1).sum(-1) + beta * (log_prior - log_q)
        zero = signal.new_zeros((1, 1))
        weights = LogWeights(signal[None], zero, log_q[None], zero, False, 1.0, -2, (-1,))
        return surrogate_loss(*self.estimator.surrogate(weights))

    def _particle_loss(self, x: torch.Tensor, beta: float) -> torch.Tensor:
        r"""The IWAE bound's loss for :math:`K` particles (DReG's gradient for ``"dreg"``), summed over the batch.

        The particles are drawn as Pyro's vectorized particle plate draws them: one
        :math:`\epsilon` of shape ``(K, *loc.shape)``. The latent terms are written as in
        :meth:`_closed_form_loss`; DReG evaluates :math:`\log q` at stopped
        :math:`\mu, \sigma` (the path through :math:`z` only) and scales the gradient reaching
        :math:`z_k` by :math:`\tilde w_k` (:class:`~pyro_lvm.estimators.iwae.ScaleGrad`, as
        :class:`~pyro_lvm.estimators.DReGELBO` does).
        """
        lvm, k = self.lvm, self.estimator.num_particles
        loc, scale = lvm.encode(x)
        eps = torch.empty((k,) + loc.shape, dtype=loc.dtype, device=loc.device).normal_()
        z = loc + eps * scale
        dims = tuple(range(2, z.dim()))
        holder: dict = {}
        if self.dreg:
            z = ScaleGrad.apply(z, holder)
            loc_stopped, scale_stopped = loc.detach(), scale.detach()
            u = (z - loc_stopped) / scale_stopped
            log_ratio = self._log_ratio(z, u, scale_stopped)
        else:
            log_ratio = self._log_ratio(z, eps, scale)
        if self.log_prior is None:
            log_ratio = log_ratio.sum(dims)
        log_lik = lvm.likelihood.log_density(lvm.decoder_output(z), x)
        log_w = log_lik.reshape(k, len(x), -1).sum(-1) + beta * log_ratio
        bound = log_mean_exp(log_w, 0, keepdim=False).sum()
        if self.dreg and bound.requires_grad:
            holder["weight"] = torch.softmax(log_w.detach(), 0).reshape(log_w.shape + (1,) * len(dims))
        return -bound
