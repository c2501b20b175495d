"""pyro-lvm evaluate and pyro-lvm diagnose on checkpoints of built-in models and of a user's own pair."""

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch

from pyro_lvm.cli.runs import load_run
from pyro_lvm.training import model_from_checkpoint
from pyro_lvm.cli import main

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
TINY = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.log_every_n_steps=1"]

# A user's own pair: PyroModules named by class path in the configuration, no stored model class.
USER_PAIR = '''
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule


class Model(PyroModule):
    def __init__(self, data_dim: int = 64, latent_dim: int = 3):
        super().__init__()
        self.latent_dim = latent_dim
        self.decoder = torch.nn.Linear(latent_dim, data_dim)

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


class Guide(PyroModule):
    def __init__(self, data_dim: int = 64, latent_dim: int = 3):
        super().__init__()
        self.encoder = torch.nn.Linear(data_dim, 2 * latent_dim)

    def forward(self, x):
        loc, raw = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, torch.nn.functional.softplus(raw) + 1e-3).to_event(1))
'''

USER_CONFIG = """
seed_everything: 0
trainer:
  logger:
    class_path: pytorch_lightning.loggers.CSVLogger
    init_args: {save_dir: runs, name: user_pair}
model:
  model: {class_path: user_pair_module.Model, init_args: {data_dim: 64, latent_dim: 3}}
  guide: {class_path: user_pair_module.Guide, init_args: {data_dim: 64, latent_dim: 3}}
  latent_monitor: false
data:
  class_path: pyro_lvm.data.DigitsDataModule
  init_args: {batch_size: 64, binarize: static}
"""

# the pictures of the posterior_checks functions that diagnose runs when they exist
SECTIONS = {
    "## Amortization gap": ("amortization_gap.png", "amortization_gap"),
    "## Simulation-based calibration": ("sbc_ranks.png", "sbc"),
    "## NUTS against the guide": ("nuts_vs_guide.png", "compare_with_nuts"),
}
FAST = ["--gap-inputs=2", "--gap-steps=5", "--num-simulations=20", "--nuts-inputs=1", "--nuts-samples=4",
        "--nuts-warmup=4"]

