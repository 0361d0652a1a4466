"""Test setup: every annotated function of the package is shape-checked by jaxtyping + beartype.

The import hook must be installed before anything imports `gemma4_eqx`.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Round after every bf16 operation, as torch does, so bf16 runs are compared with transformers' rounding points.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()

from jaxtyping import install_import_hook  # noqa: E402

with install_import_hook("gemma4_eqx", "beartype.beartype"):
    import gemma4_eqx  # noqa: F401,E402

import pathlib  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES
