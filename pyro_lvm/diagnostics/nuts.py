r"""NUTS on :math:`p(z \mid x_i)` with the trained model, against the guide :math:`q(z \mid x_i)`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import pandas as pd
import torch
from torch.distributions import biject_to

from ..pairs import resolve
from .posterior import Evaluating, flat_draws, log_joint, pair_layout, refuse_discrete

__all__ = ["wasserstein_1d", "NutsComparison", "compare_with_nuts"]

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
    guide with :func:`~pyro_lvm.diagnostics.calibration.sbc` or :func:`~pyro_lvm.diagnostics.psis.psis_khat`).

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
    with Evaluating(model, guide, model_fn, guide_fn):
        layout = pair_layout(model_fn, guide_fn, x, kwargs, data_plate, "compare_with_nuts", vectorize_particles)
        refuse_discrete(layout, "compare_with_nuts", model,
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
            return -(log_joint(model_fn, x, kwargs, values, layout).sum() + log_det)

        with torch.no_grad():
            q_draws = flat_draws(model_fn, guide_fn, x, kwargs, guide_samples, chunk_size, data_plate, layout)["latents"]
            starts = flat_draws(model_fn, guide_fn, x, kwargs, num_chains, chunk_size, data_plate, layout)["latents"]
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
