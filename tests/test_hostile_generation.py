"""Hostile generation, chat and command-line inputs, round two (issue 34): nothing lost, hung or silent.

`LIBRARY` (one test each): settings `generate`, `ChatSession`, speculative decoding, `KVCache` and `quantize`
used to accept with other tokens as the result, or to refuse with a raw error after the work had started. Each
must now raise the named error type naming the argument, before anything is compiled (`counting_compilations`
sees nothing) and within a few seconds (run in a thread with a deadline: no hang).

`CLI` (one test each): the command line refuses in one line on stderr naming the flag (exit status 1, no
traceback) before the model loads (`hub.load` fails the test): a device as --image, text that is not UTF-8, closed
stdout / stdin, a context beyond the model or the memory, a bad generation_config.json.

Then: two threads on one ChatSession (the second is refused by name, no turn lost), a turn too long for the cache
(the conversation is kept, the next turn reuses it), `gemma4-eqx chat` keeping the conversation (and skipping a
line of invalid UTF-8) instead of exiting, and a real process started with stdout closed.
"""

from __future__ import annotations

import importlib
import inspect
import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx import cli
from gemma4_eqx.assets import SMALL_CHECKPOINT, TINY_CHECKPOINT
from gemma4_eqx.generate.chat import ContextFullError, SessionBusyError
from gemma4_eqx.io import hub
from gemma4_eqx.model.drafter import PromptLookupDrafter
from gemma4_eqx.processing import TemplateBudgetError, TemplateLimits
from gemma4_eqx.quant.format import QuantConfig, QuantError
from gemma4_eqx.testing import counting_compilations

settings = importlib.import_module("gemma4_eqx.generate.settings")  # g4.generate is the function
SettingsError = settings.SettingsError

GREEDY = g4.GenerationConfig(temperature=0.0, stop_ids=(1, 106))
PROMPT = np.array([2, 5, 6, 7], np.int32)
DEADLINE = 30.0  # seconds: a refusal takes milliseconds; past this the call is taken to hang


@pytest.fixture(scope="module")
def model():
    return g4.load(TINY_CHECKPOINT)


@pytest.fixture(scope="module")
def proc():
    return g4.Processor.from_pretrained(TINY_CHECKPOINT)


def _within(seconds: float, fn):
    """fn() in a thread: (its exception or None); fails when it is still running after `seconds` (a hang)."""
    box: dict = {}

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return box.get("error")


def _chat(model, proc, **kw):
    return lambda: g4.ChatSession(model, proc, **{"generation_config": GREEDY, "max_new_tokens": 4,
                                                   "max_context": 64, **kw})


def _generate(model, prompt=PROMPT, **kw):
    return lambda: g4.generate(model, prompt, **{"max_new_tokens": 2, "generation_config": GREEDY, **kw})


def _unchecked(fn):
    """`fn` without the tests' beartype hook (tests/conftest.py), which refuses a value of the wrong type at the
    annotations, as users run it: then the package's own checks must refuse it by name."""
    return inspect.unwrap(fn)


def _generate_unchecked(model, **kw):
    return lambda: _unchecked(g4.generate)(model, PROMPT, **{"max_new_tokens": 2, "generation_config": GREEDY, **kw})


def _truncating(model, length):
    cache = g4.KVCache.init(model.config, max_len=8, dtype=jnp.float32)
    return lambda: _unchecked(g4.KVCache.truncate)(cache, length)


def _session_sending(model, proc, content, **kw):
    chat = g4.ChatSession(model, proc, generation_config=GREEDY, max_new_tokens=4, max_context=64, **kw)
    return lambda: chat.send(content)


