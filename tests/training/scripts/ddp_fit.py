"""Train a small VAE with DDP on 2 CPU processes (gloo); each rank saves its parameters.

Run as a script (Lightning's DDP launcher re-executes it once per extra rank):
``python tests/scripts/ddp_fit.py OUT_DIR``.
"""

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

import pyro_lvm


class SaveParameters(pl.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")
        losses = [float(v) for k, v in trainer.callback_metrics.items() if k == "train/loss_epoch"]
        torch.save({"world_size": trainer.world_size, "loss": losses}, self.out / f"info{trainer.global_rank}.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    pyro_lvm.fit(
        pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[32]),
        data=pyro_lvm.data.DigitsDataModule(batch_size=64),
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveParameters(out)],
    )
