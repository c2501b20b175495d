r"""How pyro_lvm calls a model/guide pair: the one seam between a user's Pyro code and the library.

Training (:class:`pyro_lvm.LVMModule`), every estimator, the evaluation, the posterior checks
and the command line call a pair through this module, so that a pair written as Pyro's
examples write them (autoguides, boolean masks, enumerated sites, any site and argument
names) behaves the same everywhere:

* **arguments**: which batch entries reach the model and which the guide
  (:func:`call_keys`, :func:`accepting`, :func:`split_batch`), and the check that a batch
  reaches the model at all (:func:`check_arguments`);
* **particles**: :math:`K` draws :math:`z^{(k)} \sim q(z \mid x)` run either in one
  vectorized pass, inside a plate of :math:`K` particles to the left of the pair's own plates,
  or one pass per draw for a model that does not broadcast over that plate
  (:func:`with_particles`, :func:`check_vectorization`);
* **trace reading**: latent, auxiliary and observed sites (:func:`latent_sites`,
  :func:`auxiliary_sites`, :func:`observed_sites`), the plate of independent data points and
  which sites are local to a data point or global (:func:`data_frames`), and the ELBO's
  terms per data point and global (:func:`elbo_parts`).

Example:
    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyro.infer.autoguide import AutoNormal
    >>> def model(x, y=None):
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("latent", dist.Normal(0., 1.))
    >>> sorted(call_keys(AutoNormal(model)))   # an autoguide takes what its model takes
    ['x', 'y']
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Optional

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import _bound_partial, _context_wrap
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import get_rng_state, set_rng_state

__all__ = [
    "PARTICLES",
    "is_pair_module",
    "resolve",
    "call_keys",
    "accepting",
    "split_batch",
    "rows",
    "check_arguments",
    "latent_sites",
    "auxiliary_sites",
    "drawn_sites",
    "site_distribution",
    "observed_sites",
    "data_frames",
    "is_local",
    "subsample_scale",
    "elbo_parts",
    "enumerated_sites",
    "enumerated_elbo_parts",
    "with_particles",
    "select_particle",
    "Vectorization",
    "check_vectorization",
    "traced_until_error",
    "vectorization_advice",
    "batch_size_of",
    "later_dependencies",
]

#: The name of the particle plate (Pyro's own, as in ``Trace_ELBO(vectorize_particles=True)``).
PARTICLES = "num_particles_vectorized"

# batch entries that data modules add for the library's own use; no model needs to take them
_INFRASTRUCTURE_KEYS = frozenset({"index", "num_data"})


# ----- the pair ---------------------------------------------------------------------------
def is_pair_module(obj: Any) -> bool:
    """Whether ``obj`` carries its own pair: ``model`` and ``guide`` methods, as :class:`pyro_lvm.VAE`."""
    return callable(getattr(obj, "model", None)) and callable(getattr(obj, "guide", None))


def resolve(model: Any, guide: Any = None, who: str = "This function") -> tuple[Callable, Callable]:
    """The model and guide functions of ``(module,)``, ``(module, guide)`` or ``(model, guide)``.

    A module with ``model`` and ``guide`` methods gives both; a ``guide`` passed with it
    replaces its own.

    Example:
        >>> from pyro_lvm import VAE
        >>> vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8])
        >>> resolve(vae) == (vae.model, vae.guide)
        True
    """
    if is_pair_module(model):
        return model.model, (model.guide if guide is None else guide)
    if guide is None:
        raise ValueError(
            f"{who} needs a guide: pass guide=... with a model function, or a module with model and "
            f"guide methods (such as pyro_lvm.VAE); got {type(model).__name__} and no guide."
        )
    return model, guide


# ----- which batch entries reach which callable ------------------------------------------
def _unwrap(fn: Any) -> Any:
    """``fn`` without Pyro's handlers (``poutine.block(model)`` -> ``model``)."""
    for _ in range(50):
        if isinstance(fn, _bound_partial):
            fn = fn.func
        elif isinstance(fn, partial) and fn.func is _context_wrap and len(fn.args) >= 2:
            fn = fn.args[1]
        else:
            return fn
    return fn


