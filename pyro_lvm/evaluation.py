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

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import pyro
import torch
from pyro import poutine

from .estimators.base import latent_sites
from .estimators.particles import LogWeights, ParticleELBO
from .likelihoods import compiled_log_prob
from .models.flow import FlowModel
from .monitoring import LatentMonitor, latent_statistics

__all__ = ["LogLikelihood", "Evaluation", "log_likelihood", "evaluate"]

# particles x data elements above which log_likelihood compiles the likelihood's kernel by
# itself: seconds of compilation against minutes of work (K = 5000 on 1,000 MNIST images is 3.9e9)
_COMPILE_WORK = 1e9


class _ImportanceWeights(ParticleELBO):
    """The particle machinery of the multi-sample bounds, used for its log weights only."""

    def run(self, model: Callable, guide: Callable, args, kwargs) -> tuple[LogWeights, Any, Any]:
        """One vectorized run of ``num_particles`` particles: the log weights and both traces."""
        _, model_trace, guide_trace = self._traces(model, guide, args, kwargs)
        # memoized in the traces: a second log_weights (the reconstruction term) reuses them
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        return self.log_weights(model_trace, guide_trace), model_trace, guide_trace


def _per_point(weights: LogWeights, tensor: torch.Tensor) -> torch.Tensor:
    """A ``joint()``-shaped tensor as ``(K, B)``: particles by data points."""
    if not weights.factorizes:
        raise ValueError(
            "The pair has sample sites outside pyro.plate('data') (global latents or "
            "observations), so its importance weights do not factorize into one log p(x_i) "
            "per data point. Put every local site in pyro.plate('data'), or pass the name of "
            "the pair's data plate as data_plate=..."
        )
    return tensor.reshape(tensor.shape[0], -1)


def _resolve_pair(model: Any, guide: Any, x: Any) -> tuple[Callable, Callable, torch.Tensor]:
    """Accept ``(model, guide, x)``, ``(module, x)`` or ``(module, None, x)``."""
    if isinstance(guide, torch.Tensor) and x is None:
        guide, x = None, guide
    if x is None:
        raise ValueError("No data given: call log_likelihood(model, guide, x) or log_likelihood(module, x).")
    if guide is None:
        if not (hasattr(model, "model") and hasattr(model, "guide")):
            raise ValueError(
                f"Without a guide, the first argument must be a module with model and guide "
                f"methods (such as pyro_lvm.VAE); got {type(model).__name__}. Pass the guide too."
            )
        return model.model, model.guide, x
    return model, guide, x


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


def _batch_kwargs(kwargs: dict, start: int, stop: int, n: int) -> dict:
    """Slice the tensors among ``kwargs`` that have one row per data point (e.g. a CVAE's ``y``)."""
    return {
        key: value[start:stop] if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n else value
        for key, value in kwargs.items()
    }


def _chunks(num_particles: int, chunk_size: int) -> Iterator[int]:
    full, rest = divmod(num_particles, chunk_size)
    yield from [chunk_size] * full + ([rest] if rest else [])


def _runs(
    model: Callable, guide: Callable, x: torch.Tensor, num_particles: int, chunk_size: int,
    batch_size: int, data_plate: str, kwargs: dict,
) -> Iterator[tuple[int, Iterator[tuple]]]:
    """Per batch of data points, its size and an iterator over its chunks of particles, each
    ``(runner, weights, model_trace, guide_trace)`` (``runner.num_particles`` is the chunk's size)."""
    runner = _ImportanceWeights(num_particles=min(chunk_size, num_particles), data_plate=data_plate)

    def chunks(xb: torch.Tensor, kw: dict) -> Iterator[tuple]:
        for i, size in enumerate(_chunks(num_particles, chunk_size)):
            runner.num_particles = size
            # Pyro's argument and support checks run on a batch's first chunk only: the
            # later ones see the same data (they cost about 8% of a MNIST run's time)
            with pyro.validation_enabled(False) if i else contextlib.nullcontext():
                out = runner.run(model, guide, (xb,), kw)
            yield (runner, *out)

    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        yield len(xb), chunks(xb, _batch_kwargs(kwargs, start, start + batch_size, len(x)))