# (id, setup(model, proc) -> the call that must fail (setup itself may do work), error type, message pattern)
LIBRARY = [
    # ChatSession validates as generate does (it accepted all of these: NaN sampled all zeros)
    ("chat temperature nan", lambda m, p: _chat(m, p, temperature=float("nan")), SettingsError, r"^temperature: "),
    ("chat temperature negative", lambda m, p: _chat(m, p, temperature=-0.5), SettingsError, r"^temperature: .*-0.5"),
    ("chat top_p 2", lambda m, p: _chat(m, p, top_p=2), SettingsError, r"^top_p: .*\(0, 1\].*found 2"),
    ("chat top_k -7", lambda m, p: _chat(m, p, top_k=-7), SettingsError, r"^top_k: .*found -7"),
    ("chat max_context 0", lambda m, p: _chat(m, p, max_context=0), SettingsError, r"^max_context: .*found 0"),
    ("chat max_context beyond the model", lambda m, p: _chat(m, p, max_context=10**9), SettingsError,
     r"^max_context: .*context of 262,144"),
    ("chat int8 cache dtype", lambda m, p: _chat(m, p, cache_dtype=jnp.int8), SettingsError,
     r"^cache_dtype: .*found int8.*int8=True"),
    ("chat max_new_tokens fills the context", lambda m, p: _chat(m, p, max_new_tokens=64), SettingsError,
     r"^max_new_tokens: 64 .*max_context of 64"),
    ("chat template_limits passed through", lambda m, p: _session_sending(
        m, p, "Hello", template_limits=TemplateLimits(max_steps=3)), TemplateBudgetError, r"max_steps"),
    # generate
    ("generate int8 cache dtype", lambda m, p: _generate(m, cache_dtype=jnp.int8), SettingsError,
     r"^cache_dtype: .*found int8"),
    ("generate suppresses the whole vocabulary", lambda m, p: _generate(m, suppress_ids=range(1024)), SettingsError,
     r"^suppress_ids: .*whole vocabulary of 1024"),
    ("generate empty prompt", lambda m, p: _generate(m, np.zeros((0,), np.int32)), ValueError, r"^prompt_ids: .*\[0\]"),
    ("generate batch of empty rows", lambda m, p: _generate(m, np.zeros((2, 0), np.int32)), ValueError,
     r"^prompt_ids: "),
    ("generate num_draft_tokens 0", lambda m, p: _generate(m, assistant=PromptLookupDrafter(),
                                                             num_draft_tokens=0), SettingsError,
     r"^num_draft_tokens: .*found 0"),
    ("generate num_draft_tokens 10**9", lambda m, p: _generate(m, assistant=PromptLookupDrafter(),
                                                                 num_draft_tokens=10**9), SettingsError,
     r"^num_draft_tokens: 1000000000 drafts do not fit .*at most 262139"),
    ("generate num_draft_tokens True", lambda m, p: _generate(m, assistant=PromptLookupDrafter(),
                                                                num_draft_tokens=True), SettingsError,
     r"^num_draft_tokens: "),
    ("generate temperature nan", lambda m, p: _generate(m, temperature=float("nan")), SettingsError, r"^temperature: "),
    ("generate top_k -7", lambda m, p: _generate(m, top_k=-7), SettingsError, r"^top_k: .*-7"),
    ("generate top_p 2", lambda m, p: _generate(m, top_p=2), SettingsError, r"^top_p: .*found 2"),
    ("generate stop id outside", lambda m, p: _generate(m, stop_ids=[5000]), SettingsError, r"^stop_ids: .*5000"),
    ("generate pad id -1", lambda m, p: _generate(m, pad_id=-1), SettingsError, r"^pad_id: .*-1"),
    ("generate max_new_tokens 0", lambda m, p: _generate(m, max_new_tokens=0), SettingsError,
     r"^max_new_tokens: .*found 0"),
    ("generate max_new_tokens beyond the model", lambda m, p: _generate(m, max_new_tokens=300_000), SettingsError,
     r"^max_new_tokens: the prompt \(4 tokens\) plus 300000 .*at most 262140"),
    # values of the wrong type (the tests' beartype hook would refuse them at the annotations; run as users do)
    ("generate num_draft_tokens None", lambda m, p: _generate_unchecked(
        m, assistant=PromptLookupDrafter(), num_draft_tokens=None), SettingsError, r"^num_draft_tokens: .*found None"),
    ("generate top_k 3.5", lambda m, p: _generate_unchecked(m, top_k=3.5), SettingsError, r"^top_k: .*3.5"),
    ("generate stop id 1.5", lambda m, p: _generate_unchecked(m, stop_ids=[1.5]), SettingsError,
     r"^stop_ids: .*1.5"),
    ("generate stop ids a string", lambda m, p: _generate_unchecked(m, stop_ids="1"), SettingsError, r"^stop_ids: "),
    ("generate max_new_tokens 2.5", lambda m, p: _generate_unchecked(m, max_new_tokens=2.5), SettingsError,
     r"^max_new_tokens: .*2.5"),
    ("generate do_sample 'no'", lambda m, p: _generate_unchecked(m, do_sample="no"), SettingsError,
     r"^do_sample: "),
    ("generate temperature True", lambda m, p: _generate_unchecked(m, temperature=True), SettingsError,
     r"^temperature: .*True"),
    # the cache
    ("KVCache int32 dtype", lambda m, p: lambda: g4.KVCache.init(m.config, max_len=8, dtype=jnp.int32), ValueError,
     r"^dtype: .*found int32.*int8=True"),
    ("KVCache truncate 3.7", lambda m, p: _truncating(m, 3.7), ValueError, r"^length: .*3.7"),
    ("KVCache truncate a float scalar", lambda m, p: _truncating(m, np.float32(3.0)), ValueError, r"^length: "),
    ("cache beyond the memory", lambda m, p: lambda: settings.check_max_context(
        m.config, 200_000, dtype="float32", memory=16 << 20), SettingsError,
     r"^max_context: .*at most [\d,]+ slots fit"),
    # quantization
    ("quantize scale_dtype potato", lambda m, p: lambda: g4.quantize(m, "int8", scale_dtype="potato"), QuantError,
     r"^scale_dtype: .*'potato'"),
    ("quantize embedding 'no'", lambda m, p: lambda: _unchecked(QuantConfig.make)(QuantConfig, "int8",
                                                                                   embedding="no"), QuantError,
     r"^embedding: .*'no'"),
    ("quantization_config embedding 'no'", lambda m, p: lambda: QuantConfig.from_json(
        {"quant_method": "gemma4_eqx", "mode": "int8", "group_size": None, "scale_dtype": "float32",
         "embedding": "no"}), QuantError, r"embedding: .*'no'"),
    ("quantization_config bits 8 mode int4", lambda m, p: lambda: QuantConfig.from_json(
        {"quant_method": "gemma4_eqx", "mode": "int4", "bits": 8, "group_size": 32, "scale_dtype": "float16",
         "embedding": False}), QuantError, r"bits: 8 contradicts mode 'int4'"),
]


