r"""The guide's draws as an ArviZ ``InferenceData``: posterior, log-likelihood, log weights and :math:`\hat k`."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from .importance import importance_draws, resolve_with_data
from .psis import psislw, rounding_tolerance

__all__ = ["to_inference_data"]

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
      draws, see :func:`~pyro_lvm.diagnostics.psis.psis_khat`);
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
    k-hat warns). Use :func:`pyro_lvm.diagnostics.likelihood.log_likelihood` for :math:`\log p(x)`.

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
    draws = importance_draws(model, guide, x, total, chunk_size, batch_size, data_plate, kwargs, True, vectorize_particles)
    log_w = draws["log_weights"]
    _, khat = psislw(log_w.T.cpu().numpy(), rtol=rounding_tolerance(x))

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
