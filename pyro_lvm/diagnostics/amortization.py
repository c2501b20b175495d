r"""The amortization gap and the approximation gap of a guide, per input (Cremer, Li & Duvenaud 2018)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pandas as pd
import torch

from ..ops import effective_sample_size, importance_stderr, log_mean_exp, minimize_cosine
from ..pairs import resolve
from .importance import chunk_sizes
from .likelihood import log_likelihood
from .posterior import (
    Evaluating,
    flat_draws,
    gaussian_log_weights,
    pair_layout,
    refuse_discrete,
)
from .psis import psislw

__all__ = ["AmortizationGap", "amortization_gap"]

@dataclass
class AmortizationGap:
    r"""The result of :func:`amortization_gap`.

    Arguments:
        table: one row per data point: ``elbo_amortized``, ``elbo_optimized``,
            ``log_likelihood`` (the more reliable of the two estimates below) and its
            ``log_likelihood_stderr`` (Monte-Carlo, delta method), ``log_likelihood_guide``
            (:func:`pyro_lvm.diagnostics.likelihood.log_likelihood` with the model's guide),
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
    with the model's own guide (:func:`pyro_lvm.diagnostics.likelihood.log_likelihood`,
    ``log_likelihood_particles``) or with the optimized :math:`q_i` (from the
    ``eval_particles`` draws). Each proposal's Pareto :math:`\hat k` (see :func:`~pyro_lvm.diagnostics.psis.psis_khat`;
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
    :func:`pyro_lvm.diagnostics.likelihood.log_likelihood`; :math:`\log p(x_i, z)` is the model's trace
    conditioned on the latent values. Discrete latents are refused (there is no Gaussian
    :math:`q_i` to refine): use :func:`~pyro_lvm.diagnostics.psis.psis_khat` and :func:`pyro_lvm.diagnostics.likelihood.log_likelihood`.

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
    _check_options(num_steps=num_steps, num_particles=num_particles, eval_particles=eval_particles,
                   log_likelihood_particles=log_likelihood_particles, history_every=history_every,
                   chunk_size=chunk_size, lr=lr)
    model_fn, guide_fn = resolve(model, guide, "amortization_gap")
    with Evaluating(model, guide, model_fn, guide_fn):
        layout = pair_layout(model_fn, guide_fn, x, kwargs, data_plate, "amortization_gap", vectorize_particles)
        refuse_discrete(layout, "amortization_gap", model,
                        "it refines a Gaussian q_i per data point, which a discrete latent cannot have.",
                        "Use psis_khat and pyro_lvm.diagnostics.log_likelihood (its elbo and log p(x) per point) "
                        "instead.")
        same_family = all(site.gaussian is not None for site in layout.sites)
        loc0, scale0, amortized = _start(model_fn, guide_fn, x, kwargs, layout, eval_particles, chunk_size, data_plate)

        def log_weights(loc: dict, scale: dict, eps: dict, stick: bool = False) -> torch.Tensor:
            return gaussian_log_weights(model_fn, x, kwargs, layout, loc, scale, eps, stick=stick)

        def noise(size: int) -> dict:
            return {n: torch.randn((size,) + v.shape, dtype=v.dtype, device=v.device) for n, v in loc0.items()}

        loc, scale, history = _refine(log_weights, noise, loc0, scale0, num_steps, lr, num_particles,
                                      history_every, min(chunk_size, eval_particles))
        draws_amortized, draws_optimized = [], []
        for size in chunk_sizes(eval_particles, chunk_size):
            eps = noise(size)  # common random numbers for both proposals of one family
            if same_family:
                draws_amortized.append(log_weights(loc0, scale0, eps).double().cpu())
            draws_optimized.append(log_weights(loc, scale, eps).double().cpu())
        by_guide = log_likelihood(model_fn, guide_fn, x, num_particles=log_likelihood_particles,
                                  chunk_size=chunk_size, batch_size=len(x), data_plate=data_plate,
                                  vectorize_particles=layout.vectorized, **kwargs)
    amortized = torch.cat(draws_amortized) if same_family else amortized
    table = _table(amortized, torch.cat(draws_optimized), by_guide, same_family)
    history_frame = pd.DataFrame(history, columns=["step", "elbo"])
    history_frame["inference_gap"] = float(table["log_likelihood"].mean()) - history_frame["elbo"]
    return AmortizationGap(table=table, history=history_frame, loc=loc, scale=scale, same_family=same_family,
                           family=_family(layout, same_family))


def _check_options(lr: float, **counts: int) -> None:
    for name, value in counts.items():
        least = {"num_steps": 0, "eval_particles": 2}.get(name, 1)  # two draws at least for a standard error
        if value < least:
            raise ValueError(f"amortization_gap needs {name} >= {least}; got {value}.")
    if lr <= 0:
        raise ValueError(f"amortization_gap needs a positive learning rate; got lr={lr}.")


def _start(model_fn, guide_fn, x, kwargs, layout, eval_particles, chunk_size, data_plate):
    """Where q_i starts: the guide's own loc and scale, or the mean and sd of its draws (and their log weights)."""
    loc0, scale0, amortized = {}, {}, None
    if not all(site.gaussian is not None for site in layout.sites):
        draws = flat_draws(model_fn, guide_fn, x, kwargs, eval_particles, chunk_size, data_plate, layout)
        amortized = draws["log_weights"].cpu()
    for site in layout.sites:
        if site.gaussian is not None:
            loc0[site.name], scale0[site.name] = site.gaussian
        else:
            values = draws["latents"][site.name]
            shape = (len(x),) + site.shape
            loc0[site.name] = values.mean(0).reshape(shape).to(site.dtype)
            scale0[site.name] = values.std(0).clamp(min=1e-6).reshape(shape).to(site.dtype)
    return loc0, scale0, amortized


def _refine(log_weights, noise, loc0, scale0, num_steps, lr, num_particles, history_every, history_size):
    """q_i refined by Adam on its sticking-the-landing ELBO; the mean ELBO every ``history_every`` steps."""
    names = list(loc0)
    loc = {n: loc0[n].detach().clone().requires_grad_() for n in names}
    log_scale = {n: scale0[n].detach().log().requires_grad_() for n in names}
    history_eps, history = noise(history_size), []

    def scales() -> dict:
        return {n: log_scale[n].exp() for n in names}

    def record(step: int) -> None:
        if step % history_every == 0 or step == num_steps:
            history.append((step, float(log_weights(loc, scales(), history_eps).double().mean())))

    def loss() -> torch.Tensor:
        return -log_weights(loc, scales(), noise(num_particles), stick=True).mean(0).sum()

    minimize_cosine([loc[n] for n in names] + [log_scale[n] for n in names], loss, num_steps, lr, before_step=record)
    return {n: loc[n].detach() for n in names}, {n: log_scale[n].detach().exp() for n in names}, history


def _table(amortized: torch.Tensor, optimized: torch.Tensor, by_guide: Any, same_family: bool) -> pd.DataFrame:
    """The per-point table of :class:`AmortizationGap` from both proposals' log weights, ``(K, N)``."""
    k = optimized.shape[0]
    elbo_amortized, elbo_optimized = amortized.mean(0), optimized.mean(0)
    if same_family:  # common random numbers: the error of the mean difference
        diff = optimized - amortized
        gap, gap_stderr = diff.mean(0), diff.std(0) / math.sqrt(k)
    else:
        gap = elbo_optimized - elbo_amortized
        gap_stderr = ((optimized.var(0) + amortized.var(0)) / k).sqrt()
    ll_guide, se_guide = by_guide.per_point.cpu(), by_guide.mc_stderr().cpu()
    ll_optimized = log_mean_exp(optimized, 0, keepdim=False)
    se_optimized = importance_stderr(effective_sample_size(optimized, 0), k)
    _, khat = psislw(torch.stack([amortized.T, optimized.T]).numpy())
    khat_guide, khat_optimized = torch.as_tensor(khat[0]), torch.as_tensor(khat[1])
    # each estimate is a lower bound only in expectation and its error estimate is only
    # trustworthy for k < 0.7: the smaller error among reliable ones, else the smaller k
    reliable_guide, reliable_optimized = khat_guide < 0.7, khat_optimized < 0.7
    use_optimized = torch.where(reliable_guide == reliable_optimized,
                                torch.where(reliable_guide, se_optimized < se_guide, khat_optimized < khat_guide),
                                reliable_optimized)
    ll = torch.where(use_optimized, ll_optimized, ll_guide)
    columns = {
        "elbo_amortized": elbo_amortized, "elbo_optimized": elbo_optimized, "log_likelihood": ll,
        "log_likelihood_stderr": torch.where(use_optimized, se_optimized, se_guide),
        "log_likelihood_guide": ll_guide, "log_likelihood_optimized": ll_optimized,
        "amortization_gap": gap, "amortization_gap_stderr": gap_stderr,
        "approximation_gap": ll - elbo_optimized, "inference_gap": ll - elbo_amortized,
        "khat_guide": khat_guide, "khat_optimized": khat_optimized,
    }
    return pd.DataFrame({name: value.numpy() for name, value in columns.items()})


def _family(layout: Any, same_family: bool) -> str:
    if same_family:
        return "q_i: a diagonal Gaussian per latent site, the guide's own family, started at the guide's loc and scale."
    other = ", ".join(f"{s.name} ({s.family}{', depends on other latents' if s.family == 'Normal' else ''})"
                      for s in layout.sites if s.gaussian is None)
    return ("q_i: a diagonal Gaussian per latent site, started at the mean and sd of the guide's draws; "
            f"the guide's family differs ({other}), so the amortization gap also holds the difference "
            "between the two families and may be negative.")
