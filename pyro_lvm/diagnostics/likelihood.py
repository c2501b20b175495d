r"""Held-out evaluation of a model/guide pair: importance-sampled log-likelihood, ELBO, KL, active units, I(x; z).

The log-likelihood is the importance-weighted (IWAE) estimate of Burda et al. (2015),
streamed over chunks of particles and batches of data so that memory stays bounded
whatever the number of particles ``K`` and of data points ``N``; for a
:class:`pyro_lvm.FlowModel` it is the flow's exact log-density (or its dequantization
bound). :func:`evaluate` adds bits per dimension, the ELBO and its two terms, the KL per
latent dimension, the active units and the mutual information :math:`I(x; z)` of the
guide's joint :math:`q(x, z) = p_{\mathrm{data}}(x)\, q(z \mid x)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import torch
from pyro import poutine

from ..estimators.particles import LogWeights
from ..likelihoods import compiled_log_prob
from ..models.flow import FlowModel
from ..pairs import (
    enumerated_elbo_parts,
    enumerated_sites,
    latent_sites,
    rows,
    site_distribution,
)
from ..training.monitor import LatentMonitor, latent_statistics
from .importance import particle_chunks, per_point, resolve_with_data

__all__ = ["LogLikelihood", "log_likelihood", "Evaluation", "evaluate"]

# particles x data elements above which log_likelihood compiles the likelihood's kernel by
# itself: seconds of compilation against minutes of work (K = 5000 on 1,000 MNIST images is 3.9e9)
_COMPILE_WORK = 1e9


@dataclass
class LogLikelihood:
    r"""The result of :func:`log_likelihood`.

    Arguments:
        per_point: the estimate of :math:`\log p(x_i)` for each data point, shape ``(N,)``.
        mean: their mean (nats per data point).
        stderr: the standard error of ``mean`` across data points, ``std / sqrt(N)``.
        log_weight_variance: the variance of the ``K`` log weights of each point, ``(N,)``
            (zero when the guide is the exact posterior; ``None`` for flows).
        ess: the effective sample size :math:`(\sum_k w_k)^2 / \sum_k w_k^2` of each
            point's weights, ``(N,)`` (``None`` for flows).
        elbo: the mean of the ``K`` log weights of each point, an unbiased estimate of its
            ELBO, ``(N,)`` (``None`` for flows).
        num_particles: ``K``.

    The Monte-Carlo standard error of each point's estimate (delta method) is
    :meth:`mc_stderr`, :math:`\sqrt{1/\mathrm{ESS} - 1/K}`.
    """

    per_point: torch.Tensor
    mean: float
    stderr: float
    log_weight_variance: Optional[torch.Tensor] = None
    ess: Optional[torch.Tensor] = None
    elbo: Optional[torch.Tensor] = None
    num_particles: int = 0

    def mc_stderr(self) -> Optional[torch.Tensor]:
        """Per point, the Monte-Carlo standard error of the estimate, ``sqrt(1/ess - 1/K)``."""
        if self.ess is None:
            return None
        return (1.0 / self.ess - 1.0 / self.num_particles).clamp(min=0.0).sqrt()


def _flow_log_likelihood(flow: FlowModel, x: torch.Tensor, batch_size: int, progress: bool) -> LogLikelihood:
    parts = []
    for start in _progress(range(0, len(x), batch_size), progress, "log p(x)"):
        parts.append(flow.log_likelihood(x[start:start + batch_size]).double())
    per_point = torch.cat(parts)
    return _summarize(per_point)


def _summarize(per_point: torch.Tensor, **extra) -> LogLikelihood:
    n = per_point.numel()
    stderr = float(per_point.std() / math.sqrt(n)) if n > 1 else float("nan")
    return LogLikelihood(per_point=per_point, mean=float(per_point.mean()), stderr=stderr, **extra)


def _progress(iterable, enabled: bool, desc: str, total: Optional[int] = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total)


def _stream(
    model: Callable, guide: Callable, x: torch.Tensor, num_particles: int, chunk_size: int,
    batch_size: int, progress: bool, data_plate: str, kwargs: dict, reconstruction: bool = False,
    vectorize_particles: Optional[bool] = None, per_point: bool = True,
) -> dict[str, torch.Tensor]:
    """Running sums over all particles.

    Per data point: ``lse`` (log sum w), ``lse2`` (log sum w^2), ``sum``/``sum2`` (of log w - shift),
    ``shift`` and ``recon`` (sum of log p(x | z)). For a pair with global latents (``per_point=False``;
    weights that do not factorize) instead, per batch: ``elbo_local``/``recon_local`` (the data points'
    terms summed over the batch, averaged over the particles) and ``elbo_global``/``recon_global``
    (the global terms, averaged over the particles).
    """
    out: dict[str, list] = {}
    total = -(-len(x) // batch_size) * -(-num_particles // chunk_size)
    bar = _progress(None, progress, "log p(x)", total=total) if progress else None
    for _, runs in particle_chunks(model, guide, x, num_particles, chunk_size, batch_size, data_plate, kwargs,
                                   vectorize_particles, reconstruction=reconstruction, per_point=per_point):
        acc: Optional[dict[str, torch.Tensor]] = None
        for draws in runs:
            weights = draws.weights
            if weights.factorizes:
                terms = _point_terms(weights, draws.reconstruction, None if acc is None else acc["shift"])
            else:
                terms = _batch_terms(weights, draws.reconstruction)
            if acc is None:
                acc = terms
            else:
                for key in ("lse", "lse2"):
                    if key in terms:
                        acc[key] = torch.logaddexp(acc[key], terms[key])
                for key in terms.keys() - {"lse", "lse2", "shift"}:
                    acc[key] = acc[key] + terms[key]
            if bar is not None:
                bar.update()
        assert acc is not None
        for key, value in acc.items():
            out.setdefault(key, []).append(value.reshape(-1))
    if bar is not None:
        bar.close()
    return {key: torch.cat(values) for key, values in out.items() if values}


def _point_terms(weights: LogWeights, recon: Optional[LogWeights], shift: Optional[torch.Tensor]) -> dict:
    log_w = per_point(weights, weights.joint()).double()
    # moments of log w about a per-point shift: no cancellation when log w barely varies
    shift = log_w[0] if shift is None else shift
    centred = log_w - shift
    terms = {
        "lse": torch.logsumexp(log_w, 0),
        "lse2": torch.logsumexp(2 * log_w, 0),
        "sum": centred.sum(0),
        "sum2": (centred * centred).sum(0),
        "shift": shift,
    }
    if recon is not None:
        terms["recon"] = per_point(recon, recon.joint()).double().sum(0)
    return terms


def _batch_terms(weights: LogWeights, recon: Optional[LogWeights]) -> dict:
    """A chunk's sums over particles of the batch's local terms and of its global terms."""
    pd = weights.particle_dim

    def split(w: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        local = w.local.double().sum([d for d in range(-w.local.dim(), 0) if d != pd])
        return local.sum(), w.other.double().sum()

    terms = dict(zip(("elbo_local", "elbo_global"), split(weights)))
    if recon is not None:
        terms.update(zip(("recon_local", "recon_global"), split(recon)))
    return terms


@torch.no_grad()
def log_likelihood(
    model: Any,
    guide: Any = None,
    x: Optional[torch.Tensor] = None,
    num_particles: int = 5000,
    chunk_size: int = 100,
    batch_size: int = 100,
    progress: bool = False,
    data_plate: str = "data",
    compile: Union[bool, str] = "auto",
    vectorize_particles: Optional[bool] = None,
    **kwargs,
) -> LogLikelihood:
    r"""Importance-sampled :math:`\log p(x_i)` of each data point (the IWAE estimate).

    With :math:`K` particles :math:`z^{(k)} \sim q(z \mid x_i)` and weights
    :math:`w_k = p(x_i, z^{(k)}) / q(z^{(k)} \mid x_i)`,

    .. math::

        \widehat{\log p}(x_i) = \log \frac1K \sum_{k=1}^K w_k,
        \qquad \mathbb E\big[\widehat{\log p}(x_i)\big] = \mathcal L_K(x_i) \le \log p(x_i),

    the importance-weighted bound of Burda et al. (2015): a lower bound in expectation
    (Jensen), non-decreasing in :math:`K`, and consistent: it tends to :math:`\log p(x_i)`
    as :math:`K \to \infty` whenever :math:`q` covers the posterior. Its bias is
    :math:`\operatorname{Var}(w) / (2 K\, p(x)^2) + O(K^{-2})` (Maddison et al. 2017;
    Nowozin 2018): :math:`O(1/K)`, and small only when the weights have a finite variance
    (check with :func:`pyro_lvm.diagnostics.psis.psis_khat`). With the exact posterior as
    the guide every weight equals :math:`p(x_i)` and the estimate is exact for any ``K``.

    The particles are drawn ``chunk_size`` at a time with the vectorized particle plate of
    :class:`~pyro_lvm.estimators.particles.ParticleELBO` and combined by a running
    log-sum-exp, the data ``batch_size`` points at a time. **Peak memory** is therefore
    that of one vectorized run of ``chunk_size x batch_size`` (particle, data point)
    pairs, whatever ``K`` and ``N``: linear in ``chunk_size * batch_size``, about
    ``4 bytes * (sum of the decoder's widths + c * data_dim)`` per pair, where ``c`` counts
    the likelihood's float32 temporaries of the data's size. Measured for a
    784-200-200-50 Bernoulli VAE (``benchmarks/log_likelihood.py``, growth of the peak
    resident set size): 0.2-0.3 GB at ``100 x 100`` and 0.76-0.78 GB at ``500 x 100``
    (about 15 kB per pair, ``c`` about 4.5), for any ``K``; plus ``O(N)`` for the results.
    Small chunks are not slower: on a CPU the 100 x 100 runs were faster than the 500 x 100
    ones. **Time**: the decoder's forward passes are the floor; with ``compile=True`` (what
    ``"auto"`` picks for runs this long) the same benchmark took 1.35 times the decoder's
    passes alone (500 MNIST test images, ``K = 5000``, one CPU thread: 28.9 s against
    21.3 s; 2.70 times with the eager kernel), so the 10,000 test images take about ten
    minutes per thread. Pyro's argument checks run on each batch's first chunk of
    particles only. Runs without gradients. For a :class:`pyro_lvm.FlowModel` the value is exact (its
    :meth:`~pyro_lvm.FlowModel.log_likelihood`: the dequantization bound for discrete
    data) and no particles are drawn.

    The pair: any model/guide whose local sites live in ``pyro.plate("data")`` (or
    ``data_plate``) and broadcast over a leading particle dimension, as the built-in
    models do; ``log_likelihood(vae, x)`` takes a module's ``model`` and ``guide``.

    References:
        Importance Weighted Autoencoders (Burda, Grosse & Salakhutdinov, 2015),
        https://arxiv.org/abs/1509.00519;
        Filtering Variational Objectives (Maddison et al., 2017), https://arxiv.org/abs/1705.09279

    Arguments:
        model: the model, or a module with ``model`` and ``guide`` methods (or a ``FlowModel``).
        guide: the guide; ``None`` (or the data, positionally) for a module's own.
        x: the data points, a tensor with the data plate's dimension first.
        num_particles: ``K``, importance samples per data point.
        chunk_size: particles drawn per vectorized run (bounds the memory).
        batch_size: data points per vectorized run (bounds the memory).
        progress: show a tqdm progress bar.
        data_plate: the name of the pair's plate of independent data points.
        compile: score Bernoulli likelihoods with a fused kernel built by ``torch.compile``
            (see :func:`pyro_lvm.likelihoods.compiled_log_prob`): ``True`` (an error if it
            cannot be built), ``False``, or ``"auto"``: only when ``K`` times the data's
            number of elements reaches ``1e9``, falling back to the eager kernel if compilation fails.
        vectorize_particles: ``True``: each chunk of particles in one pass; ``False``: one pass per
            particle, for a model written for exactly the batch's shape (boolean indexing); ``None``:
            decided on the first batch (see :func:`pyro_lvm.pairs.check_vectorization`).
        kwargs: passed to ``model`` and ``guide``; a tensor with one row per data point
            (such as a conditional VAE's ``y``) is batched along with ``x``.

    A pair with global latents (sites outside the data plate) has no per-point
    :math:`\log p(x_i)`; it is refused on the first chunk, with what to do instead.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Normal(0., 1.))
        ...         pyro.sample("x", dist.Normal(z, 1.), obs=x)
        >>> def guide(x):
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("z", dist.Normal(x / 2, 0.5 ** 0.5))  # the exact posterior
        >>> x = torch.tensor([0.0, 1.0])
        >>> result = log_likelihood(model, guide, x, num_particles=10)
        >>> exact = dist.Normal(0., 2 ** 0.5).log_prob(x)
        >>> bool(torch.allclose(result.per_point, exact.double(), atol=1e-6))
        True
    """
    if isinstance(model, FlowModel) and (guide is None or isinstance(guide, torch.Tensor)):
        x = guide if x is None else x
        if x is None:
            raise ValueError("No data given: call log_likelihood(flow, x).")
        return _flow_log_likelihood(model, x, batch_size, progress)
    model, guide, x = resolve_with_data(model, guide, x)
    for name, value in (("num_particles", num_particles), ("chunk_size", chunk_size), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value}.")
    with _kernels(compile, num_particles, x):
        sums = _stream(model, guide, x, num_particles, chunk_size, batch_size, progress, data_plate, kwargs,
                       vectorize_particles=vectorize_particles)
    return _from_sums(sums, num_particles)


def _kernels(compile: Union[bool, str], num_particles: int, x: torch.Tensor):
    """The :func:`~pyro_lvm.likelihoods.compiled_log_prob` block that ``compile`` asks for."""
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto'; got {compile!r}.")
    if compile == "auto":
        return compiled_log_prob(num_particles * x.numel() >= _COMPILE_WORK)
    return compiled_log_prob(bool(compile), strict=bool(compile))


def _from_sums(sums: dict[str, torch.Tensor], k: int) -> LogLikelihood:
    mean = sums["sum"] / k
    variance = (sums["sum2"] / k - mean**2).clamp(min=0.0) * k / max(k - 1, 1)
    return _summarize(
        sums["lse"] - math.log(k),
        log_weight_variance=variance,
        ess=torch.exp(2 * sums["lse"] - sums["lse2"]),
        elbo=sums["shift"] + mean,
        num_particles=k,
    )


@dataclass
class Evaluation:
    r"""The result of :func:`evaluate` (per-data-point means, in nats unless stated).

    Arguments:
        log_likelihood: the mean importance-sampled :math:`\log p(x)`; ``None`` for a pair with
            global latents, whose :math:`\log p(x)` does not split into one term per data point.
        log_likelihood_stderr: its standard error across data points (``None`` likewise).
        bits_per_dim: :math:`-\log p(x) / (D \log 2)` with ``D`` the number of scalars of a data point.
        elbo: the mean ELBO (from the same particles: the mean of the log weights). With global
            latents, :math:`\big(\sum_i \mathrm{local}_i + \mathrm{global}\big) / N`: their terms
            counted once for the data set, so the value does not depend on ``batch_size``.
        reconstruction: :math:`\mathbb E_q[\log p(x \mid z)]`.
        kl: :math:`\mathbb E_q[\log q(z \mid x) - \log p(z)]` (``elbo = reconstruction - kl``).
        kl_per_dim: per latent site, :math:`\mathbb E_x \mathrm{KL}(q(z_d \mid x) \| p(z_d))`
            in the site's shape (from :func:`pyro_lvm.training.monitor.latent_statistics`).
        active_units: units with :math:`\operatorname{Cov}_x \mathbb E_q[z_d] > 0.01`.
        num_units: the number of latent units.
        mutual_information: the estimate of :math:`I(x; z)` (see :func:`evaluate`), or
            ``None`` (flows; guides with several latent sites).
        num_points: ``N``, the number of data points evaluated.
        num_particles: ``K``.
        result: the full :class:`LogLikelihood` (per-point values).
    """

    log_likelihood: Optional[float]
    log_likelihood_stderr: Optional[float]
    bits_per_dim: Optional[float]
    elbo: float
    reconstruction: float
    kl: float
    kl_per_dim: dict = field(default_factory=dict)
    active_units: int = 0
    num_units: int = 0
    mutual_information: Optional[float] = None
    num_points: int = 0
    num_particles: int = 0
    result: Optional[LogLikelihood] = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """The scalars (and ``kl_per_dim`` as lists), e.g. to save as JSON."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("result", "kl_per_dim")}
        out["kl_per_dim"] = {site: value.flatten().tolist() for site, value in self.kl_per_dim.items()}
        return out


