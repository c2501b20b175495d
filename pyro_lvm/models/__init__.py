"""Model/guide pairs as PyroModules."""

from .vae import VAE

__all__ = ["VAE"]