@pytest.mark.parametrize("case, setup, error, pattern", LIBRARY, ids=[c[0] for c in LIBRARY])
def test_library_refuses_before_any_work(model, proc, case, setup, error, pattern):
    call = setup(model, proc)
    with counting_compilations() as compiled:
        e = _within(DEADLINE, call)
    assert isinstance(e, error), f"{case}: expected {error.__name__}, got {e!r}"
    message = str(e)
    assert re.search(pattern, message), message
    assert "\n" not in message.strip(), message
    assert compiled == [], f"{case}: {len(compiled)} programs compiled before the refusal"


def test_valid_settings_pass_as_before(model):
    """The sentinels and spellings callers use keep working: top_k -1 / top_p -1.0 from the config, None filters
    off, numpy ids, suppress ids outside the vocabulary ignored with a warning."""
    s = settings.SamplingSettings.resolve(model.config, GREEDY, top_k=None, top_p=None, stop_ids=np.array([1, 106]))
    assert (s.temperature, s.top_k, s.top_p, s.stop_ids) == (0.0, None, None, (1, 106))
    s = settings.SamplingSettings.resolve(model.config, None, temperature=0.7)
    assert (s.top_k, s.top_p, s.pad_id) == (64, 0.95, model.config.text.pad_token_id)
    with pytest.warns(UserWarning, match=r"suppress_ids: \[5000\] lie outside"):
        assert settings.SamplingSettings.checked(1024, temperature=0, suppress_ids=[3, 5000]).suppress_ids == (3,)
    with pytest.raises(SettingsError, match="key: sampling"):
        s.require_key(None)
    assert settings.check_cache_dtype(None, jnp.bfloat16) == jnp.bfloat16


