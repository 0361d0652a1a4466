"""Test setup: every annotated function of the package is shape-checked by jaxtyping + beartype.

The import hook must be installed before anything imports `gemma4_eqx`.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _share_compiled_programs() -> None:
    """One persistent compilation cache for the whole run: xdist workers, notebook kernels and test subprocesses.

    Many tests compile the same programs (every module clears JAX's in-memory caches when it ends, see
    `_release_compiled_programs`); with this, the second compilation of an identical program (same HLO, same
    options, same XLA_FLAGS: all in JAX's cache key) is read back instead. The first process of a run (the xdist
    controller, or the only process) makes a fresh folder and removes it at exit; workers and children inherit it
    through the environment. A folder the user set already is used as is.
    """
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="gemma4-eqx-tests-xla-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


_share_compiled_programs()
# Round after every bf16 operation, as torch does, so bf16 runs are compared with transformers' rounding points.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()

from jaxtyping import install_import_hook  # noqa: E402

import importlib  # noqa: E402
import pkgutil  # noqa: E402

with install_import_hook("gemma4_eqx", "beartype.beartype"):
    import gemma4_eqx  # noqa: E402

    # Every submodule now, under the hook: the lazily exposed ones (bridge, nnx, sharding, surgery, train) would
    # otherwise be imported later, outside it, and go unchecked.
    for _module in pkgutil.walk_packages(gemma4_eqx.__path__, "gemma4_eqx."):
        importlib.import_module(_module.name)

import pathlib  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


@pytest.fixture(scope="session")
def notebook_kernels(tmp_path_factory):
    """A kernelspec of this interpreter for the notebook tests (`notebook_runner.py`)."""
    from notebook_runner import kernel_specs

    return kernel_specs(tmp_path_factory.mktemp("kernels"))


def _memory_mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no count to watch, so release after every module
        return 1 << 30


# Release compiled programs once a process holds this many memory mappings (under half the kernel's usual
# `vm.max_map_count` of 65,530, so a module that compiles a lot still has room).
MAX_MAPPINGS = 25_000


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after a test module once the process holds many memory mappings.

    Every compiled CPU executable keeps memory mappings; over the whole suite they passed the kernel's
    `vm.max_map_count` (65,530 here) and LLVM crashed with a segfault in a later compilation. Releasing after every
    module also threw away the library's own compiled programs (generate's prefill and decode loop, the cached
    decode step) that the next module calls again with the same model and shapes, so they are kept until the count
    says otherwise.
    """
    yield
    if _memory_mappings() < MAX_MAPPINGS:
        return
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
