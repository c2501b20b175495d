r"""What the per-input checks of a posterior share: the pair's latent sites and plates, and :math:`\log p(x_i, z)` at given latents.

The amortization gap, NUTS and SBC (:mod:`pyro_lvm.diagnostics`) each treat the posterior
:math:`p(z \mid x_i)` of every input on its own: :func:`pair_layout` reads the latent sites of the guide and
the plates of the pair, :func:`log_joint` evaluates the model conditioned on latent values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites

from ..pairs import check_vectorization, latent_sites, rows, site_distribution
from .importance import importance_draws

__all__ = [
    "Site",
    "Layout",
    "module_of",
    "Evaluating",
    "take_rows",
    "data_frame",
    "family_name",
    "normal_parameters",
    "pair_layout",
    "log_joint",
    "flat_draws",
    "refuse_discrete",
    "pair_name",
    "gaussian_log_weights",
]

_PARTICLES = "posterior_check_particles"


@dataclass
class Site:
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
class Layout:
    """The latent sites of a pair, its plate nesting (without particles) and the data plate's dim."""

    sites: list
    nesting: int
    data_dim: int
    vectorized: bool = True  # whether the model broadcasts over a particle plate (else one run per particle)

    def names(self) -> list[str]:
        return [site.name for site in self.sites]


def module_of(fn: Any) -> Optional[torch.nn.Module]:
    """The ``nn.Module`` behind a model or guide: itself, a bound method's owner, or a wrapped function's."""
    seen = 0
    while fn is not None and seen < 10:
        if isinstance(fn, torch.nn.Module):
            return fn
        fn = getattr(fn, "__self__", None) or getattr(fn, "__wrapped__", None)
        seen += 1
    return None


class Evaluating:
    """Put the modules behind a pair in eval mode (no dropout, fixed batch norm), and restore them."""

    def __init__(self, *fns: Any):
        modules = {}
        for fn in fns:
            module = module_of(fn)
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


def take_rows(x: torch.Tensor, kwargs: dict, index: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Rows ``index`` of ``x`` and of the tensors among ``kwargs`` with one row per data point."""
    return x[index], rows(kwargs, index, len(x))


def data_frame(site: dict, data_plate: str):
    return next((f for f in site["cond_indep_stack"] if f.vectorized and f.name == data_plate), None)


def family_name(fn: Any) -> str:
    base = fn
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    return type(base).__name__


def normal_parameters(fn: Any) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    base = fn
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    if isinstance(base, torch.distributions.Normal):
        return base.loc, base.scale
    return None


def pair_layout(model: Callable, guide: Callable, x: torch.Tensor, kwargs: dict, data_plate: str, who: str,
            vectorize_particles: Optional[bool] = None) -> Layout:
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
            frame = data_frame(site, data_plate)
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
        start = value.dim() - len(fn.event_shape) + data_frame(site, data_plate).dim
        if start < 0 or any(size != 1 for size in value.shape[:start]):
            raise ValueError(
                f"{who} reads the latent site {name!r} of shape {tuple(value.shape)} as one row per data point "
                f"along pyro.plate({data_plate!r}); its leading dims are not of size 1."
            )
        shape = value.shape[start + 1:]
        n = value.shape[start]
        gaussian = None
        first_params, second_params = normal_parameters(fn), normal_parameters(second_fn)
        if first_params is not None and second_params is not None and all(
            torch.equal(a.broadcast_to(value.shape), b.broadcast_to(value.shape))
            for a, b in zip(first_params, second_params)
        ):  # a Normal whose parameters do not depend on another latent's draw
            gaussian = tuple(p.detach().broadcast_to(value.shape).reshape((n,) + shape).clone() for p in first_params)
        sites.append(Site(name=name, shape=shape, discrete=bool(support.is_discrete), support=support,
                           dtype=value.dtype, gaussian=gaussian, family=family_name(fn)))
    if vectorize_particles is None:
        vectorized = bool(check_vectorization(model, guide, (x,), kwargs, nesting))
    else:
        vectorized = bool(vectorize_particles)
    return Layout(sites=sites, nesting=nesting, data_dim=data_dim, vectorized=vectorized)


def log_joint(model: Callable, x: torch.Tensor, kwargs: dict, values: dict, layout: Layout) -> torch.Tensor:
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


def _joint_run(model: Callable, x: torch.Tensor, kwargs: dict, values: dict, layout: Layout,
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


def flat_draws(model: Callable, guide: Callable, x: torch.Tensor, kwargs: dict, num: int, chunk_size: int,
                data_plate: str, layout: Layout) -> dict[str, Any]:
    """``num`` draws of the guide per data point: log weights ``(num, N)`` and latents ``{name: (num, N, D)}``."""
    return importance_draws(model, guide, x, num, chunk_size, len(x), data_plate, kwargs, True, layout.vectorized)


def refuse_discrete(layout: Layout, who: str, model: Any, reason: str, alternative: str) -> None:
    discrete = [f"{site.name!r} ({site.family})" for site in layout.sites if site.discrete]
    if discrete:
        raise ValueError(
            f"{who} needs continuous latents; {pair_name(model)} has the discrete latent site(s) {', '.join(discrete)}: "
            f"{reason} {alternative}"
        )


def pair_name(model: Any) -> str:
    module = module_of(model)
    return type(module).__name__ if module is not None else getattr(model, "__name__", type(model).__name__)


def gaussian_log_weights(model: Callable, x: torch.Tensor, kwargs: dict, layout: Layout, loc: dict, scale: dict,
                          eps: dict, stick: bool = False) -> torch.Tensor:
    """``log p(x, z) - log q(z)`` at ``z = loc + scale * eps`` per site, ``(K, N)``; ``stick`` detaches q's parameters in ``log q``."""
    values, log_q = {}, 0.0
    for name in loc:
        z = loc[name] + scale[name] * eps[name]
        q_loc, q_scale = (loc[name].detach(), scale[name].detach()) if stick else (loc[name], scale[name])
        log_q = log_q + dist.Normal(q_loc, q_scale).log_prob(z).reshape(z.shape[:2] + (-1,)).sum(-1)
        values[name] = z
    return log_joint(model, x, kwargs, values, layout) - log_q