# ---- the command line ----------------------------------------------------------------------------------------
@pytest.fixture()
def no_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(hub, "load", refuse)


def _folder_with(tmp_path, name: str, make) -> str:
    folder = tmp_path / "m"
    shutil.copytree(TINY_CHECKPOINT, folder)
    path = folder / name
    path.unlink(missing_ok=True)
    make(path)
    return str(folder)


def _small_memory(monkeypatch):
    monkeypatch.setattr(settings, "memory_bytes", lambda: 32 << 20)


# (id, argv or argv(tmp_path), flag or text the one line must name, patch(monkeypatch) or None)
CLI = [
    ("image is a device", ["generate", "--prompt", "hi", "--image", "/dev/zero"],
     "--image /dev/zero: not a regular file, it is a character device", None),
    ("image is a folder", ["generate", "--prompt", "hi", "--image", "/"],
     "--image /: not a regular file, it is a directory", None),
    ("prompt with an undecodable byte", ["generate", "--prompt", "caf\udce9"],
     "--prompt: not valid UTF-8 text (the byte 0xe9 at character 3)", None),
    ("prompt with a lone surrogate", ["generate", "--prompt", "x\ud800"],
     "--prompt: not valid UTF-8 text (a lone surrogate U+D800", None),
    ("system with an undecodable byte", ["chat", "--system", "\udcff"], "--system: not valid UTF-8", None),
    ("closed stdout", ["info"], "stdout is closed", lambda mp: mp.setattr(sys, "stdout", None)),
    ("closed stdin", ["chat"], "stdin is closed: chat reads", lambda mp: mp.setattr(sys, "stdin", None)),
    ("max context beyond the model", ["chat", "--max-context", "1000000000"],
     "argument --max-context: expected at most the model's context of 262,144", None),
    ("max context beyond the memory", ["chat", "--max-context", "200000"],
     "argument --max-context: a KV cache of 200,000 slots needs", _small_memory),
    ("max new tokens fill the context", ["chat", "--max-new-tokens", "600", "--max-context", "512"],
     "argument --max-new-tokens: 600 tokens per reply", None),
    ("max new tokens beyond the model", ["generate", "--prompt", "hi", "--max-new-tokens", "300000"],
     "argument --max-new-tokens: the prompt (", None),
    ("top-p 2", ["generate", "--prompt", "hi", "--top-p", "2"], "argument --top-p: expected a number in (0, 1]", None),
    ("top-k -7", ["chat", "--top-k", "-7"], "argument --top-k: expected an integer >= 0", None),
    ("temperature nan", ["chat", "--temperature", "nan"], "argument --temperature: expected a finite number", None),
    ("generation_config eos outside the vocabulary", lambda tmp: ["generate", "--prompt", "hi", "--model", _folder_with(
        tmp, "generation_config.json", lambda p: p.write_text('{"eos_token_id": [1, 5000]}'))],
     "generation_config.json: eos_token_id: [5000] lie outside the vocabulary", None),
    ("generation_config suppresses everything", lambda tmp: ["chat", "--model", _folder_with(
        tmp, "generation_config.json", lambda p: p.write_text(f'{{"suppress_tokens": {list(range(1024))}}}'))],
     "generation_config.json: suppress_tokens: the ids cover the whole vocabulary", None),
    ("generation_config is a FIFO", lambda tmp: ["generate", "--prompt", "hi", "--model", _folder_with(
        tmp, "generation_config.json", lambda p: os.mkfifo(p))],
     "generation_config.json: not a regular file, it is a FIFO", None),
]


