"""Nothing lost, nothing silently wrong: runs under faults (kill -9, Ctrl-C, a full disk, a diverging step, a
hostile checkpoint, two runs in one folder, bad data), most of them in subprocesses as a user would meet them."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyro
import pytest
import pytorch_lightning as pl
import torch

import pyro_lvm
from pyro_lvm.training.callbacks import RunCheckpoint
from pyro_lvm.cli import main
from pyro_lvm.data import DigitsDataModule, TensorDataModule
from pyro_lvm.training import DivergedError

REPO = Path(__file__).resolve().parents[2]
QUIET = dict(enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False)

# A run of the digits VAE through pyro_lvm.fit with the defaults (fast step, RunCheckpoint), resumable.
RUN = '''
import sys, pytorch_lightning as pl, pyro_lvm
from pyro_lvm.data import DigitsDataModule
root, epochs, ckpt = sys.argv[1], int(sys.argv[2]), (sys.argv[3] if len(sys.argv) > 3 else None)
pl.seed_everything(0, verbose=False)
vae = pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[32])
pyro_lvm.fit(vae, data=DigitsDataModule(batch_size=128), lr=3e-3, max_epochs=epochs, ckpt_path=ckpt,
             default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False)
'''

# The same with every kind of state an estimator keeps: a per-datapoint guide's tables, the score function's
# running-average baseline, a beta schedule of the step.
STATEFUL = RUN.replace("pyro_lvm.fit(vae, ", """guide = pyro_lvm.PerDatapointGuide(num_data=1437)
pyro_lvm.fit(vae, guide, estimator=pyro_lvm.make_elbo("score_function", num_particles=2),
             beta=pyro_lvm.schedules.LinearWarmup(warmup_steps=60), """)


def run_script(tmp_path, source: str, *args, env=None, wait=True):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(source))
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, str(script), *map(str, args)]
    if not wait:
        return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)


def epoch_of(path: Path) -> int:
    return torch.load(path, weights_only=True)["epoch"]


def state_difference(a: Path, b: Path) -> float:
    """The largest |difference| between two checkpoints' parameters and optimizer states."""
    ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    diffs = [float((ca["state_dict"][k] - cb["state_dict"][k]).abs().max()) for k in ca["state_dict"]]
    for sa, sb in zip(ca["optimizer_states"][0]["state"].values(), cb["optimizer_states"][0]["state"].values()):
        diffs += [float((sa[k].double() - sb[k].double()).abs().max()) for k in sa]
    assert ca["epoch"] == cb["epoch"] and ca["global_step"] == cb["global_step"]
    return max(diffs)


@pytest.mark.parametrize("source, epochs, kill_at", [(RUN, 30, 8), (STATEFUL, 8, 3)], ids=["default", "stateful"])
def test_a_run_killed_mid_run_resumes_to_exactly_the_uninterrupted_run(tmp_path, source, epochs, kill_at):
    # kill -9 once last.ckpt holds epoch kill_at (the default fast step; or a per-datapoint guide, a score-function
    # baseline and a beta schedule), resume from it, compare with a run that was never interrupted
    whole = run_script(tmp_path, source, tmp_path / "whole", epochs)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    process = run_script(tmp_path, source, tmp_path / "killed", epochs, wait=False)
    while process.poll() is None and not (last.is_file() and epoch_of(last) >= kill_at):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    killed_at = epoch_of(last)
    assert kill_at <= killed_at < epochs - 1  # killed mid-run, late enough for a one-step difference to grow
    resumed = run_script(tmp_path, source, tmp_path / "killed", epochs, last)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert state_difference(tmp_path / "whole" / "checkpoints" / "last.ckpt", last) == 0.0


def test_last_ckpt_is_the_last_epoch_even_when_the_monitored_number_did_not_improve(tmp_path):
    class Worse(pl.Callback):  # a monitored number that only gets worse: only epoch 0 is "best"
        def on_validation_epoch_end(self, trainer, module):
            module.log("worse", -float(trainer.current_epoch))

    checkpoint = RunCheckpoint(dirpath=tmp_path, monitor="worse", mode="max")
    pyro_lvm.fit(pyro_lvm.VAE(latent_dim=2, hidden_dims=[16]), data=DigitsDataModule(), max_epochs=4,
                 callbacks=[Worse(), checkpoint], **{**QUIET, "enable_checkpointing": True})
    assert epoch_of(tmp_path / "last.ckpt") == 3
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch000.ckpt", "last.ckpt"]


def test_a_diverging_learning_rate_stops_at_once_and_keeps_finite_parameters(tmp_path):
    # the default VAE on digits without a validation split: the loss is NaN at the second step
    x = DigitsDataModule(batch_size=10_000).train_dataloader().dataset.x
    vae = pyro_lvm.VAE()
    checkpoint = RunCheckpoint(dirpath=tmp_path)
    with pytest.raises(DivergedError, match=r"diverged at step 1 \(epoch 0\).*learning rate 1000000.0.*lr=100000.0"):
        pyro_lvm.fit(vae, data=TensorDataModule(x.round()), lr=1e6, max_epochs=20, callbacks=[checkpoint],
                     **{**QUIET, "enable_checkpointing": True})
    assert all(torch.isfinite(p).all() for p in vae.parameters())
    for path in tmp_path.glob("*.ckpt"):  # nothing non-finite was saved
        assert all(torch.isfinite(v).all() for v in torch.load(path, weights_only=True)["state_dict"].values())


def test_nonfinite_skip_skips_the_bad_steps_and_counts_them():
    x = torch.bernoulli(torch.full((256, 64), 0.3))
    vae = pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[16])
    original = vae.model

    def model(batch, num_data=None):  # a rare batch whose loss is NaN
        if float(batch[0, 0]) == 0.5:
            batch = batch.clone()
            batch[0, 0] = float("nan")
        return original(batch)

    module = pyro_lvm.LVMModule(model, vae.guide, nonfinite="skip", latent_monitor=False)
    batches = [x[i:i + 32].clone() for i in range(0, 256, 32)]
    batches[3][0, 0] = 0.5
    trainer = pl.Trainer(max_epochs=1, **QUIET)
    # the model's own check would refuse the NaN first; Pyro warns of the NaN loss, as always
    with pyro.validation_enabled(False), pytest.warns(UserWarning, match="Encountered NaN"):
        trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None),
                    torch.utils.data.DataLoader(batches[:1], batch_size=None))
    assert module.skipped_steps == 1 and trainer.global_step == 8
    assert all(torch.isfinite(p).all() for p in module.parameters())


