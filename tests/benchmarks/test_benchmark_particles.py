"""The particle benchmark (benchmarks/particles.py) runs and prints its table: a smoke test, not a timing."""

import importlib.util
from pathlib import Path

import math

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "particles.py"


def test_quick_run_times_both_paths_for_every_configuration(capsys):
    spec = importlib.util.spec_from_file_location("particles_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--particles", "2", "3", "--estimators", "iwae", "--steps", "1", "--rounds", "1",
                        "--batch-size", "8", "--threads", "1"])
    assert [(r["estimator"], r["particles"]) for r in rows] == [("iwae", 2), ("iwae", 3)]
    assert all(r["vectorized"] > 0 and r["sequential"] > 0 and math.isfinite(r["ratio"]) for r in rows)
    assert "one at a time s/step" in capsys.readouterr().out
