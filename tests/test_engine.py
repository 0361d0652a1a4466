"""The continuous-batching engine (`gemma4_eqx.generate.engine`) on the trained small checkpoint: each request,
whatever runs beside it and whenever it arrives, gets what `g4.generate` gives it alone (greedy: its tokens;
sampled: the same draws from the same key), with its own settings, stop ids and lengths; slots are freed at
once; 50 requests arriving at random compile nothing after the first. The server's tests (test_serve*.py) run
the same engine behind HTTP."""

import jax
import numpy as np
import pytest

import gemma4_eqx as g4
from gemma4_eqx.generate.engine import Engine, EngineStopped, QueueFull
from gemma4_eqx.testing import counting_compilations

PATH = g4.assets.SMALL_CHECKPOINT


@pytest.fixture(scope="module")
def model():
    return g4.load(PATH)


@pytest.fixture(scope="module")
def prompts(model):
    """Prompts of 3..120 tokens from the held-out text (a <bos> first), deterministic."""
    tok = g4.Processor.from_pretrained(PATH).tokenizer
    words = (PATH / "heldout.txt").read_text().split()
    rng = np.random.default_rng(0)
    out = []
    for _ in range(50):
        start, n = int(rng.integers(0, len(words) - 200)), int(rng.integers(3, 120))
        ids = tok.encode(" ".join(words[start:start + n]), add_special_tokens=False)[:n]
        out.append(np.asarray([2] + ids, np.int32))
    return out


@pytest.fixture(scope="module")
def engine(model):
    eng = Engine(model, slots=4, max_context=512, generation_config=PATH)
    eng.warmup()
    return eng


def reference(model, prompt, spec):
    out = g4.generate(model, prompt, max_new_tokens=spec["max_new_tokens"], temperature=spec["temperature"],
                      top_k=spec.get("top_k", -1), top_p=spec.get("top_p", -1.0), stop_ids=spec.get("stop_ids"),
                      key=jax.random.key(spec.get("seed", 0)), generation_config=PATH, return_result=True)
    return out.sequences[0]


def test_random_arrivals_match_generate_and_compile_nothing(model, prompts, engine):
    """50 requests (mixed greedy and sampled settings, stop ids, lengths) submitted at random points between
    scheduler steps over 4 slots: each equals `g4.generate` for it alone, and after the first request of the cache
    bucket nothing compiles (the engine's programs: prefill, writing a row, one decode chunk)."""
    rng = np.random.default_rng(1)
    specs = []
    for i in range(50):
        temperature = float(rng.choice([0.0, 0.0, 0.8]))
        spec = dict(max_new_tokens=int(rng.integers(1, 48)), temperature=temperature, seed=i,
                    stop_ids=[1, 106] + ([274] if i % 3 == 0 else []))  # 274: "\n", common in this text
        if temperature:
            spec.update(top_k=int(rng.choice([0, 20])), top_p=float(rng.choice([1.0, 0.9])))
        specs.append(spec)
    requests = []
    with counting_compilations() as seen:
        requests.append(engine.submit(prompts[0], **specs[0]))
        engine.run_until_idle()
        first = len(seen)
        i = 1
        while i < 50 or not engine.idle:
            while i < 50 and rng.random() < 0.4:
                requests.append(engine.submit(prompts[i], **specs[i]))
                i += 1
            engine.step()
        later = len(seen) - first
    assert later == 0, f"{later} compilations after the first request"
    reasons = []
    for prompt, spec, request in zip(prompts, specs, requests):
        result = request.result()
        np.testing.assert_array_equal(result.tokens, reference(model, prompt, spec))
        reasons.append(result.finish_reason)
        assert result.finish_reason == ("stop" if result.tokens[-1] in spec["stop_ids"] else "length")
    assert "stop" in reasons and "length" in reasons
    assert engine.running == 0 and engine.waiting == 0


