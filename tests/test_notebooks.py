"""The notebooks in notebooks/ run top to bottom on the bundled checkpoint (no network) and are stored without
outputs. Each runs in a fresh kernel of *this* interpreter (`notebook_runner.py`). The first three run here, the
editing ones (surgery, research, speculative decoding) in test_notebooks_editing.py, so that the suite's two workers
run the two halves side by side (`--dist loadfile` keeps a file on one worker)."""

import nbformat
import pytest

from notebook_runner import FOLDER, run_notebook

NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
HERE = ["01_quickstart", "02_transforms", "03_nnx_vs_equinox"]


def test_the_notebooks_are_the_listed_ones():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_transforms.ipynb", "03_nnx_vs_equinox.ipynb",
                                           "04_surgery.ipynb", "05_research.ipynb", "06_speculative.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} cell {i}: clear its outputs"


@pytest.mark.parametrize("name", HERE)
def test_notebook_runs_top_to_bottom(name, notebook_kernels):
    run_notebook(FOLDER / f"{name}.ipynb", notebook_kernels)
