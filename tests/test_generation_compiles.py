"""`g4.generate` compiles once per coarse shape: the calls a chat or an evaluation loop makes reuse programs.

Counts XLA backend compilations (jax's monitoring event) on the bundled checkpoint: after one warm-up call, ten
calls with new prompt lengths, new `max_new_tokens` and new sampling settings add at most 4; likewise for a
left-padded batch of 4 and for image prompts of different sizes. No prompt of length L prefills more than 2L.
"""

import jax
import numpy as np
import PIL.Image
import pytest

import gemma4_eqx as g4
from gemma4_eqx.generate.inputs import PREFILL_CHUNKS, cache_bucket, prompt_bucket
from gemma4_eqx.testing import counting_compilations


@pytest.fixture(scope="module")
def model():
    return g4.load(g4.assets.TINY_CHECKPOINT)


def _settings(i: int) -> dict:
    rng = np.random.default_rng(100 + i)
    return dict(max_new_tokens=int(rng.integers(1, 65)), key=jax.random.key(i),
                temperature=float([0.0, 0.6, 1.0, 1.4][i % 4]), top_k=int([0, 5, 64, 200][(i // 2) % 4]),
                top_p=float([1.0, 0.9, 0.5][i % 3]))


def _ten_calls(model, make_prompt, lengths):
    results = []
    for i, length in enumerate(lengths):
        ids, extra = make_prompt(length, i)
        out = g4.generate(model, ids, return_result=True, **extra, **_settings(i))
        results.append((length, out))
    return results


def _text(length, seed):
    return np.random.default_rng(seed).integers(3, 1000, length).astype(np.int32), {}


def _batch(length, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 1000, (4, length)).astype(np.int32)
    mask = np.ones(ids.shape, bool)
    for b, pad in enumerate((0, length // 3, 1, length // 2)):
        mask[b, :pad] = False
        ids[b, :pad] = 0
    return ids, {"attention_mask": mask}


LENGTHS = (10, 300, 37, 129, 64, 250, 12, 190, 77, 283)


def test_ten_text_calls_add_at_most_four_compilations(model):
    g4.generate(model, _text(100, 99)[0], max_new_tokens=20, temperature=0.0)
    with counting_compilations() as seen:
        results = _ten_calls(model, _text, LENGTHS)
    assert len(seen) <= 4, f"{len(seen)} compilations after the warm-up"
    for length, out in results:
        assert length <= out.prefilled <= 2 * length
        assert out.tokens.shape[-1] >= 1 and int(out.lengths) <= out.tokens.shape[-1]


def test_a_left_padded_batch_of_four_adds_at_most_four_compilations(model):
    ids, extra = _batch(100, 98)
    g4.generate(model, ids, max_new_tokens=20, temperature=0.0, **extra)
    with counting_compilations() as seen:
        results = _ten_calls(model, _batch, LENGTHS)
    assert len(seen) <= 4, f"{len(seen)} compilations after the warm-up"
    for length, out in results:
        assert length <= out.prefilled <= 2 * length and out.tokens.shape[0] == 4


def test_image_prompts_of_different_sizes_add_at_most_four_compilations(model):
    proc = g4.Processor.from_pretrained(g4.assets.TINY_CHECKPOINT)
    sizes = [(64, 80), (32, 32), (96, 48), (48, 160), (128, 128), (40, 72), (200, 100), (64, 64), (90, 90),
             (150, 60)]

    def prompt(size, seed):
        image = np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)
        batch = proc(text=["<|image|> what is in this picture?"], images=[[PIL.Image.fromarray(image)]])
        return batch["input_ids"], {k: v for k, v in batch.items() if k != "input_ids"}

    ids, extra = prompt((70, 70), 97)
    g4.generate(model, ids, max_new_tokens=8, temperature=0.0, **extra)
    prompts = [prompt(s, i) for i, s in enumerate(sizes)]
    assert len({p[0].shape[-1] for p in prompts}) >= 4, "the image sizes should give different prompt lengths"
    with counting_compilations() as seen:
        for i, (ids, extra) in enumerate(prompts):
            out = g4.generate(model, ids, return_result=True, **extra, **_settings(i))
            assert ids.shape[-1] <= out.prefilled <= 2 * ids.shape[-1]
    assert len(seen) <= 4, f"{len(seen)} compilations after the warm-up"


@pytest.mark.parametrize("length", [1, 2, 3, 7, 8, 9, 15, 63, 64, 65, 511, 513, 4097, 100_000])
def test_no_bucket_more_than_doubles_a_prompt(length):
    for vision in (False, True):
        p, c = prompt_bucket(length, vision)
        assert length <= p <= 2 * max(length, 4) and p % c == 0
        if not vision:
            assert c in PREFILL_CHUNKS and p <= 2 * length
    assert cache_bucket(length + 10, 262_144) >= length + 10
