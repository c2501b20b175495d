"""Smoke test of ``benchmarks/svi_step.py``, and checks of what its reference step and memory probe compute."""

import copy
import gc
import importlib.util
import math
import sys
from pathlib import Path

import pyro
import pyro.infer.util
import pytest
import torch

from pyro_lvm import VAE, LVMModule

torch.set_num_threads(1)

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "svi_step.py"
VARIANTS = {
    "a": ["torch", "pyro SVI Trace_ELBO", "pyro SVI JitTrace_ELBO", "pyro_lvm", "pyro_lvm reparam",
          "pyro_lvm user pair"],
    "b": ["torch", "pyro SVI Trace_ELBO", "pyro SVI JitTrace_ELBO", "pyro_lvm"],
    "c": ["torch", "pyro SVI Trace_ELBO", "pyro SVI JitTrace_ELBO", "pyro_lvm", "pyro_lvm user pair"],
    "d": ["torch", "pyro SVI TraceGraph_ELBO", "pyro_lvm"],
    "e": ["torch", "pyro SVI RenyiELBO", "pyro_lvm iwae, Pyro's path", "pyro_lvm"],
}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_svi_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def tables(out: str) -> dict[str, dict[str, list[str]]]:
    """Rows of each configuration's table: {config key: {variant: cells}}."""
    found: dict[str, dict[str, list[str]]] = {}
    names = sorted({n for v in VARIANTS.values() for n in v}, key=len, reverse=True)
    key = None
    for line in out.splitlines():
        if line.startswith("(") and ") batch " in line:
            key = line[1]
            found[key] = {}
        elif key is not None and line.startswith("  "):
            name = next((n for n in names if line.strip().startswith(n + " ")), None)
            if name is not None:
                found[key][name] = line.strip()[len(name):].split()
    return found


def test_quick_run_prints_positive_finite_ratios_for_every_variant(bench, capsys, tmp_path):
    rst = tmp_path / "svi_step.inc"
    torch.set_num_threads(2)  # main runs with --threads 1 and must give the 2 back
    validation = pyro.infer.util.is_validation_enabled()
    pyro.enable_validation(False)  # main runs with Pyro's default (on) and must restore this
    try:
        status = bench.main(["--quick", "--threads", "1", "--rounds", "2", "--steps", "2", "--rst", str(rst)])
        assert torch.get_num_threads() == 2 and not pyro.infer.util.is_validation_enabled()
        assert gc.get_freeze_count() == 0  # the objects it froze for quick collections are thawed
    finally:
        torch.set_num_threads(1)
        pyro.enable_validation(validation)
    assert status == 0  # without --strict, targets not met do not fail the run
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}, pyro-ppl {pyro.__version__}" in out
    assert "device: cpu" in out and "torch.set_num_threads(1)" in out
    assert "Pyro's validation on (its default) for every variant" in out
    rows = tables(out)
    assert {k: sorted(v) for k, v in rows.items()} == {k: sorted(v) for k, v in VARIANTS.items()}
    for key, table in rows.items():
        for name, cells in table.items():
            # ms/step, (min-max), examples/s, speed ratio, peak MiB, memory ratio
            ms, _, per_second, ratio, peak, memory_ratio = cells
            for value in (ms, per_second, ratio, peak, memory_ratio):  # a step holds its activations: peak > 0
                assert math.isfinite(float(value)) and float(value) > 0, (key, name, cells)
        # the reference's paired ratios to itself
        assert float(table["torch"][3]) == 1.0 and float(table["torch"][5]) == 1.0
    for key, target in (("a", "0.95"), ("b", "0.98"), ("c", "0.80"), ("d", "0.70")):
        assert f"({key}) speed target pyro_lvm >= {target}x torch: " in out
    text = rst.read_text()
    assert "python benchmarks/svi_step.py --quick" in text
    assert text.count(".. list-table::") == len(VARIANTS) and "   * - pyro SVI TraceGraph_ELBO" in text


def test_missing_mnist_falls_back_to_random_data_and_says_so(bench, capsys, tmp_path):
    status = bench.main(["--quick", "--configs", "c", "--rounds", "1", "--steps", "1", "--warmup", "0",
                         "--mnist-root", str(tmp_path / "nowhere")])
    assert status == 0
    out = capsys.readouterr().out
    assert f"note: MNIST not found in {tmp_path / 'nowhere'}" in out and "random binary data" in out
    assert set(tables(out)["c"]) == set(VARIANTS["c"])


@pytest.mark.parametrize("estimator", ["analytic_kl", "score_function"])
def test_hand_written_step_computes_pyro_lvms_loss_and_gradients(bench, estimator):
    # The reference is the same computation as pyro_lvm's estimator: for the same noise,
    # the same -ELBO and the same gradients (for the score function: the same surrogate
    # with the same decaying-average baseline, step after step).
    pyro.set_rng_seed(0)
    vae = VAE(data_shape=16, latent_dim=3, hidden_dims=[8])
    config = bench.Config("t", 16, 8, 3, 10, estimator == "score_function", 0.0, 1, "mnist4x4")
    net = bench.HandWrittenVAE(16, 8, 3)
    net.encoder.load_state_dict(vae.encoder.state_dict())
    net.decoder.load_state_dict(vae.decoder.state_dict())
    loss_fn = bench.HandWrittenReinforce(net) if config.score_function else net
    module = LVMModule(copy.deepcopy(vae), estimator=estimator, latent_monitor=False)
    x = torch.bernoulli(torch.full((10, 16), 0.4))
    module.initialize(x)
    ours = list(module.lvm.encoder.parameters()) + list(module.lvm.decoder.parameters())
    theirs = list(net.encoder.parameters()) + list(net.decoder.parameters())
    for seed in range(3):  # the baseline is 0 at the first step, a running average after
        torch.manual_seed(seed)
        expected = module(x)
        expected_grads = torch.autograd.grad(expected, ours)
        torch.manual_seed(seed)
        actual = loss_fn(x)
        grads = torch.autograd.grad(actual, theirs)
        assert torch.allclose(actual, expected, rtol=1e-5, atol=0)
        for g, e in zip(grads, expected_grads):
            # float32 rounding of sums taken in another order: 1e-5 of the largest entry
            assert torch.allclose(g, e, rtol=1e-5, atol=1e-5 * e.abs().max()), float((g - e).abs().max() / e.abs().max())


def test_cpu_step_peak_counts_what_is_live_at_once_above_the_start(bench):
    held = torch.ones(2**20)  # live before the step: not part of its peak
    kept = []

    def step(x):
        a = torch.ones(2**18)  # 1 MiB
        b = torch.ones(2**19)  # 2 MiB, while a is alive: the peak, 3 MiB
        del a, b
        kept.append(torch.ones(2**19))  # 2 MiB that outlive the step, after both were freed

    peak = bench.step_peak_memory(step, [torch.zeros(1)], torch.device("cpu"))
    assert peak == 3 * 2**20
    assert len(kept) == 2 and held.sum() == 2**20  # two steps profiled; held lived throughout
