"""Command-line input checks, run before any model loads: flag types that name what they expect, and checks of
files, folders and media (`CliError`: one line, exit status 1). Shared by every subcommand."""

from __future__ import annotations

import argparse
import math
import os
import sys
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


def setting(check_name: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A flag checked by `generate.settings` (the rule `generate`, `ChatSession` and the server apply):
    `check_name` names its function there (e.g. "check_temperature"), `parse` reads the text (int or float)."""
    def read(text: str) -> Any:
        from ..generate import settings

        try:
            value = parse(text)
        except ValueError:
            kind = "an integer" if parse is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {kind}, found {text!r}") from None
        try:
            return getattr(settings, check_name)(value)
        except settings.SettingsError as e:  # "temperature: expected ...": argparse names the flag itself
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None

    read.__name__ = "integer" if parse is int else "number"
    return read


def as_flag(e: Exception, flags: dict[str, str]) -> CliError:
    """A `SettingsError` ("max_context: ...") as the flag that set it ("argument --max-context: ...")."""
    name, _, rest = str(e).partition(": ")
    return CliError(f"argument {flags[name]}: {rest}" if name in flags else str(e))


def check_text(value: str | None, flag: str) -> None:
    """Text given on the command line must be UTF-8: undecodable bytes reach Python as lone surrogates, which
    the tokenizer cannot encode."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(value[e.start])
        what = (f"the byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}")
        raise CliError(f"{flag}: not valid UTF-8 text ({what} at character {e.start}); pass the text encoded as "
                       "UTF-8") from None


def _stream_open(stream: Any) -> bool:
    """False for a stream Python found closed at start (None), closed since, or whose descriptor is gone."""
    if stream is None or getattr(stream, "closed", False):
        return False
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):  # no descriptor (io.StringIO, a wrapper): open while not closed
        return True
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def check_stdout() -> None:
    """Every command writes its result to stdout: a closed one is refused before any work."""
    if not _stream_open(sys.stdout):
        raise CliError("stdout is closed: the command writes its output there; redirect it to a file or /dev/null "
                       "instead of closing it")


def check_stdin(command: str) -> None:
    if not _stream_open(sys.stdin):
        raise CliError(f"stdin is closed: {command} reads the user's turns from it, one per line; pipe them in or run "
                       "it in a terminal")


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


def _check_file(path: str, flag: str, what: str = "a regular file") -> None:
    """A regular file (or a link to one) that opens for reading: `utils.files` names what else it is (a folder,
    a FIFO, a device, a socket) or why it does not open."""
    from ..utils import files

    try:
        with files.open_regular(path, what):
            pass
    except files.FileMissingError:
        raise CliError(f"{flag} {path}: no such file") from None
    except files.FileReadError as e:
        raise CliError(f"{flag} {e}") from None


def _check_image(path: str) -> None:
    _check_file(path, "--image", "an image file")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CliError(f"--image {path}: not a readable image ({e})") from None


def _check_audio(path: str, resample: bool, downmix: bool) -> None:
    _check_file(path, "--audio", "an audio file")
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
    check_text(args.prompt, "--prompt")
    check_text(args.system, "--system")
    cfg = _check_model(args.model)
    for image in args.image or []:
        _check_image(image)
    for audio in args.audio or []:
        _check_audio(audio, args.resample, args.downmix)
    if cfg is not None and args.top_k is not None and args.top_k > cfg.text.vocab_size:
        raise CliError(f"argument --top-k: expected at most the vocabulary size {cfg.text.vocab_size}, "
                       f"found {args.top_k}")


def check_chat(args: argparse.Namespace) -> None:
    """Everything `chat` reads before the model loads (its cache is checked against the memory once the folder is
    resolved, still before the load: `check_cache_fits`)."""
    check_text(args.system, "--system")
    check_stdin("chat")
    _check_model(args.model)
    if args.max_new_tokens >= args.max_context:
        raise CliError(f"argument --max-new-tokens: {args.max_new_tokens} tokens per reply leave no room for a prompt "
                       f"in --max-context {args.max_context}; expected fewer")


def _stored_dtype(folder: str) -> str | None:
    """config.json's "dtype" (what the weights are stored in, and what the model loads as without --dtype)."""
    from ..utils import files

    try:
        d = files.read_json(os.path.join(folder, "config.json"), 8 << 20, expect=dict)
    except (files.FileReadError, OSError):
        return None
    stored = d.get("dtype", d.get("torch_dtype"))
    return stored if stored in DTYPE_BYTES else None


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def weights_bytes(folder: str, dtype: str | None) -> int:
    """About what the weights of `folder` take once loaded: its safetensors files, scaled from the stored dtype
    to `dtype` (None: kept)."""
    total = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.endswith(".safetensors"):
                try:
                    total += entry.stat().st_size
                except OSError:
                    pass
    stored = _stored_dtype(folder)
    if dtype in DTYPE_BYTES and stored is not None:
        total = total * DTYPE_BYTES[dtype] // DTYPE_BYTES[stored]
    return total


def check_cache_fits(cfg: Any, folder: str, *, slots: int, spare: int, dtype: str | None, flag: str,
                     batch: int = 1) -> None:
    """The KV cache of `slots` slots (and `spare` ring slots; `batch` rows, e.g. a server's) within the model's
    context and beside the weights in the memory (`generate.settings.check_max_context`, the model's dtype:
    `dtype` or the stored one); else a CliError naming `flag` and what fits."""
    from ..generate.settings import SettingsError, check_max_context

    try:
        check_max_context(cfg, slots, dtype=dtype or _stored_dtype(folder) or "float32", spare=spare, batch=batch,
                          reserved=weights_bytes(folder, dtype), name=flag)
    except SettingsError as e:
        raise CliError(f"argument {e}") from None


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