def _signature(fn: Any) -> tuple[frozenset, bool]:
    """The names a callable takes by keyword, and whether it takes ``**kwargs``."""
    fn = _unwrap(fn)
    if isinstance(fn, torch.nn.Module):  # its __call__ takes (*args, **kwargs); forward says what it uses
        fn = fn.forward
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return frozenset(), True
    names = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def call_keys(fn: Callable, model: Optional[Callable] = None) -> frozenset:
    """The keyword arguments pyro_lvm passes to ``fn``: those it names.

    An autoguide takes ``*args, **kwargs`` and passes them on to its model, so it gets what
    its model takes (an :class:`~pyro.infer.autoguide.AutoGuideList`: what any of its parts
    takes). Another callable that takes ``**kwargs`` gets the names it lists and those of
    ``model`` (a guide is called with the model's arguments, as in Pyro): ``**kwargs`` is
    not a licence to pass everything.

    Example:
        >>> def model(x, y=None): ...
        >>> def guide(x, index=None, **kwargs): ...
        >>> sorted(call_keys(model)), sorted(call_keys(guide, model))
        (['x', 'y'], ['index', 'x', 'y'])
    """
    from pyro.infer.autoguide import AutoCallable, AutoGuide, AutoGuideList

    fn = _unwrap(fn)
    declared = getattr(fn, "call_keys", None)  # a callable that says what it takes (see accepting)
    if isinstance(declared, (set, frozenset)):
        return frozenset(declared)
    if isinstance(fn, AutoGuideList):
        keys = call_keys(fn.model)
        for part in fn:
            keys = keys | call_keys(part)
        return keys
    if isinstance(fn, AutoCallable):
        return call_keys(fn.model) | call_keys(getattr(fn, "_guide"), fn.model)
    if isinstance(fn, AutoGuide):
        return call_keys(fn.model)
    names, var_kw = _signature(fn)
    if var_kw and model is not None:
        names = names | call_keys(model)
    return names


def accepting(fn: Callable, keys: Optional[Iterable[str]] = None) -> Callable:
    """``fn``, called only with the keyword arguments in ``keys`` (default :func:`call_keys`)."""
    keys = call_keys(fn) if keys is None else frozenset(keys)

    @functools.wraps(fn, updated=())
    def call(*args, **kwargs):
        return fn(*args, **{k: v for k, v in kwargs.items() if k in keys})

    call.call_keys = keys
    return call


def split_batch(batch: Any, rename: Optional[dict] = None) -> tuple[tuple, dict, int]:
    """A batch as the pair's ``(args, kwargs)`` and its number of data points.

    A tensor is ``x``; a tuple is passed positionally; a dict passes ``"x"`` first and its
    other entries by name, renamed by ``rename`` (batch key -> argument name).

    Example:
        >>> args, kwargs, n = split_batch({"x": torch.zeros(3, 2), "y": torch.ones(3)}, rename={"y": "ys"})
        >>> len(args), sorted(kwargs), n
        (1, ['ys'], 3)
    """
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, batch.shape[0]
    if isinstance(batch, dict):
        if "x" not in batch:
            raise TypeError(f"A dict batch must have the data points under 'x'; got the keys {sorted(batch)}.")
        x = batch["x"]
        rename = rename or {}
        return (x,), {rename.get(k, k): v for k, v in batch.items() if k != "x"}, x.shape[0]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return tuple(batch), {}, batch[0].shape[0]
    raise TypeError(f"Batches must be a tensor, a tuple or a dict with key 'x'; got {type(batch).__name__}.")


def rows(kwargs: dict, index: Any, n: int) -> dict:
    """The rows ``index`` (a slice or indices) of the tensors in ``kwargs`` with one row per data point (``n`` rows)."""
    return {
        key: value[index] if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n else value
        for key, value in kwargs.items()
    }


