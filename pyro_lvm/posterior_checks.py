r"""Checks of an approximate posterior q(z | x): Pareto k-hat, ArviZ export, amortization gap, NUTS, SBC."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import biject_to

from .evaluation import _chunks, _per_point, log_likelihood, particle_chunks, resolve_with_data
from .pairs import check_vectorization, latent_sites, resolve, rows, site_distribution

__all__ = [
    "psis_khat", "psislw", "to_inference_data", "amortization_gap", "AmortizationGap", "compare_with_nuts",
    "NutsComparison", "wasserstein_1d", "sbc", "SBCResult", "plot_sbc",
]


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


def _rounding(x: torch.Tensor) -> float:
    """The relative spread below which log weights are equal but for rounding.

    The weights come back in float64, but they were computed in the data's precision (float32
    unless the data are float64).
    """
    return 1e-9 if x.dtype == torch.float64 else 100 * torch.finfo(torch.float32).eps


def _draws(
    model: Callable, guide: Callable, x: torch.Tensor, num_particles: int, chunk_size: int,
    batch_size: int, data_plate: str, kwargs: dict, keep_latents: bool, vectorize_particles: Optional[bool] = None,
) -> dict[str, Any]:
    """Per data point, ``num_particles`` log weights (and optionally the draws and log p(x | z))."""
    log_w, recon, latents = [], [], {}
    for n, runs in particle_chunks(model, guide, x, num_particles, chunk_size, batch_size, data_plate, kwargs,
                                   vectorize_particles, reconstruction=keep_latents, latents=keep_latents):
        parts_w, parts_r, parts_z = [], [], {}
        for draws in runs:
            weights = draws.weights
            parts_w.append(_per_point(weights, weights.joint()).double())
            if keep_latents:
                parts_r.append(_per_point(draws.reconstruction, draws.reconstruction.joint()).double())
                for name, value in draws.latents.items():  # (K, B, prod(site shape))
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
        vectorize_particles: the particles in one pass, one at a time, or ``None`` (decided on the
            first batch; see :func:`pyro_lvm.evaluation.log_likelihood`).
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
    log_w = _draws(model, guide, x, num_particles, chunk_size, batch_size, data_plate, kwargs, False,
                   vectorize_particles)["log_weights"]
    _, khat = psislw(log_w.T.cpu().numpy(), rtol=_rounding(x))
    return torch.as_tensor(khat, dtype=torch.float64)


@torch.no_grad()
def to_inference_data(
    model: Any,
    guide: Any = None,
    x: Optional[torch.Tensor] = None,
    num_samples: int = 250,
    num_chains: int = 4,
    chunk_size: int = 100,
    batch_size: int = 100,
    data_plate: str = "data",
    vectorize_particles: Optional[bool] = None,
    **kwargs,
):
    r"""An :class:`arviz.InferenceData` of the guide's posterior draws for the inputs ``x``.

    Built with ``arviz.from_dict`` (``from_pyro`` needs an MCMC run). ``num_chains`` chains of
    ``num_samples`` independent draws :math:`z^{(s)} \sim q(z \mid x_i)` for each input (the
    chains are independent draws too, so ``az.rhat`` is near 1 and ``az.ess`` near the number of
    draws: a check that the export is sound, not of the guide); groups:

    * ``posterior``: each latent site under its own name, dims ``(chain, draw, obs, <site>_dim)``
      (the site's shape per data point flattened);
    * ``log_likelihood``: ``x``, :math:`\log p(x_i \mid z_i^{(s)})` (all observed sites), dims ``(chain, draw, obs)``;
    * ``sample_stats``: ``log_weight``, :math:`\log p(x_i, z_i^{(s)}) - \log q(z_i^{(s)} \mid x_i)`,
      and ``khat`` (dims ``(obs,)`` only: one Pareto :math:`\hat k` per input, from all its
      draws, see :func:`psis_khat`);
    * ``observed_data``: ``x``.

    A site may have any name (Pyro's VAE example calls its latent ``latent``): ArviZ drops a
    variable named like a dimension, so the dimensions take other names where a site has theirs
    (``obs_`` for a site named ``obs``), and a site named like ArviZ's own ``chain`` or ``draw`` is
    stored as ``chain_`` or ``draw_``; each variable's attribute ``site`` holds its site's name.

    ``az.summary`` and ``az.plot_posterior`` describe :math:`q(z \mid x_i)` per input;
    ``az.plot_khat(az.ELPDData(data=[idata.sample_stats["khat"], 0.7], index=["pareto_k",
    "good_k"]))`` plots the k-hat per input (ArviZ 0.23 deprecates passing the bare array;
    tutorial 06 shows it). ``az.loo`` runs,
    but read it for what it is here: each input has its *own* latent, the draws come from
    ``q`` and not from one joint posterior, and with a fixed decoder :math:`p(x_i \mid x_{-i})
    = p(x_i)`; PSIS-LOO then computes :math:`-\log \mathbb E_q[1 / p(x_i \mid z)]`, the
    (Pareto-smoothed) *harmonic-mean* estimator of :math:`\log p(x_i)`, which is correct
    only when :math:`q` is the exact posterior and notoriously unstable even then (its own
    k-hat warns). Use :func:`pyro_lvm.evaluation.log_likelihood` for :math:`\log p(x)`.

    Arguments:
        model: the model, or a module with ``model`` and ``guide`` methods.
        guide: the guide; ``None`` (or the data, positionally) for a module's own.
        x: the chosen inputs (a few: the posterior group holds ``num_chains x num_samples x N x latent`` numbers).
        num_samples: draws per chain and input.
        num_chains: chains of independent draws (at least 2 for ``az.rhat``).
        chunk_size: draws per vectorized run.
        batch_size: inputs per vectorized run.
        data_plate: the name of the pair's plate of independent data points.
        vectorize_particles: the draws in one pass, one at a time, or ``None`` (decided on the first batch).
        kwargs: passed to ``model`` and ``guide`` (tensors with one row per data point batched with ``x``).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("latent", dist.Normal(torch.zeros(2), 1.).to_event(1))
        ...         pyro.sample("x", dist.Normal(z, 1.).to_event(1), obs=x)
        >>> def guide(x):
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("latent", dist.Normal(x / 2, 0.5 ** 0.5).to_event(1))
        >>> idata = to_inference_data(model, guide, torch.zeros(3, 2), num_samples=50, num_chains=2)
        >>> dict(idata.posterior["latent"].sizes)
        {'chain': 2, 'draw': 50, 'obs': 3, 'latent_dim': 2}
    """
    import arviz as az
    import xarray as xr

    if num_samples < 2:
        raise ValueError(f"to_inference_data needs num_samples >= 2; got {num_samples}.")
    if num_chains < 1:
        raise ValueError(f"to_inference_data needs num_chains >= 1; got {num_chains}.")
    model, guide, x = resolve_with_data(model, guide, x, "to_inference_data")
    total = num_samples * num_chains
    draws = _draws(model, guide, x, total, chunk_size, batch_size, data_plate, kwargs, True, vectorize_particles)
    log_w = draws["log_weights"]
    _, khat = psislw(log_w.T.cpu().numpy(), rtol=_rounding(x))

    def chains(t: torch.Tensor) -> np.ndarray:
        return t.cpu().numpy().reshape((num_chains, num_samples) + tuple(t.shape[1:]))

    variables = {}  # a site named like ArviZ's own dims is stored as "chain_"
    for name in draws["latents"]:
        variables[name] = name
        while variables[name] in ("chain", "draw"):
            variables[name] += "_"
    # no dim may share a variable's name (in any group), or ArviZ drops the variable
    taken = {"chain", "draw", "x", "log_weight", "khat", *variables.values()}

    def free(name: str) -> str:
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    obs = free("obs")
    posterior, dims = {}, {}
    for name, value in draws["latents"].items():
        posterior[variables[name]] = chains(value)
        dims[variables[name]] = [obs, free(f"{name}_dim")]
    dims.update({"x": [obs], "log_weight": [obs]})
    n = len(x)
    idata = az.from_dict(
        posterior=posterior,
        log_likelihood={"x": chains(draws["reconstruction"])},
        sample_stats={"log_weight": chains(log_w)},
        observed_data={"x": x.detach().cpu().double().numpy()},
        coords={obs: np.arange(n)},
        dims=dims,
    )
    idata.sample_stats["khat"] = xr.DataArray(khat, dims=[obs], coords={obs: np.arange(n)})
    for name, variable in variables.items():
        idata.posterior[variable].attrs["site"] = name
    return idata


# ----- amortization gap, NUTS, simulation-based calibration (any model/guide pair) --------

_PARTICLES = "posterior_check_particles"


@dataclass
class _Site:
    """A latent site of the pair as the guide draws it: its shape per data point and its kind."""

    name: str
    shape: torch.Size  # per data point: the dims right of the data plate's (inner plates, event)
    discrete: bool
    support: Any
    dtype: torch.dtype
    # (loc, scale), each (N, *shape), when the guide's site is a Normal whose parameters depend on x alone
    gaussian: Optional[tuple[torch.Tensor, torch.Tensor]]
    family: str


@dataclass
class _Layout:
    """The latent sites of a pair, its plate nesting (without particles) and the data plate's dim."""

    sites: list
    nesting: int
    data_dim: int
    vectorized: bool = True  # whether the model broadcasts over a particle plate (else one run per particle)

    def names(self) -> list[str]:
        return [site.name for site in self.sites]


def _module_of(fn: Any) -> Optional[torch.nn.Module]:
    """The ``nn.Module`` behind a model or guide: itself, a bound method's owner, or a wrapped function's."""
    seen = 0
    while fn is not None and seen < 10:
        if isinstance(fn, torch.nn.Module):
            return fn
        fn = getattr(fn, "__self__", None) or getattr(fn, "__wrapped__", None)
        seen += 1
    return None


class _Evaluating:
    """Put the modules behind a pair in eval mode (no dropout, fixed batch norm), and restore them."""

    def __init__(self, *fns: Any):
        modules = {}
        for fn in fns:
            module = _module_of(fn)
            if module is not None:
                modules[id(module)] = module
        self.modules = list(modules.values())

    def __enter__(self) -> None:
        self.training = [module.training for module in self.modules]
        for module in self.modules:
            module.eval()

    def __exit__(self, *exc) -> None:
        for module, training in zip(self.modules, self.training):
            module.train(training)


def _take(x: torch.Tensor, kwargs: dict, index: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Rows ``index`` of ``x`` and of the tensors among ``kwargs`` with one row per data point."""
    return x[index], rows(kwargs, index, len(x))


def _frame(site: dict, data_plate: str):
    return next((f for f in site["cond_indep_stack"] if f.vectorized and f.name == data_plate), None)


def _family(fn: Any) -> str:
    base = fn
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    return type(base).__name__


def _normal_parameters(fn: Any) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    base = fn
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    if isinstance(base, torch.distributions.Normal):
        return base.loc, base.scale
    return None


def _layout(model: Callable, guide: Callable, x: torch.Tensor, kwargs: dict, data_plate: str, who: str,
            vectorize_particles: Optional[bool] = None) -> _Layout:
    """Trace the guide (twice) and the model against it: the latent sites, the plates, and whether
    the pair runs its particles vectorized (``vectorize_particles``; ``None``: as
    :func:`pyro_lvm.pairs.check_vectorization` finds)."""
    with poutine.block(), torch.no_grad():
        first = prune_subsample_sites(poutine.trace(guide).get_trace(x, **kwargs))
        second = prune_subsample_sites(poutine.trace(guide).get_trace(x, **kwargs))
        model_trace = prune_subsample_sites(poutine.trace(poutine.replay(model, trace=first)).get_trace(x, **kwargs))
    nesting, data_dim = 0, None
    for trace in (first, model_trace):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["infer"].get("_deterministic"):
                continue
            frame = _frame(site, data_plate)
            if frame is None:
                raise ValueError(
                    f"{who} checks each data point's posterior on its own, so every sample site must be "
                    f"inside pyro.plate({data_plate!r}); site {name!r} is not (a global latent or observation). "
                    "Put it in the data plate, or pass the name of the pair's data plate as data_plate=..."
                )
            data_dim = frame.dim
            nesting = max([nesting] + [-f.dim for f in site["cond_indep_stack"] if f.vectorized])
    latents = latent_sites(first)
    if not latents:
        raise ValueError(f"{who} needs a guide with latent sample sites; the guide drew none for this input.")
    in_model = set(latent_sites(model_trace))
    if set(latents) != in_model:
        raise ValueError(
            f"{who} needs the model and the guide to share their latent sites; the guide has "
            f"{sorted(latents)}, the model {sorted(in_model)}."
        )
    sites = []
    model_sites = latent_sites(model_trace)
    for name, site in latents.items():
        value = site["value"]
        # the guide's density of the model's value (an autoguide's Delta: its auxiliary draw's), the model's support
        fn = site_distribution(first, name, model_sites[name]) or site["fn"]
        second_fn = site_distribution(second, name, model_sites[name]) or second.nodes[name]["fn"]
        support = model_sites[name]["fn"].support
        start = value.dim() - len(fn.event_shape) + _frame(site, data_plate).dim
        if start < 0 or any(size != 1 for size in value.shape[:start]):
            raise ValueError(
                f"{who} reads the latent site {name!r} of shape {tuple(value.shape)} as one row per data point "
                f"along pyro.plate({data_plate!r}); its leading dims are not of size 1."
            )
        shape = value.shape[start + 1:]
        n = value.shape[start]
        gaussian = None
        first_params, second_params = _normal_parameters(fn), _normal_parameters(second_fn)
        if first_params is not None and second_params is not None and all(
            torch.equal(a.broadcast_to(value.shape), b.broadcast_to(value.shape))
            for a, b in zip(first_params, second_params)
        ):  # a Normal whose parameters do not depend on another latent's draw
            gaussian = tuple(p.detach().broadcast_to(value.shape).reshape((n,) + shape).clone() for p in first_params)
        sites.append(_Site(name=name, shape=shape, discrete=bool(support.is_discrete), support=support,
                           dtype=value.dtype, gaussian=gaussian, family=_family(fn)))
    if vectorize_particles is None:
        vectorized = bool(check_vectorization(model, guide, (x,), kwargs, nesting))
    else:
        vectorized = bool(vectorize_particles)
    return _Layout(sites=sites, nesting=nesting, data_dim=data_dim, vectorized=vectorized)


def _log_joint(model: Callable, x: torch.Tensor, kwargs: dict, values: dict, layout: _Layout) -> torch.Tensor:
    r"""``log p(x_i, z)`` at the latent values ``values[name]`` of shape ``(K, N, *shape)``: shape ``(K, N)``.

    The model runs once, conditioned on the values, inside a plate of ``K`` particles to the
    left of its own plates (as :class:`pyro_lvm.estimators.particles.ParticleELBO` runs it); or,
    for a model that does not broadcast over particles (``layout.vectorized`` false), once per
    particle with the values in the shape of one batch.
    """
    k = next(iter(values.values())).shape[0]
    if layout.vectorized:
        return _joint_run(model, x, kwargs, values, layout, k)
    return torch.cat([_joint_run(model, x, kwargs, {name: value[i] for name, value in values.items()}, layout, None)
                      for i in range(k)])


def _joint_run(model: Callable, x: torch.Tensor, kwargs: dict, values: dict, layout: _Layout,
               k: Optional[int]) -> torch.Tensor:
    """One conditioned run of the model: ``k`` particles in a plate, or one (``None``) without: ``(k or 1, N)``."""
    n = len(x)
    depth, keep = layout.nesting + 1, layout.nesting + 1 + layout.data_dim
    pad = (1,) * (layout.nesting + layout.data_dim)
    with poutine.block():
        if k is None:
            trace = poutine.trace(poutine.condition(model, data=values)).get_trace(x, **kwargs)
        else:
            data = {name: value.reshape((k,) + pad + value.shape[1:]) for name, value in values.items()}
            with pyro.plate(_PARTICLES, k, dim=-depth):
                trace = poutine.trace(poutine.condition(model, data=data)).get_trace(x, **kwargs)
    k = k or 1
    total = None
    for site in prune_subsample_sites(trace).nodes.values():
        if site["type"] != "sample" or site["infer"].get("_deterministic"):
            continue
        log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        log_p = scale_and_mask(log_p, site["scale"], site["mask"])
        if not isinstance(log_p, torch.Tensor):
            continue
        log_p = log_p.reshape((1,) * (depth - log_p.dim()) + log_p.shape)
        others = [d for d in range(depth) if d not in (0, keep)]
        log_p = log_p.sum(others, keepdim=True) if others else log_p
        log_p = log_p.reshape(log_p.shape[0], log_p.shape[keep])
        total = log_p if total is None else total + log_p
    return total.expand(k, n)


def _flat_draws(model: Callable, guide: Callable, x: torch.Tensor, kwargs: dict, num: int, chunk_size: int,
                data_plate: str, layout: _Layout) -> dict[str, Any]:
    """``num`` draws of the guide per data point: log weights ``(num, N)`` and latents ``{name: (num, N, D)}``."""
    return _draws(model, guide, x, num, chunk_size, len(x), data_plate, kwargs, True, layout.vectorized)


def _refuse_discrete(layout: _Layout, who: str, model: Any, reason: str, alternative: str) -> None:
    discrete = [f"{site.name!r} ({site.family})" for site in layout.sites if site.discrete]
    if discrete:
        raise ValueError(
            f"{who} needs continuous latents; {_name(model)} has the discrete latent site(s) {', '.join(discrete)}: "
            f"{reason} {alternative}"
        )


def _name(model: Any) -> str:
    module = _module_of(model)
    return type(module).__name__ if module is not None else getattr(model, "__name__", type(model).__name__)


def _gaussian_log_weights(model: Callable, x: torch.Tensor, kwargs: dict, layout: _Layout, loc: dict, scale: dict,
                          eps: dict, stick: bool = False) -> torch.Tensor:
    """``log p(x, z) - log q(z)`` at ``z = loc + scale * eps`` per site, ``(K, N)``; ``stick`` detaches q's parameters in ``log q``."""
    values, log_q = {}, 0.0
    for name in loc:
        z = loc[name] + scale[name] * eps[name]
        q_loc, q_scale = (loc[name].detach(), scale[name].detach()) if stick else (loc[name], scale[name])
        log_q = log_q + dist.Normal(q_loc, q_scale).log_prob(z).reshape(z.shape[:2] + (-1,)).sum(-1)
        values[name] = z
    return _log_joint(model, x, kwargs, values, layout) - log_q


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
        loc: per latent site, the optimized means, ``(N, *site_shape)``.
        scale: per latent site, the optimized standard deviations, ``(N, *site_shape)``.
        same_family: whether the guide is itself a diagonal Gaussian of ``x`` at every site, so that
            :math:`q_i` and the guide are of one family; if not (a flow posterior, a hierarchical
            guide whose upper sites depend on the lower draws) the "amortization gap" also holds the
            difference between the two families and may be negative.
        family: that in words, for reports.
    """

    table: pd.DataFrame
    history: pd.DataFrame
    loc: dict
    scale: dict
    same_family: bool = True
    family: str = ""

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
    guide: Optional[Callable] = None,
    data_plate: str = "data",
    vectorize_particles: Optional[bool] = None,
    **kwargs,
) -> AmortizationGap:
    r"""Per data point, the amortization gap and the approximation gap of the guide :math:`q(z \mid x)`.

    The gap between :math:`\log p(x_i)` and the amortized ELBO splits into two
    (Cremer, Li & Duvenaud 2018):

    .. math::

        \log p(x_i) - \mathcal L[q_\phi(\cdot \mid x_i)]
        = \underbrace{\log p(x_i) - \mathcal L[q_i^*]}_{\text{approximation gap}}
        + \underbrace{\mathcal L[q_i^*] - \mathcal L[q_\phi(\cdot \mid x_i)]}_{\text{amortization gap}},
        \qquad \mathcal L[q] = \mathbb E_q\big[\log p(x_i, z) - \log q(z)\big],

    where :math:`q_i^* = \arg\max_q \mathcal L[q]` is the best member of the variational
    family for this data point alone. The approximation gap is
    :math:`\mathrm{KL}(q_i^* \,\|\, p(z \mid x_i))`, the price of the family; the
    amortization gap is the price of one encoder for all inputs. Here :math:`q_i^*` is
    approximated by a diagonal Gaussian per continuous latent site,
    :math:`q_i = \prod_s \mathcal N(m_{is}, \operatorname{diag} e^{2 s_{is}})` (mean-field
    across sites), refined by ``num_steps`` of Adam on the reparameterized ELBO
    (``num_particles`` draws per step, all data points at once; the model is fixed; the
    learning rate decays from ``lr`` to 0 on a cosine, so that the last steps settle), with
    the "sticking the landing" gradient (Roeder et al. 2017): :math:`\log q` is evaluated
    with its parameters detached, so the gradient vanishes draw by draw at the exact posterior.

    **Start and family.** Where the guide's site is a (possibly ``Independent``) ``Normal``
    whose parameters depend on ``x`` alone (a VAE's encoder, a conditional VAE's
    :math:`q(z \mid x, y)`), :math:`q_i` starts at its ``loc`` and ``scale`` and the guide
    is of :math:`q_i`'s family. Otherwise (a flow posterior; a hierarchical guide, whose
    :math:`q(z_2 \mid z_1)` depends on the draw of :math:`z_1`) :math:`q_i` starts at the mean
    and standard deviation of ``eval_particles`` draws of the guide, and **the families
    differ**: the guide may be richer than :math:`q_i`, so the "amortization gap" then also
    holds the difference of the families and can be negative
    (``AmortizationGap.same_family`` is ``False`` and ``family`` says so).

    The final ELBOs are estimated with ``eval_particles`` draws. For a Gaussian guide both
    use the same standard-normal draws :math:`\epsilon` (:math:`z = m + \sigma \epsilon`),
    so that the gap's Monte-Carlo error is that of the difference of the log weights
    (``amortization_gap_stderr``); otherwise the guide's draws are independent of
    :math:`q_i`'s and the standard error is that of a difference of two independent means.
    :math:`\log p(x_i)` is one of two IWAE estimates (each a lower bound in expectation):
    with the model's own guide (:func:`pyro_lvm.evaluation.log_likelihood`,
    ``log_likelihood_particles``) or with the optimized :math:`q_i` (from the
    ``eval_particles`` draws). Each proposal's Pareto :math:`\hat k` (see :func:`psis_khat`;
    from the ``eval_particles`` draws) says whether its error estimate,
    :math:`\sqrt{1/\mathrm{ESS} - 1/K}` (delta method), can be trusted (:math:`\hat k < 0.7`):
    among trusted estimates the one with the smaller error is taken, else the one with the
    smaller :math:`\hat k` (not the larger value: a heavy-tailed estimate can overshoot
    :math:`\log p(x_i)`, and the mean-field optimum is often too narrow). Both gaps are
    :math:`\ge 0` up to Monte-Carlo noise and the finite optimization (for one family): an
    amortization gap below zero by more than a few standard errors means the refinement
    diverged (lower ``lr``); an approximation gap that stays large may also mean too few steps.

    The pair: any model/guide whose latent and observed sites live in ``pyro.plate("data")``
    (or ``data_plate``) and broadcast over a leading particle dimension, as for
    :func:`pyro_lvm.evaluation.log_likelihood`; :math:`\log p(x_i, z)` is the model's trace
    conditioned on the latent values. Discrete latents are refused (there is no Gaussian
    :math:`q_i` to refine): use :func:`psis_khat` and :func:`pyro_lvm.evaluation.log_likelihood`.

    Memory: the refinement holds ``num_particles x N`` model passes with gradients, so
    pass a modest batch ``x`` (tens to hundreds of points); evaluation runs
    ``chunk_size x N`` at a time. The modules behind the pair are put in eval mode while this runs.

    References:
        Inference Suboptimality in Variational Autoencoders (Cremer, Li & Duvenaud, 2018),
        https://arxiv.org/abs/1801.03558;
        Sticking the Landing (Roeder, Wu & Duvenaud, 2017), https://arxiv.org/abs/1703.09194

    Arguments:
        model: the model, or a module with ``model`` and ``guide`` methods (e.g. a :class:`pyro_lvm.VAE`).
        x: the data points, ``(N, *event_shape)`` (a conditional model's inputs).
        num_steps: Adam steps of the per-datapoint refinement.
        lr: Adam's learning rate.
        num_particles: draws per step for the ELBO's gradient.
        eval_particles: draws for the final ELBOs and k-hats (kept in memory, ``eval_particles x N``).
        log_likelihood_particles: importance samples for the log-likelihood with the model's guide.
        history_every: record the mean ELBO every this many steps (with fixed draws).
        chunk_size: draws per vectorized evaluation run.
        guide: the guide, for a model function of your own; ``None`` for a module's.
        data_plate: the name of the pair's plate of independent data points.
        vectorize_particles: run the particles in one pass, one at a time, or ``None`` (decided by
            :func:`pyro_lvm.pairs.check_vectorization`), for a model that does not broadcast over them.
        kwargs: passed to ``model`` and ``guide`` (e.g. a conditional VAE's ``y`` and ``mask``).

    Example:
        >>> from pyro_lvm import VAE
        >>> vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8])
        >>> x = torch.bernoulli(torch.full((3, 4), 0.5))
        >>> gaps = amortization_gap(vae, x, num_steps=20, eval_particles=50, log_likelihood_particles=50)
        >>> list(gaps.table.columns[:3]), gaps.same_family
        (['elbo_amortized', 'elbo_optimized', 'log_likelihood'], True)
        >>> len(gaps.history), tuple(gaps.loc["z"].shape)
        (3, (3, 2))
    """
    for name, value in (("num_steps", num_steps), ("num_particles", num_particles), ("eval_particles", eval_particles),
                        ("log_likelihood_particles", log_likelihood_particles), ("history_every", history_every),
                        ("chunk_size", chunk_size)):
        least = {"num_steps": 0, "eval_particles": 2}.get(name, 1)  # two draws at least for a standard error
        if value < least:
            raise ValueError(f"amortization_gap needs {name} >= {least}; got {value}.")
    if lr <= 0:
        raise ValueError(f"amortization_gap needs a positive learning rate; got lr={lr}.")
    model_fn, guide_fn = resolve(model, guide, "amortization_gap")
    with _Evaluating(model, guide, model_fn, guide_fn):
        layout = _layout(model_fn, guide_fn, x, kwargs, data_plate, "amortization_gap", vectorize_particles)
        _refuse_discrete(layout, "amortization_gap", model,
                         "it refines a Gaussian q_i per data point, which a discrete latent cannot have.",
                         "Use psis_khat and pyro_lvm.evaluation.log_likelihood (its elbo and log p(x) per point) instead.")
        same_family = all(site.gaussian is not None for site in layout.sites)
        loc0, scale0, amortized = {}, {}, None
        if not same_family:
            draws = _flat_draws(model_fn, guide_fn, x, kwargs, eval_particles, chunk_size, data_plate, layout)
            amortized = draws["log_weights"].cpu()
        for site in layout.sites:
            if site.gaussian is not None:
                loc0[site.name], scale0[site.name] = site.gaussian
            else:
                values = draws["latents"][site.name]
                shape = (len(x),) + site.shape
                loc0[site.name] = values.mean(0).reshape(shape).to(site.dtype)
                scale0[site.name] = values.std(0).clamp(min=1e-6).reshape(shape).to(site.dtype)
        names = list(loc0)
        loc = {n: loc0[n].detach().clone().requires_grad_() for n in names}
        log_scale = {n: scale0[n].detach().log().requires_grad_() for n in names}
        params = [loc[n] for n in names] + [log_scale[n] for n in names]
        optimizer = torch.optim.Adam(params, lr=lr)

        def noise(size: int) -> dict:
            return {n: torch.randn((size,) + loc0[n].shape, dtype=loc0[n].dtype, device=loc0[n].device) for n in names}

        def scales() -> dict:
            return {n: log_scale[n].exp() for n in names}

        history_eps = noise(min(chunk_size, eval_particles))
        history = []
        for step in range(num_steps + 1):
            if step % history_every == 0 or step == num_steps:
                elbo = _gaussian_log_weights(model_fn, x, kwargs, layout, loc, scales(), history_eps).double().mean()
                history.append((step, float(elbo)))
            if step == num_steps:
                break
            eps = noise(num_particles)
            # cosine decay to 0: Adam's steps do not shrink with the gradient's noise at the optimum
            optimizer.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / num_steps))
            with torch.enable_grad():
                log_w = _gaussian_log_weights(model_fn, x, kwargs, layout, loc, scales(), eps, stick=True)
                grads = torch.autograd.grad(-log_w.mean(0).sum(), params)
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
        loc = {n: loc[n].detach() for n in names}
        scale = {n: log_scale[n].detach().exp() for n in names}

        draws_amortized, draws_optimized = [], []
        for size in _chunks(eval_particles, chunk_size):
            eps = noise(size)
            if same_family:
                draws_amortized.append(_gaussian_log_weights(model_fn, x, kwargs, layout, loc0, scale0, eps).double().cpu())
            draws_optimized.append(_gaussian_log_weights(model_fn, x, kwargs, layout, loc, scale, eps).double().cpu())
        by_guide = log_likelihood(model_fn, guide_fn, x, num_particles=log_likelihood_particles,
                                  chunk_size=chunk_size, batch_size=len(x), data_plate=data_plate,
                                  vectorize_particles=layout.vectorized, **kwargs)
    optimized = torch.cat(draws_optimized)
    amortized = torch.cat(draws_amortized) if same_family else amortized
    k = eval_particles
    elbo_amortized, elbo_optimized = amortized.mean(0), optimized.mean(0)
    if same_family:  # common random numbers: the error of the mean difference
        diff = optimized - amortized
        gap, gap_stderr = diff.mean(0), diff.std(0) / math.sqrt(k)
    else:
        gap = elbo_optimized - elbo_amortized
        gap_stderr = ((optimized.var(0) + amortized.var(0)) / k).sqrt()
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
    if same_family:
        family = "q_i: a diagonal Gaussian per latent site, the guide's own family, started at the guide's loc and scale."
    else:
        other = ", ".join(f"{s.name} ({s.family}{', depends on other latents' if s.family == 'Normal' else ''})"
                          for s in layout.sites if s.gaussian is None)
        family = ("q_i: a diagonal Gaussian per latent site, started at the mean and sd of the guide's draws; "
                  f"the guide's family differs ({other}), so the amortization gap also holds the difference "
                  "between the two families and may be negative.")
    return AmortizationGap(table=table, history=history_frame, loc=loc, scale=scale, same_family=same_family,
                           family=family)


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
        table: one row per (``obs``, ``site``, ``latent``), ``latent`` indexing the site's
            flattened dimensions: ``nuts_mean``, ``nuts_sd``, ``guide_mean``, ``guide_sd``,
            ``wasserstein`` (:func:`wasserstein_1d` between the two samples), ``r_hat``
            (split R-hat) and ``ess`` of the NUTS chains.
        samples: per latent site, the NUTS draws, ``(num_chains, num_samples, N, *site_shape)``.
        guide_samples: per latent site, the draws of :math:`q(z \mid x_i)`, ``(guide_samples, N, *site_shape)``.
    """

    table: pd.DataFrame
    samples: dict
    guide_samples: dict


