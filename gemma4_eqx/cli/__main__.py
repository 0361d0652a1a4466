"""`python -m gemma4_eqx.cli ...`: the same as the `gemma4-eqx` command."""

import sys

from .main import main

if __name__ == "__main__":  # not on a plain import (tests/conftest.py imports every module of the package)
    sys.exit(main())
