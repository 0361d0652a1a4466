"""The editing notebooks (surgery, research, speculative decoding) run top to bottom on the bundled checkpoints:
the other half of test_notebooks.py, in a file of its own so that a second worker runs it beside the first half."""

import pytest

from notebook_runner import FOLDER, run_notebook

EDITING = ["04_surgery", "05_research", "06_speculative"]


def test_the_two_halves_cover_every_notebook():
    from test_notebooks import HERE
    assert sorted(HERE + EDITING) == sorted(p.stem for p in FOLDER.glob("*.ipynb"))


@pytest.mark.parametrize("name", EDITING)
def test_notebook_runs_top_to_bottom(name, notebook_kernels):
    run_notebook(FOLDER / f"{name}.ipynb", notebook_kernels)