RUNS = {
    "vae": ("vae_digits.yaml", "vae_digits"),
    "conv_vae": ("conv_vae_digits.yaml", "conv_vae_digits"),
    "flow": ("realnvp_digits.yaml", "realnvp_digits"),
    "discrete_vae": ("discrete_vae_digits.yaml", "discrete_vae_digits"),
    "hvae": ("hvae_digits.yaml", "hvae_digits"),
    "cvae": ("cvae_digits_quadrants.yaml", "cvae_digits_quadrants"),
    "flow_posterior": ("vae_digits_flow_posterior.yaml", "vae_digits_flow_posterior"),
    "user_pair": (None, "user_pair"),
    "baseline": ("baseline_digits_quadrants.yaml", "baseline_digits_quadrants"),
}
# runs of models with latents: every posterior check applies, but NUTS and the gap to a discrete latent
LATENT = ["vae", "conv_vae", "discrete_vae", "hvae", "cvae", "flow_posterior", "user_pair"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny run (one epoch of two batches) per model; name -> its last checkpoint."""
    root = tmp_path_factory.mktemp("runs")
    (root / "user_pair_module.py").write_text(textwrap.dedent(USER_PAIR))
    (root / "user_pair.yaml").write_text(USER_CONFIG)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.syspath_prepend(str(root))
        mp.setattr("sys.argv", ["pyro-lvm"])
        for name, (config, folder) in RUNS.items():
            path = root / "user_pair.yaml" if config is None else REPO / "configs" / config
            extra = ["--test_after_fit=false"] if name in ("flow", "baseline") else []
            main(["fit", f"--config={path}", *TINY, *QUIET, *extra])
            out[name] = root / "runs" / folder / "version_0" / "checkpoints" / "last.ckpt"
        yield out


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr("sys.argv", ["pyro-lvm"])


@pytest.fixture
def user_module_importable(runs, monkeypatch):
    monkeypatch.syspath_prepend(str(runs["user_pair"].parents[4]))


@pytest.mark.parametrize("name", LATENT)
def test_evaluate_prints_and_saves_the_importance_sampled_log_likelihood(name, runs, user_module_importable, capsys):
    ckpt = runs[name]
    main(["evaluate", f"--ckpt={ckpt}", "--num-particles=20", "--chunk-size=10", "--limit=30"])
    out = capsys.readouterr().out
    saved = json.loads((ckpt.parents[1] / "evaluate_test.json").read_text())
    assert saved["num_points"] == 30 and saved["num_particles"] == 20 and not saved["flow"]
    # the IWAE estimate with K particles is at least the mean of the same K log weights, the ELBO
    assert saved["log_likelihood"] >= saved["elbo"]
    assert saved["elbo"] == pytest.approx(saved["reconstruction"] - saved["kl"], abs=1e-6)
    assert saved["bits_per_dim"] == pytest.approx(-saved["log_likelihood"] / (64 * math.log(2)), rel=1e-6)
    assert 0 < saved["log_likelihood_stderr"] < 10
    assert f"{saved['log_likelihood']:.3f} ± {saved['log_likelihood_stderr']:.3f}" in out
    assert "active units" in out and "Wrote" in out


def test_evaluate_of_a_flow_is_its_exact_log_likelihood(runs, tmp_path, capsys):
    output = tmp_path / "flow.json"
    main(["evaluate", f"--ckpt={runs['flow']}", "--split=val", "--limit=16", f"--output={output}"])
    saved = json.loads(output.read_text())
    flow = model_from_checkpoint(runs["flow"])
    _, datamodule = load_run(runs["flow"])
    datamodule.setup("validate")
    x = torch.cat([b["x"] for b in datamodule.val_dataloader()])[:16]
    # the same dequantization noise: evaluate seeds with --seed (default 0), then draws log p, then bits/dim
    torch.manual_seed(0)
    with torch.no_grad():
        assert saved["log_likelihood"] == pytest.approx(float(flow.log_likelihood(x).double().mean()), rel=1e-5)
        assert saved["bits_per_dim"] == pytest.approx(float(flow.bits_per_dim(x).mean()), rel=1e-5)
    assert saved["flow"] and saved["split"] == "val"
    out = capsys.readouterr().out
    assert "exact log-likelihood" in out and "bits/dim" in out and "IWAE" not in out


def test_rebuilt_model_has_the_trained_weights(runs):
    checkpoint = torch.load(runs["vae"], weights_only=True)
    model = model_from_checkpoint(runs["vae"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][f"lvm.{key}"]), key
    assert not model.training


@pytest.mark.parametrize("name", LATENT)
def test_diagnose_writes_the_khat_histogram_and_the_collapse_picture(name, runs, user_module_importable, tmp_path):
    out = tmp_path / "diagnose"
    main(["diagnose", f"--ckpt={runs[name]}", "--num-inputs=12", "--num-particles=50", f"--output-dir={out}", *FAST])
    report = (out / "report.md").read_text()
    khat = json.loads((out / "khat.json").read_text())
    assert len(khat) == 12
    assert (out / "khat_histogram.png").is_file() and (out / "worst_inputs.png").is_file()
    assert "Pareto k-hat" in report and "KL per latent dimension" in report
    assert f"| > 0.7 (unreliable) | {sum(k > 0.7 for k in khat)} " in report
    worst = max(range(12), key=lambda i: khat[i])
    assert f"{worst}: {khat[worst]:.2f}" in report  # the worst input is named first
    assert list(out.glob("kl_per_dim_*.png"))
    for section, (picture, _) in SECTIONS.items():
        assert section in report  # run, or a line saying why not
        refused = name == "discrete_vae" and section != "## Simulation-based calibration"
        assert (out / picture).is_file() is not refused, picture
    assert "Not run for this model" not in report if name != "discrete_vae" else report.count("Not run for this model") == 2
    if name == "discrete_vae":  # NUTS and the Gaussian refinement need continuous latents, and say so
        assert "NUTS (Hamiltonian Monte Carlo) moves along the gradient" in report
        assert "Use psis_khat and pyro_lvm.diagnostics.log_likelihood" in report
    if name in ("hvae", "flow_posterior"):  # the refined Gaussian is not the guide's family, and the report says so
        assert "the guide's family differs" in report
    if name == "hvae":  # NUTS on both sites jointly: one row per site and dimension (16 + 4), SBC on both
        assert " z2 " in report and "z1" in report
        assert len((out / "nuts_vs_guide.csv").read_text().splitlines()) == 1 + 16 + 4
        assert "of 20 latent dimensions" in report and "The 16 least uniform dimensions are drawn" in report


def test_diagnose_skips_a_check_given_zero(runs, tmp_path):
    out = tmp_path / "skip"
    main(["diagnose", f"--ckpt={runs['vae']}", "--num-inputs=4", "--num-particles=20", f"--output-dir={out}",
          "--gap-inputs=0", "--num-simulations=0", "--nuts-inputs=0"])
    report = (out / "report.md").read_text()
    assert "Skipped (--gap-inputs 0)" in report and "Skipped (--nuts-inputs 0)" in report
    assert not (out / "nuts_vs_guide.png").exists() and (out / "khat_histogram.png").is_file()


def test_diagnose_of_a_flow_says_there_is_no_latent(runs, tmp_path):
    out = tmp_path / "flow_diagnose"
    main(["diagnose", f"--ckpt={runs['flow']}", f"--output-dir={out}"])
    report = (out / "report.md").read_text()
    assert "no latent variable" in report and not (out / "khat_histogram.png").exists()


def test_corrupt_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "checkpoints" / "bad.ckpt"
    bad.parent.mkdir()
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot be read.*corrupt or truncated"):
        main(["evaluate", f"--ckpt={bad}"])
    with pytest.raises(ValueError, match="cannot be read"):
        main(["diagnose", f"--ckpt={bad}"])


def test_a_class_outside_pyro_lvm_is_refused(runs, tmp_path):
    checkpoint = torch.load(runs["vae"], weights_only=True)
    checkpoint["pyro_lvm"]["model"]["class"] = "os.system"
    forged = tmp_path / "checkpoints" / "forged.ckpt"
    forged.parent.mkdir()
    torch.save(checkpoint, forged)
    config = runs["vae"].parents[1] / "config.yaml"
    with pytest.raises(ValueError, match="'os.system', which is outside the pyro_lvm package"):
        main(["evaluate", f"--ckpt={forged}", f"--config={config}"])
    checkpoint["pyro_lvm"]["model"]["class"] = "pyro_lvm.cli.fit.LVMCLI"
    torch.save(checkpoint, forged)
    with pytest.raises(ValueError, match="is not a pyro_lvm model"):
        model_from_checkpoint(forged)


def test_a_user_pair_without_its_config_is_refused_with_the_fix(runs, user_module_importable, tmp_path, capsys):
    lone = tmp_path / "lone.ckpt"
    lone.write_bytes(runs["user_pair"].read_bytes())
    with pytest.raises(SystemExit):
        main(["evaluate", f"--ckpt={lone}"])
    assert "Pass the run's configuration with --config RUN/config.yaml" in capsys.readouterr().err
    with pytest.raises(ValueError, match="user's own model/guide pair"):
        model_from_checkpoint(lone)


def test_evaluate_with_the_compiled_kernel_gives_the_same_numbers(runs, tmp_path, monkeypatch):
    import pyro_lvm.diagnostics.likelihood as likelihood

    asked, original = [], likelihood.compiled_log_prob

    def spy(enabled, *args, **kwargs):  # which kernel each run asked for: an ignored --compile fails below
        asked.append(bool(enabled))
        return original(enabled, *args, **kwargs)

    monkeypatch.setattr(likelihood, "compiled_log_prob", spy)
    out = {}
    for mode in ("false", "true"):
        output = tmp_path / f"{mode}.json"
        main(["evaluate", f"--ckpt={runs['vae']}", "--num-particles=20", "--limit=16", f"--compile={mode}",
              f"--output={output}"])
        out[mode] = json.loads(output.read_text())
    # the same seed, the same draws: only float32 rounding of the likelihood's sum differs
    assert out["true"]["log_likelihood"] == pytest.approx(out["false"]["log_likelihood"], abs=1e-3)
    assert out["true"]["elbo"] == pytest.approx(out["false"]["elbo"], abs=1e-3)
    assert asked and set(asked[: len(asked) // 2]) == {False} and set(asked[len(asked) // 2:]) == {True}


def test_a_pair_without_latents_is_evaluated_exactly_and_not_diagnosed(runs, tmp_path, capsys):
    # the CVAE's deterministic baseline: p(y | x) with no latent variable
    output = tmp_path / "baseline.json"
    main(["evaluate", f"--ckpt={runs['baseline']}", "--num-particles=7", "--limit=12", f"--output={output}"])
    saved = json.loads(output.read_text())
    assert saved["exact"] and not saved["flow"] and saved["kl"] == 0.0
    assert saved["log_likelihood"] == pytest.approx(saved["elbo"], abs=1e-6)  # every particle's weight is p(x)
    assert "exact log-likelihood" in capsys.readouterr().out
    out = tmp_path / "baseline_diagnose"
    main(["diagnose", f"--ckpt={runs['baseline']}", f"--output-dir={out}"])
    report = (out / "report.md").read_text()
    assert "draws no latent variable" in report and not (out / "khat_histogram.png").exists()


def test_a_random_subset_is_a_seeded_sample_of_the_whole_split(runs, tmp_path):
    from pyro_lvm.cli.runs import load_run, split_data, subset_indices

    _, datamodule = load_run(str(runs["vae"]), None, need_data=True)[:2]
    everything = split_data(datamodule, "test", None)["x"]
    picked = split_data(datamodule, "test", 16, subset="random", seed=3)["x"]
    index = subset_indices(len(everything), 16, seed=3)
    assert torch.equal(picked, everything[index]) and not torch.equal(index, torch.arange(16))
    assert torch.equal(split_data(datamodule, "test", 16)["x"], everything[:16])  # the default: the first 16
    assert len(set(subset_indices(len(everything), 16, seed=4).tolist()) ^ set(index.tolist())) > 0
    output = tmp_path / "random.json"
    main(["evaluate", f"--ckpt={runs['vae']}", "--num-particles=5", "--limit=16", "--subset=random", "--seed=3",
          f"--output={output}"])
    numbers = json.loads(output.read_text())
    assert numbers["num_points"] == 16 and numbers["subset"] == "random 16 (seed 3)"


def test_evaluate_runs_on_the_device_it_is_given_and_refuses_one_that_is_not_there(runs, tmp_path, capsys):
    out = {}
    devices = ["cpu", "auto"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        output = tmp_path / f"{device}.json"
        main(["evaluate", f"--ckpt={runs['vae']}", "--num-particles=20", "--limit=16", "--compile=false",
              f"--device={device}", f"--output={output}"])
        out[device] = json.loads(output.read_text())
    assert out["cpu"]["device"] == "cpu"
    assert out["auto"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():  # other draws on the GPU: the same estimate within its Monte-Carlo noise
        assert out["cuda"]["log_likelihood"] == pytest.approx(out["cpu"]["log_likelihood"], abs=1.0)
    missing = ["cuda:7"] if torch.cuda.is_available() and torch.cuda.device_count() < 8 else ["cuda"]
    for device in ([] if torch.cuda.is_available() and missing == ["cuda"] else missing) + ["tpu-ish"]:
        with pytest.raises(SystemExit):
            main(["evaluate", f"--ckpt={runs['vae']}", "--num-particles=2", "--limit=2", f"--device={device}"])
        assert "--device" in capsys.readouterr().err
