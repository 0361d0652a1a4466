"""Parse what the model wrote after `<|turn>model\\n`: the inverse of the chat template's model turn.

    <|channel>thought\\n REASONING \\n<channel|>            the thinking channel (absent, or empty when thinking is off)
    <|tool_call>call:NAME{key:value,...}<tool_call|>     zero or more tool calls
    ANSWER                                              the rest of the text
    <turn|> | <|tool_response> | <eos>                  where the turn stops (and a call waits for its result)

Tool-call arguments use the template's syntax: keys bare, strings between `<|"|>` quotes, `true` / `false` /
`null`, numbers, `[...]` lists and `{...}` mappings. `parse_response` returns the message in the form the chat
template takes back, so a reply can be appended to the conversation as it is:

    {"content": "It is sunny.", "reasoning": "..." or None,
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}

The reply is model output, so it may be anything: the parser runs in time linear in its input, without recursion
(nesting is held to MAX_ARGUMENT_DEPTH with an error naming the limit), and its errors quote at most a short
excerpt of the text.
"""

from __future__ import annotations

import bisect
import re
from typing import Any

import numpy as np
from jaxtyping import Integer

THOUGHT_OPEN = "<|channel>"
THOUGHT_CLOSE = "<channel|>"
CALL_OPEN = "<|tool_call>"
CALL_CLOSE = "<tool_call|>"
QUOTE = '<|"|>'
STOPS = ("<turn|>", "<|tool_response>", "<eos>")
CALL_START = CALL_OPEN + "call:"
ARGS_END = "}" + CALL_CLOSE
MAX_ARGUMENT_DEPTH = 256  # nesting of [...] and {...} in one call's arguments
EXCERPT = 80  # characters of the text an error message quotes at most
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_SPACE = re.compile(r"[ \t\n\r]*")
_KEY_CHARS = re.compile(r"[^:,{}\[\]]*")
_BARE_CHARS = re.compile(r"[^,}\]]*")


def excerpt(text: str, start: int = 0, width: int = EXCERPT) -> str:
    """repr of at most `width` characters of `text` from offset `start`, with "..." where it was cut."""
    start = max(0, start)
    piece = text[start:start + width]
    return ("..." if start > 0 else "") + repr(piece) + ("..." if start + width < len(text) else "")


def parse_response(text_or_ids: str | list[int] | Integer[np.ndarray, "seq"], tokenizer: Any = None) -> dict:
    """The reasoning, tool calls and answer of one model turn (text, or ids with `tokenizer` to decode them).

    Text before the turn (`<bos>`, the prompt) must not be included; a leading `<|turn>model\\n` is tolerated.
    Raises ValueError naming the problem (and quoting a short excerpt) when a tool call cannot be read.
    """
    if isinstance(text_or_ids, str):
        text = text_or_ids
    else:
        if tokenizer is None:
            raise TypeError("parse_response: token ids need tokenizer= (a gemma4_eqx Tokenizer or Processor) to decode them")
        text = tokenizer.decode(np.asarray(text_or_ids).tolist(), skip_special_tokens=False)
    if text.startswith("<|turn>model\n"):
        text = text[len("<|turn>model\n"):]
    ends = [at for at in (text.find(s) for s in STOPS) if at >= 0]
    if ends:
        text = text[: min(ends)]

    # The thinking channel(s): each <|channel>...<channel|> taken out of the text, its thought kept.
    thoughts, parts, pos = [], [], 0
    while True:
        start = text.find(THOUGHT_OPEN, pos)
        if start < 0:
            break
        parts.append(text[pos:start])
        start += len(THOUGHT_OPEN)
        close = text.find(THOUGHT_CLOSE, start)
        if close < 0:  # generation stopped inside the channel
            thought, pos = text[start:], len(text)
        else:
            thought, pos = text[start:close], close + len(THOUGHT_CLOSE)
        thought = thought[len("thought\n"):] if thought.startswith("thought\n") else thought.removeprefix("thought")
        thought = thought[:-1] if thought.endswith("\n") else thought
        if thought:
            thoughts.append(thought)
    parts.append(text[pos:])
    text = "".join(parts)
    reasoning = "\n".join(thoughts) if thoughts else None

    tool_calls, kept, pos = [], [], 0
    for start, brace, end in _tool_call_spans(text):
        name = text[start + len(CALL_START):brace].strip()
        if not name:
            raise ValueError(f"parse_response: a tool call without a name at offset {start}: "
                             f"{excerpt(text[start:end + len(ARGS_END)])}")
        tool_calls.append({"type": "function", "function": {"name": name,
                                                            "arguments": parse_arguments(text[brace + 1:end])}})
        kept.append(text[pos:start])
        pos = end + len(ARGS_END)
    kept.append(text[pos:])
    content = "".join(kept)
    unclosed = content.find(CALL_OPEN)
    if unclosed >= 0:
        raise ValueError(f"parse_response: a tool call was not closed with {CALL_CLOSE}: "
                         f"{excerpt(content[unclosed:unclosed + EXCERPT + 1])}")
    return {"content": content.strip(), "reasoning": reasoning, "tool_calls": tool_calls}


