"""pyro_lvm: latent-variable models as first-class citizens of Pyro.

Define a model/guide pair (or pick :class:`VAE`), pick an estimator of the ELBO's
gradient (:func:`make_elbo`), a KL weight or schedule (:mod:`pyro_lvm.schedules`),
and train with :func:`fit` or ``pyro-lvm fit``.
"""

from . import (
    callbacks, data, diagnostics, estimators, evaluation, flows, guides, likelihoods, monitoring, nets, pairs,
    plots, posterior_checks, runs, schedules,
)
from .estimators import make_elbo
from .evaluation import evaluate, log_likelihood
from .guides import AmortizedGuide, PerDatapointGuide, SemiAmortizedGuide, with_global_autoguide
from .models.conv_vae import ConvVAE
from .models.cvae import ConditionalVAE, DeterministicBaseline
from .models.discrete_vae import DiscreteVAE
from .models.flow import FlowModel
from .models.hierarchical_vae import HierarchicalVAE
from .models.vae import VAE
from .training import LVMModule, elbo_terms, fit

__version__ = "0.1.0"

__all__ = [
    "VAE",
    "DiscreteVAE",
    "ConvVAE",
    "ConditionalVAE",
    "DeterministicBaseline",
    "FlowModel",
    "HierarchicalVAE",
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
    "callbacks",
    "data",
    "diagnostics",
    "estimators",
    "evaluation",
    "flows",
    "guides",
    "likelihoods",
    "monitoring",
    "nets",
    "pairs",
    "plots",
    "posterior_checks",
    "runs",
    "schedules",
]
