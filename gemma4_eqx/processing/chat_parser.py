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
"""

from __future__ import annotations

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
_CALL = re.compile(re.escape(CALL_OPEN) + r"call:(?P<name>[^{]*)\{(?P<args>.*?)\}" + re.escape(CALL_CLOSE), re.S)
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def parse_response(text_or_ids: str | list[int] | Integer[np.ndarray, "seq"], tokenizer: Any = None) -> dict:
    """The reasoning, tool calls and answer of one model turn (text, or ids with `tokenizer` to decode them).

    Text before the turn (`<bos>`, the prompt) must not be included; a leading `<|turn>model\\n` is tolerated.
    Raises ValueError naming the problem when a tool call cannot be read.
    """
    if isinstance(text_or_ids, str):
        text = text_or_ids
    else:
        if tokenizer is None:
            raise TypeError("parse_response: token ids need tokenizer= (a gemma4_eqx Tokenizer or Processor) to decode them")
        text = tokenizer.decode(np.asarray(text_or_ids).tolist(), skip_special_tokens=False)
    if text.startswith("<|turn>model\n"):
        text = text[len("<|turn>model\n"):]
    ends = [text.find(s) for s in STOPS if s in text]
    if ends:
        text = text[: min(ends)]

    reasoning = None
    parts = []
    rest = text
    while THOUGHT_OPEN in rest:
        before, _, after = rest.partition(THOUGHT_OPEN)
        parts.append(before)
        thought, closed, rest = after.partition(THOUGHT_CLOSE)
        if not closed:  # generation stopped inside the channel
            rest = ""
        thought = thought[len("thought\n"):] if thought.startswith("thought\n") else thought.removeprefix("thought")
        thought = thought[:-1] if thought.endswith("\n") else thought
        if thought:
            reasoning = thought if reasoning is None else reasoning + "\n" + thought
    parts.append(rest)
    text = "".join(parts)

    tool_calls = []
    for match in _CALL.finditer(text):
        name = match.group("name").strip()
        if not name:
            raise ValueError(f"parse_response: a tool call without a name: {match.group(0)!r}")
        tool_calls.append({"type": "function", "function": {"name": name, "arguments": parse_arguments(match.group("args"))}})
    content = _CALL.sub("", text)
    if CALL_OPEN in content:
        raise ValueError(f"parse_response: a tool call was not closed with {CALL_CLOSE}: {content[content.index(CALL_OPEN):]!r}")
    return {"content": content.strip(), "reasoning": reasoning, "tool_calls": tool_calls}


def parse_arguments(text: str) -> dict:
    """`key:value,key:value` (the inside of a call's braces) -> a dict."""
    reader = _Reader(text)
    out = reader.mapping_body(end=None)
    reader.skip_space()
    if reader.pos != len(text):
        raise ValueError(f"parse_response: unexpected {text[reader.pos:]!r} in tool-call arguments {text!r}")
    return out


class _Reader:
    """A small recursive reader of the template's argument syntax."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def fail(self, what: str) -> ValueError:
        return ValueError(f"parse_response: {what} at offset {self.pos} of tool-call arguments {self.text!r}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t\n\r":
            self.pos += 1

    def peek(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)

    def mapping_body(self, end: str | None) -> dict:
        out: dict = {}
        self.skip_space()
        if (end is None and self.pos == len(self.text)) or (end is not None and self.peek(end)):
            return out
        while True:
            self.skip_space()
            key = self.key()
            self.skip_space()
            if not self.peek(":"):
                raise self.fail(f"expected ':' after the key {key!r}")
            self.pos += 1
            out[key] = self.value()
            self.skip_space()
            if self.peek(","):
                self.pos += 1
                continue
            if end is None or self.peek(end):
                return out
            raise self.fail("expected ',' or the end of the mapping")

    def key(self) -> str:
        if self.peek(QUOTE):
            return self.quoted()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ":,{}[]":
            self.pos += 1
        key = self.text[start:self.pos].strip()
        if not key:
            raise self.fail("expected a key")
        return key

    def quoted(self) -> str:
        """A `<|"|>`-quoted string. The string may itself hold the quote token (the template writes it as is),
        so the closing quote is the first one the syntax can continue after: one followed by `,`, `:`, `}`, `]`
        or the end (after spaces); failing that, the first one."""
        self.pos += len(QUOTE)
        end = self.text.find(QUOTE, self.pos)
        if end < 0:
            raise self.fail(f"a string opened with {QUOTE} is not closed")
        first, candidate = end, end
        while candidate >= 0:
            rest = self.text[candidate + len(QUOTE):].lstrip(" \t\n\r")
            if not rest or rest[0] in ",:}]":
                end = candidate
                break
            candidate = self.text.find(QUOTE, candidate + len(QUOTE))
        else:
            end = first
        value, self.pos = self.text[self.pos:end], end + len(QUOTE)
        return value

    def value(self) -> Any:
        self.skip_space()
        if self.peek(QUOTE):
            return self.quoted()
        if self.peek("{"):
            self.pos += 1
            out = self.mapping_body(end="}")
            self.pos += 1
            return out
        if self.peek("["):
            self.pos += 1
            items: list = []
            self.skip_space()
            while not self.peek("]"):
                items.append(self.value())
                self.skip_space()
                if self.peek(","):
                    self.pos += 1
                elif not self.peek("]"):
                    raise self.fail("expected ',' or ']' in a list")
            self.pos += 1
            return items
        for word, value in (("true", True), ("false", False), ("null", None)):
            if self.peek(word) and not self._word_continues(len(word)):
                self.pos += len(word)
                return value
        number = _NUMBER.match(self.text, self.pos)
        if number and not self._word_continues(number.end() - self.pos):
            self.pos = number.end()
            literal = number.group(0)
            return float(literal) if any(c in literal for c in ".eE") else int(literal)
        # A bare word (models sometimes drop the quotes): read up to the next separator.
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ",}]":
            self.pos += 1
        if start == self.pos:
            raise self.fail("expected a value")
        return self.text[start:self.pos].strip()

    def _word_continues(self, length: int) -> bool:
        end = self.pos + length
        return end < len(self.text) and self.text[end] not in ",}] \t\n\r"
