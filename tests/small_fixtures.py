"""The trained small checkpoint as module-scoped fixtures, shared by the test files that judge outputs on it:
`from small_fixtures import model, proc` registers them in a test module."""

import jax.numpy as jnp
import pytest

import gemma4_eqx as g4

SMALL = g4.assets.SMALL_CHECKPOINT


@pytest.fixture(scope="module")
def model():
    return g4.load(SMALL, dtype=jnp.float32)


@pytest.fixture(scope="module")
def proc():
    return g4.Processor.from_pretrained(SMALL)