def compare_with_nuts(
    model: Any,
    x: torch.Tensor,
    num_samples: int = 500,
    warmup_steps: int = 300,
    num_chains: int = 2,
    guide_samples: int = 2000,
    max_tree_depth: int = 8,
    full_mass: bool = False,
    guide: Optional[Callable] = None,
    data_plate: str = "data",
    chunk_size: int = 100,
    vectorize_particles: Optional[bool] = None,
    **kwargs,
) -> NutsComparison:
    r"""Run NUTS on :math:`p(z \mid x_i)` with the trained model and compare it with :math:`q(z \mid x_i)`.

    The unnormalized posterior :math:`p(z \mid x_i) \propto p(x_i, z)` of each chosen input,
    over all its latent sites jointly (:math:`z_1, \dots, z_L` of a hierarchy; :math:`z` of a
    conditional model given its input and target, passed in ``kwargs``), is sampled by the
    No-U-Turn sampler (``pyro.infer.NUTS`` with step size and mass matrix, diagonal or dense,
    adapted during ``warmup_steps``). :math:`\log p(x_i, z)` is the model's trace conditioned
    on the latent values; a site with a constrained support is sampled in the unconstrained
    space (``biject_to``, with its log-Jacobian). The inputs' posteriors are independent given
    the model, so they are sampled together as one product distribution over
    :math:`(z_1, \dots, z_N)`: one run per chain, chains run one after the other in this
    process (no multiprocessing), each started at a draw of the guide. Per input, site and
    latent dimension the table holds the marginal means and standard deviations under NUTS
    and under the guide, the Wasserstein-1 distance between the two samples (in the latent's
    units: for two Gaussians of equal spread it is the difference of means), and the chains'
    split :math:`\hat R` (Gelman-Rubin; want :math:`< 1.01`-:math:`1.05`) and effective
    sample size (``pyro.ops.stats``). NUTS is asymptotically exact, so a large distance with
    a good :math:`\hat R` and ESS says the guide is wrong for that input. The NUTS means carry
    a Monte-Carlo error of about ``nuts_sd / sqrt(ess)``.

    Discrete latents are refused: Hamiltonian Monte Carlo moves along the gradient of
    :math:`\log p(x, z)` in :math:`z`, which a discrete latent does not have (check such a
    guide with :func:`sbc` or :func:`psis_khat`).

    Cost: ``num_chains * (warmup_steps + num_samples)`` NUTS iterations of up to
    ``2 ** max_tree_depth`` model passes each on the ``N`` inputs: keep ``x``
    to a handful of points.

    References:
        The No-U-Turn Sampler (Hoffman & Gelman, 2011), https://arxiv.org/abs/1111.4246;
        Yes, but Did It Work?: Evaluating Variational Inference (Yao et al., 2018), https://arxiv.org/abs/1802.02538

    Arguments:
        model: the model, or a module with ``model`` and ``guide`` methods (e.g. a :class:`pyro_lvm.VAE`).
        x: the chosen inputs, ``(N, *event_shape)`` (a few).
        num_samples: NUTS draws kept per chain.
        warmup_steps: adaptation steps per chain (discarded).
        num_chains: independent chains (at least 1; 2 or more for a meaningful R-hat).
        guide_samples: draws of :math:`q(z \mid x_i)` per input.
        max_tree_depth: NUTS's maximum tree depth.
        full_mass: adapt a dense mass matrix over all chosen inputs' latents (for strongly
            correlated posteriors; its size is the square of ``N x`` the latent size).
        guide: the guide, for a model function of your own; ``None`` for a module's.
        data_plate: the name of the pair's plate of independent data points.
        chunk_size: guide draws per vectorized run.
        vectorize_particles: run the particles in one pass, one at a time, or ``None`` (decided by
            :func:`pyro_lvm.pairs.check_vectorization`), for a model that does not broadcast over them.
        kwargs: passed to ``model`` and ``guide`` (e.g. a conditional VAE's ``y`` and ``mask``).

    Example:
        >>> from pyro_lvm import VAE
        >>> vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8])
        >>> x = torch.bernoulli(torch.full((2, 4), 0.5))
        >>> result = compare_with_nuts(vae, x, num_samples=20, warmup_steps=20, guide_samples=50)
        >>> result.table.shape, tuple(result.samples["z"].shape)
        ((4, 10), (2, 20, 2, 2))
    """
    from pyro.infer import MCMC, NUTS
    from pyro.ops.stats import effective_sample_size, split_gelman_rubin

    for name, value in (("num_samples", num_samples), ("num_chains", num_chains), ("guide_samples", guide_samples),
                        ("chunk_size", chunk_size)):
        if value < 1:
            raise ValueError(f"compare_with_nuts needs {name} >= 1; got {value}.")
    if num_samples < 4:
        raise ValueError(f"compare_with_nuts needs num_samples >= 4 (split R-hat halves each chain); got {num_samples}.")
    if warmup_steps < 0:
        raise ValueError(f"compare_with_nuts needs warmup_steps >= 0; got {warmup_steps}.")
    model_fn, guide_fn = resolve(model, guide, "compare_with_nuts")
    x = x.detach()
    n = len(x)
    with _Evaluating(model, guide, model_fn, guide_fn):
        layout = _layout(model_fn, guide_fn, x, kwargs, data_plate, "compare_with_nuts", vectorize_particles)
        _refuse_discrete(layout, "compare_with_nuts", model,
                         "NUTS (Hamiltonian Monte Carlo) moves along the gradient of log p(x, z) in z, which a "
                         "discrete latent does not have.",
                         "Check such a guide with sbc (ranks with random tie-breaking) or psis_khat instead.")
        transforms = {site.name: biject_to(site.support) for site in layout.sites}

        def potential(params: dict) -> torch.Tensor:
            values, log_det = {}, 0.0
            for name, u in params.items():
                z = transforms[name](u)
                log_det = log_det + transforms[name].log_abs_det_jacobian(u, z).sum()
                values[name] = z.unsqueeze(0)
            return -(_log_joint(model_fn, x, kwargs, values, layout).sum() + log_det)

        with torch.no_grad():
            q_draws = _flat_draws(model_fn, guide_fn, x, kwargs, guide_samples, chunk_size, data_plate, layout)["latents"]
            starts = _flat_draws(model_fn, guide_fn, x, kwargs, num_chains, chunk_size, data_plate, layout)["latents"]
        chains: dict[str, list] = {site.name: [] for site in layout.sites}
        for chain in range(num_chains):
            initial = {
                site.name: transforms[site.name].inv(starts[site.name][chain].reshape((n,) + site.shape).to(site.dtype))
                for site in layout.sites
            }
            kernel = NUTS(potential_fn=potential, adapt_step_size=True, adapt_mass_matrix=True,
                          full_mass=full_mass, max_tree_depth=max_tree_depth)
            mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps,
                        initial_params=initial, disable_progbar=True)
            mcmc.run()
            for name, value in mcmc.get_samples().items():
                chains[name].append(transforms[name](value.detach()))
    samples = {name: torch.stack(values) for name, values in chains.items()}
    guide_draws = {site.name: q_draws[site.name].reshape((guide_samples, n) + site.shape).to(site.dtype)
                   for site in layout.sites}
    rows = []
    for site in layout.sites:
        flat = samples[site.name].reshape(num_chains, num_samples, n, -1).double().cpu()
        q_flat = q_draws[site.name].double().cpu()
        r_hat = split_gelman_rubin(flat, chain_dim=0, sample_dim=1)
        ess = effective_sample_size(flat, chain_dim=0, sample_dim=1)
        pooled = flat.reshape(-1, n, flat.shape[-1])
        for i in range(n):
            for d in range(flat.shape[-1]):
                nuts, q = pooled[:, i, d], q_flat[:, i, d]
                rows.append({
                    "obs": i, "site": site.name, "latent": d,
                    "nuts_mean": float(nuts.mean()), "nuts_sd": float(nuts.std()),
                    "guide_mean": float(q.mean()), "guide_sd": float(q.std()),
                    "wasserstein": float(wasserstein_1d(nuts, q)),
                    "r_hat": float(r_hat[i, d]), "ess": float(ess[i, d]),
                })
    table = pd.DataFrame(rows).sort_values(["obs"], kind="stable").reset_index(drop=True)
    return NutsComparison(table=table, samples=samples, guide_samples=guide_draws)


@dataclass
class SBCResult:
    r"""The result of :func:`sbc`.

    Arguments:
        ranks: per simulation and latent dimension (every site's dimensions flattened and
            concatenated in the guide's order), the number of the ``num_draws`` guide draws
            below the true value (ties broken at random): ``(num_simulations, D)``, in ``0..num_draws``.
        p_values: per latent dimension, the p-value of the chi-square test of uniformity of the binned ranks, ``(D,)``.
        num_draws: draws from :math:`q(z \mid x)` per simulation.
        num_bins: bins of the test and the histograms.
        labels: the name of each column of ``ranks``, ``"site[d]"``.
    """

    ranks: torch.Tensor
    p_values: torch.Tensor
    num_draws: int
    num_bins: int
    labels: list = field(default_factory=list)


def _binned(ranks: torch.Tensor, num_draws: int, num_bins: int) -> torch.Tensor:
    """Counts per bin and dimension, ``(num_bins, D)``: rank r goes to bin ``r * num_bins // (num_draws + 1)``."""
    bins = ranks * num_bins // (num_draws + 1)
    return torch.stack([torch.bincount(bins[:, d], minlength=num_bins) for d in range(ranks.shape[1])], 1)


def _distribution_guide(guide: Callable, x: torch.Tensor, kwargs: dict, data_plate: str) -> Optional[Callable]:
    """A guide given as ``x -> q(z | x)`` (a distribution, the older form) as a Pyro guide of the site ``"z"``."""
    try:
        with poutine.block(), torch.no_grad():
            trace = poutine.trace(guide).get_trace(x)
    except TypeError:
        return None
    returned = trace.nodes["_RETURN"]["value"]
    if not isinstance(returned, torch.distributions.Distribution) or latent_sites(trace):
        return None

    def pyro_guide(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with pyro.plate(data_plate, len(x)):
            return pyro.sample("z", guide(x))

    return pyro_guide


def _observed_argument(site: dict, x: torch.Tensor, kwargs: dict) -> Optional[str]:
    """The argument (``"x"`` or a keyword) whose tensor the observed ``site`` observes."""
    obs = site["infer"]["obs"]
    arguments = {"x": x, **{k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}}
    for key, value in arguments.items():
        if value is obs:
            return key
    for key, value in arguments.items():  # a view (e.g. x flattened) of an argument
        if value.numel() == obs.numel() and value.numel() > 0 and value.data_ptr() == obs.data_ptr():
            return key
    return None


def _unmodelled(fn: Any) -> Optional[torch.Tensor]:
    """The mask of a masked likelihood (``fn.mask(m).to_event(...)``): False on entries the model does not score."""
    base = fn
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    mask = getattr(base, "_mask", None)
    return mask if isinstance(mask, torch.Tensor) else None


@torch.no_grad()
def sbc(
    model: Any,
    guide: Optional[Callable] = None,
    num_simulations: int = 1000,
    num_draws: int = 99,
    num_bins: int = 20,
    batch_size: int = 500,
    x: Optional[torch.Tensor] = None,
    data_plate: str = "data",
    vectorize_particles: Optional[bool] = None,
    **kwargs,
) -> SBCResult:
    r"""Simulation-based calibration of the amortized posterior :math:`q(z \mid x)` (Talts et al. 2018).

    Each simulation draws :math:`(\tilde z, \tilde x) \sim p(z, x)` from the model (every
    latent site and every observed site, the observations unconditioned with
    ``pyro.poutine.uncondition``; a binary image for a Bernoulli likelihood), then
    :math:`L` = ``num_draws`` draws :math:`z^{(l)} \sim q(z \mid \tilde x)`, and records per
    latent site and dimension :math:`d` the rank
    :math:`r_d = \#\{l : z^{(l)}_d < \tilde z_d\} + U_d \in \{0, \dots, L\}`, where
    :math:`U_d` is uniform on :math:`\{0, \dots, \#\{l : z^{(l)}_d = \tilde z_d\}\}`: ties,
    which only a discrete latent has, are broken at random, so that discrete latents (a
    one-hot coordinate, a bit) are checked too. If :math:`q(z \mid x) = p(z \mid x)`, then
    :math:`\tilde z` and the draws are exchangeable given :math:`\tilde x` and :math:`r_d`
    is uniform on :math:`\{0, \dots, L\}`, whatever the model. The ranks are grouped into
    ``num_bins`` equal bins and tested with Pearson's chi-square,

    .. math::

        X^2 = \sum_{j=1}^{J} \frac{(O_j - N/J)^2}{N/J} \ \sim\ \chi^2_{J-1}
        \quad\text{under uniformity},

    whose p-value is reported per dimension (small: not calibrated). Read the histograms
    (:func:`plot_sbc`): a U shape means :math:`q` is too narrow (overconfident), a hump too
    wide, a slope a biased mean. Uniform ranks are necessary, not sufficient: the prior
    itself, used as :math:`q`, is calibrated too. Only the amortized posterior over the
    prior predictive is checked, and the test's power grows with ``num_simulations``.

    **The data passed in.** The model is called as in training, ``model(x, **kwargs)``, with
    its observed sites drawn instead of observed: simulation :math:`j` uses row
    :math:`j \bmod N` of ``x`` and of each tensor in ``kwargs`` with one row per data point.
    For an unconditional model only their shapes matter (default for a built-in model: its
    ``example_batch``). For a conditional model they are the conditioning: a
    :class:`pyro_lvm.ConditionalVAE` given the inputs ``x`` and ``y=..., mask=...`` draws
    :math:`\tilde z \sim p(z \mid x)`, :math:`\tilde y \sim p(y \mid x, \tilde z)` and ranks
    :math:`\tilde z` among draws of :math:`q(z \mid x, \tilde y)`: calibration averaged over
    the given inputs. The simulated value of an observed site replaces the argument it
    observes (found by identity: ``obs=x`` or ``obs=y``, or a view of it); entries that a
    masked likelihood does not score (``mask`` False) keep the given values, as they are no
    part of the model. The target must be given (``y``): without it a conditional model
    observes nothing and its guide is the prior.

    References:
        Validating Bayesian Inference Algorithms with Simulation-Based Calibration
        (Talts, Betancourt, Simpson, Vehtari & Gelman, 2018), https://arxiv.org/abs/1804.06788

    Arguments:
        model: the model, or a module with ``model`` and ``guide`` methods (e.g. a :class:`pyro_lvm.VAE`).
        guide: the guide (a Pyro guide of the model's latent sites), or a callable returning the
            distribution :math:`q(z \mid x)` of the site ``"z"`` for a batch ``x``; ``None`` for a module's.
        num_simulations: simulated pairs :math:`(\tilde z, \tilde x)`.
        num_draws: draws from :math:`q` per simulation (``num_draws + 1`` must be a multiple of ``num_bins``).
        num_bins: bins of the uniformity test.
        batch_size: simulations per vectorized run.
        x: the data rows the simulations cycle through (see above); ``None`` for a built-in model's ``example_batch``.
        data_plate: the name of the pair's plate of independent data points.
        vectorize_particles: run the particles in one pass, one at a time, or ``None`` (decided by
            :func:`pyro_lvm.pairs.check_vectorization`), for a model that does not broadcast over them.
        kwargs: passed to ``model`` and ``guide`` (e.g. a conditional VAE's ``y`` and ``mask``).

    Example:
        >>> from pyro_lvm import VAE
        >>> vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8])
        >>> result = sbc(vae, num_simulations=40, num_draws=19, num_bins=5)
        >>> tuple(result.ranks.shape), tuple(result.p_values.shape), result.labels
        ((40, 2), (2,), ['z[0]', 'z[1]'])
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
    if x is None:
        if not callable(getattr(model, "example_batch", None)):
            raise ValueError(
                f"sbc of {_name(model)} needs data rows x=...: the simulations are called model(x, **kwargs) with "
                "their shape (and, for a conditional model, their inputs). Pass e.g. x=data[:100]."
            )
        x = model.example_batch(1)
    if len(x) < 1:
        raise ValueError("sbc needs at least one data row x; got an empty tensor.")
    model_fn, guide_fn = resolve(model, guide, "sbc")
    with _Evaluating(model, guide, model_fn, guide_fn):
        # the older form of a built-in model's guide: x -> q(z | x), a distribution
        older = guide is not None and callable(getattr(model, "posterior", None))
        legacy = _distribution_guide(guide_fn, x[:1], kwargs, data_plate) if older else None
        guide_fn = legacy or guide_fn
        first_x, first_kwargs = _take(x, kwargs, torch.arange(min(batch_size, len(x))))
        layout = _layout(model_fn, guide_fn, first_x, first_kwargs, data_plate, "sbc", vectorize_particles)
        ranks = []
        for start, size in zip(range(0, num_simulations, batch_size), _chunks(num_simulations, batch_size)):
            xb, kwb = _take(x, kwargs, torch.arange(start, start + size) % len(x))
            with poutine.block():
                trace = prune_subsample_sites(poutine.trace(poutine.uncondition(model_fn)).get_trace(xb, **kwb))
            observed = [site for site in trace.nodes.values()
                        if site["type"] == "sample" and site["infer"].get("was_observed")
                        and not site["infer"].get("_deterministic")]
            if not observed:
                raise ValueError(
                    f"sbc simulates the observed sites of the model, but {_name(model)} observed nothing when called "
                    f"with x and {sorted(kwargs) or 'no keyword arguments'}. For a conditional model pass the target "
                    "too (e.g. y=..., mask=... for pyro_lvm.ConditionalVAE)."
                )
            arguments = {"x": xb, **kwb}
            for site in observed:
                key = _observed_argument(site, xb, kwb)
                if key is None:
                    raise ValueError(
                        f"sbc cannot tell which argument the observed site {site['name']!r} observes: it must observe "
                        "an argument of the model as given (obs=x, obs=y, or a view of it)."
                    )
                value, given = site["value"], site["infer"]["obs"]
                keep = _unmodelled(site["fn"])
                if keep is not None:
                    value = torch.where(keep.expand(value.shape), value, given.expand(value.shape).to(value.dtype))
                arguments[key] = value.reshape(arguments[key].shape).to(arguments[key].dtype)
            x_sim = arguments.pop("x")
            truth = {site.name: trace.nodes[site.name]["value"].reshape(size, -1).double() for site in layout.sites}
            draws = _flat_draws(model_fn, guide_fn, x_sim, arguments, num_draws, num_draws, data_plate, layout)["latents"]
            parts = []
            for site in layout.sites:
                z, true = draws[site.name], truth[site.name]
                below, ties = (z < true).sum(0), (z == true).sum(0)
                parts.append(below + (torch.rand(ties.shape, device=ties.device) * (ties + 1)).floor().long())
            ranks.append(torch.cat(parts, 1))
    ranks = torch.cat(ranks).long().cpu()
    labels = [f"{site.name}[{d}]" for site in layout.sites for d in range(math.prod(site.shape))]
    counts = _binned(ranks, num_draws, num_bins).double()
    expected = num_simulations / num_bins
    statistic = ((counts - expected) ** 2 / expected).sum(0)
    p_values = 1 - torch.distributions.Chi2(torch.tensor(float(num_bins - 1), dtype=torch.float64)).cdf(statistic)
    return SBCResult(ranks=ranks, p_values=p_values, num_draws=num_draws, num_bins=num_bins, labels=labels)


def plot_sbc(result: SBCResult, path: Optional[str] = None, band: float = 0.99, max_panels: Optional[int] = None):
    r"""Rank histograms of :func:`sbc`, one panel per latent dimension, with the uniform band.

    The grey band is the central ``band`` interval of each bin's count under uniformity,
    :math:`\mathrm{Binomial}(N, 1/J)`; about ``1 - band`` of the bins fall outside it by chance.

    Arguments:
        result: the output of :func:`sbc`.
        path: where to save the figure (any format matplotlib knows), or ``None``.
        band: the probability of the uniform band.
        max_panels: draw at most this many dimensions, those with the smallest p-values
            (the least uniform); ``None`` for all (a large latent makes a large figure).

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
    if max_panels is not None and max_panels < 1:
        raise ValueError(f"plot_sbc needs max_panels >= 1 (or None for all); got {max_panels}.")
    counts = _binned(result.ranks, result.num_draws, result.num_bins).numpy()
    n, dims = result.ranks.shape
    labels = result.labels if len(result.labels) == dims else [f"z[{d}]" for d in range(dims)]
    shown = np.arange(dims)
    if max_panels is not None and dims > max_panels:
        shown = np.sort(np.argsort(result.p_values.numpy(), kind="stable")[:max_panels])
    counts, labels, p_values = counts[:, shown], [labels[d] for d in shown], result.p_values[shown]
    dims = len(shown)
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
        ax.set_title(f"{labels[d]}  p = {float(p_values[d]):.2g}", fontsize=9)
        ax.set_xticks([])
    fig.supxlabel("rank of the true z among the guide's draws")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig
