"""g4.ChatSession: the cache kept between turns equals a from-scratch render; `gemma4-eqx chat` with piped input."""

import os
import subprocess
import sys

import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx.testing import counting_compilations


GREEDY = g4.GenerationConfig(temperature=0.0, stop_ids=(1, 106))
MEDIA_KW = {"images_kwargs": {"max_soft_tokens": 70}}


@pytest.fixture(scope="module")
def model():
    return g4.load(g4.assets.TINY_CHECKPOINT)


@pytest.fixture(scope="module")
def proc():
    return g4.Processor.from_pretrained(g4.assets.TINY_CHECKPOINT)


def _common_prefix(a, b):
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def test_three_turns_prefill_only_what_the_render_adds_and_equal_a_from_scratch_run(model, proc):
    image = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    chat = g4.ChatSession(model, proc, generation_config=GREEDY, max_new_tokens=10, max_context=512,
                          processor_kwargs=MEDIA_KW)
    turns = [[{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}],
             "Describe it in more detail.", "Thanks! One more word?"]
    previous = None
    for i, content in enumerate(turns):
        reply = chat.send(content)
        messages = chat.messages[:-1]  # the conversation as sent, before this reply was appended
        render = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          processor_kwargs=MEDIA_KW)
        ids = np.asarray(render["input_ids"])[0]
        if i == 0:
            assert reply.reused == 0 and reply.prefilled == len(ids)
        else:
            shared = _common_prefix(previous, ids)
            assert shared > len(previous) - 10  # the earlier prompt, image included, stays in the cache
            assert reply.reused == shared and reply.prefilled == len(ids) - shared
            assert (ids[shared:] != model.config.image_token_id).all()  # the image is not prefilled again
        scratch = g4.generate(model, **render, max_new_tokens=10, generation_config=GREEDY, return_result=True)
        np.testing.assert_array_equal(reply.tokens, scratch.sequences[0])
        previous = ids
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 3


def test_text_turns_of_every_length_share_one_prefill_program_and_equal_a_from_scratch_run():
    """Text turns prefill in fixed-size chunks padded on the right (then rolled back), so turns of new lengths
    compile nothing once the first has run. On the trained small checkpoint, whose greedy replies depend on the
    prompt (the tiny one repeats a token), each reply equals `g4.generate` on the whole render."""
    small = g4.load(g4.assets.SMALL_CHECKPOINT)
    sproc = g4.Processor.from_pretrained(g4.assets.SMALL_CHECKPOINT)
    chat = g4.ChatSession(small, sproc, generation_config=GREEDY, max_new_tokens=12, max_context=256)
    turns = ["Once upon a time", "and then the little dog ran all the way home to see", "Why?",
             "Tell me more about the old man who lived by the sea and his boat"]
    compiled, replies = [], []
    for content in turns:
        with counting_compilations() as seen:
            reply = chat.send(content)
        compiled.append(len(seen))
        replies.append(reply)
        render = sproc.apply_chat_template(chat.messages[:-1], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)
        scratch = g4.generate(small, **render, max_new_tokens=12, generation_config=GREEDY, return_result=True)
        np.testing.assert_array_equal(reply.tokens, scratch.sequences[0])
    assert len({r.prefilled for r in replies}) == len(turns)  # every turn prefilled a different number of tokens
    assert len({int(t) for r in replies for t in r.tokens}) > 5  # replies that depend on where they are read
    assert compiled[0] > 0 and compiled[1:] == [0] * (len(turns) - 1), compiled


def test_reset_forgets_the_conversation(model, proc):
    # The session sizes of the test above (its cache layout: its compiled decode loop and roll-back are reused) and
    # of the CLI test below, whose first turns ("Hello there", "Second try") prefill as many tokens as this one's.
    chat = g4.ChatSession(model, proc, generation_config=GREEDY, max_new_tokens=10, max_context=512)
    first = chat.send("Hello there")
    chat.send("Again")
    chat.reset()
    again = chat.send("Hello there")
    assert again.reused == 0 and chat.messages[0]["content"] == "Hello there"
    np.testing.assert_array_equal(first.tokens, again.tokens)


def test_a_conversation_longer_than_the_cache_is_refused(model, proc):
    chat = g4.ChatSession(model, proc, generation_config=GREEDY, max_new_tokens=4, max_context=32)
    with pytest.raises(ValueError, match="max_context"):
        chat.send("word " * 40)


def test_cli_chat_with_piped_input():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    stdin = "Hello there\n/reset\nSecond try\n/quit\nnever read\n"
    # the session sizes of the tests above: the child process finds their programs in the shared compilation cache
    out = subprocess.run([sys.executable, "-m", "gemma4_eqx.cli", "chat", "--max-new-tokens", "10", "--max-context",
                          "512", "--temperature", "0"], input=stdin, capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.count("tokens/s") == 2  # two replies, then /quit
    assert "[conversation reset]" in out.stderr
