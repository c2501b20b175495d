"""Pyro autoguides for a model's global latents beside a local guide for the rest."""

from __future__ import annotations

from typing import Any, Callable

import torch
from pyro import poutine
from pyro.infer.autoguide import AutoCallable, AutoGuide, AutoGuideList, AutoNormal
from pyro.poutine.util import site_is_subsample
from torch import nn

from ..pairs import accepting, call_keys

__all__ = ["with_global_autoguide"]


class _GlobalLocalGuide(AutoGuideList):
    """An AutoGuideList that passes :meth:`set_num_data` on to its local guide."""

    def set_num_data(self, num_data: int) -> None:
        set_num_data = getattr(self.__dict__.get("_local_guide"), "set_num_data", None)
        if callable(set_num_data):
            set_num_data(num_data)


def with_global_autoguide(
    model: Callable,
    local_guide: Callable,
    autoguide: Callable[..., AutoGuide] = AutoNormal,
    plate: str = "data",
    **autoguide_kwargs: Any,
) -> AutoGuideList:
    r"""Pair a guide for the local latents with an autoguide for the global ones.

    For a model with global latents :math:`\beta` (outside the data plate) and
    local latents :math:`z_i` (inside it), the guide is the mean-field product

    .. math::

        q(\beta, z_{1:N}) = q_\psi(\beta) \prod_i q(z_i \mid x_i),

    an :class:`~pyro.infer.autoguide.AutoGuideList` whose first part is
    ``autoguide`` on ``poutine.block(model)`` exposing every sample site *not*
    inside the plate ``plate``, and whose second part is ``local_guide`` (an
    :class:`AmortizedGuide`, :class:`PerDatapointGuide`, ... ; wrapped in an
    :class:`~pyro.infer.autoguide.AutoCallable` unless it is an AutoGuide). A site
    counts as local when it runs inside the plate, which is decided as the model
    runs: no example arguments are needed, and the autoguide traces its part at
    its first call as autoguides do. The local guide is attached to ``model`` if
    it has ``attach`` and no model yet, and ``set_num_data`` on the result
    reaches it, so :class:`pyro_lvm.LVMModule` sizes a :class:`PerDatapointGuide`.
    (In eval mode such a guide refits held-out :math:`q_i` with the global latents
    drawn from their prior, not from :math:`q_\psi(\beta)`, which it does not see.)

    References:
        Hoffman, Blei, Wang & Paisley (2013), "Stochastic Variational Inference",
        https://arxiv.org/abs/1206.7051 (global and local variational parameters).

    Arguments:
        model: the model, with global and local latent sites.
        local_guide: the guide of the local sites (those inside ``plate``).
        autoguide: the autoguide class for the global sites.
        plate: the name of the model's data plate.
        autoguide_kwargs: further arguments of ``autoguide`` (``init_scale``, ...).

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> def model(x):
        ...     w = pyro.sample("w", dist.Normal(0., 1.))
        ...     with pyro.plate("data", x.shape[0]):
        ...         z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.).to_event(1))
        ...         pyro.sample("x", dist.Normal(w + z, 1.).to_event(1), obs=x)
        >>> from pyro_lvm.guides import AmortizedGuide
        >>> guide = with_global_autoguide(model, AmortizedGuide(torch.nn.Linear(2, 4)))
        >>> sorted(guide(torch.randn(8, 2)))
        ['w', 'z']
        >>> loss = pyro.infer.Trace_ELBO().differentiable_loss(model, guide, torch.randn(8, 2))
    """
    model_fn = accepting(model)

    def is_local(msg) -> bool:
        return msg["type"] == "sample" and any(f.name == plate for f in msg["cond_indep_stack"])

    global_model = poutine.block(model_fn, hide_fn=is_local)
    guide = _GlobalLocalGuide(global_model)
    guide.__dict__["_local_guide"] = local_guide
    guide.append(autoguide(global_model, **autoguide_kwargs))
    if callable(getattr(local_guide, "attach", None)) and getattr(local_guide, "model", None) is None:
        local_guide.attach(model, None)
    if isinstance(local_guide, AutoGuide):
        guide.append(local_guide)
    else:
        local_fn = accepting(local_guide)

        def sample_local(*args, **kwargs) -> dict[str, torch.Tensor]:
            # AutoGuideList merges the parts' dicts of samples; a guide may return anything
            trace = poutine.trace(local_fn).get_trace(*args, **kwargs)
            return {name: site["value"] for name, site in trace.iter_stochastic_nodes()
                    if not site_is_subsample(site)}

        sample_local.call_keys = call_keys(local_guide, model)  # e.g. "index" for a PerDatapointGuide

        part = AutoCallable(model_fn, sample_local)
        if isinstance(local_guide, nn.Module):
            part.local_guide = local_guide  # registered, so its parameters and train/eval follow
        guide.append(part)
    return guide
