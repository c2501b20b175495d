r"""Simulation-based calibration of the amortized posterior :math:`q(z \mid x)` (Talts et al. 2018)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from ..pairs import latent_sites, resolve
from .importance import chunk_sizes
from .posterior import Evaluating, flat_draws, pair_layout, pair_name, take_rows

__all__ = ["SBCResult", "sbc", "plot_sbc"]

@dataclass
class SBCResult:
    r"""The result of :func:`~pyro_lvm.diagnostics.calibration.sbc`.

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
                f"sbc of {pair_name(model)} needs data rows x=...: the simulations are called model(x, **kwargs) with "
                "their shape (and, for a conditional model, their inputs). Pass e.g. x=data[:100]."
            )
        x = model.example_batch(1)
    if len(x) < 1:
        raise ValueError("sbc needs at least one data row x; got an empty tensor.")
    model_fn, guide_fn = resolve(model, guide, "sbc")
    with Evaluating(model, guide, model_fn, guide_fn):
        # the older form of a built-in model's guide: x -> q(z | x), a distribution
        older = guide is not None and callable(getattr(model, "posterior", None))
        legacy = _distribution_guide(guide_fn, x[:1], kwargs, data_plate) if older else None
        guide_fn = legacy or guide_fn
        first_x, first_kwargs = take_rows(x, kwargs, torch.arange(min(batch_size, len(x))))
        layout = pair_layout(model_fn, guide_fn, first_x, first_kwargs, data_plate, "sbc", vectorize_particles)
        ranks = []
        for start, size in zip(range(0, num_simulations, batch_size), chunk_sizes(num_simulations, batch_size)):
            xb, kwb = take_rows(x, kwargs, torch.arange(start, start + size) % len(x))
            with poutine.block():
                trace = prune_subsample_sites(poutine.trace(poutine.uncondition(model_fn)).get_trace(xb, **kwb))
            observed = [site for site in trace.nodes.values()
                        if site["type"] == "sample" and site["infer"].get("was_observed")
                        and not site["infer"].get("_deterministic")]
            if not observed:
                raise ValueError(
                    f"sbc simulates the observed sites of the model, but {pair_name(model)} observed nothing when called "
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
            draws = flat_draws(model_fn, guide_fn, x_sim, arguments, num_draws, num_draws, data_plate, layout)["latents"]
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
    r"""Rank histograms of :func:`~pyro_lvm.diagnostics.calibration.sbc`, one panel per latent dimension, with the uniform band.

    The grey band is the central ``band`` interval of each bin's count under uniformity,
    :math:`\mathrm{Binomial}(N, 1/J)`; about ``1 - band`` of the bins fall outside it by chance.

    Arguments:
        result: the output of :func:`~pyro_lvm.diagnostics.calibration.sbc`.
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
