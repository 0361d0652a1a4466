"""`g4.ChatSession`: a conversation that keeps its KV cache between turns.

Each `send` renders the whole conversation with the processor's chat template (as transformers'
`apply_chat_template` does, images / audio / video included), finds the longest common prefix of token ids with
what the cache holds, rolls the cache back to that prefix (`KVCache.truncate`) and prefills only the rest, then
decodes the reply with the same driver as `g4.generate`.

The official template renders an earlier model turn differently from the live reply (it drops the thinking
channel), so after each reply the cache is rolled back to the end of the prompt; the next turn's render then
adds the template's own rendering of that reply and the new user turn, and only those are prefilled. The cache
therefore always equals a from-scratch render of the conversation, and greedy replies equal re-running the
whole conversation from scratch (tests/test_chat.py).

Compiled once: a text turn is prefilled in chunks of a fixed size (`generation.PREFILL_CHUNKS`, at most
`max_new_tokens + 1`) over a row as long as the cache, padded on the right and rolled back over the padding, so
turns of every length share one prefill program per chunk size and one decode program. A turn that adds an
image, audio or video is prefilled as one chunk of exactly its new tokens (a chunk must not cut an image's
bidirectional block), which compiles once per such length.

    chat = g4.ChatSession(model, proc, generation_config=folder)
    reply = chat.send([{"type": "image", "image": "cat.png"}, {"type": "text", "text": "What is this?"}])
    reply.content, reply.reasoning, reply.tool_calls
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Any

import jax
import numpy as np

from ..model.cache import KVCache
from ..model.sharding import commit_like
from ..processing import parse_response
from .batching import MEDIA, soft_tokens
from .inputs import PREFILL_CHUNKS
from .loop import prefill_rows, run_decode, sample_step
from .settings import (
    SamplingSettings,
    SettingsError,
    check_cache_dtype,
    check_max_context,
    check_positive_int,
)


@dataclasses.dataclass(frozen=True)
class Reply:
    content: str
    reasoning: str | None
    tool_calls: list
    text: str  # the model's raw output (special tokens included)
    tokens: np.ndarray
    prefilled: int  # prompt tokens this turn prefilled (what the render added beyond the cached prefix)
    reused: int  # prompt tokens found in the cache
    interrupted: bool = False


class ContextFullError(ValueError):
    """A turn that does not fit the session's cache (`max_context`): nothing was prefilled, the conversation is kept
    as it was; `reset()`, a shorter turn or a session with a larger `max_context` goes on. `tokens`: the rendered
    conversation with the turn, `max_new_tokens`: the reply's room, `max_context`: the session's slots."""

    def __init__(self, message: str, *, tokens: int, max_new_tokens: int, max_context: int):
        super().__init__(message)
        self.tokens, self.max_new_tokens, self.max_context = tokens, max_new_tokens, max_context


class SessionBusyError(RuntimeError):
    """`send` or `reset` called while another call on the same session runs (another thread, or a streamer calling
    back into its session): a session is one conversation, one turn at a time."""


@functools.partial(jax.jit, donate_argnums=0)
def _truncate(cache: KVCache, length) -> KVCache:
    return jax.vmap(lambda c: c.truncate(length))(cache)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def _media_after(batch: dict, prefix: int, config) -> dict:
    """The media items whose placeholders lie after the first `prefix` tokens (the others are in the cache)."""
    ids = np.asarray(batch["input_ids"])[0]
    out = {}
    for token_attr, fields, count_field in MEDIA:
        if batch.get(fields[0]) is None:
            continue
        done = int((ids[:prefix] == getattr(config, token_attr)).sum())
        counts = [soft_tokens(count_field, item) for item in np.asarray(batch[count_field])]
        cum = np.concatenate([[0], np.cumsum(counts)])
        skip = int(np.searchsorted(cum, done))
        if skip >= len(cum) or cum[skip] != done:
            raise ValueError(f"{fields[0]}: the cached prefix ends inside a media item")
        if skip < len(counts):
            for f in fields:
                out[f] = np.asarray(batch[f])[skip:]
    return out


class ChatSession:
    """A multi-turn conversation on one model; `send(content)` returns a `Reply`.

    `generation_config`: defaults for stop ids, suppressed ids and sampling (a `GenerationConfig` or a checkpoint
    folder; see `g4.generate`). `max_context`: the cache's slots (prompt and replies of the whole conversation; at
    most the model's context, and a cache that fits the memory). `max_new_tokens`: per reply; the sliding layers
    keep that many spare ring slots so the reply can be rolled back. `enable_thinking`, `processor_kwargs` and
    `template_limits` (the chat template's render budget, `processing.TemplateLimits`) go to
    `apply_chat_template`. Every setting is checked here (`generate.settings`), before the cache is allocated.

    A turn too long for the cache raises `ContextFullError` and keeps the conversation; one session takes one turn
    at a time (`SessionBusyError` otherwise).
    """

    def __init__(self, model, processor, *, system: str | None = None, generation_config=None,
                 max_new_tokens: int = 256, max_context: int = 4096, enable_thinking: bool = False,
                 temperature: float | int | None = None, top_k: int | None = -1, top_p: float | int | None = -1.0,
                 key=None, cache_dtype=None, processor_kwargs: dict | None = None, template_limits=None):
        self.model, self.processor = model, processor
        self.settings = SamplingSettings.resolve(model.config, generation_config, temperature=temperature,
                                                 top_k=top_k, top_p=top_p)
        self.settings.require_key(key)
        self.temperature = self.settings.temperature
        self.stop_ids = self.settings.stop_ids
        self.max_new_tokens = check_positive_int(max_new_tokens, "max_new_tokens", "a positive number of tokens "
                                                 "per reply")
        self.cache_dtype = check_cache_dtype(cache_dtype, model.dtype)
        self.max_context = check_max_context(model.config, max_context, dtype=self.cache_dtype,
                                             spare=self.max_new_tokens)
        if self.max_new_tokens >= self.max_context:
            raise SettingsError(f"max_new_tokens: {self.max_new_tokens} new tokens per reply leave no room for a "
                                f"prompt in the session's max_context of {self.max_context} slots; expected fewer")
        self.params = self.settings.params()
        self.enable_thinking = enable_thinking
        self.processor_kwargs = processor_kwargs
        self.template_limits = template_limits
        self.key = jax.random.key(0) if key is None else key
        self.system = system
        self._busy = threading.Lock()
        self.reset()

    @contextlib.contextmanager
    def _one_turn(self, what: str):
        if not self._busy.acquire(blocking=False):
            raise SessionBusyError(f"ChatSession.{what}: the session is busy with another call (another thread, or a "
                                   "streamer calling back into it); a session takes one turn at a time: wait for the "
                                   "reply, or make one session per conversation")
        try:
            yield
        finally:
            self._busy.release()

    def reset(self) -> None:
        """Forget the conversation (the cache is emptied, not reallocated)."""
        with self._one_turn("reset"):
            self.messages: list[dict] = [] if self.system is None else [{"role": "system", "content": self.system}]
            self.cached = np.zeros((0,), np.int64)  # the token ids the cache holds
            self.cache = self._empty_cache()

    def _empty_cache(self) -> KVCache:
        # committed like the model, as every later cache is (the outputs of its programs): one prefill program
        cache = KVCache.init(self.model.config, max_len=self.max_context, dtype=self.cache_dtype, batch=1,
                             spare=self.max_new_tokens)
        return commit_like(cache, self.model)

    def render(self, messages: list[dict], add_generation_prompt: bool = True):
        return self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=True, return_dict=True,
                                                  enable_thinking=self.enable_thinking,
                                                  processor_kwargs=self.processor_kwargs,
                                                  template_limits=self.template_limits)

    def send(self, content: str | list[dict], *, streamer=None, max_new_tokens: int | None = None) -> Reply:
        """Add a user turn (text or content blocks), generate the reply, add it to the conversation.

        A turn that does not fit raises `ContextFullError` with the conversation kept as it was."""
        with self._one_turn("send"):
            return self._send(content, streamer, max_new_tokens)

    def _send(self, content, streamer, max_new_tokens) -> Reply:
        max_new = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if isinstance(max_new, bool) or not isinstance(max_new, (int, np.integer)) or not 0 < max_new <= \
                self.max_new_tokens:
            raise SettingsError(f"max_new_tokens: expected an integer in 1..{self.max_new_tokens} (the session's "
                                f"spare slots), found {max_new!r}")
        messages = self.messages + [{"role": "user", "content": content}]
        batch = self.render(messages)
        ids = np.asarray(batch["input_ids"])[0]
        if len(ids) + max_new > self.max_context:
            raise ContextFullError(f"max_context: the conversation ({len(ids)} tokens) plus {max_new} new tokens "
                                   f"exceeds the session's {self.max_context} slots; the conversation is kept as it "
                                   "was: call reset() to start over, send a shorter turn, or make a session with a "
                                   "larger max_context", tokens=len(ids), max_new_tokens=max_new,
                                   max_context=self.max_context)
        types = np.asarray(batch.get("mm_token_type_ids", np.zeros((1, len(ids)), np.int64)))[0]
        keep = min(_common_prefix(self.cached, ids), len(ids) - 1)
        vision = np.isin(types, (1, 2))
        while 0 < keep < len(ids) and vision[keep] and vision[keep - 1]:
            keep -= 1  # never resume inside an image: its block is bidirectional
        if keep < len(self.cached):
            rollback = len(self.cached) - keep
            if rollback > self.cache.spare + 1:  # cannot roll back that far: start from scratch
                self.cache = self._empty_cache()
                keep = 0
            else:
                self.cache = _truncate(self.cache, np.int32(keep))
            self.cached = self.cached[:keep]  # what the cache holds now, should this turn not finish
        new = len(ids) - keep  # positions continue the cache's
        media = _media_after(batch, keep, self.model.config)
        self.key, sub = jax.random.split(self.key)
        common = dict(max_len=self.max_context, mask_mode="intended", cache_dtype=self.cache_dtype, raw_keys=True)
        if media or vision[keep:].any():
            # one chunk of exactly the new tokens (a chunk must not cut an image): compiled per length
            part = {"input_ids": ids[None, keep:].astype(np.int32), "attention_mask": np.ones((1, new), bool)}
            if vision[keep:].any():
                part["mm_token_type_ids"] = types[None, keep:].astype(np.int32)
            part.update({k: v[None] for k, v in media.items()})
            state, first = prefill_rows(self.model, self.cache, jax.device_put(part), np.int32(0), np.int32(max_new),
                                    sub, self.params, chunk=None, bounds=((0, new),), **common)
        else:
            # Text: chunks of a fixed size over a row as long as the cache, padded on the right and rolled back
            # after, so turns of every length share one program per chunk size. The padding (< chunk) must fit
            # the ring's spare slots and the room left for the reply: chunk <= max_new + 1.
            chunk = max(c for c in PREFILL_CHUNKS if c <= min(new, max_new + 1))
            row = np.full((1, self.max_context), int(self.params.pad_id), np.int32)
            row[0, :new] = ids[keep:]
            part = {"input_ids": row, "attention_mask": np.arange(self.max_context)[None] < new}
            state, first = prefill_rows(self.model, self.cache, jax.device_put(part), np.int32(-(-new // chunk)),
                                    np.int32(max_new), sub, self.params, np.int32(new), chunk=chunk, bounds=None,
                                    **common)
        result, state = run_decode(self.model, state, first, self.params, max_new_tokens=max_new, streamer=streamer,
                                   step=sample_step, pad_id=int(self.params.pad_id))
        # roll the reply back out of the cache: the next render holds the template's own version of it
        self.cache = _truncate(state.cache, np.int32(len(ids)))
        self.cached = ids
        tokens = result.sequences[0]
        text = self.processor.tokenizer.decode(tokens, skip_special_tokens=False)
        parsed = self._parse(text)
        message = {"role": "assistant", "content": parsed["content"]}
        if parsed.get("tool_calls"):
            message["tool_calls"] = parsed["tool_calls"]
        self.messages = messages + [message]
        return Reply(content=parsed["content"], reasoning=parsed.get("reasoning"),
                     tool_calls=parsed.get("tool_calls") or [], text=text, tokens=tokens,
                     prefilled=new, reused=keep, interrupted=result.interrupted)

    def _parse(self, text: str) -> dict[str, Any]:
        try:
            return parse_response(text)
        except ValueError:  # an unreadable (e.g. cut-off) tool call: keep the text as the answer
            return {"content": text, "reasoning": None, "tool_calls": []}
