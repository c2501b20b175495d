"""Model/guide pairs as PyroModules."""

from .base import LatentVariableModel
from .conv_vae import ConvVAE
from .cvae import ConditionalVAE, DeterministicBaseline, evaluate_conditional
from .discrete_vae import DiscreteVAE
from .flow import FlowModel
from .hierarchical_vae import HierarchicalVAE
from .ssvae import SemiSupervisedVAE
from .vae import VAE

__all__ = ["LatentVariableModel", "VAE", "DiscreteVAE", "ConvVAE", "HierarchicalVAE",
           "ConditionalVAE", "DeterministicBaseline", "evaluate_conditional", "FlowModel",
           "SemiSupervisedVAE"]