def _tool_call_spans(text: str) -> list[tuple[int, int, int]]:
    r"""(start, opening brace, closing brace) of each `<|tool_call>call:NAME{ARGS}<tool_call|>`, left to right and
    not overlapping: NAME runs to the first `{`, ARGS to the first `}<tool_call|>` after it (the regex
    `<\|tool_call>call:([^{]*)\{(.*?)\}<tool_call\|>` with re.S, found in one pass instead of one scan per start)."""
    spans, pos = [], 0
    while True:
        start = text.find(CALL_START, pos)
        if start < 0:
            return spans
        brace = text.find("{", start + len(CALL_START))
        if brace < 0:
            return spans  # no later call can have a brace either
        end = text.find(ARGS_END, brace + 1)
        if end < 0:
            return spans  # nor a closing one
        spans.append((start, brace, end))
        pos = end + len(ARGS_END)


def parse_arguments(text: str) -> dict:
    """`key:value,key:value` (the inside of a call's braces) -> a dict, read without recursion."""
    reader = _Reader(text)
    out = reader.arguments()
    reader.skip_space()
    if reader.pos != len(text):
        raise ValueError(f"parse_response: unexpected {excerpt(text, reader.pos)} at offset {reader.pos} of tool-call "
                         f"arguments of {len(text):,} characters")
    return out