def _as_tensor(data: Any, split: str) -> torch.Tensor:
    """The data points of a tensor, a Lightning data module's split, or a loader of dict batches."""
    if isinstance(data, torch.Tensor):
        return data
    loader = data
    if hasattr(data, f"{split}_dataloader"):
        if hasattr(data, "setup"):
            data.setup()
        loader = getattr(data, f"{split}_dataloader")()
    try:
        batches = [b["x"] if isinstance(b, dict) else b for b in loader]
    except TypeError:
        raise ValueError(
            f"data must be a tensor, a Lightning data module or a DataLoader; got {type(data).__name__}."
        ) from None
    return torch.cat(batches)


def _guide_runs(guide: Callable, x: torch.Tensor, batch_size: int, kwargs: dict, model: Callable) -> Iterator:
    """One unvectorized run of the guide (and the model replayed) per batch."""
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        kw = rows(kwargs, slice(start, start + batch_size), len(x))
        with poutine.block():
            guide_trace = poutine.trace(guide).get_trace(xb, **kw)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(xb, **kw)
        yield model_trace, guide_trace


def _enumerated_elbo(model: Callable, guide: Callable, x: torch.Tensor, batch_size: int, data_plate: str,
                     kwargs: dict) -> float:
    """The ELBO per data point of a pair whose model enumerates sites: TraceEnum_ELBO at one draw of the
    guide per batch, global terms counted once (:func:`pyro_lvm.pairs.enumerated_elbo_parts`)."""
    from pyro.infer import TraceEnum_ELBO

    elbo, local, shared = TraceEnum_ELBO(), [], []
    for start in range(0, len(x), batch_size):
        parts = enumerated_elbo_parts(model, guide, (x[start:start + batch_size],),
                                      rows(kwargs, slice(start, start + batch_size), len(x)), data_plate, elbo)
        local.append(float(parts["elbo"]))
        shared.append(float(parts["global_elbo"]))
    return (sum(local) + sum(shared) / len(shared)) / len(x)


