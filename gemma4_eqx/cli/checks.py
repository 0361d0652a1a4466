"""Command-line input checks, run before any model loads: flag types that name what they expect, and checks of
files, folders and media (`CliError`: one line, exit status 1). Shared by every subcommand."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from typing import Any

from ..assets import SMALL_CHECKPOINT

SAMPLING_RATE = 16_000  # what the audio feature extractor takes


class CliError(Exception):
    """A bad command-line input: printed as one line, exit status 1."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 1 like every other input error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(f"{message} (see {self.prog} --help)")


# ---- flag types: each names what it expects; argparse prefixes the flag ----------------------------------
def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, found {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            span = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"expected an integer {span}, found {value}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(lo: float, hi: float | None = None, lo_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, found {text!r}") from None
        bad = not math.isfinite(value) or value < lo or (lo_open and value == lo) or (hi is not None and value > hi)
        if bad:
            span = f"{'(' if lo_open else '['}{lo:g}, {f'{hi:g}]' if hi is not None else 'inf)'}"
            raise argparse.ArgumentTypeError(f"expected a finite number in {span}, found {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def shard_size(text: str) -> str:
    from ..io.save import parse_size

    try:
        parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive size such as 5GB, 500MB or a number of bytes, "
                                         f"found {text!r}") from None
    return text


def _looks_local(name: str) -> bool:
    """A path rather than a Hub repo id ('owner/name')."""
    return (os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") != 1
            or os.sep != "/" and os.sep in name)


def _check_model(name: str | None, flag: str = "--model", config_file_ok: bool = False) -> Any:
    """A local `--model` must be a checkpoint folder with a readable config.json; returns its config (or None for
    a Hub repo id, which the Hub resolves later)."""
    from ..config.gemma4 import Gemma4Config

    if name is None:
        return Gemma4Config.from_pretrained(SMALL_CHECKPOINT)
    if not _looks_local(name):
        return None
    path = os.path.expanduser(name)
    if config_file_ok and os.path.isfile(path):
        return Gemma4Config.from_pretrained(path)
    if not os.path.exists(path):
        raise CliError(f"{flag} {name}: no such folder (and not a Hub repo id of the form owner/name)")
    if not os.path.isdir(path):
        raise CliError(f"{flag} {name}: expected a checkpoint folder, found a file")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CliError(f"{flag} {name}: no config.json in this folder; expected a transformers-format checkpoint")
    return Gemma4Config.from_pretrained(path)


def _check_file(path: str, flag: str) -> None:
    if not os.path.exists(path):
        raise CliError(f"{flag} {path}: no such file")
    if not os.path.isfile(path):
        raise CliError(f"{flag} {path}: expected a file, found a folder")
    if not os.access(path, os.R_OK):
        raise CliError(f"{flag} {path}: not readable")


def _check_image(path: str) -> None:
    _check_file(path, "--image")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CliError(f"--image {path}: not a readable image ({e})") from None


def _check_audio(path: str, resample: bool, downmix: bool) -> None:
    _check_file(path, "--audio")
    import soundfile

    try:
        info = soundfile.info(path)
    except Exception as e:  # soundfile raises its own LibsndfileError (a RuntimeError)
        raise CliError(f"--audio {path}: not a readable audio file ({e})") from None
    if info.channels != 1 and not downmix:
        raise CliError(f"--audio {path}: {info.channels} channels, the model takes mono; pass --downmix to "
                       "average them")
    if info.samplerate != SAMPLING_RATE and not resample:
        raise CliError(f"--audio {path}: sampled at {info.samplerate} Hz, the model takes {SAMPLING_RATE} Hz; pass "
                       "--resample to convert it")
    if info.frames == 0:
        raise CliError(f"--audio {path}: holds no samples")


def check_generate(args: argparse.Namespace) -> None:
    """Everything `generate` reads, checked before the model loads."""
    cfg = _check_model(args.model)
    for image in args.image or []:
        _check_image(image)
    for audio in args.audio or []:
        _check_audio(audio, args.resample, args.downmix)
    if cfg is not None and args.top_k is not None and args.top_k > cfg.text.vocab_size:
        raise CliError(f"argument --top-k: expected at most the vocabulary size {cfg.text.vocab_size}, "
                       f"found {args.top_k}")


def check_info(args: argparse.Namespace) -> None:
    _check_model(args.model, config_file_ok=True)


def check_verify(args: argparse.Namespace) -> None:
    _check_model(args.model)


def check_convert(args: argparse.Namespace) -> None:
    _check_model(args.model)
    from ..io.names import CheckpointError
    from ..io.save import check_target

    try:  # "", /, system folders, home / working directory, files of others it would delete (see io.save)
        check_target(args.out, getattr(args, "overwrite", False), what="--out")
    except CheckpointError as e:
        raise CliError(str(e) if str(e).startswith("--out") else f"--out {args.out}: {e}") from None
    out = os.path.expanduser(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise CliError(f"--out {args.out}: exists and is not a folder")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise CliError(f"--out {args.out}: the parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CliError(f"--out {args.out}: the parent folder {parent} is not writable")