class _Reader:
    """A reader of the template's argument syntax: an explicit stack of open mappings and lists, no recursion."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0
        self._quotes: list[int] | None = None
        self._good: list[int] | None = None

    def fail(self, what: str) -> ValueError:
        return ValueError(f"parse_response: {what} at offset {self.pos} of tool-call arguments "
                          f"{excerpt(self.text, self.pos - 20)}")

    def skip_space(self) -> None:
        self.pos = _SPACE.match(self.text, self.pos).end()

    def peek(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)

    def arguments(self) -> dict:
        """The top-level mapping (no braces around it). Each open `{` or `[` pushes (its container, its closing
        character, the key it will be stored under) on a stack; closing it pops and stores it in the one below."""
        root: dict = {}
        stack: list[tuple[Any, str | None, Any]] = []
        container: Any = root
        end: str | None = None
        key: Any = None
        state = "map_start"
        while True:
            if state == "map_start":  # just after `{` (or at the start): an empty mapping closes at once
                self.skip_space()
                if (end is None and self.pos == len(self.text)) or (end is not None and self.peek(end)):
                    state = "close"
                else:
                    state = "map_key"
            elif state == "map_key":
                self.skip_space()
                key = self.key()
                self.skip_space()
                if not self.peek(":"):
                    raise self.fail(f"expected ':' after the key {excerpt(key, 0, 40)}")
                self.pos += 1
                state = "value"
            elif state == "list_start":  # just after `[`
                self.skip_space()
                state = "close" if self.peek("]") else "value"
            elif state == "value":
                self.skip_space()
                if self.peek("{") or self.peek("["):
                    if len(stack) + 1 >= MAX_ARGUMENT_DEPTH:
                        raise self.fail(f"arguments nested deeper than {MAX_ARGUMENT_DEPTH} levels, the limit")
                    opening = self.text[self.pos]
                    self.pos += 1
                    stack.append((container, end, key))
                    if opening == "{":
                        container, end, state = {}, "}", "map_start"
                    else:
                        container, end, state = [], "]", "list_start"
                    continue
                state = self.store(container, key, self.scalar())
            elif state == "map_next":
                self.skip_space()
                if self.peek(","):
                    self.pos += 1
                    state = "map_key"
                elif end is None or self.peek(end):
                    state = "close"
                else:
                    raise self.fail("expected ',' or the end of the mapping")
            elif state == "list_next":
                self.skip_space()
                if self.peek(","):
                    self.pos += 1
                    state = "close" if self.peek("]") else "value"  # `[1,]` is [1]; no space skipped before `]`
                elif self.peek("]"):
                    state = "close"
                else:
                    raise self.fail("expected ',' or ']' in a list")
            else:  # close the current container
                if not stack:
                    return root
                self.pos += 1  # the `}` or `]`
                done = container
                container, end, key = stack.pop()
                state = self.store(container, key, done)

    @staticmethod
    def store(container: Any, key: Any, value: Any) -> str:
        if isinstance(container, dict):
            container[key] = value
            return "map_next"
        container.append(value)
        return "list_next"

    def key(self) -> str:
        if self.peek(QUOTE):
            return self.quoted()
        start = self.pos
        self.pos = _KEY_CHARS.match(self.text, self.pos).end()
        key = self.text[start:self.pos].strip()
        if not key:
            raise self.fail("expected a key")
        return key

    def _find_quotes(self) -> None:
        """Every `<|"|>` of the text, and for each the index of the first at or after it that the syntax can
        continue after (followed, past spaces, by `,`, `:`, `}`, `]` or the end): found once, in one pass."""
        text, quotes = self.text, []
        at = text.find(QUOTE)
        while at >= 0:
            quotes.append(at)
            at = text.find(QUOTE, at + len(QUOTE))
        good = [len(quotes)] * (len(quotes) + 1)
        for i in range(len(quotes) - 1, -1, -1):
            after = _SPACE.match(text, quotes[i] + len(QUOTE)).end()
            good[i] = i if after == len(text) or text[after] in ",:}]" else good[i + 1]
        self._quotes, self._good = quotes, good

    def quoted(self) -> str:
        """A `<|"|>`-quoted string. The string may itself hold the quote token (the template writes it as is),
        so the closing quote is the first one the syntax can continue after: one followed by `,`, `:`, `}`, `]`
        or the end (after spaces); failing that, the first one."""
        if self._quotes is None:
            self._find_quotes()
        self.pos += len(QUOTE)
        i = bisect.bisect_left(self._quotes, self.pos)
        if i == len(self._quotes):
            raise self.fail(f"a string opened with {QUOTE} is not closed")
        j = self._good[i]
        end = self._quotes[j] if j < len(self._quotes) else self._quotes[i]
        value, self.pos = self.text[self.pos:end], end + len(QUOTE)
        return value

    def scalar(self) -> Any:
        """A value that is no mapping or list: a quoted string, true / false / null, a number or a bare word."""
        if self.peek(QUOTE):
            return self.quoted()
        for word, value in (("true", True), ("false", False), ("null", None)):
            if self.peek(word) and not self._word_continues(len(word)):
                self.pos += len(word)
                return value
        number = _NUMBER.match(self.text, self.pos)
        if number and not self._word_continues(number.end() - self.pos):
            literal = number.group(0)
            if any(c in literal for c in ".eE"):
                self.pos = number.end()
                return float(literal)
            try:
                value = int(literal)
            except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits())
                raise self.fail(f"a number of {len(literal):,} digits, more than Python reads") from None
            self.pos = number.end()
            return value
        # A bare word (models sometimes drop the quotes): read up to the next separator.
        start = self.pos
        self.pos = _BARE_CHARS.match(self.text, self.pos).end()
        if start == self.pos:
            raise self.fail("expected a value")
        return self.text[start:self.pos].strip()

    def _word_continues(self, length: int) -> bool:
        end = self.pos + length
        return end < len(self.text) and self.text[end] not in ",}] \t\n\r"
