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

`Folder` is for the files of one folder (a checkpoint): the folder is opened once and every file is opened
relative to that descriptor, so all of them come from the same directory even if another process swaps the
folder for a new one meanwhile. Only plain names are opened, and a symlink is followed only in two shapes
(`FOLDER_LINK_RULE`): a link to another file of the same folder, or, in a Hugging Face cache snapshot
`<repo>/snapshots/<revision>/`, a link to `<repo>/blobs/<blob>`; the file reached must be a regular file.

    with Folder("ckpt") as folder:
        config = folder.read_json("config.json", max_bytes=8 << 20, expect=dict)
        weights = folder.open("model.safetensors", "a safetensors file")   # stays valid after the folder closes

Only the standard library: every layer of the package may import this module.
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
from typing import Any

__all__ = ["FileReadError", "FileMissingError", "Folder", "FOLDER_LINK_RULE", "open_regular", "file_size", "read_bytes",
           "read_text", "read_json", "read_folder_text", "read_folder_json", "json_depth", "describe_mode",
           "MAX_JSON_DEPTH"]

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


_READ_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_BINARY", 0))


def open_regular(path: str | os.PathLike, what: str = "a regular file") -> io.BufferedReader:
    """Open `path` for binary reading if it is a regular file (or a symlink to one); else FileReadError naming the
    file and what it is (FileMissingError when it does not exist). `what` completes "expected ..." in messages,
    e.g. "an image file". The caller closes the returned file object (use it in a `with` block)."""
    name = os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    try:
        fd = os.open(name, _READ_FLAGS)
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
    return _regular_file(fd, name, what)


def _regular_file(fd: int, name: str, what: str) -> io.BufferedReader:
    """The binary file object of `fd` if it is a regular file (O_NONBLOCK cleared); else `fd` closed and
    FileReadError naming `name` and what it is."""
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
        return _read_limited(f, path, max_bytes, what)


def _read_limited(f: Any, path: str | os.PathLike, max_bytes: int | None, what: str) -> bytes:
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


# ---- the files of one folder -------------------------------------------------------------------------------------
FOLDER_LINK_RULE = ("a symlink in the folder is followed only to another file of the same folder, or, in a Hugging "
                    "Face cache snapshot <repo>/snapshots/<revision>/, to <repo>/blobs/<blob>; the file reached must "
                    "be a regular file, not a further link")
MAX_LINK_HOPS = 8  # links inside a folder followed before "too many levels"


def _plain_name(name: str, folder: str, what: str) -> str:
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name)):
        raise FileReadError(f"{folder}: {name!r} is not a plain file name inside the folder; expected {what}")
    return name


