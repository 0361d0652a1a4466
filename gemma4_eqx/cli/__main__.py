"""`python -m gemma4_eqx.cli ...`: the same as the `gemma4-eqx` command."""

import sys

from .main import main

sys.exit(main())
