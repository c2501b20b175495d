"""Every notebook in tutorials/ runs from top to bottom in fast mode without an error."""

import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient
from traitlets import default

TUTORIALS = sorted((Path(__file__).resolve().parents[2] / "tutorials").glob("*.ipynb"))


class VenvKernelManager(AsyncKernelManager):
    """Starts "python3" with this interpreter, whatever kernels are installed elsewhere.

    With no kernel folders to search, "python3" resolves to ipykernel's own spec, whose
    command is ``sys.executable -m ipykernel_launcher``.
    """

    @default("kernel_spec_manager")
    def _kernel_spec_manager_default(self) -> KernelSpecManager:
        return KernelSpecManager(kernel_dirs=[], parent=self)


def test_kernel_runs_this_interpreter():
    assert VenvKernelManager(kernel_name="python3").kernel_spec.argv[0] == sys.executable


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_in_fast_mode(path, tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_LVM_FAST", "1")
    # The tutorials' models are tiny: torch's thread pool only adds synchronization, which
    # costs 20-80x on a small machine that other processes keep busy.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), (
        f"{path.name} is stored with outputs; clear them to keep the diff small"
    )
    client = NotebookClient(
        nb,
        kernel_name="python3",
        kernel_manager_class=VenvKernelManager,
        timeout=600,  # seconds per cell
        allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},  # the working directory: run folders land here
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on an error
    stderr = [
        output.text
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream" and output.name == "stderr"
    ]
    assert not stderr, f"{path.name} wrote to stderr (warnings or errors):\n" + "\n".join(stderr)


def test_there_are_tutorials():
    assert TUTORIALS, "no notebooks in tutorials/"