def check_arguments(model: Callable, batch_keys: Iterable[str], model_trace: Any = None,
                    rename: Optional[dict] = None, guide_keys: Iterable[str] = ()) -> None:
    """Refuse a pair that a batch would train on nothing, before any work.

    Two ways a pair silently learns nothing: a batch entry that no argument of the model takes
    while the model has an argument of a similar name (Pyro's CVAE example calls its target
    ``ys``; a data module's key is ``y``), and a model that observes nothing (``model_trace``
    has no observed site). The message names the batch keys, the model's arguments and the
    closest match, and says how to map a key to an argument (``rename``). An entry that the guide
    takes (``guide_keys``; e.g. ``index`` for a per-datapoint guide) is not questioned.

    Example:
        >>> def model(xs, ys=None): ...
        >>> check_arguments(model, ["x", "y", "index"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: The batch entry 'y' reaches no argument of the model...
    """
    keys = set(batch_keys) - {"x"}
    renamed = {(rename or {}).get(k, k) for k in keys}
    names, _ = _signature(model)
    for key, name in sorted(zip(keys, [(rename or {}).get(k, k) for k in keys])):
        if name in names or name in set(guide_keys) or key in _INFRASTRUCTURE_KEYS:
            continue
        close = difflib.get_close_matches(name, sorted(names - renamed), n=1, cutoff=0.5)
        if close:
            raise ValueError(
                f"The batch entry {key!r} reaches no argument of the model, whose arguments are "
                f"{sorted(names)}; the batch has {sorted(set(batch_keys))}. Did you mean {close[0]!r}? "
                f"Pass it under that name with rename={{{key!r}: {close[0]!r}}} (YAML: rename: {{{key}: {close[0]}}}), "
                "or rename the model's argument. (Left as it is, the model would never see it.)"
            )
    if model_trace is not None and not observed_sites(model_trace):
        raise ValueError(
            f"The model observed nothing when called with a batch (entries {sorted(set(batch_keys))} reach its "
            f"arguments {sorted(names & (renamed | {'x'})) or '(x only, positionally)'}): no sample site has obs=..., "
            "so training would fit nothing. Check that the argument the model observes receives the batch entry "
            "(rename={'batch_key': 'argument'} maps one to the other), or that it is not None."
        )


# ----- reading a trace -------------------------------------------------------------------
def _is_deterministic(site: dict) -> bool:
    return bool(site["infer"].get("_deterministic"))


def _sample_sites(trace: Any) -> dict:
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site) and not _is_deterministic(site)
    }


def latent_sites(trace: Any) -> dict:
    """The latent sample sites of a trace, by name: unobserved, and not an autoguide's auxiliary site.

    Subsample sites, ``pyro.deterministic`` sites and auxiliary sites (an autoguide's
    ``<name>_unconstrained``, marked ``infer={"is_auxiliary": True}``) are left out, so a
    model's and its guide's latent sites share their names.
    """
    return {
        name: site
        for name, site in _sample_sites(trace).items()
        if not site["is_observed"] and not site["infer"].get("is_auxiliary")
    }


def auxiliary_sites(trace: Any) -> dict:
    """A guide's auxiliary sample sites (``infer={"is_auxiliary": True}``), which the model does not have.

    An autoguide draws an unconstrained value at such a site and returns its image as a ``Delta``
    at the model's site; the guide's density :math:`\\log q(z)` is the sum of both log-densities.
    """
    return {
        name: site
        for name, site in _sample_sites(trace).items()
        if not site["is_observed"] and site["infer"].get("is_auxiliary")
    }


def drawn_sites(trace: Any) -> dict:
    r"""Every site a guide draws, in order: its latent sites and its auxiliary sites.

    The guide's density :math:`\log q` is the sum over these; an estimator that treats the
    guide's draws one by one (score functions, path derivatives) must see the auxiliary ones too.
    """
    return {name: site for name, site in _sample_sites(trace).items() if not site["is_observed"]}


def _is_real(support: Any) -> bool:
    while isinstance(support, torch.distributions.constraints.independent):
        support = support.base_constraint
    return support is torch.distributions.constraints.real


def site_distribution(guide_trace: Any, name: str, model_site: Optional[dict] = None) -> Any:
    """:math:`q(z)` of a latent site as a distribution of the model's value, or ``None`` if the guide has none.

    The guide site's own distribution; for an autoguide's ``Delta`` (Pyro's
    :class:`~pyro.infer.autoguide.AutoNormal` on a real-valued site, whose draw
    ``<name>_unconstrained`` *is* the value) the auxiliary draw's distribution. A point
    estimate (``AutoDelta``), a constrained autoguide site or one part of a joint auxiliary
    draw (``AutoDiagonalNormal``) has no per-site density at hand: ``None``.
    """
    from pyro.distributions import Delta

    fn = guide_trace.nodes[name]["fn"]
    base = fn
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    if not isinstance(base, Delta):
        return fn
    aux = guide_trace.nodes.get(f"{name}_unconstrained")
    if aux is None or not aux["infer"].get("is_auxiliary") or model_site is None:
        return None
    return aux["fn"] if _is_real(model_site["fn"].support) else None


