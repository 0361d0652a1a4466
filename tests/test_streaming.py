"""Streaming: clean UTF-8 text token by token, and Ctrl-C ending a long generation promptly."""

import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx.generate.streaming import TextStreamer

TEXT = "héllo 😀 日本 wörld\nnext línea, ok ñ"


@pytest.fixture(scope="module")
def tokenizer():
    return g4.Processor.from_pretrained(g4.assets.TINY_CHECKPOINT).tokenizer


def _ids(tokenizer, text):
    return [int(i) for i in np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"]).reshape(-1)]


def test_multibyte_text_streams_exactly(tokenizer):
    ids = _ids(tokenizer, TEXT)
    assert "\ufffd" in "".join(tokenizer.decode([i]) for i in ids), "the text should need byte-fallback tokens"
    pieces = []
    streamer = TextStreamer(tokenizer, write=pieces.append)
    for i in ids:
        streamer(np.asarray([i]))
    streamer.end()
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert "héllo " in pieces and "😀 " in pieces  # released at word boundaries


def test_stop_ids_are_not_printed_and_tokens_are_counted(tokenizer):
    ids = _ids(tokenizer, "a b c ")
    pieces = []
    streamer = TextStreamer(tokenizer, write=pieces.append, stop_ids=(1,))
    for i in ids + [1]:
        streamer([i])
    streamer.end()
    assert "".join(pieces) == "a b c " and streamer.tokens == len(ids) + 1
    assert streamer.time_to_first_token is not None


def test_generate_streams_through_the_text_streamer(tokenizer):
    model = g4.load(g4.assets.TINY_CHECKPOINT)
    pieces = []
    streamer = TextStreamer(tokenizer, write=pieces.append, skip_special_tokens=False)
    out = g4.generate(model, np.arange(3, 20, dtype=np.int32), max_new_tokens=9, temperature=0.0, stop_ids=(),
                      streamer=streamer)
    streamer.end()
    assert "".join(pieces) == tokenizer.decode(np.asarray(out)) and streamer.tokens == 9


def test_cli_generate_ends_soon_after_ctrl_c():
    """A huge --max-new-tokens: SIGINT once tokens flow; the process must end within 5 s, keeping its output."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "gemma4_eqx.cli", "generate", "--prompt", "hi", "--max-new-tokens", "20000",
           "--temperature", "0", "--show-special"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = [], []
    readers = [threading.Thread(target=lambda s=s, b=b: b.extend(iter(lambda: s.read(1), b"")), daemon=True)
               for s, b in ((proc.stdout, out), (proc.stderr, err))]
    for r in readers:
        r.start()
    try:
        deadline = time.monotonic() + 600  # loading and compiling on a shared machine
        while not out and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert out, "no token was streamed: " + b"".join(err).decode()[-2000:]
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
    for r in readers:
        r.join(timeout=5)
    assert code == 130, b"".join(err).decode()[-2000:]
    assert "[interrupted]" in b"".join(err).decode() and "tokens/s" in b"".join(err).decode()


def test_generate_returns_what_was_streamed_when_interrupted():
    """The flag the SIGINT handler sets, raised from the streamer: generation stops and returns the tokens so far."""
    model = g4.load(g4.assets.TINY_CHECKPOINT)
    seen = []

    def streamer(tokens):
        seen.append(int(tokens[0]))
        if len(seen) == 5:
            signal.raise_signal(signal.SIGINT)

    # 200 new tokens: far more than the 5 before Ctrl-C, and the cache bucket (256 slots) of the test above, so the
    # programs it compiled are reused
    out = g4.generate(model, np.arange(3, 20, dtype=np.int32), max_new_tokens=200, temperature=0.0, stop_ids=(),
                      streamer=streamer, return_result=True)
    assert out.interrupted and 5 <= out.tokens.shape[0] < 200
    assert out.tokens.tolist() == seen


def test_without_a_streamer_ctrl_c_raises_keyboard_interrupt():
    model = g4.load(g4.assets.TINY_CHECKPOINT)
    calls = []

    def step(m, state, params):  # a swapped-in step that presses Ctrl-C while tracing the first chunk
        from gemma4_eqx.generate.loop import sample_step

        if not calls:
            calls.append(1)
            signal.raise_signal(signal.SIGINT)
        return sample_step(m, state, params)

    with pytest.raises(KeyboardInterrupt):
        g4.generate(model, np.arange(3, 20, dtype=np.int32), max_new_tokens=200, temperature=0.0, stop_ids=(),
                    step=step)  # 200: several decode chunks of 32 steps; Ctrl-C ends it after the first
