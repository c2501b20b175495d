"""The pyro-lvm command line: default run, shipped configs, resume, and its errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_lvm.cli import main

REPO = Path(__file__).resolve().parents[2]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    # main(args) stands for the command line; pytest's own arguments are not part of it
    monkeypatch.setattr("sys.argv", ["pyro-lvm"])


def test_fit_with_defaults_writes_the_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--trainer.max_epochs=2", *QUIET])
    run = tmp_path / "runs" / "vae_digits" / "version_0"
    for name in ("metrics.csv", "config.yaml", "loss_curves.png", "reconstructions.png", "samples.png",
                 "latent_stats.csv", "latent_usage.png"):
        assert (run / name).is_file(), name
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/active_units", "val/beta", "val/kl_dim/z/0", "val/kl_dim/z/1"} <= set(header)
    stats = (run / "latent_stats.csv").read_text().splitlines()
    assert stats[0] == "epoch,step,beta,site,index,position,kl,activity" and len(stats) == 1 + 2 * 2
    assert (run / "checkpoints" / "last.ckpt").is_file()
    out = capsys.readouterr().out
    assert f"Run folder: {run.resolve()}" in out and "validation ELBO" in out
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["pyro_lvm"]["model"]["config"]["latent_dim"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.filterwarnings("ignore:.*Tensor Cores.*", "ignore:.*pin_memory.*")
def test_fit_and_evaluate_on_a_gpu_write_the_whole_run_folder(tmp_path, monkeypatch):
    # on a GPU the latent monitor's epochs live on the device: the run's pictures (latent usage
    # too) and the evaluation must bring them to the host (the first H200 run failed there)
    import json

    monkeypatch.chdir(tmp_path)
    main(["fit", "--trainer.max_epochs=2", "--trainer.accelerator=gpu", "--trainer.devices=1", *QUIET])
    run = tmp_path / "runs" / "vae_digits" / "version_0"
    for name in ("reconstructions.png", "samples.png", "latent_usage.png", "latent_stats.csv"):
        assert (run / name).is_file(), name
    output = tmp_path / "gpu.json"
    main(["evaluate", f"--ckpt={run / 'checkpoints' / 'last.ckpt'}", "--num-particles=50", "--device=cuda",
          f"--output={output}"])
    numbers = json.loads(output.read_text())
    assert numbers["device"] == "cuda" and numbers["log_likelihood"] >= numbers["elbo"] - 0.05


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_fit_resumes_from_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--trainer.max_epochs=1", *QUIET])
    last = tmp_path / "runs" / "vae_digits" / "version_0" / "checkpoints" / "last.ckpt"
    main(["fit", "--trainer.max_epochs=2", f"--ckpt_path={last}", *QUIET])
    resumed = tmp_path / "runs" / "vae_digits" / "version_1" / "checkpoints" / "last.ckpt"
    assert torch.load(resumed, weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_run(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", f"--config={config}", "--trainer.fast_dev_run=true", *QUIET]
    if "mnist" in config.name:
        if not SHARED_MNIST.is_dir():
            pytest.skip("MNIST IDX files not available")
        args.append(f"--data.init_args.root={SHARED_MNIST}")
    main(args)


def test_unknown_key_is_named_with_the_valid_ones(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  model:\n    class_path: pyro_lvm.VAE\n    init_args:\n      latent_dimm: 3\n")
    with pytest.raises(SystemExit):
        main(["fit", f"--config={bad}"])
    err = capsys.readouterr().err
    assert "Unknown key 'latent_dimm' for pyro_lvm.VAE. Did you mean 'latent_dim'?" in err
    assert "data_shape, latent_dim, hidden_dims" in err


def test_unknown_top_level_key_suggests_the_closest(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.estimatorr=reparam"])
    err = capsys.readouterr().err
    assert "Did you mean 'estimator'?" in err and "latent_monitor" in err


@pytest.mark.parametrize("old, new", [
    (["--model.num_particles=5"], "--model.estimator pyro_lvm.estimators.IWAEELBO --model.estimator.num_particles 5"),
    (["--model.kl_control=pyro_lvm.estimators.FreeBits"], "init_args: {kl_control: {class_path: pyro_lvm.estimators.FreeBits"),
    (["--model.estimator_options={baseline: nvil}"], "--model.estimator.baseline nvil"),
])
def test_options_moved_onto_the_estimator_are_refused_with_the_new_spelling(capsys, old, new):
    with pytest.raises(SystemExit):
        main(["fit", *old])
    err = capsys.readouterr().err
    assert "is the estimator's own option now" in err and new in err


def test_the_new_spelling_builds_the_estimator_it_names(tmp_path):
    from pyro_lvm.cli.fit import DEFAULT_CONFIG, LVMCLI

    # as flags and as YAML, the estimator's class and options reach the module (an estimator option dropped
    # on the way would leave the default, which is what each assert rules out)
    cli = LVMCLI(args=["--config", str(DEFAULT_CONFIG), "--model.estimator", "pyro_lvm.estimators.DReGELBO",
                       "--model.estimator.num_particles", "7", "--trainer.logger", "false"], run=False)
    assert type(cli.model.estimator).__name__ == "DReGELBO" and cli.model.estimator.num_particles == 7
    config = tmp_path / "free_bits.yaml"
    config.write_text("model:\n  estimator:\n    class_path: pyro_lvm.estimators.AnalyticKLELBO\n    init_args:\n"
                      "      kl_control: {class_path: pyro_lvm.estimators.FreeBits, init_args: {nats: 0.75}}\n"
                      "trainer: {logger: false}\n")
    cli = LVMCLI(args=["--config", str(DEFAULT_CONFIG), "--config", str(config)], run=False)
    assert type(cli.model.estimator).__name__ == "AnalyticKLELBO" and cli.model.kl_control.nats == 0.75


def test_corrupt_checkpoint_is_refused_before_training(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot be read"):
        main(["fit", f"--ckpt_path={bad}"])


def test_fit_with_ddp_on_two_cpu_processes(tmp_path):
    cli = Path(sys.executable).parent / "pyro-lvm"
    result = subprocess.run(
        [str(cli), "fit", "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
         "--trainer.max_epochs=1", *QUIET],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Run folder:" in result.stdout
    assert (tmp_path / "runs" / "vae_digits" / "version_0" / "samples.png").is_file()


@pytest.mark.parametrize(
    "config, estimator",
    [
        ("vae_digits.yaml", "reparam"),
        ("vae_digits.yaml", "analytic_kl"),
        ("vae_digits.yaml", "stl"),
        ("vae_digits.yaml", "score_function"),
        ("vae_digits.yaml", "iwae"),
        ("vae_digits.yaml", "dreg"),
        ("discrete_vae_digits.yaml", "vimco"),
        ("discrete_vae_digits.yaml", "enum"),
        ("discrete_vae_digits.yaml", "relaxed"),
        ("discrete_vae_digits.yaml", "score_function"),
    ],
)
def test_each_estimator_is_one_flag(config, estimator, tmp_path, monkeypatch):
    # the class by its flag, its options as the estimator's own keys; the run trains with exactly that estimator
    from pyro_lvm.cli.fit import LVMCLI
    from pyro_lvm.estimators import ESTIMATORS

    monkeypatch.chdir(tmp_path)
    cls = ESTIMATORS[estimator]
    cli = LVMCLI(args=["fit", f"--config={REPO / 'configs' / config}", f"--model.estimator=pyro_lvm.estimators.{cls.__name__}",
                       "--model.estimator.num_particles=3", "--trainer.max_epochs=1", "--trainer.limit_train_batches=8",
                       *QUIET])
    assert type(cli.model.estimator) is cls and cli.model.estimator.num_particles == 3
    assert cli.trainer.global_step == 8
    if estimator == "vimco":  # needs two particles at least: no default of its own
        return
    # the name alone: the estimator with its defaults
    cli = LVMCLI(args=["fit", f"--config={REPO / 'configs' / config}", f"--model.estimator={estimator}",
                       "--trainer.fast_dev_run=true", *QUIET])
    assert type(cli.model.estimator) is cls and cli.model.estimator.num_particles == 1


def test_estimator_options_are_the_estimators_own_keys(tmp_path, monkeypatch):
    from pyro_lvm.cli.fit import LVMCLI

    monkeypatch.chdir(tmp_path)
    cli = LVMCLI(args=["fit", "--model.estimator=pyro_lvm.estimators.ScoreFunctionELBO", "--model.estimator.baseline=nvil",
                       "--model.estimator.baseline_lr=0.01", "--trainer.fast_dev_run=true", *QUIET])
    assert cli.model.estimator.baseline == "nvil"
    assert [group.get("lr") for group in cli.model.parameter_groups()] == [None, 0.01]  # the baseline's own rate


def test_a_wrong_combination_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="'iwae' needs reparameterizable latents.*use 'vimco'"):
        main(["fit", f"--config={REPO / 'configs' / 'discrete_vae_digits.yaml'}", "--model.estimator=iwae",
              "--trainer.fast_dev_run=true", *QUIET])


def test_run_pictures_come_from_another_split_when_there_is_no_validation_split(tmp_path):
    from types import SimpleNamespace

    from pyro_lvm import VAE
    from pyro_lvm.cli.fit import RunReport

    class NoValidation:
        def val_dataloader(self):
            raise KeyError("val")  # as a data module built with val_size=0 does

        def test_dataloader(self):
            return []  # an empty split: no batch

        def train_dataloader(self):
            return [{"x": torch.bernoulli(torch.full((8, 64), 0.5))}]

    report = RunReport()
    vae = VAE(data_shape=64, latent_dim=2, hidden_dims=[8])
    written = report._pictures(SimpleNamespace(datamodule=NoValidation()), vae, tmp_path)
    assert {p.name for p in written} >= {"reconstructions.png", "samples.png"}
    assert report._first_batch(None) == (None, None)


def test_optimizer_key_keeps_the_own_rate_of_a_learned_baseline(tmp_path):
    # LightningCLI's optimizer: key builds its optimizer on model.parameters(), one group; LVMCLI
    # gives it LVMModule.parameter_groups(), so the NVIL baseline keeps its 3e-3 under SGD and a
    # scheduler that scales every group
    from pyro_lvm.cli.fit import DEFAULT_CONFIG, LVMCLI

    cli = LVMCLI(args=["--config", str(DEFAULT_CONFIG), "--model.estimator", "pyro_lvm.estimators.ScoreFunctionELBO",
                       "--model.estimator.baseline", "nvil",
                       "--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.05",
                       "--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size", "1",
                       "--lr_scheduler.gamma", "0.5", "--trainer.logger", "false",
                       "--trainer.default_root_dir", str(tmp_path)], run=False)
    (optimizer,), (scheduler,) = cli.model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    assert [group["lr"] for group in optimizer.param_groups] == [0.05, 3e-3]
    (baseline,) = [m for m in cli.model.modules() if getattr(m, "own_lr", None) is not None]
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(p) for p in baseline.parameters()}
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(cli.model.parameters()))
    optimizer.step()
    scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.025, 1.5e-3])
    assert "parameters" not in vars(cli.model)  # the module's own parameters() is back


def test_the_demos_choices_do_not_reach_a_users_own_config(tmp_path, monkeypatch, capsys):
    # `pyro-lvm fit` alone runs the demo (grey levels, a Gaussian likelihood); a config of the user's own that
    # leaves the likelihood, the binarization and the rate out gets the classes' defaults, not the demo's
    import yaml

    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "mine.yaml"
    mine.write_text("model:\n  model:\n    class_path: pyro_lvm.VAE\n    init_args: {data_shape: 64, latent_dim: 3}\n"
                    "data:\n  class_path: pyro_lvm.data.DigitsDataModule\n")

    def resolved(*args):
        with pytest.raises(SystemExit):
            main(["fit", *args, "--print_config"])
        return yaml.safe_load(capsys.readouterr().out)

    users = resolved(f"--config={mine}")
    assert users["model"]["model"]["init_args"]["likelihood"] == "bernoulli"
    assert users["data"]["init_args"]["binarize"] == "static" and users["model"]["lr"] == 1e-3
    demo = resolved()
    assert demo["model"]["model"]["init_args"]["likelihood"]["class_path"].endswith("GaussianLikelihood")
    assert demo["data"]["init_args"]["binarize"] == "none"
