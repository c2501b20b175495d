"""Training on real MNIST (IDX files from ../shared/data/mnist, skipped where absent)."""

from pathlib import Path

import pytest
import pytorch_lightning as pl

import pyro_lvm
from pyro_lvm.data import MNISTDataModule

MNIST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"
pytestmark = pytest.mark.skipif(not MNIST.is_dir(), reason="MNIST IDX files not available")


class RecordLoss(pl.Callback):
    def __init__(self):
        self.loss = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss.append(float(outputs["loss"]))


def _train(max_epochs, limit_train_batches):
    record = RecordLoss()
    pl.seed_everything(0, verbose=False)
    module = pyro_lvm.fit(
        pyro_lvm.VAE(data_shape=784, latent_dim=20, hidden_dims=[400]),
        data=MNISTDataModule(root=str(MNIST), batch_size=128),
        estimator="analytic_kl", max_epochs=max_epochs, limit_train_batches=limit_train_batches,
        limit_val_batches=10, callbacks=[record], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    return module, record.loss


def test_loss_falls_on_mnist_in_a_short_run():
    _, loss = _train(max_epochs=1, limit_train_batches=100)
    first, last = sum(loss[:10]) / 10, sum(loss[-10:]) / 10
    assert last < first - 150, (first, last)  # ~545 -> ~190 nats per image


@pytest.mark.slow
def test_full_mnist_epochs_reach_a_reasonable_elbo():
    module, _ = _train(max_epochs=3, limit_train_batches=1.0)
    assert float(module.trainer.callback_metrics["val/elbo"]) > -125.0