@pytest.mark.parametrize("case, argv, named, patch", CLI, ids=[c[0] for c in CLI])
def test_cli_refuses_in_one_line_before_loading(no_load, tmp_path, monkeypatch, capsys, case, argv, named, patch):
    if callable(argv):
        argv = argv(tmp_path)
    if patch is not None:
        patch(monkeypatch)
    box = {}
    e = _within(DEADLINE, lambda: box.setdefault("status", cli.main(argv)))
    assert e is None, repr(e)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert box["status"] == 1 and captured.out == ""
    assert len(lines) == 1 and lines[0].startswith("gemma4-eqx: error: ") and named in lines[0], captured.err
    assert "Traceback" not in captured.err


# ---- a session: one turn at a time, nothing lost ------------------------------------------------------------
def test_two_threads_on_one_session_and_a_turn_too_long_lose_nothing(model, proc):
    chat = g4.ChatSession(model, proc, generation_config=GREEDY, max_new_tokens=10, max_context=128)
    first_token, tried = threading.Event(), threading.Event()
    seen: dict = {}

    def streamer(tokens):  # runs inside the first send, while it holds the session
        first_token.set()
        tried.wait(DEADLINE)

    def first():
        seen["reply"] = chat.send("Hello there", streamer=streamer)

    thread = threading.Thread(target=first, daemon=True)
    thread.start()
    assert first_token.wait(DEADLINE * 4), "the first turn never produced a token"
    for call in (lambda: chat.send("Me too"), chat.reset):
        with pytest.raises(SessionBusyError, match=r"ChatSession\.(send|reset): the session is busy"):
            call()
    tried.set()
    thread.join(DEADLINE * 4)
    assert not thread.is_alive() and "reply" in seen
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]  # the first turn, and only it

    before = [dict(m) for m in chat.messages]
    with pytest.raises(ContextFullError, match=r"^max_context: .*conversation is kept.*reset\(\)") as info:
        chat.send("word " * 120)
    assert info.value.max_context == 128 and info.value.tokens + 10 > 128
    assert chat.messages == before  # kept as it was
    with pytest.raises(SettingsError, match=r"^max_new_tokens: .*1\.\.10"):
        chat.send("Again", max_new_tokens=0)
    again = chat.send("Again")
    assert again.reused > 0 and [m["role"] for m in chat.messages] == ["user", "assistant"] * 2


def test_cli_chat_keeps_the_conversation_when_a_turn_is_too_long(monkeypatch, capsys):
    stdin = b"\xff\xfe not UTF-8\n" + b"word " * 200 + b"\n/quit\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    box = {}
    argv = ["chat", "--model", str(TINY_CHECKPOINT), "--max-new-tokens", "4", "--max-context", "64", "--temperature",
            "0"]
    assert _within(DEADLINE * 4, lambda: box.setdefault("status", cli.main(argv))) is None
    err = capsys.readouterr().err
    assert box["status"] == 0, err
    assert "line 1 of stdin is not valid UTF-8 (the byte 0xff at byte offset 0)" in err, err
    assert "[this turn does not fit" in err and "the conversation is kept" in err and "/reset" in err, err
    assert "reset()" not in err and "Traceback" not in err, err


def test_a_process_started_with_stdout_closed_says_so():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    # the shell closes descriptor 1 (>&-) before Python starts, which then has no sys.stdout at all
    out = subprocess.run(["sh", "-c", 'exec "$0" -m gemma4_eqx.cli info --model "$1" >&-', sys.executable,
                          str(SMALL_CHECKPOINT)], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=env, timeout=120, check=False)
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr.strip() == ("gemma4-eqx: error: stdout is closed: the command writes its output there; "
                                  "redirect it to a file or /dev/null instead of closing it"), out.stderr
    assert time.perf_counter() - t0 < 120
