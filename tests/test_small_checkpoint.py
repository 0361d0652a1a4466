"""The bundled trained checkpoint (gemma4_eqx/assets/small): real structure, low held-out perplexity, varied
greedy text, and it loads in the processor like the tiny one."""

import json

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4
from small_fixtures import model, proc  # noqa: F401  (fixtures)
from gemma4_eqx.train import losses
from gemma4_eqx.config import FULL, SLIDING

SMALL = g4.assets.SMALL_CHECKPOINT
RECORD = json.loads((SMALL / "training.json").read_text())


def test_structure_is_the_real_one(model):
    cfg = model.config
    t = cfg.text
    assert set(t.layer_types) == {SLIDING, FULL}
    assert t.attention_k_eq_v
    assert t.rope_full.rope_type == "proportional" and t.rope_sliding.rope_type == "default"
    assert t.sliding_window < RECORD["seq"]  # the window is shorter than the training rows
    assert t.final_logit_softcapping is not None and t.tie_word_embeddings
    assert model.embed_vision is not None and model.embed_audio is not None


def test_heldout_perplexity_is_far_below_the_vocabulary(model, proc):
    text = (SMALL / "heldout.txt").read_text()
    ppl = float(losses.text_perplexity(model, proc.tokenizer, text, RECORD["heldout_eval_seq"]))
    vocab = model.config.text.vocab_size
    assert ppl < vocab / 10, (ppl, vocab)  # an untrained model scores about the vocabulary size (~1000)
    # and it is the model that was trained (same figure as when it was saved)
    np.testing.assert_allclose(ppl, RECORD["heldout_perplexity"], rtol=1e-3)


def test_greedy_output_is_varied(model, proc):
    ids = np.asarray(proc.tokenizer(RECORD["greedy_prompt"])["input_ids"], np.int32)[0]
    cfg = model.config
    out = np.asarray(g4.generate(model, ids, max_new_tokens=64, temperature=0.0, stop_ids=(),
                                 suppress_ids=(cfg.eoi_token_id, cfg.eoa_token_id)))
    assert out.shape == (64,)
    assert len(np.unique(out)) >= 16, proc.tokenizer.decode(out)


def test_loads_in_the_processor_with_the_chat_format(model, proc):
    vocab = model.config.text.vocab_size
    tok = proc.tokenizer
    for token, idx in {"<bos>": 2, "<eos>": 1, "<|turn>": 105, "<turn|>": 106, "<|image>": vocab - 7,
                       "<|image|>": vocab - 5, "<|audio|>": vocab - 4, "<|video|>": vocab - 1}.items():
        assert tok.convert_tokens_to_ids(token) == idx, token
    chat = [{"role": "user", "content": [{"type": "text", "text": "What does this License cover?"}]}]
    text = proc.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<bos><|turn>user\n") and "<|turn>model\n" in text
    batch = proc.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = np.asarray(batch["input_ids"])[0]
    assert ids.max() < vocab and list(ids).count(105) == 2  # both turns' <|turn> are single tokens
    logits = np.asarray(eqx.filter_jit(lambda m, x: m(x))(model, ids))  # one program; eagerly, one per operation
    assert logits.shape == (len(ids), vocab) and bool(np.all(np.isfinite(logits)))
