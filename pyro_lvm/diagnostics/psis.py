r"""Pareto-smoothed importance sampling: the :math:`\hat k` of a guide's importance weights, per input."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from .importance import importance_draws, resolve_with_data

__all__ = ["psislw", "rounding_tolerance", "psis_khat"]

def psislw(log_weights: np.ndarray, rtol: float = 1e-9) -> tuple[np.ndarray, np.ndarray]:
    """Pareto-smoothed log weights and k-hat, draws on the last axis, on ArviZ 0.x and 1.x.

    ArviZ 0.x has ``arviz.psislw(log_weights, reff)``; ArviZ 1.x moved PSIS to
    ``arviz_stats``, whose array function takes a *log-likelihood* and smooths its
    negation (the leave-one-out weights), so the log weights are negated on the way in.
    Rows of equal weights (a guide equal to the posterior) have no tail to fit: their
    k-hat is ``-inf`` (bounded weights) and their smoothed weights the normalized input.

    Arguments:
        log_weights: array ``(..., S)`` of log importance weights (unnormalized).
        rtol: a row counts as equal weights when its range is at most ``rtol`` times
            ``1 + max |log w|``: the rounding of the precision the weights were computed in
            (float32 log weights of an exact guide differ by rounding alone).

    Example:
        >>> lw, khat = psislw(np.zeros((2, 100)))  # equal weights
        >>> lw.shape, khat.shape
        ((2, 100), (2,))
    """
    import arviz as az

    log_weights = np.asarray(log_weights, dtype=np.float64)
    # equal weights (q is the exact posterior) leave no tail to fit: bounded weights, k = -inf
    flat = np.ptp(log_weights, axis=-1) <= rtol * (1.0 + np.abs(log_weights).max(axis=-1))
    smoothed = log_weights - np.logaddexp.reduce(log_weights, axis=-1, keepdims=True)
    khat = np.full(log_weights.shape[:-1], -np.inf)
    rows = ~flat
    if rows.any():
        major = int(az.__version__.split(".")[0])
        if major < 1:
            lw, k = az.psislw(log_weights[rows], reff=1.0)
        else:  # ArviZ >= 1.0: untested here
            from arviz_stats.base import array_stats

            lw, k = array_stats.psislw(-log_weights[rows], r_eff=1.0, axis=-1)
        smoothed[rows], khat[rows] = np.asarray(lw), np.asarray(k)
    return smoothed, khat


def rounding_tolerance(x: torch.Tensor) -> float:
    """The relative spread below which log weights are equal but for rounding.

    The weights come back in float64, but they were computed in the data's precision (float32
    unless the data are float64).
    """
    return 1e-9 if x.dtype == torch.float64 else 100 * torch.finfo(torch.float32).eps


@torch.no_grad()
def psis_khat(
    model: Any,
    guide: Any = None,
    x: Optional[torch.Tensor] = None,
    num_particles: int = 1000,
    chunk_size: int = 100,
    batch_size: int = 100,
    data_plate: str = "data",
    vectorize_particles: Optional[bool] = None,
    **kwargs,
) -> torch.Tensor:
    r"""Pareto :math:`\hat k` of the importance weights :math:`p(x_i, z) / q(z \mid x_i)`, one per data point.

    For each data point, ``num_particles`` draws :math:`z \sim q(z \mid x_i)` give the
    weights :math:`w = p(x_i, z) / q(z \mid x_i)`; a generalized Pareto distribution is
    fitted to their largest values (Pareto-smoothed importance sampling, PSIS) and its
    shape :math:`\hat k` estimated. :math:`k` is the tail index of the weights'
    distribution: the weights have finite moments of order below :math:`1/k`. So

    * :math:`\hat k < 0.5`: finite variance; importance sampling from :math:`q` (and the
      log-likelihood estimate of :func:`pyro_lvm.diagnostics.likelihood.log_likelihood`) is reliable;
    * :math:`0.5 \le \hat k \le 0.7`: infinite variance, but PSIS still works, converging
      more slowly; more particles are needed;
    * :math:`\hat k > 0.7`: importance sampling is unreliable (the estimate may be far
      from :math:`\log p(x)` at any practical :math:`K`): :math:`q(z \mid x_i)` misses
      mass of the posterior :math:`p(z \mid x_i)` (too narrow, or in the wrong place).

    Yao et al. (2018) use :math:`\hat k` as a diagnostic of variational inference. For a
    Gaussian posterior :math:`\mathcal N(\mu, \sigma_p^2)` and guide
    :math:`\mathcal N(\mu, \sigma_q^2)` in one dimension,
    :math:`w \propto \exp\big(z^2 (1/\sigma_q^2 - 1/\sigma_p^2)/2\big)`, whose tail is of
    Pareto type with :math:`k = 1 - \sigma_q^2 / \sigma_p^2` when the guide is too narrow
    (:math:`\sigma_q < \sigma_p`; :math:`P(w > t) \sim t^{-1/k}` up to logarithms); a guide
    wider than the posterior gives bounded weights, :math:`k \le 0`. So a guide too narrow
    by a factor :math:`\sqrt 2` in scale is at the edge :math:`k = 0.5`. The finite-sample
    estimate is noisy (about :math:`\pm 0.1` at 1000 draws).

    References:
        Yes, but Did It Work?: Evaluating Variational Inference (Yao, Vehtari, Simpson &
        Gelman, 2018), https://arxiv.org/abs/1802.02538;
        Pareto Smoothed Importance Sampling (Vehtari et al., 2015-2024), https://arxiv.org/abs/1507.02646

    Arguments:
        model: the model, or a module with ``model`` and ``guide`` methods.
        guide: the guide; ``None`` (or the data, positionally) for a module's own.
        x: the data points.
        num_particles: draws from ``q`` per data point (PSIS needs a few hundred at least).
        chunk_size: particles per vectorized run.
        batch_size: data points per vectorized run.
        data_plate: the name of the pair's plate of independent data points.
        vectorize_particles: the particles in one pass, one at a time, or ``None`` (decided on the
            first batch; see :func:`pyro_lvm.diagnostics.likelihood.log_likelihood`).
        kwargs: passed to ``model`` and ``guide`` (tensors with one row per data point batched with ``x``).

    Returns:
        :math:`\hat k` per data point, a float64 tensor of shape ``(N,)`` (``-inf`` where all
        weights are equal, as for the exact posterior).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Normal(0., 1.))
        ...         pyro.sample("x", dist.Normal(z, 1.), obs=x)
        >>> def guide(x):  # the posterior is N(x / 2, 1/2); this guide is 10 times narrower
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("z", dist.Normal(x / 2, 0.05 ** 0.5))
        >>> pyro.set_rng_seed(0)
        >>> bool((psis_khat(model, guide, torch.zeros(3)) > 0.7).all())
        True
    """
    if num_particles < 2:
        raise ValueError(f"psis_khat needs num_particles >= 2 (PSIS fits the tail of many weights); got {num_particles}.")
    model, guide, x = resolve_with_data(model, guide, x, "psis_khat")
    log_w = importance_draws(model, guide, x, num_particles, chunk_size, batch_size, data_plate, kwargs, False,
                   vectorize_particles)["log_weights"]
    _, khat = psislw(log_w.T.cpu().numpy(), rtol=rounding_tolerance(x))
    return torch.as_tensor(khat, dtype=torch.float64)
