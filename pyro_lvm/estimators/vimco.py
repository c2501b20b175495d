"""VIMCO: the multi-sample score-function estimator of the importance-weighted bound."""

from __future__ import annotations

import torch

from ..ops import log_mean_exp, sum_except
from .base import guide_covers_model
from .particles import ParticleELBO
from .score_function import ScoreFunctionGuide, refuse_point_estimates

__all__ = ["VIMCOELBO"]


class VIMCOELBO(ParticleELBO):
    r"""Variational inference for Monte Carlo objectives (Mnih & Rezende 2016).

    The bound is IWAE's, :math:`\hat{\mathcal L} = \log \frac1K \sum_k w_k`; the
    latents need not be reparameterizable (discrete latents are the point). The
    gradient is the score function with a per-particle *leave-one-out* baseline:

    .. math::

        \nabla \hat{\mathcal L} \approx \sum_k \big(\hat{\mathcal L} - \hat{\mathcal L}_{-k}\big)
            \nabla \log q(z_k \mid x) + \sum_k \tilde w_k \nabla \log w_k,

    where :math:`\hat{\mathcal L}_{-k}` replaces :math:`w_k` by the geometric mean of
    the other weights. The baseline of particle :math:`k` does not depend on
    :math:`z_k`, so the estimator stays unbiased, and the learning signal of each
    particle is how much it contributes to the bound. Every guide latent is
    treated by its score function (reparameterizable ones too). Needs
    ``num_particles >= 2``.

    References:
        Variational inference for Monte Carlo objectives (Mnih & Rezende, 2016),
        https://arxiv.org/abs/1602.06725

    Arguments: as :class:`~pyro_lvm.estimators.IWAEELBO`.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> pyro.clear_param_store()
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         c = pyro.sample("c", dist.Bernoulli(0.5))
        ...         pyro.sample("x", dist.Normal(2 * c - 1, 1.), obs=x)
        >>> def guide(x):
        ...     p = pyro.param("p", torch.full((len(x),), 0.5), constraint=dist.constraints.unit_interval)
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("c", dist.Bernoulli(p))
        >>> VIMCOELBO(num_particles=5).differentiable_loss(model, guide, torch.tensor([-1., 1.])).backward()
        >>> pyro.param("p").unconstrained().grad.shape
        torch.Size([2])
    """

    _name = "vimco"
    min_particles = 2

    def _check_traces(self, model_trace, guide_trace, args, kwargs) -> None:
        guide_covers_model(self._name, model_trace, guide_trace)
        refuse_point_estimates(self._name, guide_trace)

    def _wrap_guide(self, guide):
        return ScoreFunctionGuide()(guide)

    def _surrogate(self, model, guide, args, kwargs):
        weights = self.particle_weights(model, guide, *args, **kwargs)
        log_w = weights.joint()
        pd = weights.particle_dim
        bound_i = log_mean_exp(log_w, pd)
        bound = weights.total(bound_i)
        if not torch.is_grad_enabled():
            return bound, bound
        k = log_w.shape[0]  # the particle dim is the first of log_w's dims
        detached = log_w.detach()
        # leave-one-out: particle j's log weight replaced by the mean of the others' (geometric mean)
        others = (detached.sum(0, keepdim=True) - detached) / (k - 1)
        eye = torch.eye(k, dtype=torch.bool, device=log_w.device)
        eye = eye.reshape((k, k) + (1,) * (log_w.dim() - 1))
        replaced = torch.where(eye, others.unsqueeze(1), detached.unsqueeze(0))  # [j, k, ...]
        loo = log_mean_exp(replaced, 1, keepdim=False)
        signal = bound_i.detach() - loo
        log_q = weights.local_q if weights.factorizes else (
            weights.other_q
            + sum_except(weights.local_q, pd)
        )
        score = weights.total((signal * log_q).sum(pd, keepdim=True))
        return bound, bound + score