def test_slots_free_at_once_and_cancel(model, prompts, engine):
    """A row that finishes frees its slot before the next chunk (a waiting request takes it while the others run),
    a cancelled one too, and what runs beside them is not disturbed."""
    long = dict(max_new_tokens=200, temperature=0.0, stop_ids=())
    runners = [engine.submit(prompts[i], **long) for i in range(3)]
    short = engine.submit(prompts[3], max_new_tokens=2, temperature=0.0, stop_ids=())
    late = engine.submit(prompts[4], max_new_tokens=8, temperature=0.0)
    engine.step()  # admits 4 (every slot), decodes: the chunk stops when short reaches its length (late waits)
    assert engine.running == 3 and engine.waiting == 1 and short.done  # short's slot is free at once
    engine.step()
    assert late.done  # admitted into short's slot, finished while the runners go on
    assert not any(r.done for r in runners)
    runners[1].cancel()
    engine.step()
    assert runners[1].result().finish_reason == "cancelled" and engine.running == 2
    engine.run_until_idle()
    for i in (0, 2):
        np.testing.assert_array_equal(runners[i].result().tokens, reference(model, prompts[i], long))
    np.testing.assert_array_equal(late.result().tokens, reference(model, prompts[4], dict(max_new_tokens=8,
                                                                                          temperature=0.0)))


def test_logprobs_per_request(model, prompts, engine):
    want = engine.submit(prompts[5], max_new_tokens=6, temperature=0.0, logprobs=True)
    plain = engine.submit(prompts[6], max_new_tokens=6, temperature=0.0)
    engine.run_until_idle()
    ref = g4.generate(model, prompts[5], max_new_tokens=6, temperature=0.0, generation_config=PATH,
                      return_logprobs=True)
    result = want.result()
    np.testing.assert_allclose(result.logprobs, ref.logprobs[:len(result.tokens)], atol=1e-5)
    np.testing.assert_array_equal(result.top_ids, ref.top_ids[:len(result.tokens)])
    assert plain.result().logprobs is None


def test_thread_streams_updates_and_drains(model, prompts):
    """Served from the engine's thread: updates as they come, `max_queue` waiting beyond the free slots, then
    `stop(drain=True)` finishes what was queued and refuses new requests."""
    eng = Engine(model, slots=2, max_context=512, generation_config=PATH, max_queue=1)
    seen = []
    a = eng.submit(prompts[7], max_new_tokens=20, temperature=0.0, stop_ids=(), on_update=seen.append)
    b = eng.submit(prompts[8], max_new_tokens=20, temperature=0.0, stop_ids=())
    c = eng.submit(prompts[9], max_new_tokens=5, temperature=0.0, stop_ids=())  # the one that may wait
    with pytest.raises(QueueFull):
        eng.submit(prompts[10], max_new_tokens=5, temperature=0.0)
    eng.start()
    eng.stop(drain=True, timeout=300)
    assert a.done and b.done and c.done and c.result().finish_reason == "length"
    assert [int(t) for u in seen for t in u.tokens] == a.result().tokens.tolist() and seen[-1].finished
    with pytest.raises(EngineStopped):
        eng.submit(prompts[10], max_new_tokens=5)


def test_refused_by_name(model, prompts, engine):
    with pytest.raises(TypeError, match="speculative decoding"):
        Engine(model, slots=2, assistant=g4.PromptLookupDrafter(ngram=2))
    with pytest.raises(ValueError, match="max_context"):
        engine.submit(np.full(500, 5, np.int32), max_new_tokens=100)
    with pytest.raises(ValueError, match="temperature"):
        engine.submit(prompts[0], temperature=-1.0)
    with pytest.raises(ValueError, match="prompt_ids"):
        engine.submit(np.array([5, 2000]), max_new_tokens=4)
    assert engine.idle


def test_quantized_model_matches_generate():
    """int8 weights (`g4.quantize`) decode in the engine as in `generate` (the tiny checkpoint: fast)."""
    model = g4.quantize(g4.load(g4.assets.TINY_CHECKPOINT), "int8")
    eng = Engine(model, slots=2, max_context=256, generation_config=g4.assets.TINY_CHECKPOINT)
    prompts = [np.array([2, 10, 11, 12, 13]), np.array([2, 40, 41])]
    requests = [eng.submit(p, max_new_tokens=n, temperature=0.0) for p, n in zip(prompts, (12, 7))]
    eng.run_until_idle()
    for p, n, r in zip(prompts, (12, 7), requests):
        ref = g4.generate(model, p, max_new_tokens=n, temperature=0.0, generation_config=g4.assets.TINY_CHECKPOINT,
                          return_result=True).sequences[0]
        np.testing.assert_array_equal(r.result().tokens, ref)
