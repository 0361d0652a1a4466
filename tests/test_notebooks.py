"""The notebooks in notebooks/ run top to bottom on the bundled checkpoint (no network) and are stored without
outputs. Each runs in a fresh kernel of *this* interpreter (a kernelspec written for the test), so a fresh venv
needs no `ipykernel install` and no venv on PATH."""

import json
import pathlib
import sys
import time

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
KERNEL = "gemma4-eqx-tests"


def test_the_notebooks_are_the_listed_ones():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_transforms.ipynb", "03_nnx_vs_equinox.ipynb",
                                           "04_surgery.ipynb", "05_research.ipynb", "06_speculative.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} cell {i}: clear its outputs"


@pytest.fixture(scope="session")
def kernel_specs(tmp_path_factory) -> KernelSpecManager:
    folder = tmp_path_factory.mktemp("kernels")
    (folder / KERNEL).mkdir()
    (folder / KERNEL / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "gemma4-eqx (tests)", "language": "python"}))
    return KernelSpecManager(kernel_dirs=[str(folder)])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, kernel_specs):
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs)  # inherits JAX_PLATFORMS etc.
    client = NotebookClient(nb, km=km, timeout=300, resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
