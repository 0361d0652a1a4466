"""Running a notebook of notebooks/ top to bottom in a fresh kernel of *this* interpreter (a kernelspec written for
the tests, so a fresh venv needs no `ipykernel install` and no venv on PATH). Shared by test_notebooks.py and
test_notebooks_editing.py, which split the notebooks in two so that the suite's workers run them side by side."""

import json
import pathlib
import sys
import time

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

FOLDER = pathlib.Path(__file__).parent.parent / "notebooks"
KERNEL = "gemma4-eqx-tests"


def kernel_specs(folder: pathlib.Path) -> KernelSpecManager:
    """A kernelspec for this interpreter, written into `folder`."""
    (folder / KERNEL).mkdir()
    (folder / KERNEL / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "gemma4-eqx (tests)", "language": "python"}))
    return KernelSpecManager(kernel_dirs=[str(folder)])


def run_notebook(path: pathlib.Path, specs: KernelSpecManager) -> None:
    """Execute every cell; raises CellExecutionError with the failing cell and its traceback."""
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)  # inherits JAX_PLATFORMS etc.
    client = NotebookClient(nb, km=km, timeout=300, resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    try:
        client.execute()
    finally:  # nbclient shuts down only the kernels it started itself: this one stayed alive (~0.7 GB each)
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
