"""benchmarks/architecture.py's static probes hold on the package as it is (the layout issue's targets)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "architecture.py"


def _load():
    spec = importlib.util.spec_from_file_location("architecture", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_cycles_no_private_imports_short_files_and_functions(capsys):
    result = _load().main(["--no-timing"])
    assert result["import_cycles"] == []
    assert result["private_imports"] == []
    assert max(size for _, size in result["longest_files"]) <= 700
    assert len(result["functions_over_80_lines"]) <= 3
    assert "import cycles: 0" in capsys.readouterr().out


def test_the_probes_see_a_cycle_and_a_private_import(tmp_path):
    # the probes themselves, on a package of two files with a cycle through a function-level import
    architecture = _load()  # a fresh copy: its ROOT is set to the temporary tree below
    package = tmp_path / "pyro_lvm"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import _hidden\n")
    (package / "b.py").write_text("def _hidden():\n    from . import a\n")
    architecture.ROOT = tmp_path
    files = sorted(package.rglob("*.py"))
    names = {architecture.module_name(p) for p in files}
    graph, private = {}, []
    for path in files:
        graph[architecture.module_name(path)], found = architecture.imports(path, names)
        private += found
    assert architecture.cycles(graph) and ("pyro_lvm.b", "_hidden") in private


def test_import_pyro_lvm_loads_no_heavy_module():
    code = ("import sys, pyro_lvm; heavy = [m for m in ('pytorch_lightning', 'matplotlib', 'arviz', 'pandas', "
            "'jsonargparse') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
