"""The OpenAI wire format's replies: generated tokens turned into text as they arrive (whole UTF-8 characters,
stop strings), a streaming parser that splits a reply into content, reasoning and tool calls as it grows, and the
response objects (ids, usage, tool calls, logprobs in the chat and the completions forms). `serve.protocol` reads
the requests.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from ..processing import parse_response
from ..processing.chat_parser import ARGS_END, CALL_START, STOPS, THOUGHT_CLOSE, THOUGHT_OPEN


# ---- text out ------------------------------------------------------------------------------------------------------
class Detokenizer:
    """Token ids in, new text out, as they are produced: a token that ends inside a UTF-8 character is held back
    until the character completes. Decodes a short window, not the whole text, each time."""

    def __init__(self, tokenizer, skip_special_tokens: bool, drop_ids=()):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.drop = frozenset(int(i) for i in drop_ids)
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already released
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, tokens) -> str:
        self.ids.extend(int(t) for t in tokens if int(t) not in self.drop)
        return self._release(final=False)

    def flush(self) -> str:
        """What is held back (a character never completed comes out as U+FFFD)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        # decoded from `prefix`, so that a token's text (a leading space) reads as it does inside the sequence
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


class StopStrings:
    """Cuts the text at the first stop string; holds back an end that could still become one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.text = ""
        self.released = 0
        self.hit = False

    def push(self, piece: str, final: bool = False) -> str:
        if self.hit:
            return ""
        self.text += piece
        cut = min((at for at in (self.text.find(s, max(0, self.released - len(s) + 1)) for s in self.stops)
                   if at >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out = self.text[self.released:cut]
            self.text = self.text[:cut]
            self.released = cut
            return out
        hold = 0 if final else max((k for s in self.stops for k in range(1, len(s))
                                    if self.text.endswith(s[:k])), default=0)
        end = len(self.text) - hold
        out = self.text[self.released:end] if end > self.released else ""
        self.released = max(self.released, end)
        return out


def _partial_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper start of one of `markers`."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


class ReplyStream:
    """Splits a model turn into content, reasoning and tool calls while it is generated: `feed(text)` returns
    `[(kind, value)]` with kind "content" / "reasoning" (text pieces) or "tool_call" (a parsed call). The pieces
    join to what `parse_response` returns for the whole text (content stripped, thoughts joined by a newline); a
    marker cut in two, and whitespace that may end the content, wait for what follows."""

    MARKERS = (THOUGHT_OPEN, CALL_START) + STOPS

    def __init__(self, prefix: str = ""):
        self.text = ""
        self.pos = 0
        self.mode = "content"
        self.started = False  # content emitted yet (leading whitespace is dropped)
        self.space = ""  # whitespace held back at the end of the content
        self.thoughts = 0  # non-empty thoughts emitted
        self.thought_begun = False
        self.thought_newline = False  # a "\n" held back at the end of the current thought
        self.ended = False
        self.calls: list[dict] = []
        self.out: list[tuple[str, Any]] = []
        if prefix:
            self.feed(prefix)

    def _content(self, piece: str) -> None:
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return
            self.started = True
        piece = self.space + piece
        kept = piece.rstrip()
        self.space = piece[len(kept):]
        if kept:
            self.out.append(("content", kept))

    def _reasoning(self, piece: str, closing: bool) -> None:
        piece = ("\n" if self.thought_newline else "") + piece
        self.thought_newline = False
        if closing:
            piece = piece[:-1] if piece.endswith("\n") else piece
        elif piece.endswith("\n"):
            piece, self.thought_newline = piece[:-1], True
        if not piece:
            return
        if not self.thought_begun:
            self.thought_begun = True
            if self.thoughts:
                piece = "\n" + piece
            self.thoughts += 1
        self.out.append(("reasoning", piece))

    def feed(self, piece: str, final: bool = False) -> list[tuple[str, Any]]:
        if self.ended:
            return []
        self.text += piece
        text = self.text
        while True:
            if self.mode == "content":
                hits = [(at, m) for m in self.MARKERS if (at := text.find(m, self.pos)) >= 0]
                if not hits:
                    end = len(text) if final else len(text) - _partial_suffix(text[self.pos:], self.MARKERS)
                    self._content(text[self.pos:end])
                    self.pos = end
                    break
                at, marker = min(hits)
                self._content(text[self.pos:at])
                self.pos = at
                if marker in STOPS:
                    self.ended = True
                    break
                if marker == THOUGHT_OPEN:
                    self.pos += len(THOUGHT_OPEN)
                    self.mode, self.thought_begun = "header", False
                else:
                    self.mode = "call"
            elif self.mode == "header":
                rest = text[self.pos:]
                if not final and len(rest) < len("thought\n") and "thought\n".startswith(rest):
                    break
                self.pos += 8 if rest.startswith("thought\n") else 7 if rest.startswith("thought") else 0
                self.mode = "thought"
            elif self.mode == "thought":
                close = text.find(THOUGHT_CLOSE, self.pos)
                if close < 0:
                    end = len(text) if final else len(text) - _partial_suffix(text[self.pos:], (THOUGHT_CLOSE,))
                    self._reasoning(text[self.pos:end], closing=final)
                    self.pos = end
                    break
                self._reasoning(text[self.pos:close], closing=True)
                self.pos = close + len(THOUGHT_CLOSE)
                self.mode = "content"
            else:  # a tool call: parsed once it is closed
                end = text.find(ARGS_END, self.pos)
                if end < 0:
                    if final:  # never closed: the text stays content (as ChatSession keeps it)
                        self._content(text[self.pos:])
                        self.pos = len(text)
                    break
                segment = text[self.pos:end + len(ARGS_END)]
                self.pos = end + len(ARGS_END)
                self.mode = "content"
                try:
                    calls = parse_response(segment)["tool_calls"]
                except ValueError:
                    self._content(segment)
                    continue
                for call in calls:
                    self.calls.append(call)
                    self.out.append(("tool_call", call))
        out, self.out = self.out, []
        return out


def parse_reply(text: str) -> dict:
    """`parse_response`, keeping an unreadable reply (a cut-off tool call) as plain content."""
    try:
        return parse_response(text)
    except ValueError:
        return {"content": text.strip(), "reasoning": None, "tool_calls": []}


# ---- responses -----------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def openai_tool_call(call: dict, index: int | None = None) -> dict:
    fn = call["function"]
    out = {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
           "function": {"name": fn["name"], "arguments": json.dumps(fn["arguments"], ensure_ascii=False)}}
    if index is not None:
        out["index"] = index
    return out


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_logprobs(tokenizer, tokens, logprobs, top_ids, top_values, k: int) -> list[dict]:
    """The chat form: one entry per generated token, its top alternatives as a list."""
    piece = lambda t: tokenizer.decode([int(t)], skip_special_tokens=False)
    entry = lambda t, lp: {"token": piece(t), "logprob": float(lp), "bytes": list(piece(t).encode("utf-8"))}
    out = []
    for i, t in enumerate(tokens):
        e = entry(t, logprobs[i])
        e["top_logprobs"] = [entry(top_ids[i][j], top_values[i][j]) for j in range(k)]
        out.append(e)
    return out


def completion_logprobs(pieces: list[str], token_logprobs: list, tops: list) -> dict:
    """The completions form: parallel lists, offsets into the echoed text."""
    offsets, at = [], 0
    for p in pieces:
        offsets.append(at)
        at += len(p)
    return {"tokens": pieces, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
