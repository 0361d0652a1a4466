"""Every Python block of the README runs, in order, as a reader would paste them (one interpreter, one namespace).

The blocks use the bundled checkpoints; the one file they name (`cat.png`) is made here, in the working directory
the blocks run in. A block that fails names itself (its first line and its place in the README).
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block."""
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        out.append((text[:m.start()].count("\n") + 1, m.group(1)))
    return out


def runner(blocks: list[tuple[int, str]]) -> str:
    """A script that runs the blocks one after another in one namespace and names the first that fails."""
    body = [
        "import sys, traceback",
        "namespace = {'__name__': '__main__'}",
        f"blocks = {blocks!r}",
        "for line, code in blocks:",
        "    try:",
        "        exec(compile(code, f'README.md:{line}', 'exec'), namespace)",
        "    except Exception:",
        "        traceback.print_exc()",
        "        print(f'README block at line {line} failed: {code.splitlines()[0]!r}', file=sys.stderr)",
        "        sys.exit(1)",
        "print(f'{len(blocks)} README blocks ran')",
    ]
    return "\n".join(body)


def test_the_readme_has_python_blocks():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 6, [line for line, _ in blocks]


def test_every_readme_python_block_runs(tmp_path):
    blocks = python_blocks(README.read_text())
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "cat.png")
    script = tmp_path / "readme_blocks.py"
    script.write_text(runner(blocks))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, textwrap.shorten(out.stdout, 2000) + "\n" + out.stderr[-6000:]
    assert f"{len(blocks)} README blocks ran" in out.stdout


def test_a_broken_block_is_caught(tmp_path):
    """The runner itself: a block that raises fails the run and is named."""
    blocks = [(10, "x = 1\n"), (20, "raise ValueError('broken on purpose')\n"), (30, "y = 2\n")]
    script = tmp_path / "broken.py"
    script.write_text(runner(blocks))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "README block at line 20 failed" in out.stderr and "ran" not in out.stdout


def package_map(text: str) -> set[str]:
    """Every backticked name in the first column of the README's package table (`## The package`)."""
    section = text.split("## The package", 1)[1].split("\n## ", 1)[0]
    names = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            names.update(re.findall(r"`([^`]+)`", row.split("|")[1]))
    return names


def test_the_package_map_matches_the_tree():
    """The README's package table names every subpackage and top-level module of gemma4_eqx, and nothing else."""
    package = README.parent / "gemma4_eqx"
    tree = {p.name + "/" for p in package.iterdir() if p.is_dir() and p.name != "__pycache__"}
    tree |= {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    listed = package_map(README.read_text())
    assert listed == tree, f"in the tree, not in the README: {sorted(tree - listed)}; in the README, not in the " \
                           f"tree: {sorted(listed - tree)}"
