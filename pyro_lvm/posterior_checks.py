r"""Checks of an approximate posterior q(z | x): Pareto k-hat, export to ArviZ, amortization gap, NUTS, SBC."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
import pyro.distributions as dist
import torch
from pyro import poutine

from .estimators.base import latent_sites
from .evaluation import (
    _chunks, _per_point, _reconstruction, _resolve_pair, _runs, log_likelihood,
)

__all__ = [
    "psis_khat", "psislw", "to_inference_data", "amortization_gap", "AmortizationGap", "compare_with_nuts",
    "NutsComparison", "wasserstein_1d", "sbc", "SBCResult", "plot_sbc",
]


def psislw(log_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pareto-smoothed log weights and k-hat, draws on the last axis, on ArviZ 0.x and 1.x.

    ArviZ 0.x has ``arviz.psislw(log_weights, reff)``; ArviZ 1.x moved PSIS to
    ``arviz_stats``, whose array function takes a *log-likelihood* and smooths its
    negation (the leave-one-out weights), so the log weights are negated on the way in.
    Rows of equal weights (a guide equal to the posterior) have no tail to fit: their
    k-hat is ``-inf`` (bounded weights) and their smoothed weights the normalized input.

    Arguments:
        log_weights: array ``(..., S)`` of log importance weights (unnormalized).

    Example:
        >>> lw, khat = psislw(np.zeros((2, 100)))  # equal weights
        >>> lw.shape, khat.shape
        ((2, 100), (2,))
    """
    import arviz as az

    log_weights = np.asarray(log_weights, dtype=np.float64)
    # equal weights (q is the exact posterior) leave no tail to fit: bounded weights, k = -inf
    flat = np.ptp(log_weights, axis=-1) <= 1e-9 * (1.0 + np.abs(log_weights).max(axis=-1))
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


def _draws(
    model: Callable, guide: Callable, x: torch.Tensor, num_particles: int, chunk_size: int,
    batch_size: int, data_plate: str, kwargs: dict, keep_latents: bool,
) -> dict[str, Any]:
    """Per data point, ``num_particles`` log weights (and optionally the draws and log p(x | z))."""
    log_w, recon, latents = [], [], {}
    for n, runs in _runs(model, guide, x, num_particles, chunk_size, batch_size, data_plate, kwargs):
        parts_w, parts_r, parts_z = [], [], {}
        for runner, weights, model_trace, guide_trace in runs:
            size = runner.num_particles
            parts_w.append(_per_point(weights, weights.joint()).double())
            if keep_latents:
                parts_r.append(_reconstruction(runner, weights, model_trace, guide_trace))
                for name, site in latent_sites(guide_trace).items():
                    value = site["value"]
                    # (K, ..., B, *event) -> (K, B, prod(event))
                    event = len(site["fn"].event_shape)
                    value = value.reshape(value.shape[:1] + (n, -1)) if event else value.reshape(size, n, 1)
                    parts_z.setdefault(name, []).append(value.double())
        log_w.append(torch.cat(parts_w))
        if keep_latents:
            recon.append(torch.cat(parts_r))
            for name, values in parts_z.items():
                latents.setdefault(name, []).append(torch.cat(values))
    out = {"log_weights": torch.cat(log_w, 1)}
    if keep_latents:
        out["reconstruction"] = torch.cat(recon, 1)
        out["latents"] = {name: torch.cat(values, 1) for name, values in latents.items()}
    return out


@torch.no_grad()
def psis_khat(
    model: Any,
    guide: Any = None,
    x: Optional[torch.Tensor] = None,
    num_particles: int = 1000,
    chunk_size: int = 100,
    batch_size: int = 100,
    data_plate: str = "data",
    **kwargs,
) -> torch.Tensor:
    r"""Pareto :math:`\hat k` of the importance weights :math:`p(x_i, z) / q(z \mid x_i)`, one per data point.

    For each data point, ``num_particles`` draws :math:`z \sim q(z \mid x_i)` give the
    weights :math:`w = p(x_i, z) / q(z \mid x_i)`; a generalized Pareto distribution is
    fitted to their largest values (Pareto-smoothed importance sampling, PSIS) and its
    shape :math:`\hat k` estimated. :math:`k` is the tail index of the weights'
    distribution: the weights have finite moments of order below :math:`1/k`. So

    * :math:`\hat k < 0.5`: finite variance; importance sampling from :math:`q` (and the
      log-likelihood estimate of :func:`pyro_lvm.evaluation.log_likelihood`) is reliable;
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
    model, guide, x = _resolve_pair(model, guide, x)
    log_w = _draws(model, guide, x, num_particles, chunk_size, batch_size, data_plate, kwargs, False)["log_weights"]
    _, khat = psislw(log_w.T.cpu().numpy())
    return torch.as_tensor(khat, dtype=torch.float64)


@torch.no_grad()
def to_inference_data(
    model: Any,
    guide: Any = None,
    x: Optional[torch.Tensor] = None,
    num_samples: int = 1000,
    chunk_size: int = 100,
    batch_size: int = 100,
    data_plate: str = "data",
    **kwargs,
):
    r"""An :class:`arviz.InferenceData` of the guide's posterior draws for the inputs ``x``.

    Built with ``arviz.from_dict`` (``from_pyro`` needs an MCMC run). One chain of
    ``num_samples`` draws :math:`z^{(s)} \sim q(z \mid x_i)` for each input; groups:

    * ``posterior``: each latent site, dims ``("obs", "latent")`` (the site's event flattened);
    * ``log_likelihood``: ``x``, :math:`\log p(x_i \mid z_i^{(s)})` (all observed sites), dims ``("obs",)``;
    * ``sample_stats``: ``log_weight``, :math:`\log p(x_i, z_i^{(s)}) - \log q(z_i^{(s)} \mid x_i)`,
      and ``khat`` (dims ``("obs",)`` only: one Pareto :math:`\hat k` per input, from these
      draws, see :func:`psis_khat`);
    * ``observed_data``: ``x``.

    ``az.summary`` and ``az.plot_posterior`` describe :math:`q(z \mid x_i)` per input (its
    R-hat and ESS are those of independent draws, ESS about ``num_samples``);
    ``az.plot_khat(idata.sample_stats["khat"])`` plots the k-hat per input. ``az.loo`` runs,
    but read it for what it is here: each input has its *own* latent, the draws come from
    ``q`` and not from one joint posterior, and with a fixed decoder :math:`p(x_i \mid x_{-i})
    = p(x_i)`; PSIS-LOO then computes :math:`-\log \mathbb E_q[1 / p(x_i \mid z)]`, the
    (Pareto-smoothed) *harmonic-mean* estimator of :math:`\log p(x_i)`, which is correct
    only when :math:`q` is the exact posterior and notoriously unstable even then (its own
    k-hat warns). Use :func:`pyro_lvm.evaluation.log_likelihood` for :math:`\log p(x)`.

    Arguments:
        model: the model, or a module with ``model`` and ``guide`` methods.
        guide: the guide; ``None`` (or the data, positionally) for a module's own.
        x: the chosen inputs (a few: the posterior group holds ``num_samples x N x latent`` numbers).
        num_samples: draws per input.
        chunk_size: draws per vectorized run.
        batch_size: inputs per vectorized run.
        data_plate: the name of the pair's plate of independent data points.
        kwargs: passed to ``model`` and ``guide`` (tensors with one row per data point batched with ``x``).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.).to_event(1))
        ...         pyro.sample("x", dist.Normal(z, 1.).to_event(1), obs=x)
        >>> def guide(x):
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("z", dist.Normal(x / 2, 0.5 ** 0.5).to_event(1))
        >>> idata = to_inference_data(model, guide, torch.zeros(3, 2), num_samples=50)
        >>> dict(idata.posterior["z"].sizes)
        {'chain': 1, 'draw': 50, 'obs': 3, 'latent': 2}
    """
    import arviz as az
    import xarray as xr

    if num_samples < 2:
        raise ValueError(f"to_inference_data needs num_samples >= 2; got {num_samples}.")
    model, guide, x = _resolve_pair(model, guide, x)
    draws = _draws(model, guide, x, num_samples, chunk_size, batch_size, data_plate, kwargs, True)
    log_w = draws["log_weights"]
    _, khat = psislw(log_w.T.cpu().numpy())

    def chain(t: torch.Tensor) -> np.ndarray:
        return t.cpu().numpy()[None]

    posterior = {name: chain(value) for name, value in draws["latents"].items()}
    x_np = x.detach().cpu().double().numpy()
    dims = {name: ["obs", "latent"] for name in posterior}
    dims.update({"x": ["obs"], "log_weight": ["obs"]})
    n = len(x)
    idata = az.from_dict(
        posterior=posterior,
        log_likelihood={"x": chain(draws["reconstruction"])},
        sample_stats={"log_weight": chain(log_w)},
        observed_data={"x": x_np},
        coords={"obs": np.arange(n)},
        dims=dims,
    )
    idata.sample_stats["khat"] = xr.DataArray(khat, dims=["obs"], coords={"obs": np.arange(n)})
    return idata


# ----- amortization gap, NUTS, simulation-based calibration (built-in models) ------------

def _single_latent_model(model: Any, x: Optional[torch.Tensor], who: str, gaussian: bool = False) -> None:
    """Refuse what is not a built-in model with one continuous latent ``z``: p(z) p(x | z) and q(z | x)."""
    needed = ("prior", "likelihood", "_decoder_output", "posterior", "latent_shape", "model", "example_batch")
    missing = [name for name in needed if not hasattr(model, name)]
    if missing:
        raise ValueError(
            f"{who} needs a built-in latent-variable model (such as pyro_lvm.VAE or pyro_lvm.ConvVAE) "
            f"with prior, likelihood, posterior and a decoder; got {type(model).__name__}, which lacks "
            f"{', '.join(missing)}. For a model/guide pair of your own use psis_khat or "
            "pyro_lvm.evaluation.log_likelihood."
        )
    if model.prior().support.is_discrete:
        raise ValueError(
            f"{who} needs a continuous latent z; {type(model).__name__} has a discrete one. "
            "Use psis_khat or pyro_lvm.evaluation.log_likelihood for discrete latents."
        )
    if len(inspect.signature(model._decoder_output).parameters) > 1:
        raise ValueError(
            f"{who} needs p(x | z) to depend on z alone; {type(model).__name__}'s decoder takes more "
            f"({', '.join(inspect.signature(model._decoder_output).parameters)}): conditional models are not supported."
        )
    x = model.example_batch(1) if x is None else x
    try:
        trace = poutine.trace(model.model).get_trace(x[:1])
    except TypeError as error:
        raise ValueError(
            f"{who} calls model.model(x) alone; {type(model).__name__}.model needs more ({error}). "
            "Conditional models are not supported."
        ) from None
    latents = list(latent_sites(trace))
    if latents != ["z"]:
        raise ValueError(
            f"{who} needs a model with the single latent site 'z', p(z) p(x | z); "
            f"{type(model).__name__} has latent sites {latents}."
        )
    if gaussian:
        if getattr(model, "posterior_flow", None) is not None or not hasattr(model, "encode"):
            raise ValueError(
                f"{who} refines a Gaussian q(z | x) = N(loc, diag scale^2) from the encoder's output; "
                f"{type(model).__name__} has no Gaussian posterior (a flow or discrete posterior). "
                "Use compare_with_nuts or psis_khat instead."
            )


def _log_joint(model: Any, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``log p(x, z) = log p(z) + log p(x | z)`` for ``z`` of shape ``(..., B, *latent_shape)``: shape ``(..., B)``."""
    batch = z.shape[: z.dim() - len(model.latent_shape)]
    return model.prior(batch).log_prob(z) + model.likelihood(model._decoder_output(z)).log_prob(x)


def _gaussian_log_weights(model: Any, x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                          eps: torch.Tensor, stick: bool = False) -> torch.Tensor:
    """``log p(x, z) - log q(z)`` at ``z = loc + scale * eps``; ``stick`` detaches q's parameters in ``log q``."""
    z = loc + scale * eps
    q_loc, q_scale = (loc.detach(), scale.detach()) if stick else (loc, scale)
    log_q = dist.Normal(q_loc, q_scale).to_event(len(model.latent_shape)).log_prob(z)
    return _log_joint(model, x, z) - log_q


@dataclass
class AmortizationGap:
    r"""The result of :func:`amortization_gap`.

    Arguments:
        table: one row per data point: ``elbo_amortized``, ``elbo_optimized``,
            ``log_likelihood`` (the more reliable of the two estimates below) and its
            ``log_likelihood_stderr`` (Monte-Carlo, delta method), ``log_likelihood_guide``
            (:func:`pyro_lvm.evaluation.log_likelihood` with the model's guide),
            ``log_likelihood_optimized`` (the IWAE estimate with the optimized :math:`q_i`),
            ``amortization_gap``, ``amortization_gap_stderr`` (its Monte-Carlo standard
            error), ``approximation_gap``, ``inference_gap`` (their sum), and the Pareto
            ``khat_guide`` and ``khat_optimized`` of the two proposals' importance weights.
        history: every ``history_every`` steps, ``step``, the mean ``elbo`` of the
            :math:`q_i` being optimized and the mean remaining ``inference_gap``,
            :math:`\overline{\log p(x_i)} - \overline{\mathrm{ELBO}_t}`: the curve of the gap closing.
        loc: the optimized means, ``(N, *latent_shape)``.
        scale: the optimized standard deviations, ``(N, *latent_shape)``.
    """

    table: pd.DataFrame
    history: pd.DataFrame
    loc: torch.Tensor
    scale: torch.Tensor

    def summary(self) -> dict[str, float]:
        """The means over data points of the table's columns."""
        return {name: float(value) for name, value in self.table.mean().items()}


@torch.no_grad()
def amortization_gap(
    model: Any,
    x: torch.Tensor,
    num_steps: int = 500,
    lr: float = 0.01,
    num_particles: int = 8,
    eval_particles: int = 1000,
    log_likelihood_particles: int = 1000,
    history_every: int = 10,
    chunk_size: int = 100,
) -> AmortizationGap:
    r"""Per data point, the amortization gap and the approximation gap of a Gaussian :math:`q(z \mid x)`.

    The gap between :math:`\log p(x_i)` and the amortized ELBO splits into two
    (Cremer, Li & Duvenaud 2018):

    .. math::

        \log p(x_i) - \mathcal L[q_\phi(\cdot \mid x_i)]
        = \underbrace{\log p(x_i) - \mathcal L[q_i^*]}_{\text{approximation gap}}
        + \underbrace{\mathcal L[q_i^*] - \mathcal L[q_\phi(\cdot \mid x_i)]}_{\text{amortization gap}},
        \qquad \mathcal L[q] = \mathbb E_q\big[\log p(x_i, z) - \log q(z)\big],

    where :math:`q_i^* = \arg\max_q \mathcal L[q]` is the best member of the variational
    family (diagonal Gaussians) for this data point alone. The approximation gap is
    :math:`\mathrm{KL}(q_i^* \,\|\, p(z \mid x_i))`, the price of the family; the
    amortization gap is the price of one encoder for all inputs. Here :math:`q_i^*` is
    approximated by :math:`q_i = \mathcal N(m_i, \operatorname{diag} e^{2 s_i})`, started
    at the encoder's output and refined by ``num_steps`` of Adam on the reparameterized
    ELBO (``num_particles`` draws per step, all data points at once; the decoder and
    prior are fixed; the learning rate decays from ``lr`` to 0 on a cosine, so that the
    last steps settle), with the "sticking the landing" gradient (Roeder et al. 2017):
    :math:`\log q` is evaluated with its parameters detached, so the gradient vanishes
    draw by draw at the exact posterior.

    The final ELBOs are estimated with ``eval_particles`` draws, the same standard-normal
    draws :math:`\epsilon` for both guides (:math:`z = m + \sigma \epsilon`), so that the
    gap's Monte-Carlo error is that of the difference of the log weights
    (``amortization_gap_stderr``). :math:`\log p(x_i)` is one of two IWAE estimates
    (each a lower bound in expectation): with the model's own guide
    (:func:`pyro_lvm.evaluation.log_likelihood`, ``log_likelihood_particles``) or with
    the optimized :math:`q_i` (from the ``eval_particles`` draws). Each proposal's Pareto
    :math:`\hat k` (see :func:`psis_khat`; from the ``eval_particles`` draws) says whether
    its error estimate, :math:`\sqrt{1/\mathrm{ESS} - 1/K}` (delta method), can be
    trusted (:math:`\hat k < 0.7`): among trusted estimates the one with the smaller error
    is taken, else the one with the smaller :math:`\hat k` (not the larger value: a
    heavy-tailed estimate can overshoot :math:`\log p(x_i)`, and the mean-field optimum
    is often too narrow). Both gaps are
    :math:`\ge 0` up to Monte-Carlo noise and the finite optimization: an amortization gap
    below zero by more than a few standard errors means the refinement diverged (lower
    ``lr``); an approximation gap that stays large may also mean too few steps.

    Memory: the refinement holds ``num_particles x N`` decoder passes with gradients, so
    pass a modest batch ``x`` (tens to hundreds of points); evaluation runs
    ``chunk_size x N`` at a time. The model is put in eval mode while this runs.

    References:
        Inference Suboptimality in Variational Autoencoders (Cremer, Li & Duvenaud, 2018),
        https://arxiv.org/abs/1801.03558;
        Sticking the Landing (Roeder, Wu & Duvenaud, 2017), https://arxiv.org/abs/1703.09194

    Arguments:
        model: a built-in model with one Gaussian latent ``z`` (with ``encode``), e.g. a :class:`pyro_lvm.VAE`.
        x: the data points, ``(N, *event_shape)``.
        num_steps: Adam steps of the per-datapoint refinement.
        lr: Adam's learning rate.
        num_particles: draws per step for the ELBO's gradient.
        eval_particles: draws for the final ELBOs and k-hats (shared by both guides; kept in memory, ``eval_particles x N``).
        log_likelihood_particles: importance samples for the log-likelihood with the model's guide.
        history_every: record the mean ELBO every this many steps (with fixed draws).
        chunk_size: draws per vectorized evaluation run.

    Example:
        >>> from pyro_lvm import VAE
        >>> vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8])
        >>> x = torch.bernoulli(torch.full((3, 4), 0.5))
        >>> gaps = amortization_gap(vae, x, num_steps=20, eval_particles=50, log_likelihood_particles=50)
        >>> list(gaps.table.columns[:3])
        ['elbo_amortized', 'elbo_optimized', 'log_likelihood']
        >>> len(gaps.history)
        3
    """
    for name, value in (("num_steps", num_steps), ("num_particles", num_particles), ("eval_particles", eval_particles),
                        ("log_likelihood_particles", log_likelihood_particles), ("history_every", history_every),
                        ("chunk_size", chunk_size)):
        least = {"num_steps": 0, "eval_particles": 2}.get(name, 1)  # two draws at least for a standard error
        if value < least:
            raise ValueError(f"amortization_gap needs {name} >= {least}; got {value}.")
    if lr <= 0:
        raise ValueError(f"amortization_gap needs a positive learning rate; got lr={lr}.")
    _single_latent_model(model, x, "amortization_gap", gaussian=True)
    training = model.training
    model.eval()
    try:
        loc0, scale0 = model.encode(x)
        loc = loc0.detach().clone().requires_grad_()
        log_scale = scale0.detach().log().requires_grad_()
        optimizer = torch.optim.Adam([loc, log_scale], lr=lr)
        history_eps = torch.randn((min(chunk_size, eval_particles),) + loc.shape, dtype=loc.dtype, device=loc.device)
        history = []
        for step in range(num_steps + 1):
            if step % history_every == 0 or step == num_steps:
                elbo = _gaussian_log_weights(model, x, loc, log_scale.exp(), history_eps).double().mean()
                history.append((step, float(elbo)))
            if step == num_steps:
                break
            eps = torch.randn((num_particles,) + loc.shape, dtype=loc.dtype, device=loc.device)
            # cosine decay to 0: Adam's steps do not shrink with the gradient's noise at the optimum
            optimizer.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / num_steps))
            with torch.enable_grad():
                log_w = _gaussian_log_weights(model, x, loc, log_scale.exp(), eps, stick=True)
                loc.grad, log_scale.grad = torch.autograd.grad(-log_w.mean(0).sum(), [loc, log_scale])
            optimizer.step()
        loc, scale = loc.detach(), log_scale.detach().exp()

        draws_amortized, draws_optimized = [], []
        for size in _chunks(eval_particles, chunk_size):
            eps = torch.randn((size,) + loc.shape, dtype=loc.dtype, device=loc.device)
            draws_amortized.append(_gaussian_log_weights(model, x, loc0, scale0, eps).double().cpu())
            draws_optimized.append(_gaussian_log_weights(model, x, loc, scale, eps).double().cpu())
        by_guide = log_likelihood(model.model, model.guide, x, num_particles=log_likelihood_particles,
                                  chunk_size=chunk_size, batch_size=len(x))
    finally:
        model.train(training)
    amortized, optimized = torch.cat(draws_amortized), torch.cat(draws_optimized)
    k = eval_particles
    diff = optimized - amortized
    gap = diff.mean(0)
    gap_stderr = diff.std(0) / math.sqrt(k)
    elbo_amortized, elbo_optimized = amortized.mean(0), optimized.mean(0)
    ll_guide, se_guide = by_guide.per_point.cpu(), by_guide.mc_stderr().cpu()
    lse = torch.logsumexp(optimized, 0)
    ll_optimized = lse - math.log(k)
    ess = torch.exp(2 * lse - torch.logsumexp(2 * optimized, 0))
    se_optimized = (1.0 / ess - 1.0 / k).clamp(min=0.0).sqrt()
    _, khat = psislw(torch.stack([amortized.T, optimized.T]).numpy())
    khat_guide, khat_optimized = torch.as_tensor(khat[0]), torch.as_tensor(khat[1])
    # each estimate is a lower bound only in expectation and its error estimate is only
    # trustworthy for k < 0.7: the smaller error among reliable ones, else the smaller k
    reliable_guide, reliable_optimized = khat_guide < 0.7, khat_optimized < 0.7
    use_optimized = torch.where(reliable_guide == reliable_optimized,
                                torch.where(reliable_guide, se_optimized < se_guide, khat_optimized < khat_guide),
                                reliable_optimized)
    ll = torch.where(use_optimized, ll_optimized, ll_guide)
    ll_se = torch.where(use_optimized, se_optimized, se_guide)
    table = pd.DataFrame({
        "elbo_amortized": elbo_amortized.numpy(),
        "elbo_optimized": elbo_optimized.numpy(),
        "log_likelihood": ll.numpy(),
        "log_likelihood_stderr": ll_se.numpy(),
        "log_likelihood_guide": ll_guide.numpy(),
        "log_likelihood_optimized": ll_optimized.numpy(),
        "amortization_gap": gap.numpy(),
        "amortization_gap_stderr": gap_stderr.numpy(),
        "approximation_gap": (ll - elbo_optimized).numpy(),
        "inference_gap": (ll - elbo_amortized).numpy(),
        "khat_guide": khat_guide.numpy(),
        "khat_optimized": khat_optimized.numpy(),
    })
    steps, elbos = zip(*history)
    history_frame = pd.DataFrame({"step": steps, "elbo": elbos})
    history_frame["inference_gap"] = float(ll.mean()) - history_frame["elbo"]
    return AmortizationGap(table=table, history=history_frame, loc=loc, scale=scale)