# ----- hostile checkpoints: no loader runs pickled code -------------------------------------------------------
class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling writes a file: the proof that code ran
        return (Path.write_text, (Path(self.path), "pwned"))


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr("sys.argv", ["pyro-lvm"])


TINY = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture
def clean(tmp_path):
    """A real run: its folder and its last checkpoint."""
    main(["fit", *TINY, f"--trainer.logger.init_args.save_dir={tmp_path / 'run'}"])
    run = tmp_path / "run" / "vae_digits" / "version_0"
    return run, run / "checkpoints" / "last.ckpt"


@pytest.fixture
def hostile(clean, tmp_path):
    """The run's checkpoint with a pickled payload added to it."""
    run, ckpt = clean
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["payload"] = Payload(tmp_path / "pwned")
    torch.save(checkpoint, ckpt)
    return run, ckpt, tmp_path / "pwned"


@pytest.mark.parametrize("force_pickles", [False, True], ids=["torch default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
def test_every_loader_refuses_a_pickled_payload(hostile, force_pickles, monkeypatch):
    run, ckpt, pwned = hostile
    if force_pickles:  # the old default of torch < 2.6: load pickles unless told otherwise
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    attempts = {
        "load_from_checkpoint": lambda: pyro_lvm.LVMModule.load_from_checkpoint(ckpt),
        "fit(ckpt_path=...)": lambda: pyro_lvm.fit(pyro_lvm.VAE(latent_dim=2, hidden_dims=[256, 128]),
                                                   data=DigitsDataModule(), ckpt_path=str(ckpt), max_epochs=2, **QUIET),
        "pyro-lvm evaluate": lambda: main(["evaluate", f"--ckpt={ckpt}", "--num-particles=2", "--limit=4"]),
        "pyro-lvm diagnose": lambda: main(["diagnose", f"--ckpt={ckpt}", "--num-inputs=2"]),
    }
    for command in ("test", "validate", "predict", "fit"):
        attempts[f"pyro-lvm {command} --ckpt_path"] = lambda c=command: main(
            [c, f"--config={run / 'config.yaml'}", f"--ckpt_path={ckpt}", "--trainer.logger=false"]
            + (["--overwrite=true"] if c == "fit" else []))
    for name, attempt in attempts.items():
        with pytest.raises((ValueError, RuntimeError, SystemExit, Exception)):
            attempt()
        assert not pwned.exists(), f"{name} ran the checkpoint's pickled code"


def test_weights_only_false_is_refused(clean):
    run, ckpt = clean
    with pytest.raises(ValueError, match="weights_only=False is refused"):
        pyro_lvm.LVMModule.load_from_checkpoint(ckpt, weights_only=False)
    with pytest.raises(SystemExit, match="--weights_only false is refused"):
        main(["test", f"--config={run / 'config.yaml'}", f"--ckpt_path={ckpt}", "--weights_only=false"])


# ----- data, checked whole and reported by the user's row ---------------------------------------------------------
def test_one_grey_row_among_binary_rows_is_refused_before_training():
    x = torch.bernoulli(torch.full((1150, 64), 0.3))
    x[1000, 5] = 0.5
    vae = pyro_lvm.VAE(data_shape=64, latent_dim=2, hidden_dims=[8])
    before = [p.clone() for p in vae.parameters()]
    with pytest.raises(ValueError, match="row 1000: Bernoulli likelihood needs binary data"):
        pyro_lvm.fit(vae, data=x, max_epochs=1, **QUIET)
    with pytest.raises(ValueError, match=r"train split \(rows of the source data\), row \d+: Bernoulli"):
        pyro_lvm.fit(vae, data=TensorDataModule(x), max_epochs=1, **QUIET)
    assert all(torch.equal(a, b) for a, b in zip(before, vae.parameters()))


def test_smaller_mistakes_get_messages_that_name_them():
    vae = pyro_lvm.VAE(data_shape=4, latent_dim=2, hidden_dims=[8])
    x = torch.bernoulli(torch.full((50, 4), 0.5))
    with pytest.raises(ValueError, match="beta .* must be >= 0.*got -1"):
        pyro_lvm.fit(vae, data=x, beta=-1.0, max_epochs=1, **QUIET)
    module = pyro_lvm.fit(vae, data=x.numpy(), max_epochs=1, **QUIET)  # a NumPy array is data too
    assert module.trainer.global_step > 0
    module = pyro_lvm.fit(vae, data=x[:1], max_epochs=1, **QUIET)  # one point: trained on, none held out
    assert module.trainer.global_step == 1
    bad = x.clone()
    bad[37, 2] = float("nan")
    with pytest.raises(ValueError, match=r"the first at index \(37, 2\)"):  # the user's row, not the split's
        pyro_lvm.fit(vae, data=bad, max_epochs=1, **QUIET)
    with pytest.raises(TypeError, match="tensor .* or a LightningDataModule; got list"):
        pyro_lvm.fit(vae, data=[[0.0] * 4], max_epochs=1, **QUIET)


def test_an_unknown_top_level_key_gets_the_top_level_keys(tmp_path, capsys, monkeypatch):
    config = tmp_path / "bad.yaml"
    config.write_text("modle:\n  lr: 0.1\n")
    with pytest.raises(SystemExit):
        main(["fit", f"--config={config}"])
    err = capsys.readouterr().err
    assert "Did you mean 'model'? Valid keys at the top level: " in err and "trainer" in err


# ----- run folders --------------------------------------------------------------------------------------------------
def test_a_run_folder_is_never_overwritten_and_a_data_error_leaves_no_empty_one(tmp_path, monkeypatch):
    common = [*TINY, f"--trainer.logger.init_args.save_dir={tmp_path}"]
    main(["fit", *common, "--trainer.logger.init_args.version=3"])
    run = tmp_path / "vae_digits" / "version_3"
    config = (run / "config.yaml").read_text()
    with pytest.raises(FileExistsError, match="version_3 already holds a run.*--ckpt_path.*--overwrite"):
        main(["fit", *common, "--trainer.logger.init_args.version=3", "--model.lr=0.5"])
    assert (run / "config.yaml").read_text() == config  # untouched
    main(["fit", *common, "--trainer.logger.init_args.version=3", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
          "--trainer.max_epochs=2"])  # resuming into its own folder is fine
    with pytest.raises(ValueError):  # a Bernoulli likelihood on the default's grey levels: refused before any step
        main(["fit", *common, "--model.model.init_args.likelihood=bernoulli"])
    assert sorted(p.name for p in (tmp_path / "vae_digits").iterdir()) == ["version_3"]  # no empty version_4


def test_concurrent_runs_claim_different_versions(tmp_path):
    # six processes claim at once (runs.py alone, without importing the package: they start together)
    script = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("runs", {str(REPO / "pyro_lvm" / "training" / "runs.py")!r})
runs = importlib.util.module_from_spec(spec); spec.loader.exec_module(runs)
print(runs.claim_version({str(tmp_path)!r})[0])
"""
    processes = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(6)]
    versions = sorted(int(p.communicate()[0]) for p in processes)
    assert versions == list(range(6))


def test_resuming_with_another_architecture_names_the_keys(tmp_path, monkeypatch):
    common = [*TINY, f"--trainer.logger.init_args.save_dir={tmp_path}"]
    main(["fit", *common, "--model.model.init_args.activation=relu"])
    last = tmp_path / "vae_digits" / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="another model configuration.*activation: 'relu' in the checkpoint, 'tanh' here"):
        main(["fit", *common, "--model.model.init_args.activation=tanh", f"--ckpt_path={last}",
              "--trainer.max_epochs=2"])


# ----- a full disk, Ctrl-C ------------------------------------------------------------------------------------------
FULL_DISK = RUN.replace("import sys,", '''import errno, torch
real_save, calls = torch.save, []
def save(obj, f, *args, **kwargs):  # the disk fills up during the 3rd checkpoint write, half way through
    calls.append(1)
    if len(calls) == 3:
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(obj, f, *args, **kwargs)
torch.save = save
import sys,''')


def test_a_full_disk_leaves_no_truncated_checkpoint_and_keeps_the_last_good_one(tmp_path):
    result = run_script(tmp_path, FULL_DISK, tmp_path / "run", 5)
    assert result.returncode != 0 and "No space left on device" in result.stdout + result.stderr
    files = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [p.name for p in files] == ["epoch000.ckpt", "last.ckpt"]  # no temporary file left either
    assert all(epoch_of(p) == 0 for p in files)  # whole files: the previous epoch's


def test_ctrl_c_saves_the_interrupted_state_and_prints_the_resume_command(tmp_path):
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    process = run_script(tmp_path, RUN, tmp_path / "run", 200, wait=False)
    while process.poll() is None and not last.is_file():
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "resume it, exactly as an uninterrupted run, with:" in out, out
    assert f"ckpt_path='{last}'" in out
    interrupted = tmp_path / "run" / "checkpoints" / "interrupted.ckpt"
    assert interrupted.is_file() and torch.load(interrupted, weights_only=True)["global_step"] > 0
