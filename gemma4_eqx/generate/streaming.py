"""Streaming generated tokens as clean text.

A byte-fallback tokenizer spells a character such as "é", "😀" or "日" over several tokens, one UTF-8 byte each;
decoded alone, a partial sequence comes out as U+FFFD. `TextStreamer` decodes everything since its last flush
and holds back a trailing U+FFFD until the character completes, and otherwise releases text at word boundaries
(whitespace), after CJK characters (which have no spaces between words) or once `max_hold` characters wait, as
transformers' `TextStreamer` does.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np

REPLACEMENT = "\ufffd"


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0xF900 <= cp <= 0xFAFF
            or 0x3040 <= cp <= 0x30FF or 0xAC00 <= cp <= 0xD7AF)


class TextStreamer:
    """`streamer=` for `g4.generate`: receives each step's tokens `[batch]` (row `row` is printed).

    `write(text)` gets the released pieces (default: stdout, flushed); `end()` releases what is held back.
    Tokens listed in `stop_ids` are not printed. Timing: `time_to_first_token` (from construction or `reset()`)
    and `tokens` (how many were received) let a caller report prefill and decode speed separately.
    """

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True, write: Callable[[str], None] | None = None,
                 row: int = 0, stop_ids=(), max_hold: int = 48):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.write = write or self._stdout
        self.row = row
        self.stop_ids = set(int(i) for i in stop_ids)
        self.max_hold = max_hold
        self.reset()

    @staticmethod
    def _stdout(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def reset(self) -> None:
        self.pending: list[int] = []  # token ids since the last release point
        self.released = 0  # characters of decode(pending) already written
        self.text = ""  # everything written so far
        self.tokens = 0
        self.start = time.perf_counter()
        self.first_token_at: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.start

    def __call__(self, tokens) -> None:
        token = int(np.asarray(tokens).reshape(-1)[self.row])
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.tokens += 1
        if token in self.stop_ids:
            return
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending, skip_special_tokens=self.skip_special_tokens)
        if text.endswith(REPLACEMENT):
            return  # an incomplete UTF-8 sequence: wait for its other bytes
        new = text[self.released:]
        cut = max(new.rfind(" "), new.rfind("\n"), new.rfind("\t"))
        if new and _is_cjk(new[-1]):
            cut = len(new) - 1
        if cut < 0 and len(new) < self.max_hold:
            return
        upto = len(new) if cut < 0 else cut + 1
        self._emit(new[:upto])
        self.released += upto
        if self.released == len(text) and text.endswith("\n"):
            self.pending, self.released = [], 0  # start afresh at a line end (decoding stays short)

    def end(self) -> None:
        """Release whatever is held back (an unfinished word; a dangling partial character stays U+FFFD)."""
        if self.pending:
            text = self.tokenizer.decode(self.pending, skip_special_tokens=self.skip_special_tokens)
            self._emit(text[self.released:])
        self.pending, self.released = [], 0

    def _emit(self, piece: str) -> None:
        if piece:
            self.text += piece
            self.write(piece)
