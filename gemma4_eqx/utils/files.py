"""One way to open a file: regular files only, read with a size limit, text as UTF-8, JSON with a depth limit.

Everything the package reads from a path it did not create (configs, tokenizers, chat templates, media) goes
through here, so each refusal names the file and what is wrong with it:

    read_json("processor_config.json", max_bytes=4 << 20, expect=dict)   # a dict, or FileReadError
    read_text("chat_template.jinja", max_bytes=1 << 20)                   # a str, or FileReadError
    with open_regular("cat.png") as f: ...                                # a binary file object

`open_regular` opens without following the open into a FIFO's wait (O_NONBLOCK, cleared once the file is known
to be regular), then checks `os.fstat` of the opened descriptor: a directory, FIFO, socket or device is refused
with what it is; a symlink is followed (the Hugging Face cache is symlinks into `blobs/`), and its target must be
a regular file. Sizes are checked on that same descriptor before any byte is read.

Only the standard library: every layer of the package may import this module.
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
from typing import Any

__all__ = ["FileReadError", "FileMissingError", "open_regular", "file_size", "read_bytes", "read_text", "read_json",
           "json_depth", "describe_mode", "MAX_JSON_DEPTH"]

# Deepest nesting a JSON file may have (the configs this package reads are a few levels deep; json's own decoder
# stops near 1,000 levels with a RecursionError that names nothing).
MAX_JSON_DEPTH = 256


class FileReadError(ValueError):
    """A file that cannot be used: not a regular file, too large, not UTF-8, not valid JSON, too deeply nested, or
    of the wrong JSON type. The message names the file and the problem; callers may wrap it in their own types."""


class FileMissingError(FileReadError, FileNotFoundError):
    """The file does not exist (also a FileNotFoundError, so code catching that keeps working)."""


def describe_mode(mode: int) -> str:
    """What a file is, from its `st_mode`: "a regular file", "a directory", "a FIFO (named pipe)", ..."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return f"a special file (mode {stat.filemode(mode)})"


def _refuse_kind(path: str, mode: int, what: str) -> FileReadError:
    return FileReadError(f"{path}: not a regular file, it is {describe_mode(mode)}; expected {what}")


