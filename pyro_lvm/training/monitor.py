r"""Watching the latent code while training: KL per dimension, active units, posterior collapse.

The lecture's two failure modes of the KL weight: too much weight and the code is
ignored (the posterior collapses onto the prior, the KL per dimension goes to zero and
reconstructions become the blurry average), too little and the code is not compressed
(samples from the prior are garbage). :class:`LatentMonitor` measures, on the
validation data of every epoch,

* the KL per latent variable, :math:`\mathbb E_x\,\mathrm{KL}(q(z_d \mid x)\,\|\,p(z_d))`
  (closed form where registered and the mean-field condition holds, else the
  Monte-Carlo :math:`\log q(z_d) - \log p(z_d)`; see :func:`pyro_lvm.estimators.kl_per_variable`);
* the activity of each unit, :math:`A_d = \operatorname{Cov}_x\big(\mathbb E_{q(z\mid x)}[z_d]\big)`,
  and the number of *active units*, those with :math:`A_d > 0.01` (Burda et al. 2015, §5.2);

and warns with a :class:`PosteriorCollapseWarning` when the run collapses.
:class:`pyro_lvm.LVMModule` runs one by default and logs ``val/active_units``,
``val/kl``, ``val/reconstruction`` and ``val/beta`` each epoch, with the KL per
dimension (``val/kl_dim/<site>/<d>``) for small latents, and writes every epoch's
per-dimension table to ``latent_stats.csv`` in the run folder.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from ..estimators.base import guide_order_matches_model
from ..estimators.kl_control import kl_per_variable, kl_per_variable_mc
from ..pairs import latent_sites, site_distribution

__all__ = ["LatentMonitor", "PosteriorCollapseWarning", "latent_statistics"]


class PosteriorCollapseWarning(UserWarning):
    """The latent code carries (almost) no information about the data."""


def _site_statistics(q, p, value: torch.Tensor, analytic: bool) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Per data point: KL per variable and E_q[z], both flattened to ``(N, D)``."""
    batch_dims = len(q.batch_shape)
    if batch_dims == 0:  # a global latent: no spread over data points to measure
        return None
    kl = kl_per_variable(q, p, value) if analytic else kl_per_variable_mc(q, p, value)
    try:
        mean = q.mean
    except NotImplementedError:  # e.g. a flow: the sample stands in for its mean
        mean = value
    mean = mean.expand(value.shape)
    n = math.prod(q.batch_shape)
    kl = kl.reshape(n, -1)
    mean = mean.reshape(n, kl.shape[1], -1).sum(-1)  # one-hot categories: one unit per variable
    return kl, mean


def latent_statistics(model_trace, guide_trace) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Size]]:
    r"""For each local latent site of a guide trace replayed in the model: ``(kl, mean, shape)``.

    ``kl`` and ``mean`` have shape ``(N, D)``: per data point, the KL of each of the
    ``D`` latent variables and its posterior mean :math:`\mathbb E_q[z_d]`; ``shape``
    is the variables' shape (e.g. ``(C, H, W)`` for a spatial latent map). Global
    latents (no batch dimension) are left out.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> from pyro import poutine
        >>> def model():
        ...     with pyro.plate("data", 3):
        ...         pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> def guide():
        ...     with pyro.plate("data", 3):
        ...         pyro.sample("z", dist.Normal(torch.ones(3, 2), 1.0).to_event(1))
        >>> g = poutine.trace(guide).get_trace()
        >>> m = poutine.trace(poutine.replay(model, trace=g)).get_trace()
        >>> kl, mean, shape = latent_statistics(m, g)["z"]
        >>> kl[0], shape
        (tensor([0.5000, 0.5000]), torch.Size([2]))
    """
    model_sites = latent_sites(model_trace)
    # closed form only under the mean-field condition; else log q - log p at the draws
    analytic = guide_order_matches_model(model_trace, guide_trace)
    out = {}
    for name, site in latent_sites(guide_trace).items():
        if name not in model_sites:
            continue
        q, p = site_distribution(guide_trace, name, model_sites[name]), model_sites[name]["fn"]
        if q is None:  # a point estimate (AutoDelta), or one part of an autoguide's joint draw
            continue
        stats = _site_statistics(q, p, site["value"], analytic)
        if stats is not None:
            kl, mean = stats
            var_shape = kl_per_variable_mc(q, p, site["value"]).shape[len(q.batch_shape):]
            out[name] = (kl, mean, var_shape)
    return out