def observed_sites(trace: Any) -> dict:
    """The observed sample sites of a trace (``pyro.deterministic`` sites left out)."""
    return {name: site for name, site in _sample_sites(trace).items() if site["is_observed"]}


def data_frames(sites: Iterable[dict], data_plate: str = "data") -> frozenset:
    """The plate frames of independent data points among ``sites``.

    The vectorized plate named ``data_plate`` (pyro_lvm's convention, and Pyro's examples');
    a pair without one: the plates that every site is in (none for a pair with a global site).
    """
    frames = [
        frozenset(f for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLES)
        for site in sites
    ]
    named = {f for fs in frames for f in fs if f.name == data_plate}
    if named:
        return frozenset(named)
    return frozenset.intersection(*frames) if frames else frozenset()


def is_local(site: dict, frames: frozenset) -> bool:
    """Whether ``site`` belongs to single data points: it runs inside the data plate ``frames``."""
    return bool(frames) and frames <= set(site["cond_indep_stack"])


def subsample_scale(frames: frozenset) -> float:
    """The factor ``size / subsample_size`` by which a subsampled data plate scales its sites."""
    scale = 1.0
    for frame in frames:
        scale *= frame.full_size / frame.size if frame.full_size else 1.0
    return scale


def _site_log_prob(site: dict) -> torch.Tensor:
    if "unscaled_log_prob" in site:
        return site["unscaled_log_prob"]
    return site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])


def elbo_parts(model_trace: Any, guide_trace: Any, data_plate: str = "data") -> dict[str, torch.Tensor]:
    r"""The ELBO's terms of one replayed run, split into the data points' and the global ones.

    For the sites inside the data plate (local): ``reconstruction`` (observed
    :math:`\log p(x_i \mid \cdot)`), ``kl`` (:math:`\log q(z_i) - \log p(z_i)`), summed over the
    batch's data points *without* the plate's subsampling scale. For the other sites (global
    latents such as a factor model's weights, global observations): ``global_reconstruction`` and
    ``global_kl``, once. A held-out ELBO per data point over ``N`` points in batches
    ``b`` is then :math:`\big(\sum_b \mathrm{local}_b + \overline{\mathrm{global}}\big) / N`,
    whatever the batch size (the global KL counted once per data set).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model(x):
        ...     w = pyro.sample("w", dist.Normal(0., 1.))
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("x", dist.Normal(w, 1.), obs=x)
        >>> def guide(x):
        ...     pyro.sample("w", dist.Normal(0., 1.))
        >>> g = poutine.trace(guide).get_trace(torch.zeros(3))
        >>> m = poutine.trace(poutine.replay(model, trace=g)).get_trace(torch.zeros(3))
        >>> parts = elbo_parts(m, g)
        >>> float(parts["global_kl"]), parts["kl"].item()  # the prior as guide: no KL at all
        (0.0, 0.0)
    """
    model_sites = _sample_sites(prune_subsample_sites(model_trace))
    guide_sites = {k: v for k, v in _sample_sites(prune_subsample_sites(guide_trace)).items() if not v["is_observed"]}
    frames = data_frames(list(model_sites.values()) + list(guide_sites.values()), data_plate)
    local_scale = subsample_scale(frames)
    device = next((s["value"].device for s in model_sites.values() if isinstance(s["value"], torch.Tensor)), None)
    zero = torch.zeros((), device=device)
    out = {key: zero for key in ("reconstruction", "kl", "global_reconstruction", "global_kl")}
    for sign, sites in ((1.0, model_sites), (-1.0, guide_sites)):
        for site in sites.values():
            local = is_local(site, frames)
            scale = site["scale"] / local_scale if local else site["scale"]
            term = scale_and_mask(_site_log_prob(site), scale, site["mask"]).sum()
            key = "reconstruction" if site["is_observed"] else "kl"
            term = term if key == "reconstruction" else -sign * term
            key = key if local else "global_" + key
            out[key] = out[key] + term
    return out


