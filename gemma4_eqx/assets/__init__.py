"""Files shipped with the package: a small random checkpoint (`tiny/`) for the CLI default and the README."""

import pathlib

ASSETS = pathlib.Path(__file__).parent
TINY_CHECKPOINT = ASSETS / "tiny"
