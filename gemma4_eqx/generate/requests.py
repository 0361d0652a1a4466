"""A request of the continuous-batching engine (`generate.engine.Engine`): the handle `submit` returns (wait for
it, cancel it), the `Update`s its `on_update` callback receives as tokens arrive, and the `RequestResult` it ends
with; the errors `submit` raises when the queue is full or the engine stopped."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import numpy as np


class QueueFull(RuntimeError):
    """`submit` while `max_queue` requests already wait for a slot."""


class EngineStopped(RuntimeError):
    """`submit` after `stop()` (or while draining)."""


@dataclasses.dataclass(frozen=True)
class Update:
    """What a request's `on_update` receives: the tokens produced since the last update (the prefill's first
    token, or one decode chunk's), with their log-probs when the request asked for them."""

    tokens: np.ndarray  # [n] int32
    logprobs: np.ndarray | None = None  # [n]: log_softmax of the model's logits at each token
    top_ids: np.ndarray | None = None  # [n, NUM_TOP]
    top_logprobs: np.ndarray | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" (a stop id), "length" (max_new_tokens), "cancelled", "error"
    error: BaseException | None = None


@dataclasses.dataclass(frozen=True)
class RequestResult:
    tokens: np.ndarray  # every new token, the stop id included when one ended the request
    finish_reason: str
    logprobs: np.ndarray | None
    top_ids: np.ndarray | None
    top_logprobs: np.ndarray | None
    prompt_tokens: int
    submitted_at: float
    first_token_at: float | None
    finished_at: float


class Request:
    """A submitted request (the handle `submit` returns): `result()` waits for it, `cancel()` withdraws it."""

    def __init__(self, engine: Any, number: int, batch: dict, prompt_length: int, n_chunks: int, chunk: int,
                 max_new_tokens: int, settings: dict, key, logprobs: bool, on_update):
        self.engine, self.number = engine, number
        self.batch, self.prompt_length, self.n_chunks, self.chunk = batch, prompt_length, n_chunks, chunk
        self.max_new_tokens, self.settings, self.key = max_new_tokens, settings, key
        self.want_logprobs, self.on_update = logprobs, on_update
        self.stop_ids = frozenset(settings["stop_ids"])
        self.tokens: list[int] = []
        self.pieces: list[Update] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.slot: int | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Withdraw the request: it leaves the queue, or its slot is freed before the next decode chunk."""
        if not self.done:
            self.cancelled = True
            self.engine._wake()

    def wait(self, timeout: float | int | None = None) -> bool:
        return self._done.wait(timeout)

    def result(self, timeout: float | int | None = None) -> RequestResult:
        """Wait for the request to finish (a cancelled one returns what it produced); raises the error of a
        request that failed."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.number}: not finished after {timeout} s")
        if self.error is not None:
            raise self.error
        cat = lambda name: (np.concatenate([getattr(p, name) for p in self.pieces]) if self.want_logprobs and
                            self.pieces else None)
        return RequestResult(tokens=np.asarray(self.tokens, np.int32), finish_reason=self.finish_reason,
                             logprobs=cat("logprobs"), top_ids=cat("top_ids"), top_logprobs=cat("top_logprobs"),
                             prompt_tokens=self.prompt_length, submitted_at=self.submitted_at,
                             first_token_at=self.first_token_at, finished_at=self.finished_at)

    # ---- called by the engine (its thread) ---------------------------------------------------------------
    def _deliver(self, update: Update) -> None:
        if update.tokens.size and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.tokens.extend(int(t) for t in update.tokens)
        self.pieces.append(update)
        if update.finished:
            self.finish_reason, self.error = update.finish_reason, update.error
            self.finished_at = time.perf_counter()
            self.batch = None  # the prompt's arrays are no longer needed
        if self.on_update is not None:
            self.on_update(update)
        if update.finished:
            self._done.set()
