"""Probes of the package's layout: import cycles, private names across files, long files and functions, start-up.

Prints, for ``pyro_lvm``:

* import cycles between the package's files (imports inside functions count too), target 0;
* private names (``_name``) that one file imports from another, target 0: a name another file uses is a public
  name of the module that owns it (which may itself be a private module);
* the longest files (target at most 700 lines) and the functions over 80 code lines (target at most 3);
* the heavy modules that ``import pyro_lvm`` loads (Lightning, matplotlib, ArviZ, pandas, jsonargparse: none is
  the target), and its time against ``import pyro`` and ``import torch``, each in a fresh process, the median of
  ``--rounds`` interleaved rounds (target at most 1.3x ``import pyro``).

    python benchmarks/architecture.py
    python benchmarks/architecture.py --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pyro_lvm"
HEAVY = ("pytorch_lightning", "lightning_fabric", "matplotlib", "arviz", "pandas", "jsonargparse")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(module: str, level: int, name: str | None, package: str) -> str:
    """The absolute module a (possibly relative) ``from ... import`` names."""
    if level == 0:
        return name or ""
    base = package.split(".")
    base = base[: len(base) - level + 1]
    return ".".join(base + ([name] if name else []))


def imports(path: Path, modules: set[str]) -> tuple[set[str], list[tuple[str, str]]]:
    """The package modules ``path`` imports (anywhere in the file), and the private names it takes from them."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found, private = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pyro_lvm"):
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            target = resolve(me, node.level, node.module, package)
            if not target.startswith("pyro_lvm"):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in modules:
                    found.add(submodule)
                else:
                    found.add(target)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append((target, alias.name))
    return {m for m in found if m in modules and m != me}, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def long_functions(path: Path, limit: int = 80) -> list[tuple[str, int]]:
    """Functions with more than ``limit`` lines of code (docstrings, comments and blank lines left out)."""
    source = path.read_text().splitlines()
    tree = ast.parse("\n".join(source))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            start = body[0].end_lineno if (isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant)
                                           and isinstance(body[0].value.value, str)) else body[0].lineno - 1
            lines = [line.strip() for line in source[start:node.end_lineno]]
            code = [line for line in lines if line and not line.startswith("#")]
            if len(code) > limit:
                out.append((f"{module_name(path)}.{node.name}", len(code)))
    return out


def import_seconds(statement: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True, cwd=ROOT)
    return time.perf_counter() - start


def heavy_modules() -> list[str]:
    code = f"import sys, pyro_lvm; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    return out.stdout.split()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the import timings")
    parser.add_argument("--no-timing", action="store_true", help="skip the import timings (the static probes only)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    options = parser.parse_args(argv)
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    graph, private = {}, []
    for path in files:
        graph[module_name(path)], names = imports(path, modules)
        private += [(module_name(path), target, name) for target, name in names]
    found_cycles = cycles(graph)
    sizes = sorted(((len(p.read_text().splitlines()), module_name(p)) for p in files), reverse=True)
    functions = sorted((f for p in files for f in long_functions(p)), key=lambda f: -f[1])
    result = {
        "files": len(files),
        "lines": sum(s for s, _ in sizes),
        "import_cycles": found_cycles,
        "private_imports": [f"{a} imports {c} from {b}" for a, b, c in private],
        "longest_files": [(m, s) for s, m in sizes[:5]],
        "functions_over_80_lines": functions,
    }
    print(f"{result['files']} files, {result['lines']} lines")
    print(f"import cycles: {len(found_cycles)}" + "".join(f"\n  {' <-> '.join(c)}" for c in found_cycles))
    print(f"private names imported across files: {len(private)}" + "".join(f"\n  {p}" for p in result["private_imports"]))
    print("longest files: " + ", ".join(f"{m} ({s})" for m, s in result["longest_files"]))
    print(f"functions over 80 code lines: {len(functions)}" + "".join(f"\n  {f} ({n})" for f, n in functions))
    if not options.no_timing:
        result["heavy_modules_loaded"] = heavy_modules()
        print("heavy modules `import pyro_lvm` loads: " + (", ".join(result["heavy_modules_loaded"]) or "none"))
        times = {"torch": [], "pyro": [], "pyro_lvm": []}
        for _ in range(options.rounds):
            for name in times:
                times[name].append(import_seconds(f"import {name}"))
        medians = {name: statistics.median(values) for name, values in times.items()}
        result["import_seconds"] = medians
        result["import_ratio_to_pyro"] = medians["pyro_lvm"] / medians["pyro"]
        print("import time (s, median of fresh processes): " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items())
              + f"; pyro_lvm / pyro = {result['import_ratio_to_pyro']:.2f}")
    if options.json:
        Path(options.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