def enumerated_sites(model_trace: Any, guide_trace: Any) -> list[str]:
    """The model's latent sites marked for parallel enumeration that the guide does not draw."""
    return [
        name for name, site in latent_sites(model_trace).items()
        if name not in guide_trace.nodes and site["infer"].get("enumerate") == "parallel"
    ]


def enumerated_elbo_parts(model: Callable, guide: Callable, args: tuple, kwargs: dict, data_plate: str = "data",
                          elbo: Any = None) -> dict[str, torch.Tensor]:
    r"""The ELBO of a pair whose model enumerates sites, split into the data points' part and the global part.

    The model's enumerated sites (:func:`enumerated_sites`, e.g. a mixture's assignment) are
    summed out exactly by :class:`~pyro.infer.TraceEnum_ELBO` at one draw of the guide; the global
    terms (:func:`elbo_parts`, sites outside the data plate) are read at the same draw and taken
    out, so that ``elbo`` is the data points' part summed over the batch (without the plate's
    subsampling scale) and ``global_elbo`` the rest, as :func:`elbo_parts` splits a plain ELBO.
    ``elbo``: the ``TraceEnum_ELBO`` to use (it keeps its guessed ``max_plate_nesting``).
    """
    from pyro.infer import TraceEnum_ELBO

    elbo = TraceEnum_ELBO() if elbo is None else elbo
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        total = -elbo.loss(model, poutine.replay(guide, trace=guide_trace), *args, **kwargs)
    parts = elbo_parts(model_trace, guide_trace, data_plate)
    frames = data_frames(list(_sample_sites(prune_subsample_sites(model_trace)).values()), data_plate)
    shared = parts["global_reconstruction"] - parts["global_kl"]
    local = (torch.as_tensor(total, dtype=shared.dtype, device=shared.device) - shared) / subsample_scale(frames)
    return {"elbo": local, "global_elbo": shared}


# ----- particles ---------------------------------------------------------------------------
def with_particles(fn: Callable, num_particles: Optional[int], max_plate_nesting: int) -> Callable:
    """``fn`` run inside a plate of ``num_particles`` particles left of its own plates; ``None``: unchanged.

    ``None`` is the sequential path: one particle per run, without a particle dimension.
    """
    if num_particles is None:
        return fn
    dim = -(max_plate_nesting + 1)

    @functools.wraps(fn, updated=())
    def particles(*args, **kwargs):
        with pyro.plate(PARTICLES, num_particles, dim=dim):
            return fn(*args, **kwargs)

    return particles


