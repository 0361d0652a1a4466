"""Weight-only quantization (gemma4_eqx/quant.py) on the bundled trained checkpoint.

Measured on the small trained checkpoint (fp32 reference; logits over the whole held-out text cut into rows of
256 tokens as `losses.text_perplexity` cuts it; perplexity from those logits, equal to the recorded 60.3):
    fp32        perplexity 60.32
    int8        perplexity 60.32, max |logit diff| 0.11, top-1 agreement 98%
    int4 (g32)  perplexity 61.56, max |logit diff| 2.7,  top-1 agreement 85%
The bounds below are set from the formats' expected error on this model, not loosened to pass: int8 logits
within 0.5 and >= 95% top-1 agreement, perplexity within 1%; int4 logits within 5 and >= 75% agreement,
perplexity within 5%.
"""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma4_eqx as g4
from small_fixtures import model, proc  # noqa: F401  (fixtures)
from gemma4_eqx import quant

SMALL = g4.assets.SMALL_CHECKPOINT
RECORD = json.loads((SMALL / "training.json").read_text())
BOUNDS = {  # mode: (max |logit diff|, min top-1 agreement, max relative perplexity change)
    "int8": (0.5, 0.95, 0.01),
    "int4": (5.0, 0.75, 0.05),
}


@pytest.fixture(scope="module")
def heldout():
    return (SMALL / "heldout.txt").read_text()


