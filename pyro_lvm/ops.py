r"""Small shared maths, written once: the bottom layer that every other part of pyro_lvm calls.

Nothing here imports the rest of the package; each function is a few lines of torch.

* :func:`log_mean_exp`: :math:`\log \frac1K \sum_k e^{v_k}`, the importance-sampled bound's core;
* :func:`effective_sample_size` (or :func:`effective_sample_size_from_log_sums`, for streamed
  weights) and :func:`importance_stderr`: how many of :math:`K` importance weights count, and the
  Monte-Carlo standard error of :math:`\log \hat p(x)` they give;
* :func:`normal_log_prob`, :func:`standard_normal_log_prob` and :func:`standard_normal_kl`: the
  diagonal Gaussian's log-density and its KL from :math:`\mathcal N(0, I)`, per coordinate;
* :func:`surrogate_loss`: a loss with the value of one expression and the gradient of another
  (the score-function estimators' surrogate);
* :func:`sum_except`: a sum over every dimension but one;
* :func:`minimize_cosine`: Adam at a cosine-decaying rate on a few tensors (the refinement of a
  per-input Gaussian, in :mod:`pyro_lvm.guides` and :func:`pyro_lvm.diagnostics.amortization_gap`).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

__all__ = [
    "HALF_LOG_2PI",
    "log_mean_exp",
    "effective_sample_size",
    "effective_sample_size_from_log_sums",
    "importance_stderr",
    "normal_log_prob",
    "standard_normal_log_prob",
    "standard_normal_kl",
    "surrogate_loss",
    "sum_except",
    "minimize_cosine",
]

#: :math:`\tfrac12 \log 2\pi`
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def log_mean_exp(value: torch.Tensor, dim: int, keepdim: bool = True) -> torch.Tensor:
    r""":math:`\log \frac1K \sum_k \exp(v_k)` along ``dim`` (of size :math:`K`), computed stably.

    Example:
        >>> log_mean_exp(torch.log(torch.tensor([1.0, 3.0])), 0, keepdim=False)
        tensor(0.6931)
    """
    return torch.logsumexp(value, dim, keepdim=keepdim) - math.log(value.shape[dim])


def effective_sample_size(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    r"""Kish's effective sample size :math:`(\sum_k w_k)^2 / \sum_k w_k^2` of importance weights given as logs.

    :math:`K` for equal weights, 1 when one weight dominates.

    Example:
        >>> effective_sample_size(torch.zeros(4))
        tensor(4.)
        >>> effective_sample_size(torch.tensor([0.0, -1e4]))
        tensor(1.)
    """
    return effective_sample_size_from_log_sums(torch.logsumexp(log_weights, dim), torch.logsumexp(2 * log_weights, dim))


def effective_sample_size_from_log_sums(log_sum: torch.Tensor, log_sum_squares: torch.Tensor) -> torch.Tensor:
    r"""Kish's effective sample size from :math:`\log \sum_k w_k` and :math:`\log \sum_k w_k^2`.

    .. math::

        \mathrm{ESS} = \frac{(\sum_k w_k)^2}{\sum_k w_k^2}
            = \exp\big(2 \log \textstyle\sum_k w_k - \log \sum_k w_k^2\big),

    for weights streamed in chunks (running log-sum-exps of :math:`\log w` and :math:`2 \log w`);
    :func:`effective_sample_size` is this of the two sums.

    Example:
        >>> log_w = torch.tensor([0.0, 0.0, -1e4])
        >>> effective_sample_size_from_log_sums(torch.logsumexp(log_w, 0), torch.logsumexp(2 * log_w, 0))
        tensor(2.)
    """
    return torch.exp(2 * log_sum - log_sum_squares)


def importance_stderr(ess: torch.Tensor, num_samples: int) -> torch.Tensor:
    r"""The Monte-Carlo standard error of :math:`\log \frac1K \sum_k w_k`, by the delta method.

    .. math::

        \operatorname{se} \approx \sqrt{\frac{\operatorname{Var}[w]}{K\,\bar w^2}}
            = \sqrt{\frac{1}{\mathrm{ESS}} - \frac{1}{K}}

    with :math:`\mathrm{ESS}` from :func:`effective_sample_size` and :math:`K` = ``num_samples``
    (zero for equal weights).

    Example:
        >>> importance_stderr(torch.tensor([4.0, 1.0]), 4)
        tensor([0.0000, 0.8660])
    """
    return (1.0 / ess - 1.0 / num_samples).clamp(min=0.0).sqrt()


def normal_log_prob(value: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    r""":math:`\log \mathcal N(v; \mu, \sigma^2) = -\tfrac12 ((v - \mu)/\sigma)^2 - \log\sigma - \tfrac12\log 2\pi`, per coordinate.

    Example:
        >>> v, m, s = torch.tensor([0.3]), torch.tensor([1.0]), torch.tensor([2.0])
        >>> bool(torch.allclose(normal_log_prob(v, m, s), torch.distributions.Normal(m, s).log_prob(v)))
        True
    """
    return -0.5 * ((value - loc) / scale) ** 2 - scale.log() - HALF_LOG_2PI


def standard_normal_log_prob(value: torch.Tensor) -> torch.Tensor:
    r""":math:`\log \mathcal N(v; 0, 1) = -\tfrac12 v^2 - \tfrac12\log 2\pi`, per coordinate.

    Example:
        >>> standard_normal_log_prob(torch.tensor([0.0]))
        tensor([-0.9189])
    """
    return -0.5 * value * value - HALF_LOG_2PI


def standard_normal_kl(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    r""":math:`\mathrm{KL}(\mathcal N(\mu, \sigma^2) \,\|\, \mathcal N(0, 1)) = \tfrac12(\mu^2 + \sigma^2 - 1) - \log\sigma`, per coordinate.

    Example:
        >>> standard_normal_kl(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]))
        tensor([0., 2.])
    """
    return 0.5 * (loc * loc + scale * scale - 1.0) - scale.log()


def surrogate_loss(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    r"""``-value`` in value, with the gradient of ``-surrogate``.

    A score-function estimator's objective is a bound :math:`\mathcal L` whose gradient is not
    :math:`\nabla \mathcal L` of the sampled expression but that of a surrogate (the bound plus
    :math:`(\ell - b)\log q`); the loss reports :math:`-\mathcal L` and differentiates the surrogate.

    Example:
        >>> theta = torch.tensor(2.0, requires_grad=True)
        >>> loss = surrogate_loss(torch.tensor(5.0), 3 * theta)
        >>> loss.backward()
        >>> float(loss.detach()), float(theta.grad)
        (-5.0, -3.0)
    """
    return -surrogate + (surrogate - value).detach()


def sum_except(value: torch.Tensor, keep: int) -> torch.Tensor:
    """The sum of ``value`` over every dimension but ``keep`` (a negative index), keeping them as size 1.

    Example:
        >>> sum_except(torch.ones(2, 3, 4), -2).shape
        torch.Size([1, 3, 1])
    """
    dims = [d for d in range(-value.dim(), 0) if d != keep]
    return value.sum(dims, keepdim=True) if dims else value


def minimize_cosine(
    leaves: list[torch.Tensor],
    loss: Callable[[], torch.Tensor],
    num_steps: int,
    lr: float,
    before_step: Optional[Callable[[int], None]] = None,
) -> None:
    r"""Minimize ``loss()`` over the tensors ``leaves`` by ``num_steps`` Adam steps at a cosine-decaying rate.

    The rate at step :math:`t` is :math:`\eta_t = \eta\,\tfrac12\big(1 + \cos(\pi t / T)\big)`: with a
    stochastic loss the last iterate settles only as the rate decays, since Adam's steps do not shrink
    with the gradient's noise. Gradients are taken by :func:`torch.autograd.grad` with respect to
    ``leaves`` alone (nothing accumulates in other tensors' ``.grad``), with autograd on even under
    ``torch.no_grad``. ``before_step(t)`` runs before each step and once after the last (``t = T``).

    Example:
        >>> w = torch.zeros(2, requires_grad=True)
        >>> minimize_cosine([w], lambda: ((w - torch.tensor([1.0, -2.0])) ** 2).sum(), num_steps=300, lr=0.1)
        >>> torch.allclose(w, torch.tensor([1.0, -2.0]), atol=1e-2)
        True
    """
    optimizer = torch.optim.Adam(leaves, lr=lr)
    for step in range(num_steps):
        if before_step is not None:
            before_step(step)
        optimizer.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / num_steps))
        with torch.enable_grad():
            grads = torch.autograd.grad(loss(), leaves)
        for leaf, grad in zip(leaves, grads):
            leaf.grad = grad
        optimizer.step()
    if before_step is not None:
        before_step(num_steps)
