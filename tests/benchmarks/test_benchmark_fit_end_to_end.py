"""benchmarks/fit_end_to_end.py runs and reports each variant against the hand-written loop."""

import importlib.util
import re
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fit_end_to_end.py"


def test_quick_run_reports_every_variant_as_a_ratio_to_the_hand_written_loop(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("fit_end_to_end", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "fit_end_to_end", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^  (torch \(hand-written\)|pyro_lvm\.fit \(\w+\))\s+[\d.]+\s+([\d.]+)$", out, re.M)
    assert len(rows) == 6  # three variants, for the digits VAE and for a user's own pair
    assert {name for name, _ in rows} == {"torch (hand-written)", "pyro_lvm.fit (quiet)", "pyro_lvm.fit (defaults)"}
    assert all(float(ratio) == 1.0 for name, ratio in rows if name.startswith("torch"))
    assert all(float(ratio) > 0 for _, ratio in rows)
