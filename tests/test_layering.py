"""The package as layers: the dependency order holds, nothing imports in a circle, no module reaches into
another's private names, and the package root stays small.

The order is import-linter's `layers` contract in pyproject.toml (`[tool.importlinter]`), which also follows chains
of imports: a low module that imports nothing high directly but reaches a high one through others is caught. The
AST checks here read every import of the package's own modules, function-local ones included.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gemma4_eqx"
MAX_ROOT_MODULES = 12


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: pathlib.Path) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import of a gemma4_eqx module in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "gemma4_eqx"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "gemma4_eqx":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((sub, "", node.lineno) if sub in MODULES else (target, a.name, node.lineno))
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_layer_contract_holds():
    """import-linter's contract (pyproject.toml): direct and indirect imports only go down the layers."""
    run = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    out = subprocess.run([sys.executable, "-c", run], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout


def test_no_module_imports_in_a_circle():
    edges = {m: sorted({t for t, _, _ in imps if t in MODULES and t != m}) for m, imps in GRAPH.items()}
    # A package's __init__ importing its own submodules is how a package exposes them, not a dependency of the
    # submodules on each other: drop those edges so that `a/__init__ -> a.x -> a.y -> a/__init__` reads as it is.
    edges = {m: [t for t in ts if not t.startswith(m + ".")] for m, ts in edges.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_imports_another_modules_private_names():
    offenders = [f"{m} imports {name} from {target} (line {line})"
                 for m, imps in GRAPH.items() for target, name, line in imps
                 if name.startswith("_") and not (name.startswith("__") and name.endswith("__")) and target != m]
    assert not offenders, "\n".join(offenders)


def test_the_package_root_holds_few_modules():
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root


@pytest.mark.parametrize("low, high", [("gemma4_eqx.model", "gemma4_eqx.generate"), ("gemma4_eqx.model", "gemma4_eqx.io"),
                                       ("gemma4_eqx.layers", "gemma4_eqx.model"), ("gemma4_eqx.config", "gemma4_eqx.layers")])
def test_a_lower_layer_reaches_no_higher_one(low, high):
    """Spelled out for the walk a reader makes: from the model's modules no chain of imports leads up."""
    reached, todo = set(), [m for m in MODULES if m == low or m.startswith(low + ".")]
    while todo:
        m = todo.pop()
        if m in reached:
            continue
        reached.add(m)
        todo += [t for t, _, _ in GRAPH.get(m, []) if t in MODULES]
    assert not [m for m in reached if m == high or m.startswith(high + ".")], sorted(reached)