class Folder:
    """A folder opened once: its files are opened relative to the held descriptor (see the module docstring).

    `Folder(path)` raises FileMissingError when there is no such folder and FileReadError when `path` is not a
    folder. Close it (or use `with`) when every file is open; the file objects it returned stay valid."""

    def __init__(self, path: str | os.PathLike, what: str = "a folder") -> None:
        self.path = os.fsdecode(os.fspath(path))
        self.real = os.path.realpath(self.path)
        try:
            self.fd = os.open(self.real, _READ_FLAGS | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            raise FileMissingError(f"{self.path}: no such folder; expected {what}") from None
        except NotADirectoryError:
            try:
                kind = describe_mode(os.stat(self.real).st_mode)
            except OSError:
                kind = "not a folder"
            raise FileReadError(f"{self.path}: not a folder, it is {kind}; expected {what}") from None
        except OSError as e:
            raise FileReadError(f"{self.path}: cannot be opened ({e.strerror or e}); expected {what}") from None
        self._identity = self._stat_identity(os.fstat(self.fd))

    @staticmethod
    def _stat_identity(st: os.stat_result) -> tuple[int, int]:
        return st.st_dev, st.st_ino

    def join(self, name: str) -> str:
        """How a file of this folder is named in messages."""
        return os.path.join(self.path, name)

    def replaced(self) -> bool:
        """True when the path no longer names the folder that was opened (e.g. a save swapped in a new one)."""
        try:
            return self._stat_identity(os.stat(self.real)) != self._identity
        except OSError:
            return True

    def exists(self, name: str) -> bool:
        """Whether the folder has an entry `name` (of any kind, a dangling link included)."""
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False

    def listdir(self) -> list[str]:
        return sorted(os.listdir(self.fd))

    def _follow(self, name: str, what: str) -> tuple[str, str]:
        """Where the symlink `name` leads: ("folder", a name in this folder) or ("blob", a Hub cache blob's path);
        FileReadError when the link leaves the shapes of FOLDER_LINK_RULE."""
        shown = self.join(name)
        try:
            target = os.readlink(name, dir_fd=self.fd)
        except OSError as e:
            raise FileReadError(f"{shown}: cannot be read ({e.strerror or e}); expected {what}") from None
        resolved = os.path.normpath(os.path.join(self.real, target))
        where, base = os.path.split(resolved)
        if base not in ("", ".", ".."):
            if where == self.real:
                return "folder", base
            snapshots = os.path.dirname(self.real)
            if os.path.basename(snapshots) == "snapshots" and where == os.path.join(os.path.dirname(snapshots),
                                                                                    "blobs"):
                return "blob", resolved
        raise FileReadError(f"{shown}: a symlink to {target!r}, outside the folder; {FOLDER_LINK_RULE}")

    def open(self, name: str, what: str = "a regular file") -> io.BufferedReader:
        """The regular file `name` of this folder, opened for binary reading (symlinks per FOLDER_LINK_RULE);
        FileReadError naming the file otherwise (FileMissingError when there is none)."""
        _plain_name(name, self.path, what)
        shown = self.join(name)
        current = name
        for _ in range(MAX_LINK_HOPS):
            try:
                fd = os.open(current, _READ_FLAGS | getattr(os, "O_NOFOLLOW", 0), dir_fd=self.fd)
            except FileNotFoundError:
                raise FileMissingError(f"{shown}: no such file; expected {what}") from None
            except OSError as e:
                try:
                    st = os.stat(current, dir_fd=self.fd, follow_symlinks=False)
                except OSError:
                    st = None
                if st is not None and stat.S_ISLNK(st.st_mode):
                    kind, where = self._follow(current, what)
                    if kind == "blob":
                        return self._open_blob(where, shown, what)
                    current = where
                    continue
                if st is not None and not stat.S_ISREG(st.st_mode):
                    raise _refuse_kind(shown, st.st_mode, what) from None
                raise FileReadError(f"{shown}: cannot be opened ({e.strerror or e}); expected {what}") from None
            return _regular_file(fd, shown, what)
        raise FileReadError(f"{shown}: too many levels of symbolic links; expected {what}")

    @staticmethod
    def _open_blob(path: str, shown: str, what: str) -> io.BufferedReader:
        try:
            fd = os.open(path, _READ_FLAGS | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise FileMissingError(f"{shown}: a symlink to {path}, which does not exist; expected {what}") from None
        except OSError as e:
            try:
                mode = os.stat(path, follow_symlinks=False).st_mode
            except OSError:
                mode = None
            if mode is not None and stat.S_ISLNK(mode):
                raise FileReadError(f"{shown}: a symlink to {path}, itself a symlink; {FOLDER_LINK_RULE}") from None
            if mode is not None and not stat.S_ISREG(mode):
                raise _refuse_kind(shown, mode, what) from None
            raise FileReadError(f"{shown}: cannot be opened ({e.strerror or e}); expected {what}") from None
        return _regular_file(fd, shown, what)

    def read_bytes(self, name: str, max_bytes: int | None, what: str = "a file") -> bytes:
        """The bytes of the file `name` (as `read_bytes`, opened through `open`)."""
        shown = self.join(name)
        with self.open(name, what) as f:
            return _read_limited(f, shown, max_bytes, what)

    def read_text(self, name: str, max_bytes: int | None, what: str = "a UTF-8 text file") -> str:
        return decode_utf8(self.read_bytes(name, max_bytes, what), self.join(name), what)

    def read_json(self, name: str, max_bytes: int | None, max_depth: int = MAX_JSON_DEPTH,
                  expect: type | None = None, what: str = "a JSON file") -> Any:
        return parse_json(self.read_text(name, max_bytes, what), self.join(name), max_depth=max_depth,
                          expect=expect, what=what)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Folder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def read_folder_text(path: str | os.PathLike, max_bytes: int | None, what: str = "a UTF-8 text file") -> str:
    """`read_text` of a file inside a checkpoint or processor folder: opened through `Folder` (its symlink rule)."""
    folder, name = os.path.split(os.fspath(path))
    with Folder(folder or ".") as f:
        return f.read_text(name, max_bytes, what)


def read_folder_json(path: str | os.PathLike, max_bytes: int | None, max_depth: int = MAX_JSON_DEPTH,
                     expect: type | None = None, what: str = "a JSON file") -> Any:
    """`read_json` of a file inside a checkpoint or processor folder: opened through `Folder` (its symlink rule)."""
    folder, name = os.path.split(os.fspath(path))
    with Folder(folder or ".") as f:
        return f.read_json(name, max_bytes, max_depth=max_depth, expect=expect, what=what)
