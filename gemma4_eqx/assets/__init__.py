"""Files shipped with the package.

- `tiny/`: a small random checkpoint (577 K parameters) for the CLI default, the README and the tests; its
  output is noise (scripts/make_bundled_checkpoint.py).
- `small/`: a small *trained* checkpoint (1.8 M parameters, the same structure at larger toy sizes) trained on
  license texts for a few CPU-minutes (scripts/train_small_checkpoint.py): its greedy output is legal English,
  so sampling, chat and decoding changes can be judged on it. `small/heldout.txt` is text it never saw and
  `small/training.json` records how it was made.
"""

import pathlib

ASSETS = pathlib.Path(__file__).parent
TINY_CHECKPOINT = ASSETS / "tiny"
SMALL_CHECKPOINT = ASSETS / "small"
