"""pyro_lvm: latent-variable models as first-class citizens of Pyro.

Define a model/guide pair (or pick :class:`VAE`), pick an estimator of the ELBO's
gradient (:func:`make_elbo`), a KL weight or schedule (:mod:`pyro_lvm.schedules`),
and train with :func:`fit` or ``pyro-lvm fit``.

``import pyro_lvm`` loads torch and Pyro only: what needs Lightning (:mod:`pyro_lvm.training`,
:mod:`pyro_lvm.data`, :mod:`pyro_lvm.cli`), matplotlib (:mod:`pyro_lvm.plots`) or ArviZ and pandas
(:mod:`pyro_lvm.diagnostics`) is imported the first time it is used.
"""

from importlib import import_module
from typing import Any

from . import estimators, flows, guides, likelihoods, models, nets, pairs, schedules
from .estimators import make_elbo
from .guides import AmortizedGuide, PerDatapointGuide, SemiAmortizedGuide, with_global_autoguide
from .models.conv_vae import ConvVAE
from .models.cvae import ConditionalVAE, DeterministicBaseline
from .models.discrete_vae import DiscreteVAE
from .models.flow import FlowModel
from .models.hierarchical_vae import HierarchicalVAE
from .models.ssvae import SemiSupervisedVAE
from .models.vae import VAE

__version__ = "0.1.0"

# name -> the module that defines it, imported on first use (Lightning, matplotlib, ArviZ, pandas)
_LAZY = {
    "LVMModule": "pyro_lvm.training",
    "fit": "pyro_lvm.training",
    "elbo_terms": "pyro_lvm.training",
    "evaluate": "pyro_lvm.diagnostics",
    "log_likelihood": "pyro_lvm.diagnostics",
}
_LAZY_MODULES = ("cli", "data", "diagnostics", "plots", "training")

__all__ = [
    "VAE",
    "DiscreteVAE",
    "ConvVAE",
    "ConditionalVAE",
    "DeterministicBaseline",
    "FlowModel",
    "HierarchicalVAE",
    "SemiSupervisedVAE",
    "LVMModule",
    "fit",
    "elbo_terms",
    "make_elbo",
    "evaluate",
    "log_likelihood",
    "AmortizedGuide",
    "PerDatapointGuide",
    "SemiAmortizedGuide",
    "with_global_autoguide",
    "data",
    "diagnostics",
    "estimators",
    "flows",
    "guides",
    "likelihoods",
    "models",
    "nets",
    "pairs",
    "plots",
    "schedules",
    "training",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
    elif name in _LAZY_MODULES:
        value = import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
