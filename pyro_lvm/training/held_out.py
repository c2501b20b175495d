r"""The ELBO's terms of a pair on held-out data: one Monte-Carlo estimate per batch, and their epoch's mean."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torchmetrics
from pyro import poutine

from ..pairs import elbo_parts, enumerated_elbo_parts, enumerated_sites

__all__ = ["elbo_terms", "replayed_traces", "HeldOutMean", "HeldOutTerms"]

def elbo_terms(model: Callable, guide: Callable, *args, **kwargs) -> dict[str, torch.Tensor]:
    r"""One-sample Monte-Carlo estimate of the ELBO's two terms, per data point.

    Runs ``guide`` once, replays ``model`` against it, and returns
    ``reconstruction`` = :math:`\log p(x \mid z)` (observed sites),
    ``kl`` = :math:`\log q(z \mid x) - \log p(z)` (latent sites) and
    ``elbo`` = reconstruction - kl, each summed over the batch (the data points'
    terms without a subsampling plate's scale, global terms once; see
    :func:`pyro_lvm.pairs.elbo_parts`). The estimate is
    unbiased for any guide, whatever estimator trained it, so held-out values are
    comparable across estimators.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("x", dist.Normal(pyro.sample("z", dist.Normal(0., 1.)), 1.), obs=torch.tensor(0.))
        >>> def guide():
        ...     pyro.sample("z", dist.Normal(0., 1.))
        >>> t = elbo_terms(model, guide)
        >>> bool(torch.isclose(t["elbo"], t["reconstruction"] - t["kl"]))
        True
    """
    parts = elbo_parts(*replayed_traces(model, guide, *args, **kwargs))
    reconstruction = parts["reconstruction"] + parts["global_reconstruction"]
    kl = parts["kl"] + parts["global_kl"]
    return {"elbo": reconstruction - kl, "reconstruction": reconstruction, "kl": kl}


def replayed_traces(model: Callable, guide: Callable, *args, **kwargs):
    """A guide trace and the model's trace replayed against it, log-densities computed."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
        *args, **kwargs
    )
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    return model_trace, guide_trace


class HeldOutMean(torchmetrics.Metric):
    r"""A held-out term per data point over an epoch, global terms counted once.

    Each batch ``b`` adds the sum over its data points of their terms, :math:`L_b`, the global
    terms (sites outside the data plate), :math:`G_b`, and its size :math:`B_b`; the epoch's value
    over :math:`N = \sum_b B_b` points is :math:`\big(\sum_b L_b + \frac1{n_b}\sum_b G_b\big) / N`,
    whatever the batch size. Summed over processes under DDP.

    Example:
        >>> mean = HeldOutMean()
        >>> mean.update(torch.tensor(-10.0), torch.tensor(-3.0), 5)
        >>> mean.update(torch.tensor(-12.0), torch.tensor(-5.0), 5)
        >>> round(float(mean.compute()), 6)  # (-22 + (-4)) / 10
        -2.6
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("local", "shared", "count", "batches"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, local: torch.Tensor, shared: torch.Tensor, batch_size: int) -> None:
        self.local += local.double()
        self.shared += shared.double()
        self.count += batch_size
        self.batches += 1

    def compute(self) -> torch.Tensor:
        # summed in float64 over the epoch; logged in the default dtype, as the other metrics
        value = (self.local + self.shared / self.batches.clamp(min=1)) / self.count.clamp(min=1)
        return value.to(torch.get_default_dtype())


class HeldOutTerms:
    r"""The held-out ELBO's terms of one batch, the data points' (``local``) and the global ones (``shared``).

    :meth:`traced` reads them from Pyro's traces, for any pair: ``reconstruction``, ``kl`` and ``elbo``
    from :func:`pyro_lvm.pairs.elbo_parts`, or, for a model that sums discrete sites out by enumeration,
    ``elbo`` alone (``TraceEnum_ELBO``'s). :meth:`closed_form` gives the same numbers for the same draws
    without traces, for a built-in model with a closed form (a :class:`~pyro_lvm.training.fast_step.FastLoss`
    whose ``closed_form`` is true). Both feed a :class:`~pyro_lvm.training.monitor.LatentMonitor` if given one.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model(x):
        ...     with pyro.plate("data", len(x)):
        ...         z = pyro.sample("z", dist.Normal(0., 1.))
        ...         pyro.sample("x", dist.Normal(z, 1.), obs=x)
        >>> def guide(x):
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("z", dist.Normal(x / 2, 0.5 ** 0.5))  # the exact posterior
        >>> x = torch.zeros(3)
        >>> local, shared = HeldOutTerms().traced(model, guide, (x,), {})
        >>> sorted(local), float(shared["kl"])
        (['elbo', 'kl', 'reconstruction'], 0.0)
    """

    def __init__(self, data_plate: str = "data"):
        self.data_plate = data_plate
        self._enumerated: Optional[list] = None  # model sites summed out by enumeration (found at the first batch)
        self._enum_elbo = None

    def traced(self, model: Callable, guide: Callable, args: tuple, kwargs: dict,
               monitor: Optional[Any] = None) -> tuple[dict, dict]:
        traces = replayed_traces(model, guide, *args, **kwargs)
        if self._enumerated is None:
            self._enumerated = enumerated_sites(*traces)
        if monitor is not None:
            monitor.update(*traces)
        if self._enumerated:  # sites the model sums out: the ELBO of TraceEnum_ELBO, no separate terms
            if self._enum_elbo is None:
                from pyro.infer import TraceEnum_ELBO

                self._enum_elbo = TraceEnum_ELBO()
            enum = enumerated_elbo_parts(model, guide, args, kwargs, self.data_plate, self._enum_elbo)
            return {"elbo": enum["elbo"]}, {"elbo": enum["global_elbo"]}
        parts = elbo_parts(*traces, data_plate=self.data_plate)
        local = {"reconstruction": parts["reconstruction"], "kl": parts["kl"]}
        shared = {"reconstruction": parts["global_reconstruction"], "kl": parts["global_kl"]}
        for terms in (local, shared):
            terms["elbo"] = terms["reconstruction"] - terms["kl"]
        return local, shared

    def closed_form(self, fast: Any, x: torch.Tensor, monitor: Optional[Any] = None) -> tuple[dict, dict]:
        reconstruction, kl, loc, kl_per_dim = fast.held_out_terms(x)
        if monitor is not None:
            monitor.add("z", kl_per_dim.reshape(len(x), -1), loc.reshape(len(x), -1), loc.shape[1:])
        zero = reconstruction.new_zeros(())
        local = {"reconstruction": reconstruction, "kl": kl, "elbo": reconstruction - kl}
        return local, {"reconstruction": zero, "kl": zero, "elbo": zero}
