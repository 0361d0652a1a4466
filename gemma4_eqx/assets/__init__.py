"""Files shipped with the package.

- `small/` (`SMALL_CHECKPOINT`): a small *trained* checkpoint (1.7 M parameters, the real structure at toy sizes)
  trained on license texts for a few CPU-minutes (scripts/train_small_checkpoint.py): its greedy output is
  English-like, so sampling, chat and decoding are judged on it; the CLI's default. `small/heldout.txt` is text it
  never saw and `small/training.json` records how it was made.
- `small-drafter/` (`SMALL_DRAFTER`): an assistant (MTP drafter) distilled for `small/`
  (scripts/train_small_drafter.py).
- `tiny/` (`TINY_CHECKPOINT`): a *random* checkpoint (577 K parameters) with vision and audio embedders: its output
  is noise; it is fast, so most tests use it (scripts/make_bundled_checkpoint.py).
"""

import pathlib

ASSETS = pathlib.Path(__file__).parent
TINY_CHECKPOINT = ASSETS / "tiny"
SMALL_CHECKPOINT = ASSETS / "small"
SMALL_DRAFTER = ASSETS / "small-drafter"