@pytest.fixture(scope="module")
def rows(proc, heldout):
    """The held-out text cut as `losses.text_perplexity` cuts it: rows of <bos> + 255 tokens, a validity mask."""
    seq = RECORD["heldout_eval_seq"]
    ids = np.asarray(proc.tokenizer(heldout)["input_ids"])[0]
    body = ids[1:]
    n = -(-len(body) // (seq - 1))
    out, mask = np.zeros((n, seq), np.int32), np.zeros((n, seq), bool)
    for r in range(n):
        piece = body[r * (seq - 1):(r + 1) * (seq - 1)]
        out[r, 0], out[r, 1:1 + len(piece)] = ids[0], piece
        mask[r, :1 + len(piece)] = True
    return jnp.asarray(out), jnp.asarray(mask)


@eqx.filter_jit
def _row_logits(m, ids, mask):
    return jax.vmap(lambda i, a: m(i, attention_mask=a))(ids, mask)


def evaluate(m, rows):
    """(logits of every row, held-out perplexity: exp of the mean next-token NLL over the valid targets)."""
    ids, mask = rows
    logits = _row_logits(m, ids, mask)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    valid = mask[:, 1:]
    return logits, float(jnp.exp(jnp.sum(jnp.where(valid, nll, 0)) / jnp.sum(valid)))


@pytest.fixture(scope="module")
def reference(model, rows):
    return evaluate(model, rows)


@pytest.fixture(scope="module")
def quantized(model):
    return {mode: g4.quantize(model, mode) for mode in BOUNDS}


@pytest.mark.parametrize("mode,scale_dtype", [("int8", None), ("int4", None), ("int4", jnp.bfloat16)])
def test_quantize_dequantize_error_is_within_half_a_step(model, mode, scale_dtype):
    qc = quant.QuantConfig.make(mode, scale_dtype=scale_dtype)
    linears = quant.decoder_linears(model)
    assert len(linears) == 13  # q/k/v/o + gate/up/down on the sliding run, q/k/o + the MLP on the full run
    for lin in linears:
        w = lin.weight
        q, s = quant.quantize_array(w, bits=qc.bits, group_size=qc.group_size, scale_dtype=qc.scale_dtype)
        assert q.dtype == (jnp.int8 if mode == "int8" else jnp.int4) and s.dtype == jnp.dtype(qc.scale_dtype)
        codes = np.asarray(q).astype(np.int32)
        assert codes.max() <= quant.QMAX[qc.bits] and codes.min() >= -quant.QMAX[qc.bits] - (qc.bits == 4)
        err = np.abs(np.asarray(quant.dequantize(q, s)) - np.asarray(w))
        step = np.repeat(np.asarray(s, np.float32), w.shape[-2] // s.shape[-2], axis=-2)
        # half a step, plus the fp32 rounding of w / scale and of q * scale (an ulp of |w| <= qmax * step)
        slack = quant.QMAX[qc.bits] * 2.0**-23
        assert np.all(err <= step * (0.5 + slack)), (mode, w.shape, float(np.max(err / step)))
        assert float(np.max(err / step)) > 0.4  # the bound is nearly reached: rounding, not a looser format
        # the format's relative error: a step is max|w|/127 (int8) or max|w| of 32 inputs / 7 (int4)
        amax = np.max(np.abs(np.asarray(w)), axis=-2)
        assert np.max(err) <= np.max(amax) / (2 * quant.QMAX[qc.bits]) * 1.01


def _agreement(ref, out, mask):
    return float(jnp.sum((jnp.argmax(out, -1) == jnp.argmax(ref, -1)) & mask) / jnp.sum(mask))


def test_reference_perplexity_is_the_recorded_one(reference):
    np.testing.assert_allclose(reference[1], RECORD["heldout_perplexity"], rtol=1e-3)


@pytest.mark.parametrize("mode", list(BOUNDS))
def test_logits_and_perplexity_against_the_float_model(rows, reference, quantized, mode):
    max_diff, min_top1, max_ppl = BOUNDS[mode]
    (ref, ppl_ref), (out, ppl_q) = reference, evaluate(quantized[mode], rows)
    mask = rows[1]
    diff = float(jnp.max(jnp.where(mask[..., None], jnp.abs(out - ref), 0)))
    assert 0 < diff < max_diff, diff
    assert _agreement(ref, out, mask) >= min_top1
    assert abs(ppl_q / ppl_ref - 1) < max_ppl, (ppl_ref, ppl_q)


def test_quantized_embedding_moves_logits_within_the_int8_bound(model, rows, reference):
    q = g4.quantize(model, "int8", embedding=True)
    assert isinstance(q.embed_tokens, quant.QuantEmbedding) and q.dtype == jnp.float32
    (ref, ppl_ref), (out, ppl_q) = reference, evaluate(q, rows)
    mask = rows[1]
    assert float(jnp.max(jnp.where(mask[..., None], jnp.abs(out - ref), 0))) < BOUNDS["int8"][0]
    assert _agreement(ref, out, mask) >= BOUNDS["int8"][1]
    assert abs(ppl_q / ppl_ref - 1) < BOUNDS["int8"][2]
    # the lookup and the head read the same dequantized table
    table = q.embed_tokens.astype(jnp.float32)
    ids = jnp.asarray([0, 5, 1023])
    np.testing.assert_array_equal(np.asarray(q.embed_tokens[ids]), np.asarray(table[ids]))
    back = quant.dequantize_model(q)
    assert not quant.is_quantized(back)
    np.testing.assert_array_equal(np.asarray(back.embed_tokens), np.asarray(table))


@pytest.mark.parametrize("mode,embedding", [("int8", False), ("int4", True)])
def test_streaming_load_and_save_round_trip(model, quantized, tmp_path, mode, embedding):
    tree = g4.quantize(model, mode, embedding=embedding) if embedding else quantized[mode]
    streamed = g4.load(SMALL, dtype=jnp.float32, quantize={"mode": mode, "embedding": embedding})
    assert jax.tree.structure(streamed) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(streamed)):  # compared on the host: no program per shape
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    g4.save(tree, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["mode"] == mode and cfg["embedding"] is embedding
    from gemma4_eqx.io.safetensors import SafetensorsFile

    f = SafetensorsFile(str(tmp_path / "q" / "model.safetensors"))
    name = "model.language_model.layers.0.mlp.down_proj"
    assert name + ".weight" not in f.keys()
    assert f.dtype_name(name + ".qweight") == ("I8" if mode == "int8" else "U8")
    assert f.shape(name + ".qweight") == ((128, 384) if mode == "int8" else (128, 192))
    assert f.shape(name + ".scales") == ((128, 1) if mode == "int8" else (128, 12))
    back = g4.load(tmp_path / "q")
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(quant.QuantError, match="already quantized"):
        g4.load(tmp_path / "q", quantize="int8" if mode == "int4" else "int4")


def test_generate_jit_vmap_and_policies_on_a_quantized_model(quantized, rows):
    q = quantized["int4"]
    window = rows[0][0]
    prompt = window[:20]
    a = np.asarray(g4.generate(q, prompt, max_new_tokens=6, temperature=0.0))
    # the cached decode agrees with the no-cache forward of the same quantized model
    full = q(jnp.concatenate([prompt, jnp.asarray(a[:-1], jnp.int32)]))
    np.testing.assert_array_equal(np.asarray(jnp.argmax(full[len(prompt) - 1:], -1)), a)
    batch = jnp.stack([window[:16], window[16:32]])
    out = eqx.filter_jit(eqx.filter_vmap(lambda m, x: m(x), in_axes=(None, 0)))(q, batch)
    np.testing.assert_allclose(np.asarray(out[1]), np.asarray(q(window[16:32])), atol=1e-4)
    # under jit the dequantization is part of the compiled program: the weights stay int4 arguments
    hlo = eqx.filter_jit(lambda m, x: m(x)).lower(q, window[:16]).as_text()
    assert "s4[" in hlo or "i4>" in hlo
    inv = q.with_numerics("invariant")
    assert all(isinstance(x.numerics, g4.Invariant) for x in jax.tree.leaves(
        inv.layers, is_leaf=lambda x: isinstance(x, quant.QuantLinear)) if isinstance(x, quant.QuantLinear))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_grouped_product_equals_dequantize_then_matmul(quantized, mode):
    """The decode-sized path the GPU takes (scales after the product) on the CPU, in fp32."""
    lin = quant.QuantLinear(*(a[0, 0] for a in (quantized[mode].layers.runs[0].mlp.down_proj.qweight,
                                               quantized[mode].layers.runs[0].mlp.down_proj.scales)))
    x = jax.random.normal(jax.random.key(1), (3, lin.in_features), jnp.float32)
    ref = x @ lin.dequantized(jnp.float32)
    np.testing.assert_allclose(np.asarray(lin.grouped_product(x)), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_sharding_rules_cover_the_quantized_leaves(quantized):
    q = quantized["int4"]
    mesh = g4.sharding.make_mesh(fsdp=1, tp=1)
    rules = quant.sharding_rules(g4.sharding.FSDP_TP)
    shardings = g4.sharding.param_shardings(q, mesh, rules)
    assert jax.tree.structure(shardings) == jax.tree.structure(q)
    path = "layers.runs.0.sliding_attention.mlp.gate_proj.qweight"
    spec = g4.sharding.partition_spec(path, (128, 384), 0, mesh, rules)
    assert spec == g4.sharding.partition_spec(path.replace("qweight", "weight"), (128, 384), 0, mesh,
                                              g4.sharding.FSDP_TP)
    placed = g4.sharding.shard_model(q, mesh, rules)
    assert jax.tree.leaves(placed)[3].dtype == jax.tree.leaves(q)[3].dtype


def test_int4_packing_round_trips_every_code():
    codes = np.arange(-8, 8, dtype=np.int8).reshape(2, 8)
    packed = quant.pack_int4(codes)
    assert packed.dtype == np.uint8 and packed.shape == (2, 4)
    assert packed[0, 0] == (0x8 | (0x9 << 4))  # -8 -> 0x8 (low nibble), -7 -> 0x9 (high)
    np.testing.assert_array_equal(quant.unpack_int4(packed), codes)


def test_bad_requests_are_named(model):
    with pytest.raises(quant.QuantError, match="expected one of"):
        g4.quantize(model, "int3")
    with pytest.raises(quant.QuantError, match="do not split into groups of 96"):
        g4.quantize(model, "int4", group_size=96)
    with pytest.raises(quant.QuantError, match="per output channel"):
        g4.quantize(model, "int8", group_size=32)
    with pytest.raises(quant.QuantError, match="already quantized"):
        g4.quantize(g4.quantize(model, "int8"), "int4")


def test_info_reports_12b_quantized_weight_memory(fixtures_dir, capsys):
    from gemma4_eqx import cli

    assert cli.main(["info", "--model", str(fixtures_dir / "configs" / "gemma-4-12B.per_layer_config.json"),
                     "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    int8 = info["weights in int8 (per channel; embedding int8 / bfloat16)"]
    int4 = info["weights in int4 (groups of 32, fp16 scales; embedding int4 / bfloat16)"]
    (i8e, i8), (i4e, i4) = ([float(x.split()[0]) for x in v.split(" / ")] for v in (int8, int4))
    assert i8e < 12 and i4e < 7  # the targets, embedding quantized too
    assert i8e < i8 < 22.28 / 2 + 1.5 and i4e < i4 < i8e
    # from the shapes: text 11.91 G parameters; int4 codes take half a byte plus 2 bytes of scale per 32 weights
    assert i4e == pytest.approx(11_907_350_320 * (0.5 + 2 / 32) / 2**30 + 52_379_904 * 2 / 2**30, abs=0.02)


def test_int8_kv_cache_moves_decode_logits_little_and_halves_the_bytes(model, rows):
    """Prefill 100 held-out tokens, decode 60 more, with a float cache and with `KVCache.init(int8=True)`.
    Measured: max |logit diff| 0.077, top-1 agreement 98.4% (fp32 weights); bounds 0.5 and 95%."""
    ids = rows[0][0][:160]

    def run(int8):
        c = g4.KVCache.init(model.config, max_len=256, dtype=jnp.float32, int8=int8)
        out, c = model.prefill(ids[:100], c)
        outs = [out]
        for t in ids[100:]:
            out, c = model.decode_step(t, c)
            outs.append(out)
        return jnp.stack(outs), c

    (ref, c32), (out, c8) = run(False), run(True)
    assert isinstance(c8.layers[0], g4.cache.RingKV8) and isinstance(c8.layers[1], g4.cache.RawKeyKV8)
    diff = float(jnp.max(jnp.abs(out - ref)))
    assert 0 < diff < 0.5, diff
    assert float(jnp.mean(jnp.argmax(out, -1) == jnp.argmax(ref, -1))) >= 0.95
    # bytes: int8 codes plus one fp32 scale per token and head, against bf16 (12B, 256K tokens, from shapes)
    from gemma4_eqx.model.cache import cache_bytes

    cfg = g4.Gemma4Config.gemma4_12b()
    bf16, int8 = cache_bytes(cfg, 262_144, jnp.bfloat16), cache_bytes(cfg, 262_144, jnp.bfloat16, int8=True)
    assert 0.5 < int8 / bf16 < 0.52, (bf16, int8)
    # a truncated int8 cache decodes as the untruncated one did at that point
    c_back = c8.truncate(int(c8.length) - 1)
    again, _ = model.decode_step(ids[-1], c_back)
    np.testing.assert_allclose(np.asarray(again), np.asarray(out[-1]), atol=1e-5)
