"""Training a model/guide pair under PyTorch Lightning.

* :mod:`~pyro_lvm.training.module`: :class:`LVMModule`, the LightningModule around any pair and estimator;
* :mod:`~pyro_lvm.training.fitting`: :func:`fit`, training in one call;
* :mod:`~pyro_lvm.training.fast_step`: the training loss of a built-in model without Pyro's tracing;
* :mod:`~pyro_lvm.training.held_out`: the held-out ELBO and its terms (:func:`elbo_terms`, :class:`HeldOutMean`);
* :mod:`~pyro_lvm.training.monitor`: the latent code while training (KL per dimension, active units, collapse);
* :mod:`~pyro_lvm.training.callbacks`: checkpoints that mean what they say, written atomically;
* :mod:`~pyro_lvm.training.runs`: run folders that are never overwritten;
* :mod:`~pyro_lvm.training.checkpoints`: reading checkpoints safely (a leaf: it imports no other part);
* :mod:`~pyro_lvm.training.state`: what a checkpoint holds besides the weights.
"""

from .callbacks import RunCheckpoint
from .checkpoints import load_checkpoint, model_from_checkpoint, run_config
from .fitting import fit
from .held_out import HeldOutMean, elbo_terms
from .module import DivergedError, LVMModule
from .monitor import LatentMonitor, PosteriorCollapseWarning, latent_statistics

__all__ = [
    "LVMModule", "fit", "elbo_terms", "HeldOutMean", "DivergedError", "LatentMonitor", "PosteriorCollapseWarning",
    "latent_statistics", "RunCheckpoint", "load_checkpoint", "model_from_checkpoint", "run_config",
]