class LatentMonitor:
    r"""Accumulate KL per dimension and unit activity over an epoch; detect collapse.

    Call :meth:`update` with each validation batch's traces, then :meth:`end_epoch`.
    An epoch counts as *collapsed* when no unit is active or the total KL per data
    point is below ``collapse_kl`` nats; after ``patience`` collapsed epochs in a row
    a :class:`PosteriorCollapseWarning` is issued (once per run).

    References:
        Importance Weighted Autoencoders (Burda et al., 2015), §5.2 (active units),
        https://arxiv.org/abs/1509.00519

    Arguments:
        activity_threshold: a unit is active when :math:`\operatorname{Cov}_x(\mathbb E_q[z_d])` exceeds it.
        collapse_kl: KL per data point (nats) below which an epoch counts as collapsed.
        patience: collapsed epochs in a row before the warning.
        max_logged_dims: log the KL of each dimension as a metric when the latent has at most
            this many (all of them always go to ``latent_stats.csv``).

    Example:
        >>> monitor = LatentMonitor(patience=1)
        >>> kl = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
        >>> means = torch.tensor([[0.0, -1.0], [0.0, 1.0]])     # dim 1 varies with x
        >>> monitor.add("z", kl, means, torch.Size([2]))
        >>> summary = monitor.end_epoch(epoch=0)
        >>> summary["active_units"], summary["kl"], summary["collapsed"]
        (1, 2.0, False)
    """

    def __init__(
        self,
        activity_threshold: float = 0.01,
        collapse_kl: float = 0.01,
        patience: int = 5,
        max_logged_dims: int = 32,
    ):
        if patience < 1:
            raise ValueError(f"patience must be at least 1 epoch; got {patience}.")
        self.activity_threshold = activity_threshold
        self.collapse_kl = collapse_kl
        self.patience = patience
        self.max_logged_dims = max_logged_dims
        self.history: list[dict] = []
        self._collapsed_epochs = 0
        self.warned = False
        self.reset()

    def reset(self) -> None:
        """Forget the current epoch's sums."""
        self._sums: dict[str, list] = {}

    def update(self, model_trace, guide_trace) -> None:
        """Add one batch: a guide trace and the model trace replayed against it."""
        for name, (kl, mean, shape) in latent_statistics(model_trace, guide_trace).items():
            self.add(name, kl, mean, shape)

    @torch.no_grad()
    def add(self, site: str, kl: torch.Tensor, mean: torch.Tensor, shape: torch.Size) -> None:
        """Add per-data-point KL and posterior means of shape ``(N, D)`` for one site."""
        kl, mean = kl.detach().double(), mean.detach().double()
        sums = torch.stack([kl.sum(0), mean.sum(0), (mean * mean).sum(0)])
        entry = self._sums.get(site)
        if entry is None:
            self._sums[site] = [sums, torch.tensor(float(kl.shape[0]), dtype=torch.float64, device=kl.device), shape]
        else:
            entry[0] += sums
            entry[1] += kl.shape[0]

    def compute(self, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict[str, dict]:
        """Per site: ``kl`` and ``activity`` per variable (in the variables' shape), and ``count``.

        ``reduce`` sums a tensor over processes (e.g. the Lightning strategy's ``reduce``).
        """
        out = {}
        for site, (sums, count, shape) in sorted(self._sums.items()):
            if reduce is not None:
                sums, count = reduce(sums.clone()), reduce(count.clone())
            kl, mean, square = sums / count
            activity = (square - mean * mean).clamp(min=0.0)
            # n/(n-1): the unbiased covariance, as torch.var would give
            activity = activity * count / (count - 1).clamp(min=1.0)
            # an epoch's summary, kept in the history: on the host, whatever device trained
            out[site] = {"kl": kl.float().reshape(shape).cpu(), "activity": activity.float().reshape(shape).cpu(),
                         "count": int(count)}
        return out

    def end_epoch(
        self, epoch: int, step: int = 0, beta: float = float("nan"),
        reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, warn: bool = True,
    ) -> dict:
        """Summarize the epoch, keep it in :attr:`history`, warn on collapse, and reset.

        Returns ``{"epoch", "step", "beta", "kl", "active_units", "num_units", "collapsed",
        "sites"}``, with ``sites`` as :meth:`compute` gives it.
        """
        sites = self.compute(reduce)
        self.reset()
        active = sum(int((s["activity"] > self.activity_threshold).sum()) for s in sites.values())
        units = sum(s["activity"].numel() for s in sites.values())
        kl = sum(float(s["kl"].sum()) for s in sites.values())
        collapsed = bool(sites) and (active == 0 or kl < self.collapse_kl)
        summary = {
            "epoch": epoch, "step": step, "beta": beta, "kl": kl, "active_units": active,
            "num_units": units, "collapsed": collapsed, "sites": sites,
        }
        self.history.append(summary)
        self._collapsed_epochs = self._collapsed_epochs + 1 if collapsed else 0
        if warn and self._collapsed_epochs >= self.patience and not self.warned:
            self.warned = True
            warnings.warn(self.collapse_message(summary), PosteriorCollapseWarning, stacklevel=2)
        return summary

    def collapse_message(self, summary: dict) -> str:
        return (
            f"Posterior collapse: {summary['active_units']} of {summary['num_units']} latent units "
            f"active and KL {summary['kl']:.4g} nats per data point for {self._collapsed_epochs} "
            f"epochs (epoch {summary['epoch']}, beta={summary['beta']:.4g}). The decoder ignores z. "
            "Lower beta or warm it up (pyro_lvm.schedules.LinearWarmup or Cyclical), or keep "
            "some KL per dimension with kl_control=pyro_lvm.estimators.FreeBits(...) or Capacity(...)."
        )

    def metrics(self, summary: dict, prefix: str = "val") -> dict[str, float]:
        """Scalars to log: active units, and the KL of each dimension for small latents."""
        out = {f"{prefix}/active_units": float(summary["active_units"])}
        if summary["num_units"] <= self.max_logged_dims:
            for site, stats in summary["sites"].items():
                for d, value in enumerate(stats["kl"].flatten().tolist()):
                    out[f"{prefix}/kl_dim/{site}/{d}"] = value
        return out

    @staticmethod
    def write_csv(summary: dict, path: Union[str, Path]) -> Path:
        """Append the epoch's per-variable KL and activity to a CSV (header on creation)."""
        path = Path(path)
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["epoch", "step", "beta", "site", "index", "position", "kl", "activity"])
            for site, stats in summary["sites"].items():
                shape = stats["kl"].shape
                for d, (kl, act) in enumerate(zip(stats["kl"].flatten().tolist(), stats["activity"].flatten().tolist())):
                    position = ",".join(str(int(i)) for i in np.unravel_index(d, tuple(shape)))
                    writer.writerow([summary["epoch"], summary["step"], summary["beta"], site, d, position, f"{kl:.6g}", f"{act:.6g}"])
        return path