def open_regular(path: str | os.PathLike, what: str = "a regular file") -> io.BufferedReader:
    """Open `path` for binary reading if it is a regular file (or a symlink to one); else FileReadError naming the
    file and what it is (FileMissingError when it does not exist). `what` completes "expected ..." in messages,
    e.g. "an image file". The caller closes the returned file object (use it in a `with` block)."""
    name = os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    flags |= getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(name, flags)
    except FileNotFoundError:
        raise FileMissingError(f"{name}: no such file; expected {what}") from None
    except OSError as e:
        # A socket cannot be opened at all (ENXIO); say what it is rather than "no such device or address".
        try:
            mode = os.stat(name).st_mode
        except OSError:
            mode = None
        if mode is not None and not stat.S_ISREG(mode):
            raise _refuse_kind(name, mode, what) from None
        if e.errno == errno.ELOOP:
            raise FileReadError(f"{name}: too many levels of symbolic links; expected {what}") from None
        raise FileReadError(f"{name}: cannot be opened ({e.strerror or e}); expected {what}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _refuse_kind(name, mode, what)
        if getattr(os, "O_NONBLOCK", 0):
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return io.open(fd, "rb", closefd=True)  # type: ignore[return-value]
    except BaseException:
        os.close(fd)
        raise


def file_size(f: Any) -> int:
    """The size in bytes of an open file (from `os.fstat` of its descriptor)."""
    return os.fstat(f.fileno()).st_size


def _size_text(n: int) -> str:
    return f"{n:,} bytes" + (f" ({n / 2**20:,.1f} MiB)" if n >= 2**20 else "")


def check_size(f: Any, path: str | os.PathLike, max_bytes: int | None, what: str = "a file") -> int:
    """The size of the open file `f`; FileReadError naming the file, its size and the limit when it is larger than
    `max_bytes` (None: no limit)."""
    size = file_size(f)
    if max_bytes is not None and size > max_bytes:
        raise FileReadError(f"{os.fspath(path)}: {_size_text(size)}, more than the limit of {_size_text(max_bytes)} "
                            f"for {what}")
    return size


def read_bytes(path: str | os.PathLike, max_bytes: int | None, what: str = "a file") -> bytes:
    """The bytes of the regular file at `path`, refused unread when it is larger than `max_bytes` (None: no
    limit). A file that grows past the limit while it is read is refused too."""
    with open_regular(path, what) as f:
        check_size(f, path, max_bytes, what)
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise FileReadError(f"{os.fspath(path)}: grew past the limit of {_size_text(max_bytes)} for {what} while "
                            "it was read")
    return data


def decode_utf8(data: bytes, path: str | os.PathLike, what: str = "a UTF-8 text file") -> str:
    """`data` decoded as UTF-8; FileReadError naming the file and the byte offset of the first invalid byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = data[e.start:e.start + 4]
        raise FileReadError(f"{os.fspath(path)}: not valid UTF-8 at byte offset {e.start} ({e.reason}, bytes "
                            f"{bad.hex(' ')}); expected {what}") from None


def read_text(path: str | os.PathLike, max_bytes: int | None, what: str = "a UTF-8 text file") -> str:
    """The text of the regular file at `path`, read as UTF-8 (size limit as in `read_bytes`)."""
    return decode_utf8(read_bytes(path, max_bytes, what), path, what)


def json_depth(value: Any) -> int:
    """The nesting depth of a parsed JSON value (a scalar 0, [] or {} 1, [[1]] 2), measured without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in item if isinstance(child, (dict, list)))
    return deepest


_JSON_TYPE_NAMES = {dict: "a JSON object", list: "a list", str: "a string", int: "a number", float: "a number",
                    bool: "a boolean", type(None): "null"}


def json_type_name(value: Any) -> str:
    """How a parsed JSON value is named in messages: "a JSON object", "a list", "a string", "a number", ..."""
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def parse_json(text: str, path: str | os.PathLike, max_depth: int = MAX_JSON_DEPTH, expect: type | None = None,
               what: str = "a JSON file") -> Any:
    """Parse JSON `text` read from `path`: FileReadError naming the file on invalid JSON (with the line and column),
    on nesting deeper than `max_depth`, and, with `expect` (e.g. dict), on a value of another type."""
    name = os.fspath(path)
    too_deep = f"{name}: JSON nested deeper than the limit of {max_depth} levels; expected {what}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise FileReadError(f"{name}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno} (char {e.pos}); "
                            f"expected {what}") from None
    except RecursionError:  # json's decoder gives up near 1,000 levels, far past max_depth
        raise FileReadError(too_deep) from None
    except ValueError as e:  # e.g. an integer literal longer than Python's int_max_str_digits
        raise FileReadError(f"{name}: not valid JSON ({str(e)[:200]}); expected {what}") from None
    if (text.count("[") + text.count("{") > max_depth) and json_depth(value) > max_depth:
        raise FileReadError(too_deep)
    if expect is not None and not isinstance(value, expect):
        wanted = _JSON_TYPE_NAMES.get(expect, expect.__name__)
        raise FileReadError(f"{name}: expected {wanted}, found {json_type_name(value)}")
    return value


def read_json(path: str | os.PathLike, max_bytes: int | None, max_depth: int = MAX_JSON_DEPTH,
              expect: type | None = None, what: str = "a JSON file") -> Any:
    """The JSON value in the regular file at `path`: read with `read_text` (size limit, UTF-8) and parsed with
    `parse_json` (named errors for invalid JSON, nesting deeper than `max_depth`, a type other than `expect`)."""
    return parse_json(read_text(path, max_bytes, what), path, max_depth=max_depth, expect=expect, what=what)
