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
  :math:`-\big[\log p_\theta(x \mid z) - \beta\,\mathrm{KL}(q_\phi(z \mid x) \,\|\, p(z))\big]`,

summed over the batch. The draws are the guide's own ``rsample`` calls in the same
order, so for the same seed the loss and its gradients equal Pyro's to float32
rounding (tested against :class:`~pyro.infer.Trace_ELBO` and
:class:`~pyro.infer.TraceMeanField_ELBO`). Validation changes from every step to once:
:class:`pyro_lvm.LVMModule` runs its first step through Pyro (all of Pyro's checks and
the estimator's :meth:`~pyro_lvm.estimators.base.BetaMixin.check`), and afterwards the
data's check (shape, NaNs, a Bernoulli likelihood's binary values) on every batch but
the distributions' argument checks off.

Anything else (several particles, ``kl_control``, a replaced guide, a model with its
own ``model``/``guide``, extra model arguments such as ``num_data``, a latent without
``rsample``) runs through Pyro as before; :func:`fast_path_blocker` names the reason.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pyro
import torch
from pyro.distributions.kl import kl_divergence

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
        >>> fast_path_blocker(vae, vae.guide, make_elbo("iwae", num_particles=5))
        'estimator IWAEELBO (only reparam and analytic_kl have a fast path)'
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
    if type(estimator) not in (ReparamELBO, AnalyticKLELBO):
        return f"estimator {type(estimator).__name__} (only reparam and analytic_kl have a fast path)"
    if estimator.num_particles != 1:
        return f"num_particles={estimator.num_particles}"
    if estimator.kl_control is not None:
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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lvm = self.lvm
        lvm._check(x)  # the data's shape and support, as the model checks them (not under validation off)
        beta = float(self.estimator.beta)
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