def _mutual_information(dists: list, values: list, row_batch: int = 256) -> float:
    r"""Mean over i of :math:`\log q(z_i \mid x_i) - \log \frac1N \sum_j q(z_i \mid x_j)`."""
    n = sum(len(v) for v in values)
    z = torch.cat(values)
    total = 0.0
    for start in range(0, n, row_batch):
        zi = z[start:start + row_batch]
        lse = None
        for fn in dists:
            # (rows, 1, *event) against a batch of data points: (rows, B)
            cross = fn.log_prob(zi.reshape(zi.shape[:1] + (1,) + zi.shape[1:])).double()
            part = torch.logsumexp(cross.reshape(len(zi), -1), 1)
            lse = part if lse is None else torch.logaddexp(lse, part)
        own = _own_log_q(dists, values, start, len(zi))
        total += float((own - (lse - math.log(n))).sum())
    return total / n


def _own_log_q(dists: list, values: list, start: int, length: int) -> torch.Tensor:
    r""":math:`\log q(z_i \mid x_i)` for the rows ``start:start + length`` of the concatenation."""
    parts, offset = [], 0
    for fn, vals in zip(dists, values):
        lo, hi = max(start, offset), min(start + length, offset + len(vals))
        if lo < hi:
            parts.append(fn.log_prob(vals).double().reshape(len(vals))[lo - offset:hi - offset])
        offset += len(vals)
    return torch.cat(parts)


