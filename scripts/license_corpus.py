"""The text corpus of the bundled small checkpoint: Debian's canonical license files, each pinned by SHA-256.

Shared by scripts/train_small_checkpoint.py (which trains on it) and evals/make_license_tasks.py (which cuts its
eval items from the same training part), so the two cannot drift apart. Standard library only.
"""

from __future__ import annotations

import hashlib
import pathlib

CORPUS_DIR = pathlib.Path("/usr/share/common-licenses")
# SHA-256 of every text used (Debian base-files 13 / Ubuntu 24.04 copies).
TRAIN_FILES = {
    "GPL-3": "3972dc9744f6499f0f9b2dbf76696f2ae7ad8af9b23dde66d6af86c9dfb36986",
    "GPL-2": "8177f97513213526df2cf6184d8ff986c675afb514d4e68a404010521b880643",
    "GPL-1": "d77d235e41d54594865151f4751e835c5a82322b0e87ace266567c3391a4b912",
    "LGPL-3": "e3a994d82e644b03a792a930f574002658412f62407f5fee083f2555c5f23118",
    "LGPL-2.1": "dc626520dcd53a22f727af3ee42c770e56c97a64fe3adb063799d8ab032fe551",
    "LGPL-2": "681e386e44a19d7d0674b4320272c90e66b6610b741e7e6305f8219c42e85366",
    "GFDL-1.3": "110535522396708cea37c72a802c5e7e81391139f5f7985631c93ef242b206a4",
    "GFDL-1.2": "d8e94ae5fdb5433fcae2961aeb1a8cf17174d6f4a0465d24bf37dd8a038bd439",
    "MPL-2.0": "fab3dd6bdab226f1c08630b1dd917e11fcb4ec5e1e020e2c16f83a0a13863e85",
    "MPL-1.1": "f849fc26a7a99981611a3a370e83078deb617d12a45776d6c4cada4d338be469",
    "Artistic": "b7fd9b73ea99602016a326e0b62e6646060d18febdd065ceca8bb482208c3d88",
    "CC0-1.0": "a2010f343487d3f7618affe54f789f5487602331c0a8d03f49e9a7c547cf0499",
    "BSD": "5d588eb3b157d52112afea935c88a7ff9efddc1e2d95a42c25d3b96ad9055008",
}
HELDOUT_SPAN = ("GPL-3", "  4. Conveying Verbatim Copies.", "  8. Termination.")  # [start, end) lines
OUT_OF_DOMAIN_FILE = ("Apache-2.0", "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30")


def read_text(name: str, sha256: str, made: str = "the checkpoint") -> str:
    """The license file `name`, after checking its SHA-256 (a mismatch stops the script, naming the file)."""
    path = CORPUS_DIR / name
    if not path.is_file():
        raise SystemExit(f"{path}: missing. The corpus is Debian's /usr/share/common-licenses (package base-files); "
                         "install base-files or copy the canonical texts there")
    data = path.read_bytes()
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise SystemExit(f"{path}: SHA-256 {found}, expected {sha256}; this machine holds another version of the "
                         f"text, so {made} would not be the same")
    return data.decode("utf-8")


def read_training_files(made: str = "the checkpoint") -> dict[str, str]:
    """Every training file's whole text, checked."""
    return {name: read_text(name, sha, made) for name, sha in TRAIN_FILES.items()}


def heldout_bounds(texts: dict[str, str]) -> tuple[str, int, int]:
    """(file name, start, end) of the held-out span: whole lines, from HELDOUT_SPAN's first heading to its stop."""
    name, first, stop = HELDOUT_SPAN
    return name, texts[name].index(f"\n{first}\n") + 1, texts[name].index(f"\n{stop}\n") + 1