def select_particle(value: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Particle ``k`` of a tensor whose (negative) particle dim is ``dim``, that dim kept (size 1)."""
    if value.dim() < -dim or value.shape[dim] == 1:
        return value
    return value.narrow(dim, k, 1)


@dataclass
class Vectorization:
    """The outcome of :func:`check_vectorization`: whether the pair broadcasts over particles, and why not."""

    vectorized: bool
    reason: str = ""
    site: Optional[str] = None

    def __bool__(self) -> bool:
        return self.vectorized


def traced_until_error(fn: Callable, *args, **kwargs) -> tuple[Any, Optional[BaseException]]:
    """Run ``fn`` under a trace; on an error, the trace of the sites drawn before it, and the error."""
    tracer = poutine.trace(fn)
    try:
        return tracer.get_trace(*args, **kwargs), None
    except Exception as err:  # the user's code may raise anything
        return tracer.msngr.trace, err


def _last_site(trace: Any) -> Optional[str]:
    names = [name for name, site in trace.nodes.items() if site["type"] == "sample"]
    return names[-1] if names else None


def _per_site_totals(trace: Any, particle_dim: Optional[int], k: int) -> dict[str, torch.Tensor]:
    """Each sample site's scaled log-density summed over everything but the particle ``k``."""
    totals = {}
    for name, site in _sample_sites(prune_subsample_sites(trace)).items():
        log_p = scale_and_mask(_site_log_prob(site), site["scale"], site["mask"])
        if not isinstance(log_p, torch.Tensor):
            log_p = torch.as_tensor(log_p)
        if particle_dim is not None:
            log_p = select_particle(log_p, k, particle_dim)
        totals[name] = log_p.double().sum()
    return totals


@torch.no_grad()
def check_vectorization(model: Callable, guide: Callable, args: tuple, kwargs: dict, max_plate_nesting: int,
                        num_particles: int = 2, rtol: float = 1e-4) -> Vectorization:
    r"""Whether the pair computes the same thing with particles vectorized as one at a time.

    Runs the guide and the model once inside a plate of ``num_particles`` particles (as
    :class:`pyro.infer.Trace_ELBO` with ``vectorize_particles=True`` does), then, for each
    particle, the pair without the plate replayed at that particle's draws, and compares every
    site's log-density. A model written for one batch (boolean indexing ``loc[mask]``, a
    ``view(batch_size, -1)``, a loop over ``x.shape[0]``) either fails inside the plate or
    computes something else there; it is then run one particle at a time. Runs without
    gradients, outside the caller's handlers (``poutine.block``), with dropout and batch-norm
    layers of the modules behind the pair in evaluation mode (their randomness and batch
    statistics are not what is checked), and leaves the random number generators as it found
    them, so a run's draws do not depend on whether it was checked.

    Returns:
        :class:`Vectorization`: truthy when the vectorized run agrees; else ``reason`` says what
        happened and ``site`` names the site where it did.
    """
    state = get_rng_state()
    try:
        with _quiet_layers(model, guide):
            return _compare_particles(model, guide, args, kwargs, max_plate_nesting, num_particles, rtol)
    finally:
        set_rng_state(state)


def _modules_behind(*fns: Any) -> list:
    """The ``nn.Module`` s behind callables: themselves, a bound method's owner, a wrapped function's."""
    found = {}
    for fn in fns:
        for _ in range(10):
            fn = _unwrap(fn)
            if isinstance(fn, torch.nn.Module):
                found[id(fn)] = fn
                break
            fn = getattr(fn, "__self__", None) or getattr(fn, "__wrapped__", None)
            if fn is None:
                break
    return list(found.values())


@contextlib.contextmanager
def _quiet_layers(*fns: Any):
    """Dropout and batch norm behind ``fns`` in evaluation mode for a while."""
    layers = [m for module in _modules_behind(*fns) for m in module.modules()
              if isinstance(m, (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._BatchNorm))]
    modes = [m.training for m in layers]
    try:
        for m in layers:
            m.eval()
        yield
    finally:
        for m, mode in zip(layers, modes):
            m.train(mode)


def _compare_particles(model, guide, args, kwargs, max_plate_nesting, num_particles, rtol) -> Vectorization:
    dim = -(max_plate_nesting + 1)
    with poutine.block():
        plain = poutine.trace(guide).get_trace(*args, **kwargs)
        vguide = with_particles(guide, num_particles, max_plate_nesting)
        guide_trace, err = traced_until_error(vguide, *args, **kwargs)
        if err is not None:
            return _refused(err, "the guide", _last_site(guide_trace))
        vmodel = with_particles(poutine.replay(model, trace=guide_trace), num_particles, max_plate_nesting)
        model_trace, err = traced_until_error(vmodel, *args, **kwargs)
        if err is not None:
            return _refused(err, "the model", _last_site(model_trace))
        for k in range(num_particles):
            replay = plain.copy()
            for name, site in _sample_sites(plain).items():
                if site["is_observed"] or name not in guide_trace.nodes:
                    continue
                value = guide_trace.nodes[name]["value"]
                event = len(site["fn"].event_shape)
                value = select_particle(value, k, dim - event)
                if value.numel() != site["value"].numel():
                    return Vectorization(False, f"the guide's site {name!r} has shape {tuple(value.shape)} per "
                                                f"particle inside the particle plate, {tuple(site['value'].shape)} "
                                                "outside it", name)
                replay.nodes[name] = dict(site, value=value.reshape(site["value"].shape))
            one_guide = poutine.trace(poutine.replay(guide, trace=replay)).get_trace(*args, **kwargs)
            one_model = poutine.trace(poutine.replay(model, trace=one_guide)).get_trace(*args, **kwargs)
            for which, vec, one in (("guide", guide_trace, one_guide), ("model", model_trace, one_model)):
                vec_totals = _per_site_totals(vec, dim, k)
                one_totals = _per_site_totals(one, None, 0)
                for name, total in one_totals.items():
                    other = vec_totals.get(name)
                    if other is None:
                        return Vectorization(False, f"the {which}'s site {name!r} is missing inside the particle plate", name)
                    if not torch.allclose(other, total, rtol=rtol, atol=rtol * (1 + float(total.abs()))):
                        return Vectorization(
                            False,
                            f"the {which}'s site {name!r} has log-density {float(other):.6g} for a particle inside the "
                            f"particle plate and {float(total):.6g} for the same draw outside it: the {which} does not "
                            "broadcast over a leading particle dimension (e.g. it reshapes or indexes tensors assuming "
                            "exactly the batch's shape)", name)
    return Vectorization(True)


def _refused(err: BaseException, who: str, site: Optional[str]) -> Vectorization:
    where = f" after the site {site!r}" if site else " before its first sample site"
    return Vectorization(
        False,
        f"{who} raised {type(err).__name__}{where} inside the particle plate ({str(err).splitlines()[0][:200] if str(err) else ''})",
        site,
    )


def vectorization_advice(result: Vectorization) -> str:
    """What to change in a model that does not broadcast over particles (for messages)."""
    return (
        f"Vectorized particles do not work for this pair: {result.reason}. To run them in one pass, write the "
        "model so that every tensor may have extra dimensions on the left (index with `...`, use `.mask(mask)` or "
        "`poutine.mask` instead of boolean indexing, `.reshape(*x.shape[:-1], -1)` instead of "
        "`.view(batch_size, -1)`); vectorize_particles=False runs them one at a time without this check."
    )


def batch_size_of(args: tuple) -> int:
    """The number of data points in a call's first argument (1 for a scalar)."""
    x = args[0] if args else None
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else 1


@torch.no_grad()
def later_dependencies(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> tuple[dict, list]:
    r"""Which latent sites' priors depend on latents that the guide draws *after* them.

    The mean-field condition of a closed-form KL (Pyro's :class:`~pyro.infer.TraceMeanField_ELBO`):
    :math:`\mathrm{KL}(q(z_a \mid \cdot) \,\|\, p(z_a \mid z_b))` at a sampled :math:`z_b` is
    unbiased only if :math:`z_b` is drawn before :math:`z_a` in the guide. Pyro checks that model
    and guide draw in the same order, which is sufficient, not necessary (a semi-supervised VAE's
    guide draws :math:`y` before :math:`z` while :math:`p(z)` does not depend on :math:`y`). Here the
    dependence itself is tested: the model runs at the guide's draws made leaves of autograd, and
    a prior depends on a later latent when its log-density has a gradient with respect to it.

    Returns:
        ``(dependencies, untested)``: for each site whose prior depends on later draws, their
        names; and the later latents that could not be tested (integer values, e.g. a
        ``Categorical``), whose dependence is unknown.
    """
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        order = list(latent_sites(guide_trace))
        leaves = {}
        replay = guide_trace.copy()
        for name in order:
            value = guide_trace.nodes[name]["value"]
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                leaves[name] = value.detach().clone().requires_grad_()
                replay.nodes[name] = dict(guide_trace.nodes[name], value=leaves[name])
        with torch.enable_grad():
            model_trace = poutine.trace(poutine.replay(model, trace=replay)).get_trace(*args, **kwargs)
            dependencies, untested_later = {}, set()
            for name, site in latent_sites(model_trace).items():
                if name not in order:
                    continue
                later = order[order.index(name) + 1:]
                tested = [n for n in later if n in leaves]
                untested_later.update(n for n in later if n not in leaves)
                if not tested:
                    continue
                log_p = site["fn"].log_prob(site["value"].detach()).sum()
                if not log_p.requires_grad:
                    continue
                grads = torch.autograd.grad(log_p, [leaves[n] for n in tested], allow_unused=True)
                found = [n for n, g in zip(tested, grads) if g is not None]
                if found:
                    dependencies[name] = found
    return dependencies, sorted(untested_later)