def wasserstein_1d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""Wasserstein-1 distance between the empirical distributions of two 1-D samples.

    .. math::

        W_1(\hat F_a, \hat F_b) = \int_{-\infty}^{\infty} \big|\hat F_a(t) - \hat F_b(t)\big|\, dt,

    computed exactly on the merged sorted sample (the empirical CDFs are step functions),
    for samples of any sizes.

    Arguments:
        a: the first sample, shape ``(n,)``.
        b: the second sample, shape ``(m,)``.

    Example:
        >>> float(wasserstein_1d(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])))
        2.0
    """
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError(f"wasserstein_1d needs two non-empty samples; got sizes {a.numel()} and {b.numel()}.")
    a, b = a.sort().values, b.sort().values
    points = torch.cat([a, b]).sort().values
    widths = points[1:] - points[:-1]
    left = points[:-1]
    cdf_a = torch.searchsorted(a, left, right=True).double() / a.numel()
    cdf_b = torch.searchsorted(b, left, right=True).double() / b.numel()
    return ((cdf_a - cdf_b).abs() * widths).sum()


@dataclass
class NutsComparison:
    r"""The result of :func:`compare_with_nuts`.

    Arguments:
        table: one row per (``obs``, ``latent``): ``nuts_mean``, ``nuts_sd``, ``guide_mean``,
            ``guide_sd``, ``wasserstein`` (:func:`wasserstein_1d` between the two samples),
            ``r_hat`` (split R-hat) and ``ess`` of the NUTS chains.
        samples: the NUTS draws, ``(num_chains, num_samples, N, *latent_shape)``.
        guide_samples: the draws of :math:`q(z \mid x_i)`, ``(guide_samples, N, *latent_shape)``.
    """

    table: pd.DataFrame
    samples: torch.Tensor
    guide_samples: torch.Tensor


def compare_with_nuts(
    model: Any,
    x: torch.Tensor,
    num_samples: int = 500,
    warmup_steps: int = 300,
    num_chains: int = 2,
    guide_samples: int = 2000,
    max_tree_depth: int = 8,
    full_mass: bool = False,
) -> NutsComparison:
    r"""Run NUTS on :math:`p(z \mid x_i)` with the trained decoder and compare it with :math:`q(z \mid x_i)`.

    The unnormalized posterior :math:`p(z \mid x_i) \propto p(z)\, p(x_i \mid z)` of each
    chosen input is sampled by the No-U-Turn sampler (``pyro.infer.NUTS`` with step size
    and mass matrix, diagonal or dense, adapted during ``warmup_steps``). The inputs' posteriors are
    independent given the decoder, so they are sampled together as one product
    distribution over :math:`(z_1, \dots, z_N)`: one run per chain, chains run one after
    the other in this process (no multiprocessing), each started at a draw of the guide.
    Per input and latent dimension the table holds the marginal means and standard
    deviations under NUTS and under the guide, the Wasserstein-1 distance between the two
    samples (in the latent's units: for two Gaussians of equal spread it is the
    difference of means), and the chains' split :math:`\hat R` (Gelman-Rubin; want
    :math:`< 1.01`-:math:`1.05`) and effective sample size
    (``pyro.ops.stats``). NUTS is asymptotically exact, so a large distance with a good
    :math:`\hat R` and ESS says the guide is wrong for that input. The NUTS means carry a
    Monte-Carlo error of about ``nuts_sd / sqrt(ess)``.

    Cost: ``num_chains * (warmup_steps + num_samples)`` NUTS iterations of up to
    ``2 ** max_tree_depth`` decoder passes each on the ``N`` inputs: keep ``x``
    to a handful of points.

    References:
        The No-U-Turn Sampler (Hoffman & Gelman, 2011), https://arxiv.org/abs/1111.4246;
        Yes, but Did It Work?: Evaluating Variational Inference (Yao et al., 2018), https://arxiv.org/abs/1802.02538

    Arguments:
        model: a built-in model with one continuous latent ``z`` (e.g. a :class:`pyro_lvm.VAE`).
        x: the chosen inputs, ``(N, *event_shape)`` (a few).
        num_samples: NUTS draws kept per chain.
        warmup_steps: adaptation steps per chain (discarded).
        num_chains: independent chains (at least 1; 2 or more for a meaningful R-hat).
        guide_samples: draws of :math:`q(z \mid x_i)` per input.
        max_tree_depth: NUTS's maximum tree depth.
        full_mass: adapt a dense mass matrix over all chosen inputs' latents (for strongly
            correlated posteriors; its size is the square of ``N x`` the latent size).

    Example:
        >>> from pyro_lvm import VAE
        >>> vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8])
        >>> x = torch.bernoulli(torch.full((2, 4), 0.5))
        >>> result = compare_with_nuts(vae, x, num_samples=20, warmup_steps=20, guide_samples=50)
        >>> result.table.shape, tuple(result.samples.shape)
        ((4, 9), (2, 20, 2, 2))
    """
    from pyro.infer import MCMC, NUTS
    from pyro.ops.stats import effective_sample_size, split_gelman_rubin

    for name, value in (("num_samples", num_samples), ("num_chains", num_chains), ("guide_samples", guide_samples)):
        if value < 1:
            raise ValueError(f"compare_with_nuts needs {name} >= 1; got {value}.")
    if num_samples < 4:
        raise ValueError(f"compare_with_nuts needs num_samples >= 4 (split R-hat halves each chain); got {num_samples}.")
    if warmup_steps < 0:
        raise ValueError(f"compare_with_nuts needs warmup_steps >= 0; got {warmup_steps}.")
    _single_latent_model(model, x, "compare_with_nuts")
    training = model.training
    model.eval()
    try:
        x = x.detach()

        def potential(params: dict) -> torch.Tensor:
            return -_log_joint(model, x, params["z"]).sum()

        with torch.no_grad():
            q_draws = model.posterior(x).sample((guide_samples,))
            starts = model.posterior(x).sample((num_chains,))
        chains = []
        for chain in range(num_chains):
            kernel = NUTS(potential_fn=potential, adapt_step_size=True, adapt_mass_matrix=True,
                          full_mass=full_mass, max_tree_depth=max_tree_depth)
            mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps,
                        initial_params={"z": starts[chain]}, disable_progbar=True)
            mcmc.run()
            chains.append(mcmc.get_samples()["z"].detach())
    finally:
        model.train(training)
    samples = torch.stack(chains)
    flat = samples.reshape(num_chains, num_samples, len(x), -1).double().cpu()
    q_flat = q_draws.reshape(guide_samples, len(x), -1).double().cpu()
    r_hat = split_gelman_rubin(flat, chain_dim=0, sample_dim=1)
    ess = effective_sample_size(flat, chain_dim=0, sample_dim=1)
    pooled = flat.reshape(-1, len(x), flat.shape[-1])
    rows = []
    for i in range(len(x)):
        for d in range(flat.shape[-1]):
            nuts, guide = pooled[:, i, d], q_flat[:, i, d]
            rows.append({
                "obs": i, "latent": d,
                "nuts_mean": float(nuts.mean()), "nuts_sd": float(nuts.std()),
                "guide_mean": float(guide.mean()), "guide_sd": float(guide.std()),
                "wasserstein": float(wasserstein_1d(nuts, guide)),
                "r_hat": float(r_hat[i, d]), "ess": float(ess[i, d]),
            })
    return NutsComparison(table=pd.DataFrame(rows), samples=samples, guide_samples=q_draws.detach())


@dataclass
class SBCResult:
    r"""The result of :func:`sbc`.

    Arguments:
        ranks: per simulation and latent dimension (flattened), the number of the
            ``num_draws`` guide draws below the true value: ``(num_simulations, D)``, in ``0..num_draws``.
        p_values: per latent dimension, the p-value of the chi-square test of uniformity of the binned ranks, ``(D,)``.
        num_draws: draws from :math:`q(z \mid x)` per simulation.
        num_bins: bins of the test and the histograms.
    """

    ranks: torch.Tensor
    p_values: torch.Tensor
    num_draws: int
    num_bins: int


def _binned(ranks: torch.Tensor, num_draws: int, num_bins: int) -> torch.Tensor:
    """Counts per bin and dimension, ``(num_bins, D)``: rank r goes to bin ``r * num_bins // (num_draws + 1)``."""
    bins = ranks * num_bins // (num_draws + 1)
    return torch.stack([torch.bincount(bins[:, d], minlength=num_bins) for d in range(ranks.shape[1])], 1)


