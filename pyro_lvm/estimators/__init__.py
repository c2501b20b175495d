r"""Estimators of the ELBO (and of tighter bounds) and their gradients, chosen by name.

Every estimator here is a :class:`pyro.infer.ELBO` with ``differentiable_loss``, so
it works with :class:`pyro.infer.SVI`, with Pyro's :class:`~pyro.infer.elbo.ELBOModule`
(``elbo(model, guide)``) and with :class:`pyro_lvm.LVMModule`, on the built-in
models and on a user's own model/guide pair. :func:`make_elbo` builds one by name:

==================  ======================================================  ==============================
name                gradient of                                             latents
==================  ======================================================  ==============================
``reparam``         ELBO, pathwise (reparameterization trick)               reparameterizable (*)
``analytic_kl``     ELBO with the KL in closed form                         closed-form KL
``stl``             ELBO, pathwise without the score term (Roeder 2017)     reparameterizable
``score_function``  ELBO, REINFORCE with a baseline (none, average, NVIL)   any
``iwae``            IWAE bound (Burda 2015), pathwise                       reparameterizable
``dreg``            IWAE bound, doubly reparameterized (Tucker 2018)        reparameterizable
``vimco``           IWAE bound, leave-one-out score function (Mnih 2016)    any, ``num_particles >= 2``
``enum``            ELBO, discrete latents summed out exactly               enumerable discrete
``relaxed``         relaxed ELBO, Gumbel-softmax (Jang 2017)                OneHotCategorical, Bernoulli
==================  ======================================================  ==============================

(*) Other sites fall back to the score function, as in Pyro.

A combination that cannot work fails before training with a message that says
what to use instead: :meth:`~pyro_lvm.estimators.base.BetaMixin.check` runs the
pair once; :class:`pyro_lvm.LVMModule` calls it when it is built (for the built-in
models) and before the first step, and every estimator calls it at its first use.

Each estimator has ``beta``, the weight of the KL term:

.. math::

    \mathcal L_\beta(x) = \mathbb E_{q(z\mid x)}[\log p(x\mid z)]
        - \beta\,\mathrm{KL}\big(q(z\mid x)\,\|\,p(z)\big),

implemented by scaling the log-densities of the latent sites in *both* the
model and the guide by ``beta`` (scaling only the model's ``log p(z)`` would
give ``beta log p(z) - log q(z)``, which is not ``beta`` times the KL). Any
``beta >= 0`` works, including 0 (pure reconstruction), which
:func:`pyro.poutine.scale` would reject. In the multi-sample bounds it weights
the latents' terms of ``log w``.

Beyond a weight, ``reparam`` and ``analytic_kl`` take a ``kl_control`` that rewrites
the KL term from the KL per latent variable: :class:`FreeBits` (a floor of
:math:`\lambda` nats per dimension, Kingma et al. 2016) or :class:`Capacity`
(:math:`\gamma\,|\mathrm{KL} - C(t)|`, Burgess et al. 2018); see
:mod:`pyro_lvm.estimators.kl_control`.
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any, Callable, Union

from pyro.infer import ELBO

from .base import BetaMixin, latent_sites
from .enum import EnumELBO
from .iwae import IWAEELBO, DReGELBO
from .kl_control import Capacity, FreeBits, KLControl, kl_per_variable
from .particles import LogWeights, ParticleELBO
from .relaxed import RelaxedELBO
from .score_function import NVILBaseline, ScoreFunctionELBO
from .stl import STLELBO
from .trace import AnalyticKLELBO, ReparamELBO
from .vimco import VIMCOELBO

__all__ = [
    "BetaMixin",
    "ReparamELBO",
    "AnalyticKLELBO",
    "STLELBO",
    "ScoreFunctionELBO",
    "NVILBaseline",
    "IWAEELBO",
    "DReGELBO",
    "VIMCOELBO",
    "EnumELBO",
    "RelaxedELBO",
    "ParticleELBO",
    "LogWeights",
    "ESTIMATORS",
    "make_elbo",
    "as_estimator",
    "MOVED_TO_ESTIMATOR",
    "moved_options_message",
    "refuse_moved_options",
    "refusing_moved_options",
    "latent_sites",
    "KLControl",
    "FreeBits",
    "Capacity",
    "kl_per_variable",
]

ESTIMATORS: dict[str, type[ELBO]] = {
    "reparam": ReparamELBO,
    "analytic_kl": AnalyticKLELBO,
    "stl": STLELBO,
    "score_function": ScoreFunctionELBO,
    "iwae": IWAEELBO,
    "dreg": DReGELBO,
    "vimco": VIMCOELBO,
    "enum": EnumELBO,
    "relaxed": RelaxedELBO,
}


def make_elbo(name: str, **options) -> ELBO:
    """Build an estimator by name; ``options`` are its constructor arguments.

    Names: see the table in :mod:`pyro_lvm.estimators`. Unknown names and
    options fail, listing the valid ones.

    Example:
        >>> elbo = make_elbo("score_function", num_particles=4, beta=0.5, baseline="nvil")
        >>> type(elbo).__name__, elbo.num_particles, elbo.beta, elbo.baseline
        ('ScoreFunctionELBO', 4, 0.5, 'nvil')
        >>> make_elbo("dreg", num_particles=16).num_particles
        16
    """
    try:
        cls = ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"Unknown estimator {name!r}; valid names: {', '.join(sorted(ESTIMATORS))}."
        ) from None
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        takers = [n for n, c in ESTIMATORS.items() if all(_takes(c, option) for option in unknown)]
        raise ValueError(
            f"Estimator {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(valid)}."
            + (f" The estimators that take it: {' and '.join(map(repr, takers))}." if takers else "")
        )
    return cls(**options)


def as_estimator(estimator: Union[ELBO, str], data_plate: str = "data") -> ELBO:
    """The estimator object for an object or a name (``"iwae"``: :func:`make_elbo` with its defaults).

    ``data_plate`` (the pair's plate of data points) is given to an estimator that weighs particles per
    data point and was left at the default plate name. The KL weight ``beta`` belongs to the trainer
    (:class:`pyro_lvm.LVMModule`'s ``beta``, a number or a schedule), which sets it at every step, so an
    estimator built with another ``beta`` is refused rather than silently overridden.

    Example:
        >>> as_estimator("iwae").num_particles
        1
        >>> as_estimator(IWAEELBO(num_particles=5), data_plate="batch").data_plate
        'batch'
        >>> as_estimator(ReparamELBO(beta=0.5))
        Traceback (most recent call last):
        ...
        ValueError: The KL weight is the trainer's: pass beta=0.5 to LVMModule or fit (a number or a pyro_lvm.schedules.Schedule) and leave ReparamELBO's beta at 1.
    """
    if isinstance(estimator, str):
        cls = ESTIMATORS.get(estimator)
        options = {"data_plate": data_plate} if cls is not None and _takes(cls, "data_plate") else {}
        return make_elbo(estimator, **options)
    if not hasattr(estimator, "differentiable_loss"):
        raise TypeError(
            f"{type(estimator).__name__} has no differentiable_loss; use a pyro_lvm estimator "
            "(pyro_lvm.estimators, or a name such as 'reparam') or a Pyro ELBO that has one."
        )
    beta = getattr(estimator, "beta", 1.0)
    if isinstance(beta, (int, float)) and beta != 1.0:
        raise ValueError(
            f"The KL weight is the trainer's: pass beta={beta} to LVMModule or fit (a number or a "
            f"pyro_lvm.schedules.Schedule) and leave {type(estimator).__name__}'s beta at 1."
        )
    if getattr(estimator, "data_plate", None) == "data" and data_plate != "data":
        estimator.data_plate = data_plate
    return estimator


def _takes(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters


#: keywords that LVMModule and fit took before the estimator carried its own options
MOVED_TO_ESTIMATOR = ("num_particles", "estimator_options", "kl_control")


def moved_options_message(owner: str, estimator: Any, moved: dict[str, Any]) -> str:
    """What to write instead of ``owner(estimator=name, num_particles=..., estimator_options=..., kl_control=...)``.

    Example:
        >>> print(moved_options_message("fit", "iwae", {"num_particles": 5}))
        fit no longer takes num_particles: the estimator carries its own options. Write estimator=pyro_lvm.estimators.IWAEELBO(num_particles=5); in a YAML config, estimator: {class_path: pyro_lvm.estimators.IWAEELBO, init_args: {num_particles: 5}}.
    """
    name = estimator if isinstance(estimator, str) else None
    cls = ESTIMATORS.get(name, type(estimator) if name is None else None) if estimator is not None else ReparamELBO
    cls_name = cls.__name__ if cls is not None else "ReparamELBO"
    options = {k: v for k, v in moved.items() if k in ("num_particles", "kl_control") and v is not None}
    options.update(moved.get("estimator_options") or {})
    python = ", ".join(f"{k}={_python(v)}" for k, v in options.items())
    yaml = ", ".join(f"{k}: {_yaml(v)}" for k, v in options.items())
    return (
        f"{owner} no longer takes {', '.join(moved)}: the estimator carries its own options. Write "
        f"estimator=pyro_lvm.estimators.{cls_name}({python}); in a YAML config, "
        f"estimator: {{class_path: pyro_lvm.estimators.{cls_name}, init_args: {{{yaml}}}}}."
    )


def _python(value: Any) -> str:
    if isinstance(value, KLControl):
        return f"pyro_lvm.estimators.{value!r}"
    return repr(value)


def _yaml(value: Any) -> str:
    if isinstance(value, KLControl):
        # a constant schedule (Capacity's capacity) is written as its value
        args = ", ".join(f"{k}: {getattr(v, 'value', v)}" for k, v in vars(value).items() if not k.startswith("_"))
        return f"{{class_path: pyro_lvm.estimators.{type(value).__name__}, init_args: {{{args}}}}}"
    return json.dumps(value) if isinstance(value, (str, bool)) or value is None else str(value)


def refuse_moved_options(owner: str, estimator: Any, kwargs: dict[str, Any]) -> None:
    """Raise a ``TypeError`` with :func:`moved_options_message` when ``kwargs`` holds a moved keyword."""
    moved = {k: kwargs[k] for k in MOVED_TO_ESTIMATOR if k in kwargs}
    if moved:
        raise TypeError(moved_options_message(owner, estimator, moved))


def refusing_moved_options(init: Callable) -> Callable:
    """Wrap an ``__init__(self, model, guide, estimator, ...)`` so the moved keywords get the new spelling.

    The wrapper keeps the wrapped signature (``inspect.signature`` follows ``__wrapped__``), which is what
    LightningCLI and jsonargparse read.
    """

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        estimator = kwargs.get("estimator", args[2] if len(args) > 2 else None)
        refuse_moved_options(type(self).__name__, estimator, kwargs)
        init(self, *args, **kwargs)

    return wrapper