def _stream(
    model: Callable, guide: Callable, x: torch.Tensor, num_particles: int, chunk_size: int,
    batch_size: int, progress: bool, data_plate: str, kwargs: dict, reconstruction: bool = False,
) -> dict[str, torch.Tensor]:
    """Per data point, running sums over all particles: ``lse`` (log sum w), ``lse2``
    (log sum w^2), ``sum``/``sum2`` (of log w - shift), ``shift`` and ``recon`` (sum of log p(x | z))."""
    out: dict[str, list] = {"lse": [], "lse2": [], "sum": [], "sum2": [], "shift": [], "recon": []}
    total = -(-len(x) // batch_size) * -(-num_particles // chunk_size)
    bar = _progress(None, progress, "log p(x)", total=total) if progress else None
    for _, runs in _runs(model, guide, x, num_particles, chunk_size, batch_size, data_plate, kwargs):
        acc: Optional[dict[str, torch.Tensor]] = None
        for runner, weights, model_trace, guide_trace in runs:
            log_w = _per_point(weights, weights.joint()).double()
            # moments of log w about a per-point shift: no cancellation when log w barely varies
            shift = log_w[0] if acc is None else acc["shift"]
            centred = log_w - shift
            terms = {
                "lse": torch.logsumexp(log_w, 0),
                "lse2": torch.logsumexp(2 * log_w, 0),
                "sum": centred.sum(0),
                "sum2": (centred * centred).sum(0),
                "shift": shift,
            }
            if reconstruction:
                terms["recon"] = _reconstruction(runner, weights, model_trace, guide_trace).sum(0)
            if acc is None:
                acc = terms
            else:
                for key in ("lse", "lse2"):
                    acc[key] = torch.logaddexp(acc[key], terms[key])
                for key in terms.keys() - {"lse", "lse2", "shift"}:
                    acc[key] = acc[key] + terms[key]
            if bar is not None:
                bar.update()
        assert acc is not None
        for key, value in acc.items():
            out[key].append(value)
    if bar is not None:
        bar.close()
    return {key: torch.cat(values) for key, values in out.items() if values}


def _reconstruction(runner: _ImportanceWeights, weights: LogWeights, model_trace, guide_trace) -> torch.Tensor:
    """``log p(x | z)`` per particle and data point: the log weights with every latent term zeroed."""
    zeros = {}
    for trace in (model_trace, guide_trace):
        for name, site in latent_sites(trace).items():
            zeros[name] = site["value"].new_zeros(site["fn"].batch_shape)
    recon = runner.log_weights(model_trace, guide_trace, guide_log_probs=zeros, model_log_probs=zeros)
    return _per_point(recon, recon.joint()).double()


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
    (check with :func:`pyro_lvm.posterior_checks.psis_khat`). With the exact posterior as
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
        kwargs: passed to ``model`` and ``guide``; a tensor with one row per data point
            (such as a conditional VAE's ``y``) is batched along with ``x``.

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
    model, guide, x = _resolve_pair(model, guide, x)
    for name, value in (("num_particles", num_particles), ("chunk_size", chunk_size), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value}.")
    with _kernels(compile, num_particles, x):
        sums = _stream(model, guide, x, num_particles, chunk_size, batch_size, progress, data_plate, kwargs)
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
        log_likelihood: the mean importance-sampled :math:`\log p(x)`.
        log_likelihood_stderr: its standard error across data points.
        bits_per_dim: :math:`-\log p(x) / (D \log 2)` with ``D`` the number of scalars of a data point.
        elbo: the mean ELBO (from the same particles: the mean of the log weights).
        reconstruction: :math:`\mathbb E_q[\log p(x \mid z)]`.
        kl: :math:`\mathbb E_q[\log q(z \mid x) - \log p(z)]` (``elbo = reconstruction - kl``).
        kl_per_dim: per latent site, :math:`\mathbb E_x \mathrm{KL}(q(z_d \mid x) \| p(z_d))`
            in the site's shape (from :func:`pyro_lvm.monitoring.latent_statistics`).
        active_units: units with :math:`\operatorname{Cov}_x \mathbb E_q[z_d] > 0.01`.
        num_units: the number of latent units.
        mutual_information: the estimate of :math:`I(x; z)` (see :func:`evaluate`), or
            ``None`` (flows; guides with several latent sites).
        num_points: ``N``, the number of data points evaluated.
        num_particles: ``K``.
        result: the full :class:`LogLikelihood` (per-point values).
    """

    log_likelihood: float
    log_likelihood_stderr: float
    bits_per_dim: float
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
        kw = _batch_kwargs(kwargs, start, start + batch_size, len(x))
        with poutine.block():
            guide_trace = poutine.trace(guide).get_trace(xb, **kw)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(xb, **kw)
        yield model_trace, guide_trace


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
      (:func:`pyro_lvm.monitoring.latent_statistics`, :class:`pyro_lvm.monitoring.LatentMonitor`);
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
        kwargs: passed to ``model`` and ``guide``; a tensor with one row per data point is batched with the data.

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
    pair_model, pair_guide, x = _resolve_pair(model, guide, x)
    with _kernels(compile, num_particles, x):
        sums = _stream(pair_model, pair_guide, x, num_particles, chunk_size, batch_size, progress,
                       data_plate, kwargs, reconstruction=True)
    k = num_particles
    ll = _from_sums(sums, k)
    reconstruction = float((sums["recon"] / k).mean())
    elbo = float(ll.elbo.mean())

    monitor = LatentMonitor(activity_threshold=activity_threshold)
    dists: dict[str, list] = {}
    values: dict[str, list] = {}
    for model_trace, guide_trace in _guide_runs(pair_guide, x, batch_size, kwargs, pair_model):
        for name, (kl, mean, shape) in latent_statistics(model_trace, guide_trace).items():
            monitor.add(name, kl, mean, shape)
        for name, site in latent_sites(guide_trace).items():
            dists.setdefault(name, []).append(site["fn"])
            values.setdefault(name, []).append(site["value"])
    summary = monitor.end_epoch(epoch=0, warn=False)
    mi = None
    if len(dists) == 1:
        ((name, fns),) = dists.items()
        if all(len(fn.batch_shape) == 1 for fn in fns):
            try:
                mi = _mutual_information(fns, values[name])
            except (RuntimeError, ValueError):  # q(z | x_j) does not broadcast over other points' z
                mi = None
    return Evaluation(
        log_likelihood=ll.mean,
        log_likelihood_stderr=ll.stderr,
        bits_per_dim=-ll.mean / (d * math.log(2.0)),
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
