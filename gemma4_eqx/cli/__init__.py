"""The `gemma4-eqx` command line (`gemma4-eqx --help`): the top layer, it may use every other part."""

from .main import main

__all__ = ["main"]