@torch.no_grad()
def evaluate(
    model: Any,
    data: Any,
    guide: Optional[Callable] = None,
    num_particles: int = 1000,
    chunk_size: int = 100,
    batch_size: int = 100,
    split: str = "test",
    progress: bool = False,
    data_plate: str = "data",
    activity_threshold: float = 0.01,
    compile: Union[bool, str] = "auto",
    vectorize_particles: Optional[bool] = None,
    **kwargs,
) -> Evaluation:
    r"""Evaluate a model/guide pair on held-out data: log-likelihood, bits/dim, ELBO, KL, collapse, :math:`I(x; z)`.

    * **log-likelihood**: :func:`log_likelihood` with ``num_particles`` particles, its
      standard error across data points, and bits per dimension
      :math:`-\widehat{\log p}(x) / (D \log 2)` (``D`` scalars per data point; for a
      :class:`pyro_lvm.FlowModel`, its own :meth:`~pyro_lvm.FlowModel.bits_per_dim`);
    * **ELBO** and its two terms, from the same particles: the mean of the log weights and
      of :math:`\log p(x \mid z)`, ``kl = reconstruction - elbo``;
    * **KL per latent dimension** and **active units**, as the training monitor computes them
      (:func:`pyro_lvm.training.monitor.latent_statistics`, :class:`pyro_lvm.training.monitor.LatentMonitor`);
    * **mutual information** of the guide's joint :math:`q(x, z) = p_{\mathrm{data}}(x) q(z \mid x)`
      (Hoffman & Johnson 2016),
      :math:`I(x; z) = \mathbb E_x \mathrm{KL}(q(z \mid x) \| p(z)) - \mathrm{KL}(q(z) \| p(z))`,
      with the aggregate posterior :math:`q(z) = \frac1N \sum_j q(z \mid x_j)` over the
      evaluated points. With one draw :math:`z_i \sim q(z \mid x_i)` per point the prior
      cancels and the estimate is

      .. math::

          \hat I = \frac1N \sum_{i=1}^N \Big[\log q(z_i \mid x_i)
              - \log \frac1N \sum_{j=1}^N q(z_i \mid x_j)\Big],

      an unbiased one-draw estimate of :math:`\frac1N \sum_i \mathrm{KL}(q(z \mid x_i) \| q(z))`,
      the information of the evaluated sample (each term's expectation is a KL divergence,
      so it is non-negative on average, though one draw per point can come out slightly
      negative when the information is near zero). Every term is at most :math:`\log N`:
      as an estimate of the population :math:`I(x; z)` it is the InfoNCE bound (van den
      Oord et al. 2018; Poole et al. 2019), biased low and saturating once the information
      approaches :math:`\log N` nats. Its cost is :math:`O(N^2)` log-density evaluations. Computed for guides with one local latent site whose
      :math:`q(\cdot \mid x_j)` can be evaluated at every other point's draw by
      broadcasting (the built-in Gaussian and categorical guides); ``None`` otherwise
      (the hierarchical VAE, a conditional-flow posterior).

    References:
        ELBO surgery (Hoffman & Johnson, 2016),
        http://approximateinference.org/2016/accepted/HoffmanJohnson2016.pdf;
        On Variational Bounds of Mutual Information (Poole et al., 2019), https://arxiv.org/abs/1905.06922

    Arguments:
        model: a module with ``model`` and ``guide`` (a built-in model, a ``FlowModel``), or a model.
        data: a tensor of data points, a Lightning data module (its ``split``) or a DataLoader of dict batches.
        guide: the guide, when ``model`` is a plain model function.
        num_particles: importance samples per data point.
        chunk_size: particles per vectorized run (see :func:`log_likelihood`).
        batch_size: data points per vectorized run.
        split: the data module's split (``"test"``, ``"val"``, ``"train"``).
        progress: show a progress bar.
        data_plate: the name of the pair's plate of independent data points.
        activity_threshold: a unit is active when its posterior mean's variance across data exceeds it.
        compile: the fused Bernoulli kernel, as in :func:`log_likelihood`.
        vectorize_particles: as in :func:`log_likelihood`.
        kwargs: passed to ``model`` and ``guide``; a tensor with one row per data point is batched with the data.

    A pair with global latents (a factor model's weights under an autoguide) gets the ELBO and
    its terms with the global terms counted once (independent of ``batch_size``), the KL per
    dimension of its local latents, and no log-likelihood (``None``; see :func:`log_likelihood`).
    A pair whose model sums sites out by enumeration (a mixture's assignment; trained with
    ``"enum"``) gets that ELBO (:class:`~pyro.infer.TraceEnum_ELBO` at one draw of the guide per
    batch), no separate ``reconstruction`` and ``kl`` (NaN), and no log-likelihood.

    Example:
        >>> from pyro_lvm import VAE
        >>> vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8])
        >>> x = torch.bernoulli(torch.full((6, 4), 0.5))
        >>> result = evaluate(vae, x, num_particles=20)
        >>> result.log_likelihood >= result.elbo, result.num_units
        (True, 2)
    """
    x = _as_tensor(data, split)
    d = math.prod(x.shape[1:])
    if isinstance(model, FlowModel):
        ll = _flow_log_likelihood(model, x, batch_size, progress)
        bpd = float(torch.cat([model.bits_per_dim(x[s:s + batch_size]) for s in range(0, len(x), batch_size)]).mean())
        return Evaluation(
            log_likelihood=ll.mean, log_likelihood_stderr=ll.stderr, bits_per_dim=bpd, elbo=ll.mean,
            reconstruction=ll.mean, kl=0.0, num_points=len(x), result=ll,
        )
    pair_model, pair_guide, x = resolve_with_data(model, guide, x, "evaluate")
    first = next(_guide_runs(pair_guide, x[:batch_size], batch_size, rows(kwargs, slice(0, batch_size), len(x)),
                             pair_model))
    k = num_particles
    if enumerated_sites(*first):  # sites the model sums out (a mixture's assignment): TraceEnum_ELBO's value
        ll, reconstruction = None, float("nan")
        elbo = _enumerated_elbo(pair_model, pair_guide, x, batch_size, data_plate, kwargs)
    else:
        with _kernels(compile, num_particles, x):
            sums = _stream(pair_model, pair_guide, x, num_particles, chunk_size, batch_size, progress,
                           data_plate, kwargs, reconstruction=True, vectorize_particles=vectorize_particles,
                           per_point=False)
        if "lse" in sums:
            ll = _from_sums(sums, k)
            reconstruction = float((sums["recon"] / k).mean())
            elbo = float(ll.elbo.mean())
        else:  # global latents: their terms counted once for the data set, not once per batch
            ll = None
            reconstruction = float((sums["recon_local"].sum() + sums["recon_global"].mean()) / (k * len(x)))
            elbo = float((sums["elbo_local"].sum() + sums["elbo_global"].mean()) / (k * len(x)))

    monitor = LatentMonitor(activity_threshold=activity_threshold)
    dists: dict[str, list] = {}
    values: dict[str, list] = {}
    for model_trace, guide_trace in _guide_runs(pair_guide, x, batch_size, kwargs, pair_model):
        for name, (kl, mean, shape) in latent_statistics(model_trace, guide_trace).items():
            monitor.add(name, kl, mean, shape)
        model_sites = latent_sites(model_trace)
        for name, site in latent_sites(guide_trace).items():
            dists.setdefault(name, []).append(site_distribution(guide_trace, name, model_sites.get(name)))
            values.setdefault(name, []).append(site["value"])
    summary = monitor.end_epoch(epoch=0, warn=False)
    mi = None
    if len(dists) == 1:
        ((name, fns),) = dists.items()
        if all(fn is not None and len(fn.batch_shape) == 1 for fn in fns):
            try:
                mi = _mutual_information(fns, values[name])
            except (RuntimeError, ValueError):  # q(z | x_j) does not broadcast over other points' z
                mi = None
    return Evaluation(
        log_likelihood=None if ll is None else ll.mean,
        log_likelihood_stderr=None if ll is None else ll.stderr,
        bits_per_dim=None if ll is None else -ll.mean / (d * math.log(2.0)),
        elbo=elbo,
        reconstruction=reconstruction,
        kl=reconstruction - elbo,
        kl_per_dim={site: stats["kl"] for site, stats in summary["sites"].items()},
        active_units=summary["active_units"],
        num_units=summary["num_units"],
        mutual_information=mi,
        num_points=len(x),
        num_particles=k,
        result=ll,
    )
