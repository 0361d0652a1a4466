"""Test setup: every annotated function of the package is shape-checked by jaxtyping + beartype.

The import hook must be installed before anything imports `gemma4_eqx`.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# What `_o0_unless_marked` below appended to XLA_FLAGS for child processes. The xdist workers are children of the
# controller, whose conftest ran first: they take the addition back out before JAX reads XLA_FLAGS.
ADDED_FLAGS = "GEMMA4_EQX_TESTS_ADDED_XLA_FLAGS"
if (_added := os.environ.pop(ADDED_FLAGS, "")) and os.environ.get("XLA_FLAGS", "").endswith(_added):
    os.environ["XLA_FLAGS"] = os.environ["XLA_FLAGS"][: -len(_added)]


def _share_compiled_programs() -> None:
    """One persistent compilation cache for the whole run: xdist workers, notebook kernels and test subprocesses.

    Many tests compile the same programs (JAX's in-memory caches are cleared now and then, see
    `_release_compiled_programs`); with this, the second compilation of an identical program (same HLO, same
    options, same XLA_FLAGS: all in JAX's cache key) is read back instead. The first process of a run (the xdist
    controller, or the only process) makes a fresh folder and removes it at exit; workers and children inherit it
    through the environment. A folder the user set already is used as is.

    Only programs that took 0.2 s or more to compile are written: over a whole run (2026-12-06, AMD EPYC VM) the
    ~1,000 hits on programs that compile in under 0.05 s (eager operations) saved nothing net (reading one back
    costs what compiling it does) while writing the ~4,000 small programs cost time; every second saved came from
    the 34 hits on programs of 0.5 s and more (62 s).
    """
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="gemma4-eqx-tests-xla-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"


_share_compiled_programs()


def _cache_jax_frame_filter() -> None:
    """Memoise JAX's test of whether a source file is one of its excluded (internal) paths.

    Every traced `eqx.error_if` (the package's input checks under jit, `_checks.check_value`) walks the whole
    Python stack and asks `jax._src.traceback_util.include_frame` about each frame, which runs `os.path.commonpath`
    and `os.stat` against every excluded path, uncached. Under pytest's deep stacks that was ~70 ms per check and
    about a quarter of the time spent tracing a forward or a prefill. The answer for a (file, path) pair cannot
    change during a run, so caching it changes nothing but the time. Private JAX API: if it moves, skip.
    """
    import functools

    from jax._src import traceback_util

    test = getattr(traceback_util, "_path_starts_with", None)
    if test is not None and not hasattr(test, "cache_info"):
        traceback_util._path_starts_with = functools.lru_cache(maxsize=None)(test)


# Round after every bf16 operation, as torch does, so bf16 runs are compared with transformers' rounding points.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()
_cache_jax_frame_filter()  # the first import of jax: after every variable it reads is set

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


# ---- XLA's LLVM backend at -O0, except where a test's assertion is about the machine code ----------------------
#
# Compiling is most of the suite's time, and XLA:CPU's LLVM backend at -O0 compiles the same programs about twice
# as fast (tiny checkpoint, one core: forward 2.9 -> 1.4 s, generate's prefill 5.4 -> 2.9 s). The HLO is the same
# program either way; only LLVM's instruction selection and vectorisation change, and with them the order in which
# fp32/bf16 sums are added (logits move by ~1e-5). What a test asserts about our program (shapes, masks, parity with
# transformers within fp32 bounds, compile counts, tokens) holds at either level: a whole run at -O0 on 2026-12-07
# failed one test, and that one is about the machine code. Tests marked `machine_code` assert exactly that (bf16
# bits against torch's, `numerics="invariant"` equal bit for bit across programs) and run at XLA's default level,
# the one users run. An XLA_FLAGS that already names a level is left alone, for this process and its children.
OPTIMISATION_FLAG = "--xla_backend_optimization_level"
LEVELS = {"o0": False, "patched": False, "set_by_user": OPTIMISATION_FLAG in os.environ["XLA_FLAGS"]}


def _o0_unless_marked() -> None:
    """Compile at -O0 while `LEVELS["o0"]` is set (per test, `pytest_runtest_setup`), by setting the debug option in
    every compilation's options; child processes (CLI, notebooks' kernels) get it through XLA_FLAGS.

    XLA reads XLA_FLAGS once per process, so the flag added to the environment after this process's first
    compilation reaches only the children. Private JAX API (`jax._src.compiler.get_compile_options`, which every
    jit calls): if it moves, everything compiles at the default level, slower and still correct, and
    tests/test_compile_levels.py fails to say so.
    """
    if LEVELS["set_by_user"]:
        return
    import functools

    import jax
    from jax._src import compiler

    jax.jit(lambda x: x + 1)(1).block_until_ready()  # this process has read XLA_FLAGS: the change below is for children
    os.environ[ADDED_FLAGS] = f" {OPTIMISATION_FLAG}=0"
    os.environ["XLA_FLAGS"] += os.environ[ADDED_FLAGS]
    original = getattr(compiler, "get_compile_options", None)
    if original is None:
        return

    @functools.wraps(original)
    def get_compile_options(*args, **kwargs):
        options = original(*args, **kwargs)
        if LEVELS["o0"]:
            # in the options' debug options, which JAX's persistent cache key holds: a program compiled at the default
            # level here never shares an entry with one compiled at -O0 here or in a child (whose XLA_FLAGS, which
            # the key also holds, is this process's environment)
            options.executable_build_options.debug_options.xla_backend_optimization_level = 0
        return options

    compiler.get_compile_options = get_compile_options
    LEVELS["patched"] = True


_o0_unless_marked()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before a test's fixtures: its level. JAX's in-memory caches do not know about the option, so a change of level
    clears them (programs of 0.2 s and more come back from the run's persistent cache, whose key has the options);
    `pytest_collection_modifyitems` puts a file's marked tests first, so a file changes level at most twice."""
    if not LEVELS["patched"]:
        return
    o0 = item.get_closest_marker("machine_code") is None
    if o0 != LEVELS["o0"]:
        import jax

        jax.clear_caches()
        LEVELS["o0"] = o0


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