@torch.no_grad()
def sbc(
    model: Any,
    guide: Optional[Callable[[torch.Tensor], Any]] = None,
    num_simulations: int = 1000,
    num_draws: int = 99,
    num_bins: int = 20,
    batch_size: int = 500,
) -> SBCResult:
    r"""Simulation-based calibration of the amortized posterior :math:`q(z \mid x)` (Talts et al. 2018).

    Each simulation draws :math:`\tilde z \sim p(z)`, :math:`\tilde x \sim p(x \mid \tilde z)`
    (a binary image for a Bernoulli likelihood) and :math:`L` = ``num_draws`` draws
    :math:`z^{(l)} \sim q(z \mid \tilde x)`, and records per latent dimension :math:`d`
    the rank :math:`r_d = \#\{l : z^{(l)}_d < \tilde z_d\} \in \{0, \dots, L\}`. If
    :math:`q(z \mid x) = p(z \mid x)`, then :math:`\tilde z` and the draws are exchangeable
    given :math:`\tilde x` and :math:`r_d` is uniform on :math:`\{0, \dots, L\}`, whatever
    the model. The ranks are grouped into ``num_bins`` equal bins and tested with
    Pearson's chi-square,

    .. math::

        X^2 = \sum_{j=1}^{J} \frac{(O_j - N/J)^2}{N/J} \ \sim\ \chi^2_{J-1}
        \quad\text{under uniformity},

    whose p-value is reported per dimension (small: not calibrated). Read the histograms
    (:func:`plot_sbc`): a U shape means :math:`q` is too narrow (overconfident), a hump too
    wide, a slope a biased mean. Uniform ranks are necessary, not sufficient: the prior
    itself, used as :math:`q`, is calibrated too. Only the amortized posterior over the
    prior predictive is checked, and the test's power grows with ``num_simulations``.

    References:
        Validating Bayesian Inference Algorithms with Simulation-Based Calibration
        (Talts, Betancourt, Simpson, Vehtari & Gelman, 2018), https://arxiv.org/abs/1804.06788

    Arguments:
        model: a built-in model with one continuous latent ``z`` (e.g. a :class:`pyro_lvm.VAE`).
        guide: a callable returning the distribution :math:`q(z \mid x)` for a batch ``x``
            (batch shape ``(B,)``, event ``latent_shape``); ``None`` for ``model.posterior``.
        num_simulations: simulated pairs :math:`(\tilde z, \tilde x)`.
        num_draws: draws from :math:`q` per simulation (``num_draws + 1`` must be a multiple of ``num_bins``).
        num_bins: bins of the uniformity test.
        batch_size: simulations per vectorized run.

    Example:
        >>> from pyro_lvm import VAE
        >>> vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8])
        >>> result = sbc(vae, num_simulations=40, num_draws=19, num_bins=5)
        >>> tuple(result.ranks.shape), tuple(result.p_values.shape)
        ((40, 2), (2,))
    """
    if num_simulations < 1 or num_draws < 1 or num_bins < 2 or batch_size < 1:
        raise ValueError(
            "sbc needs num_simulations >= 1, num_draws >= 1, num_bins >= 2 and batch_size >= 1; got "
            f"{num_simulations}, {num_draws}, {num_bins} and {batch_size}."
        )
    if (num_draws + 1) % num_bins:
        raise ValueError(
            f"sbc bins the ranks 0..num_draws into equal bins: num_draws + 1 = {num_draws + 1} is not a multiple "
            f"of num_bins = {num_bins}. Use e.g. num_draws = {num_bins * max(1, round((num_draws + 1) / num_bins)) - 1}."
        )
    _single_latent_model(model, None, "sbc")
    guide = model.posterior if guide is None else guide
    training = model.training
    model.eval()
    try:
        ranks = []
        for size in _chunks(num_simulations, batch_size):
            z = model.prior(torch.Size([size])).sample()
            x = model.likelihood(model._decoder_output(z)).sample()
            draws = guide(x).sample((num_draws,))
            below = (draws < z).reshape(num_draws, size, -1)
            ranks.append(below.sum(0))
    finally:
        model.train(training)
    ranks = torch.cat(ranks).long().cpu()
    counts = _binned(ranks, num_draws, num_bins).double()
    expected = num_simulations / num_bins
    statistic = ((counts - expected) ** 2 / expected).sum(0)
    p_values = 1 - torch.distributions.Chi2(torch.tensor(float(num_bins - 1), dtype=torch.float64)).cdf(statistic)
    return SBCResult(ranks=ranks, p_values=p_values, num_draws=num_draws, num_bins=num_bins)


