"""Continuous batching on the compiled generation loop: a fixed number of slots, each a row of one KV cache.

    engine = Engine(model, slots=8, max_context=4096, generation_config=folder)
    a = engine.submit(prompt_ids, max_new_tokens=64, temperature=0.0)
    b = engine.submit(other_ids, max_new_tokens=16, temperature=0.7, seed=1, on_update=print)
    engine.run_until_idle()                  # or engine.start(): a thread that serves until engine.stop()
    a.result().tokens, b.result().finish_reason

**State.** One `loop.DecodeState` over `slots` rows: the KV cache stacked over the slots, each row's last token,
count, `max_new` and its own PRNG key; a free slot is a row marked done. The sampling settings are
`SamplingParams.make_rows`: each row its own temperature, top-k, top-p, suppressed and stop ids, so a slot keeps
its request's settings. A row draws its tokens from its own key exactly as `g4.generate` draws a one-row batch,
so a request samples what `generate` samples for it alone with the same key, whatever else runs beside it
(greedy: the same tokens, up to the float rounding of a different cache layout).

**Scheduler** (host side, `step`): between two decode chunks it runs queued jobs (`call`: scoring), drops
cancelled requests (a waiting one leaves the queue; a running one's row is overwritten by a blank done row),
then admits waiting requests in arrival order while a slot is free: each is prefilled alone
(`loop.prefill_rows`, which also chooses its first token) and its row is written into the slot (`slots.place_row`,
donated: in place). Then one `loop.decode_chunk` over every slot, with the per-step function `slots.slot_step`; the
new tokens of each running row go to its request (`on_update`); a row that produced a stop id or its
`max_new_tokens` frees its slot at once. A chunk runs at most `decode_chunk` steps; it stops early once every row
is done, and, while requests wait, as soon as one running row finishes (`decode_chunk(until_freed=...)`).

**Compiled once** per (slots, cache bucket): the cache has `max_len = cache_bucket(max_context)` slots per row;
text prompts are left-padded to a multiple of `prefill_chunk` and prefilled in chunks of that size, the token
fields padded to `max_len`, so every text prompt shares one prefill program (the chunk count is traced); one
decode program, one program to write a row. A prompt with images or video is prefilled whole, padded to a power
of two (one program per such length and media shape, as in `g4.generate`). A request fits when its padded prompt
plus `max_new_tokens` fits `max_len`.

Finished rows keep stepping with the others (the batch is fixed); their cache is parked at slot 0 before each
step (`slots.park_finished`) so an idle row never runs past its cache. Speculative decoding (`assistant=`) is not
available here (its draft-verify loop is one program per batch in `speculative.py`): `Engine` refuses it by name.
Quantized models (`g4.quantize`) run as they do in `generate`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config.generation import GenerationConfig
from ..model.masks import TokenType
from ..model.sharding import commit_like
from .batching import TOKEN_FIELDS
from .inputs import MEDIA_FIELDS, as_batch, cache_bucket, check_prompt_ids, pad_rows, prompt_bucket
from .requests import EngineStopped, QueueFull, Request, RequestResult, Update
from .sampling import NUM_TOP, SamplingParams
from .settings import check_settings
from .slots import blank_row, decode_slots, empty_slots, place_row, prefill_one

PREFILL_CHUNK = 64  # text prompts: left-padded to a multiple of this and prefilled in chunks of it
ENGINE_DECODE_CHUNK = 16  # decode steps per compiled chunk: how long a freed slot or a new request may wait


# ---- the engine --------------------------------------------------------------------------------------------
class Engine:
    """Continuous batching over `slots` rows of one KV cache (see the module doc).

    `max_context`: cache slots per row (rounded up to a power of two, at least 256, capped at the model's
    context): a request's padded prompt plus its `max_new_tokens` must fit. `generation_config`: defaults for
    every request (a `GenerationConfig`, a checkpoint folder or a dict; else the model's config), as in
    `g4.generate`. `prefill_chunk`: text prompts are prefilled in chunks of this many tokens (one program for
    every length). `decode_chunk`: decode steps per compiled chunk (a finished row's slot is refilled, and a
    waiting request admitted, between two chunks). `max_queue`: requests that may wait while every slot is busy;
    beyond them `submit` raises `QueueFull`. `raw_keys`: keys-as-values layers store raw keys (`g4.KVCache.init`:
    half their cache, but every decode step rotates every row's whole context again, on a CPU batched most of a
    step); by default they store rotated K and V. `seed`: draws the keys of requests given no seed.
    """

    def __init__(self, model, *, slots: int = 8, max_context: int = 4096, generation_config=None,
                 prefill_chunk: int = PREFILL_CHUNK, decode_chunk: int = ENGINE_DECODE_CHUNK, max_queue: int = 1024,
                 cache_dtype=None, raw_keys: bool = False, seed: int = 0, assistant=None):
        if assistant is not None:
            raise TypeError("Engine: assistant= (speculative decoding) is not supported with continuous batching; "
                            "use g4.generate(..., assistant=) for one batch at a time")
        for name, value, lo in (("slots", slots, 1), ("max_context", max_context, 1),
                                ("prefill_chunk", prefill_chunk, 1), ("decode_chunk", decode_chunk, 1),
                                ("max_queue", max_queue, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
                raise ValueError(f"{name}: expected an integer >= {lo}, found {value!r}")
        cfg = model.config
        self.model = model
        self._leaves, self._treedef = jax.tree.flatten(model)
        self.slots = int(slots)
        self.max_len = cache_bucket(int(max_context), cfg.text.max_position_embeddings)
        if prefill_chunk > self.max_len:
            raise ValueError(f"prefill_chunk: {prefill_chunk} exceeds the cache's {self.max_len} slots")
        self.prefill_chunk = int(prefill_chunk)
        self.decode_chunk = int(decode_chunk)
        self.max_queue = int(max_queue)
        self.gen = GenerationConfig.resolve(generation_config, cfg)
        self.pad_id = int(cfg.text.pad_token_id if self.gen.pad_id is None else self.gen.pad_id)
        self.vocab = cfg.text.vocab_size
        self.cache_dtype = jnp.dtype(cache_dtype or model.dtype)
        self._compiled = dict(max_len=self.max_len, cache_dtype=self.cache_dtype, raw_keys=bool(raw_keys))
        self._rng = np.random.default_rng(seed)
        self.state = self._commit(empty_slots(model, jax.random.key(seed), slots=self.slots, **self._compiled))
        self._blank = self._commit(blank_row(model, jax.random.key(seed), **self._compiled))
        idle = dict(temperature=0.0, top_k=None, top_p=None, suppress_ids=(), stop_ids=(), pad_id=self.pad_id)
        self._idle_row = SamplingParams.host_row(self.vocab, **idle)
        self._host_params = {k: np.stack([v] * self.slots) for k, v in self._idle_row.items()}
        self._params: SamplingParams | None = None
        self._running: list[Request | None] = [None] * self.slots
        self._count = np.zeros(self.slots, np.int64)  # tokens each running row has delivered
        self._waiting: collections.deque[Request] = collections.deque()
        self._jobs: collections.deque[tuple[Callable, concurrent.futures.Future]] = collections.deque()
        self._lock = threading.Condition()
        self._submitted = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False
        self.stats = collections.Counter()  # prefills, decode chunks, decode steps, ...

    def _commit(self, tree):
        """Placed where the programs' outputs live (committed): jit keys its programs on it, so the state made
        here and the state after a step must agree, or the next call compiles again (see `commit_like`)."""
        tree = commit_like(tree, self.model)
        device = jax.devices()[0]
        return jax.tree.map(lambda x: jax.device_put(x, device) if isinstance(x, jax.Array) and not x.committed
                            else x, tree)

    # ---- submitting ------------------------------------------------------------------------------------
    def submit(self, prompt_ids, *, max_new_tokens: int | None = None, temperature: float | int | None = None,
               top_k: int | None = -1, top_p: float | int | None = -1.0, stop_ids=None, suppress_ids=None,
               seed: int | None = None, key=None, logprobs: bool = False,
               on_update: Callable[[Update], None] | None = None, mm_token_type_ids=None, **media) -> Request:
        """Queue one request (a 1-D prompt; media keywords as `g4.generate` takes them for one prompt); returns
        its `Request`. Unset settings come from the engine's generation config (`top_k=-1`, `top_p=-1.0`: its
        values); `max_new_tokens=None`: as many as the cache leaves. `seed` or `key`: the request's PRNG key
        (`jax.random.key(seed)`; neither: one drawn from the engine's seed). Checked here: a bad setting, a prompt
        out of the vocabulary or too long raises ValueError before anything is queued."""
        unknown = [k for k in media if k not in MEDIA_FIELDS]
        if unknown:
            raise TypeError(f"submit: unexpected keyword {unknown[0]!r}; media keywords are {', '.join(MEDIA_FIELDS)}")
        ids = np.asarray(prompt_ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"prompt_ids: expected one non-empty row of token ids [seq], found shape "
                             f"{list(ids.shape)}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"prompt_ids: expected integer token ids, found dtype {ids.dtype}")
        gen = self.gen
        temperature = gen.temperature if temperature is None else temperature
        top_k = gen.top_k if top_k == -1 else top_k
        top_p = gen.top_p if top_p == -1.0 else top_p
        stop_ids = tuple(int(i) for i in (gen.stop_ids if stop_ids is None else stop_ids))
        suppress_ids = tuple(int(i) for i in (gen.suppress_ids if suppress_ids is None else suppress_ids))
        media = {k: np.asarray(v)[None] for k, v in media.items() if v is not None}
        types = None if mm_token_type_ids is None else np.asarray(mm_token_type_ids)[None]
        if types is not None and types.shape != (1, ids.size):
            raise ValueError(f"mm_token_type_ids: expected shape [{ids.size}] like prompt_ids, found "
                             f"{list(types.shape[1:])}")
        check_prompt_ids(self.model, ids[None], media)
        batch = as_batch(self.model, ids[None], None, None, {"mm_token_type_ids": types, **media})
        vision = "mm_token_type_ids" in batch and bool(np.isin(batch["mm_token_type_ids"],
                                                               (TokenType.IMAGE, TokenType.VIDEO)).any())
        seq = ids.size
        p, chunk = self.prompt_bucket(seq, vision)
        room = self.max_len - p
        if room <= 0:
            raise ValueError(f"prompt_ids: a prompt of {seq} tokens (padded to {p}) leaves no room in the engine's "
                             f"cache of {self.max_len} slots per row (max_context)")
        if max_new_tokens is None:
            max_new_tokens = room
        check_settings(self.model, temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=stop_ids,
                       suppress_ids=suppress_ids, pad_id=self.pad_id, max_new_tokens=max_new_tokens,
                       prompt_length=seq)
        if max_new_tokens > room:
            raise ValueError(f"max_new_tokens: the prompt ({seq} tokens, padded to {p}) plus {max_new_tokens} new "
                             f"tokens exceed the engine's cache of {self.max_len} slots per row (max_context); at "
                             f"most {room} new tokens fit")
        padded = pad_rows(batch, p, self.pad_id, vision)
        if not vision:
            padded.pop("mm_token_type_ids", None)  # the text-only program (banded sliding attention)
            padded = {k: (np.pad(v, [(0, 0), (0, self.max_len - p)]) if k in TOKEN_FIELDS else v)
                      for k, v in padded.items()}
        if key is None:
            key = jax.random.key(int(self._rng.integers(2**31)) if seed is None else seed)
        settings = dict(temperature=float(temperature), top_k=top_k, top_p=top_p, suppress_ids=suppress_ids,
                        stop_ids=stop_ids, pad_id=self.pad_id)
        with self._lock:
            if self._stopping or self._draining:
                raise EngineStopped("the engine is stopping: it takes no new requests")
            free = sum(r is None for r in self._running)
            if len(self._waiting) >= self.max_queue + free:
                raise QueueFull(f"every slot is busy and {len(self._waiting) - free} requests already wait for one "
                                f"(max_queue {self.max_queue})")
            self._submitted += 1
            request = Request(self, self._submitted, padded, seq, p // chunk, chunk, int(max_new_tokens), settings,
                              key, bool(logprobs), on_update)
            self._waiting.append(request)
            self._lock.notify_all()
        return request

    def prompt_bucket(self, length: int, vision: bool = False) -> tuple[int, int]:
        """(padded length, prefill chunk) of a prompt of `length` tokens (`vision`: it holds image or video soft
        tokens); `max_len` minus the padded length is how many new tokens fit after it."""
        if vision:
            return prompt_bucket(length, True)
        return -(-length // self.prefill_chunk) * self.prefill_chunk, self.prefill_chunk

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn()` between two decode chunks (in the engine's thread once started; else at the next `step`),
        e.g. `g4.score` on the same model, so device work is never interleaved; returns a Future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._stopping:
                raise EngineStopped("the engine is stopped")
            self._jobs.append((fn, future))
            self._lock.notify_all()
        return future

    def warmup(self) -> None:
        """Compile the text programs now (prefill, writing a row, a decode chunk; the state is left with every
        slot free), so that the first request waits for none of them. Call it before `start()`."""
        if self._thread is not None or not self.idle:
            raise RuntimeError("warmup: call it on an idle engine before start()")
        bos = self.model.config.text.bos_token_id
        probe = self.submit(np.array([bos if bos is not None else self.pad_id], np.int32), max_new_tokens=2,
                            temperature=0.0, stop_ids=())
        self.run_until_idle()
        probe.result()
        self.stats.clear()

    # ---- state ---------------------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return sum(r is not None for r in self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        return not (self._waiting or self._jobs or any(r is not None for r in self._running))

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # ---- the scheduler ---------------------------------------------------------------------------------
    def step(self) -> bool:
        """One round: jobs, cancellations, admissions, then one decode chunk over the slots. Returns whether work
        is left (waiting or running requests, jobs)."""
        self._run_jobs()
        self._reap_cancelled()
        self._admit()
        if any(r is not None for r in self._running):
            self._decode()
        return not self.idle

    def run_until_idle(self) -> None:
        """Step until no request waits or runs (without the thread)."""
        while self.step():
            pass

    def _run_jobs(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    return
                fn, future = self._jobs.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # noqa: BLE001 (handed to the caller)
                    future.set_exception(e)

    def _finish(self, request: Request, reason: str, error: BaseException | None = None) -> None:
        if not request.done:
            request._deliver(Update(np.zeros((0,), np.int32), finished=True, finish_reason=reason, error=error))

    def _reap_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in self._waiting if r.cancelled]
            for r in gone:
                self._waiting.remove(r)
        for r in gone:
            self._finish(r, "cancelled")
        for slot, r in enumerate(self._running):
            if r is not None and r.cancelled:
                self._release(slot)
                self._finish(r, "cancelled")

    def _release(self, slot: int) -> None:
        """Free a running slot now: a blank done row over it (a row that finished by itself is already done)."""
        self.state = place_row(self.state, self._blank, np.int32(slot))
        self._free_slot(slot)

    def _free_slot(self, slot: int) -> None:
        self._running[slot] = None
        for k, v in self._idle_row.items():
            self._host_params[k][slot] = v
        self._params = None

    def _admit(self) -> None:
        while True:
            with self._lock:
                free = [s for s, r in enumerate(self._running) if r is None]
                if not free or not self._waiting:
                    return
                request = self._waiting.popleft()
                slot = free[0]
                self._running[slot] = request  # the slot is taken while it prefills (`submit` counts it busy)
            if request.cancelled:
                self._running[slot] = None
                self._finish(request, "cancelled")
                continue
            try:
                self._prefill(request, slot)
            except Exception as e:  # noqa: BLE001 (the request fails, the engine goes on)
                self._running[slot] = None
                self._finish(request, "error", e)

    def _prefill(self, request: Request, slot: int) -> None:
        params = SamplingParams.make(self.vocab, **request.settings)
        row, first = prefill_one(self._leaves, self._treedef, jax.device_put(request.batch),
                                 np.int32(request.n_chunks), np.int32(request.max_new_tokens), request.key, params,
                                 chunk=request.chunk, **self._compiled)
        self.stats["prefills"] += 1
        self.stats["prefill_tokens"] += request.n_chunks * request.chunk
        first = jax.tree.map(lambda x: np.asarray(x)[:, None], first)  # [1, 1, ...]: one row, one step
        done = bool(np.asarray(row.done)[0])
        reason = self._reason(request, int(first.token[0, 0])) if done else None
        if done:  # its only token: the slot was never written
            self._running[slot] = None
            request._deliver(self._update(request, first, 0, 1, done, reason))
            return
        self.state = place_row(self.state, row, np.int32(slot))
        request.slot = slot
        self._count[slot] = 1
        for k, v in SamplingParams.host_row(self.vocab, **request.settings).items():
            self._host_params[k][slot] = v
        self._params = None
        request._deliver(self._update(request, first, 0, 1, False, None))

    def _reason(self, request: Request, last: int) -> str:
        return "stop" if last in request.stop_ids else "length"

    def _update(self, request: Request, out, row: int, n: int, finished: bool, reason: str | None) -> Update:
        tokens = np.asarray(out.token[row, :n], np.int32)
        if not request.want_logprobs:
            return Update(tokens, finished=finished, finish_reason=reason)
        return Update(tokens, np.asarray(out.logprob[row, :n]), np.asarray(out.top_ids[row, :n]),
                      np.asarray(out.top_logprobs[row, :n]), finished=finished, finish_reason=reason)

    def _steps(self) -> int:
        left = [r.max_new_tokens - int(self._count[s]) for s, r in enumerate(self._running) if r is not None]
        return max(1, min(self.decode_chunk, max(left)))

    def _decode(self) -> None:
        if self._params is None:
            self._params = SamplingParams(**{k: jax.device_put(v) for k, v in self._host_params.items()})
        steps = self._steps()
        try:
            # requests wait for a slot: the chunk ends as soon as a running row finishes (its slot is free)
            self.state, out, n = decode_slots(self._leaves, self._treedef, self.state, self._params,
                                              np.int32(steps), np.bool_(bool(self._waiting)), size=self.decode_chunk)
            out = jax.tree.map(np.asarray, out)
            n = int(n)
            count = np.asarray(self.state.count)
            done = np.asarray(self.state.done)
        except Exception as e:  # noqa: BLE001 (every running request fails; the slots start afresh)
            self.state = self._commit(empty_slots(self.model, jax.random.key(0), slots=self.slots, **self._compiled))
            for slot, r in enumerate(self._running):
                if r is not None:
                    self._free_slot(slot)
                    self._finish(r, "error", e)
            return
        self.stats["decode_chunks"] += 1
        self.stats["decode_steps"] += n
        for slot, r in enumerate(self._running):
            if r is None:
                continue
            new = int(count[slot] - self._count[slot])
            self._count[slot] = count[slot]
            finished = bool(done[slot])
            reason = None
            if finished:
                last = int(out.token[slot, new - 1]) if new else (r.tokens[-1] if r.tokens else -1)
                reason = self._reason(r, last)
                self._free_slot(slot)  # a done row is a free slot
            r._deliver(self._update(r, out, slot, new, finished, reason))

    # ---- the thread ------------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Serve from a background thread until `stop()`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="gemma4-eqx-engine", daemon=True)
            self._thread.start()
        return self

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and self.idle:
                    if self._draining:
                        self._stopping = True
                        break
                    self._lock.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 (a bug: every request fails with it, the thread goes on)
                self._fail_all(e)
        for slot, r in enumerate(self._running):
            if r is not None:
                self._free_slot(slot)
                self._finish(r, "cancelled")
        with self._lock:
            left, self._waiting = list(self._waiting), collections.deque()
            jobs, self._jobs = list(self._jobs), collections.deque()
        for r in left:
            self._finish(r, "cancelled")
        for _, future in jobs:
            future.cancel()

    def _fail_all(self, error: BaseException) -> None:
        self.state = self._commit(empty_slots(self.model, jax.random.key(0), slots=self.slots, **self._compiled))
        for slot, r in enumerate(self._running):
            if r is not None:
                self._free_slot(slot)
                self._finish(r, "error", error)
        with self._lock:
            left, self._waiting = list(self._waiting), collections.deque()
        for r in left:
            self._finish(r, "error", error)

    def stop(self, *, drain: bool = True, timeout: float | int | None = None) -> None:
        """Stop the thread. `drain=True`: no new requests, those queued and running finish first; `drain=False`:
        they end now as cancelled."""
        with self._lock:
            if drain:
                self._draining = True
            else:
                self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None


__all__ = ["ENGINE_DECODE_CHUNK", "Engine", "EngineStopped", "NUM_TOP", "PREFILL_CHUNK", "QueueFull", "Request",
           "RequestResult", "Update", "decode_slots", "place_row", "prefill_one"]
