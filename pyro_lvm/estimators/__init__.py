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

import inspect

from pyro.infer import ELBO

from .base import BetaMixin, latent_sites
from .enum import EnumELBO
from .iwae import DReGELBO, IWAEELBO
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
        raise ValueError(
            f"Estimator {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(valid)}."
        )
    return cls(**options)