# Heaviest test files first (seconds of test time, 2-core AMD EPYC VM, 2026-12-06: test_generation 188,
# test_notebooks 130, test_invariant 95, ..., test_numerics 18; the 21 files not listed take under 15 s each).
# `--dist loadfile` hands whole files to the workers in collection order (pyproject: --no-loadscope-reorder, since
# xdist would otherwise order them by their number of tests), so starting with the long ones keeps a long file
# from running alone at the end: the longest-first order is within a few seconds of an even split; xdist's own
# order left one worker idle for ~75 s. Only the schedule depends on this list, never a result.
HEAVIEST_FIRST = (
    "test_generation.py", "test_notebooks.py", "test_invariant.py", "test_hf_parity.py", "test_api_contract.py",
    "test_surgery.py", "test_notebooks_editing.py", "test_modes.py", "test_speculative.py", "test_transforms.py",
    "test_nnx_reference.py", "test_quant.py", "test_generation_cache.py", "test_train.py", "test_sharding.py",
    "test_attention.py", "test_losses.py", "test_chat.py", "test_distributed.py", "test_packing.py",
    "test_generation_compiles.py", "test_bf16_modules.py", "test_scoring.py", "test_atomic_save.py",
    "test_serving_layout.py", "test_multimodal.py", "test_taps.py", "test_cli.py", "test_numerics.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    # stable: a file's tests keep their order, its `machine_code` tests first (see pytest_runtest_setup)
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), item.path.name,
                                 item.get_closest_marker("machine_code") is None))


def pytest_collection_finish(session):
    """Move everything alive after collection (JAX, the package, the test modules and their data) out of the
    garbage collector's view: a full collection otherwise walks all of it again (~0.4 s each; 21 of them over
    test_generation and test_surgery, 8.9 s, and 5.3 s with this)."""
    import gc

    gc.collect()
    gc.freeze()