def plot_sbc(result: SBCResult, path: Optional[str] = None, band: float = 0.99):
    r"""Rank histograms of :func:`sbc`, one panel per latent dimension, with the uniform band.

    The grey band is the central ``band`` interval of each bin's count under uniformity,
    :math:`\mathrm{Binomial}(N, 1/J)`; about ``1 - band`` of the bins fall outside it by chance.

    Arguments:
        result: the output of :func:`sbc`.
        path: where to save the figure (any format matplotlib knows), or ``None``.
        band: the probability of the uniform band.

    Returns:
        The matplotlib figure.

    Example:
        >>> from pyro_lvm import VAE
        >>> fig = plot_sbc(sbc(VAE(data_shape=4, latent_dim=2, hidden_dims=[8]), num_simulations=40, num_draws=19, num_bins=5))
        >>> len(fig.axes)
        2
        >>> import matplotlib.pyplot as plt; plt.close(fig)
    """
    import matplotlib.pyplot as plt

    if not 0 < band < 1:
        raise ValueError(f"plot_sbc needs a band probability in (0, 1); got {band}.")
    counts = _binned(result.ranks, result.num_draws, result.num_bins).numpy()
    n, dims = result.ranks.shape
    binomial = torch.distributions.Binomial(n, torch.tensor(1.0 / result.num_bins, dtype=torch.float64))
    cdf = binomial.log_prob(torch.arange(n + 1, dtype=torch.float64)).exp().cumsum(0)
    lo = int(torch.searchsorted(cdf, torch.tensor((1 - band) / 2, dtype=torch.float64)))
    hi = int(torch.searchsorted(cdf, torch.tensor((1 + band) / 2, dtype=torch.float64)))
    cols = min(dims, 4)
    rows = -(-dims // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.4 * rows), squeeze=False)
    edges = np.arange(result.num_bins + 1)
    for d, ax in enumerate(axes.flat):
        if d >= dims:
            ax.remove()
            continue
        ax.axhspan(lo, hi, color="0.85", zorder=0)
        ax.axhline(n / result.num_bins, color="0.5", lw=0.8)
        ax.stairs(counts[:, d], edges, fill=True, alpha=0.8)
        ax.set_title(f"z[{d}]  p = {float(result.p_values[d]):.2g}", fontsize=9)
        ax.set_xticks([])
    fig.supxlabel("rank of the true z among the guide's draws")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig
