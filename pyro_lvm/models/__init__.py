"""Model/guide pairs as PyroModules."""

from .discrete_vae import DiscreteVAE
from .vae import VAE

__all__ = ["VAE", "DiscreteVAE"]
