"""Training through LVMModule / fit: hand-written pairs, resume, DDP, checkpoints, bad input."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

import pyro_lvm
from pyro_lvm.data import DigitsDataModule, TensorDataModule

QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)


class RecordValidation(pl.Callback):
    def __init__(self):
        self.elbo = []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.elbo.append(float(trainer.callback_metrics["val/elbo"]))


# ----- a hand-written factor-analysis pair: pyro.param, pyro.module, a constrained param ----
K, D = 2, 6


def fa_model(x):
    W = pyro.param("W", lambda: 0.1 * torch.randn(D, K))
    b = pyro.param("b", lambda: torch.zeros(D))
    s = pyro.param("s", lambda: torch.ones(D), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(K), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T + b, s).to_event(1), obs=x)


encoder = nn.Linear(D, 2 * K)


def fa_guide(x):
    pyro.module("encoder", encoder)
    loc, raw = encoder(x).split(K, -1)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))


def fa_log_evidence(W, b, s, x):
    cov = W @ W.T + torch.diag(s**2)
    return torch.distributions.MultivariateNormal(b, cov).log_prob(x).mean()


def test_hand_written_pair_trains_through_fit():
    torch.manual_seed(0)
    W_true = torch.randn(D, K)
    x = torch.randn(2048, K) @ W_true.T + 0.3 * torch.randn(2048, D) + 1.0
    pyro.clear_param_store()
    record = RecordValidation()
    module = pyro_lvm.fit(
        fa_model, fa_guide, data=TensorDataModule(x[:1792], val=x[1792:], batch_size=128),
        estimator="analytic_kl", lr=0.02, max_epochs=25, callbacks=[record],
        enable_checkpointing=False, **QUIET,
    )
    # every parameter of the pair is a parameter of the module, none leaked to Pyro's store
    names = set(module.pyro_params.keys())
    assert names == {"W", "b", "s", "encoder$$$weight", "encoder$$$bias"}
    assert {id(p) for p in encoder.parameters()} <= {id(p) for p in module.parameters()}
    assert len(pyro.get_param_store()) == 0
    # the exact log-evidence of held-out data rose to near that of the true parameters
    p = {k: v.detach() for k, v in module.pyro_params.items()}
    s = torch.distributions.transform_to(dist.constraints.positive)(p["s"])
    learned = fa_log_evidence(p["W"], p["b"], s, x[1792:])
    truth = fa_log_evidence(W_true, torch.ones(D), torch.full((D,), 0.3), x[1792:])
    initial = fa_log_evidence(0.1 * torch.randn(D, K), torch.zeros(D), torch.ones(D), x[1792:])
    assert learned > truth - 0.25
    assert learned > initial + 3.0
    # the held-out ELBO rose to within a small gap of the exact evidence (a linear encoder
    # is nearly exact here; the strict ELBO <= log p(x) is tested in test_estimators.py)
    assert abs(record.elbo[-1] - float(learned)) < 0.3
    assert record.elbo[-1] > record.elbo[0] + 1.0


def test_vae_loss_falls_on_digits():
    record = RecordValidation()
    pyro_lvm.fit(
        pyro_lvm.VAE(data_shape=64, latent_dim=4, hidden_dims=[64]),
        data=DigitsDataModule(batch_size=64), max_epochs=6, callbacks=[record],
        enable_checkpointing=False, **QUIET,
    )
    assert record.elbo[-1] > record.elbo[0] + 2.0, record.elbo


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize("estimator", ["reparam", "score_function"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, estimator):
    def run(max_epochs, ckpt_path=None, dirpath=None):
        callbacks = [ModelCheckpoint(dirpath=dirpath, save_last=True)] if dirpath else []
        pl.seed_everything(7, verbose=False)  # the same initial weights in every run
        return pyro_lvm.fit(
            pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[32]),
            data=DigitsDataModule(batch_size=64), estimator=estimator, seed=7,
            max_epochs=max_epochs, ckpt_path=ckpt_path, callbacks=callbacks,
            enable_checkpointing=bool(dirpath), **QUIET,
        )

    straight = run(4)
    run(2, dirpath=tmp_path)
    resumed = run(4, ckpt_path=str(tmp_path / "last.ckpt"), dirpath=tmp_path)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    # not vacuous: training moved the parameters
    fresh = run(0).state_dict()
    assert any(not torch.allclose(fresh[k], a[k]) for k in a)


@pytest.mark.skipif(sys.platform == "win32", reason="gloo DDP test on Linux")
def test_ddp_two_processes_end_with_identical_parameters(tmp_path):
    script = Path(__file__).parent / "scripts" / "ddp_fit.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    info = torch.load(tmp_path / "info0.pt", weights_only=True)
    assert info["world_size"] == 2
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    fresh = pyro_lvm.LVMModule(pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[32])).state_dict()
    assert any(not torch.allclose(fresh[k], rank0[k]) for k in fresh)


# ----- bad input: a clear error before any work is lost ----------------------------------------
def _fit_vae(x, **vae_kwargs):
    return pyro_lvm.fit(
        pyro_lvm.VAE(**{"data_shape": 64, "latent_dim": 2, "hidden_dims": [8], **vae_kwargs}),
        data=TensorDataModule(x, val=x[:16], batch_size=16), max_epochs=1, enable_checkpointing=False, **QUIET,
    )


def test_nan_in_data_is_rejected_before_training():
    x = torch.bernoulli(torch.full((64, 64), 0.5))
    x[5, 3] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        _fit_vae(x)


def test_grey_levels_with_bernoulli_likelihood_are_rejected():
    with pytest.raises(ValueError, match="binary data.*binarize"):
        _fit_vae(torch.rand(64, 64))


def test_data_outside_unit_interval_with_bernoulli_are_rejected():
    with pytest.raises(ValueError, match=r"needs data in \[0, 1\]; got min=-0.9"):
        _fit_vae(torch.rand(64, 64) * 3 - 1)


def test_wrong_data_shape_is_rejected():
    with pytest.raises(ValueError, match=r"shape \(batch, 64\); got \(1, 784\). Set data_shape"):
        _fit_vae(torch.bernoulli(torch.full((64, 784), 0.5)))


def test_gaussian_vae_accepts_grey_levels():
    module = _fit_vae(torch.rand(64, 64), likelihood="gaussian")
    assert module.trainer.current_epoch == 1


def test_corrupt_checkpoint_gets_a_clear_error(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="cannot be read.*corrupt or truncated"):
        pyro_lvm.fit(pyro_lvm.VAE(), data=DigitsDataModule(), ckpt_path=str(bad), max_epochs=1, **QUIET)


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    pyro_lvm.fit(
        pyro_lvm.VAE(latent_dim=2, hidden_dims=[16]), data=DigitsDataModule(), max_epochs=1,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)], **QUIET,
    )
    with pytest.raises(ValueError, match="another model configuration.*latent_dim: 2 in the checkpoint, 3 here"):
        pyro_lvm.fit(
            pyro_lvm.VAE(latent_dim=3, hidden_dims=[16]), data=DigitsDataModule(), max_epochs=2,
            ckpt_path=str(tmp_path / "last.ckpt"),
            callbacks=[ModelCheckpoint(dirpath=tmp_path / "other", save_last=True)], **QUIET,
        )


def test_pair_without_guide_is_rejected():
    with pytest.raises(TypeError, match="no guide"):
        pyro_lvm.LVMModule(fa_model)


def test_beta_schedule_drives_the_estimator():
    module = pyro_lvm.LVMModule(
        pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[8]),
        beta=pyro_lvm.schedules.LinearWarmup(warmup_steps=10),
    )
    trainer = pl.Trainer(max_steps=6, enable_checkpointing=False, limit_val_batches=0, **QUIET)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert module.estimator.beta == pytest.approx(0.5)  # beta(5) after steps 0..5


def test_beta_with_an_estimator_without_kl_weight_is_rejected():
    with pytest.raises(ValueError, match="beta needs an estimator with a KL weight"):
        pyro_lvm.LVMModule(fa_model, fa_guide, estimator=pyro.infer.Trace_ELBO(), beta=0.5)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_a_loaded_module_evaluates_with_trainer_test(tmp_path):
    pl.seed_everything(0, verbose=False)
    module = pyro_lvm.fit(
        pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[16]), data=DigitsDataModule(),
        max_epochs=1, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)], **QUIET,
    )
    fresh = pyro_lvm.LVMModule(pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[16]))
    trainer = pl.Trainer(enable_checkpointing=False, **QUIET)
    (result,) = trainer.test(fresh, datamodule=DigitsDataModule(), ckpt_path=str(tmp_path / "last.ckpt"),
                             weights_only=True)
    (expected,) = pl.Trainer(enable_checkpointing=False, **QUIET).test(module, datamodule=DigitsDataModule())
    assert result["test/elbo"] == pytest.approx(expected["test/elbo"], abs=1.0)  # one MC draw each
    torch.testing.assert_close(fresh.state_dict(), module.state_dict())


def test_tensorboard_and_csv_loggers_record_the_validation_elbo(tmp_path):
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    pyro_lvm.fit(
        pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[16]), data=DigitsDataModule(),
        max_epochs=2, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=5, logger=[CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")],
    )
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    header = next((tmp_path / "csv").rglob("metrics.csv")).read_text().splitlines()[0]
    assert {"val/elbo", "val/kl", "val/reconstruction", "train/loss_epoch", "train/beta"} <= set(header.split(","))


def test_early_stopping_on_the_validation_elbo():
    from pytorch_lightning.callbacks import EarlyStopping

    module = pyro_lvm.fit(
        pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[16]), data=DigitsDataModule(),
        max_epochs=50, enable_checkpointing=False, **QUIET,
        # demanding 100 nats of improvement per epoch stops the run after `patience` epochs
        callbacks=[EarlyStopping(monitor="val/elbo", mode="max", min_delta=100.0, patience=2)],
    )
    assert module.trainer.current_epoch == 3
