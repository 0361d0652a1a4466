"""GGUF (gemma4_eqx/gguf_io.py): Q4_0 blocks read as int4 codes + fp16 scales equal gguf's own dequantization bit
for bit; the GGUF name table covers the 12B's text tensors; a GGUF written from the small trained checkpoint loads
as an int4 model."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import gemma4_eqx as g4  # noqa: E402
from gemma4_eqx.io import gguf as gguf_io
from gemma4_eqx import quant  # noqa: E402
from gemma4_eqx.io.names import TEXT_PREFIX, tensor_specs  # noqa: E402
from gemma4_eqx.config import Gemma4Config  # noqa: E402

Q4_0 = gguf.GGMLQuantizationType.Q4_0


def _write(path, tensors):
    w = gguf.GGUFWriter(str(path), "gemma4")
    for name, (data, qtype) in tensors.items():
        if qtype == Q4_0:
            w.add_tensor(name, gguf.quants.quantize(data, Q4_0), raw_dtype=Q4_0)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_q4_0_blocks_equal_gguf_dequantization_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((48, 96)).astype(np.float32)
    a[0, :32] = np.linspace(-1, 1, 32)  # a block whose extreme is negative: code -8 appears
    a[1, :32] = 0  # an all-zero block
    b = (rng.standard_normal((8, 256)) * 1e-3).astype(np.float32)
    _write(tmp_path / "t.gguf", {"a.weight": (a, Q4_0), "b.weight": (b, Q4_0)})
    reader = gguf.GGUFReader(str(tmp_path / "t.gguf"))
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists the innermost dimension first
        codes, scales = gguf_io.q4_0_codes(np.asarray(t.data), shape)
        assert codes.dtype == np.int8 and scales.dtype == np.float16 and scales.shape == (shape[0], shape[1] // 32)
        assert codes.min() >= -8 and codes.max() <= 7
        theirs = gguf.quants.dequantize(np.asarray(t.data), Q4_0).reshape(shape)
        # our int4 layout ([in, out] codes, [groups, out] scales), dequantized as the model does
        ours = quant.dequantize(jnp.asarray(codes.T.astype(ml_dtypes.int4)), jnp.asarray(scales.T))
        np.testing.assert_array_equal(np.asarray(ours).T.view(np.uint32), theirs.astype(np.float32).view(np.uint32))
    first = gguf_io.q4_0_codes(np.asarray(reader.tensors[0].data), (48, 96))[0]
    assert first.min() == -8


def test_name_table_covers_every_text_tensor_of_the_12b():
    abstract = eqx.filter_eval_shape(lambda: g4.Gemma4(Gemma4Config.gemma4_12b(), key=jax.random.key(0),
                                                       dtype=jnp.bfloat16))
    specs = tensor_specs(abstract)
    table, unsupported = gguf_io.name_table(specs)
    text = [s.name for s in specs if s.name.startswith(TEXT_PREFIX)]
    assert sorted(table) == sorted(text) and len(text) == 1 + 1 + 48 * 13 + 40  # 40 sliding layers have v_proj
    assert unsupported and not any(n.startswith(TEXT_PREFIX) for n in unsupported)  # vision + audio embedders
    arch = {gguf.constants.TENSOR_NAMES[t] for t in gguf.constants.MODEL_TENSORS[gguf.constants.MODEL_ARCH.GEMMA4]}
    for ours, theirs in table.items():
        stem = theirs[:-len(".weight")]
        assert re.sub(r"\.\d+\.", ".{bid}.", stem) in arch, (ours, theirs)
    assert table[TEXT_PREFIX + "layers.5.self_attn.k_proj.weight"] == "blk.5.attn_k.weight"
    assert table[TEXT_PREFIX + "layers.0.layer_scalar"] == "blk.0.layer_output_scale.weight"
    assert table[TEXT_PREFIX + "embed_tokens.weight"] == "token_embd.weight"


def test_a_gguf_of_the_small_checkpoint_loads_as_an_int4_model(tmp_path):
    model = g4.load(g4.assets.SMALL_CHECKPOINT, dtype=jnp.float32)
    config = model.config.replace(vision=None, audio=None)
    from gemma4_eqx.io.save import host_tensors

    specs = [s for s in tensor_specs(model) if s.name.startswith(TEXT_PREFIX)]
    table, _ = gguf_io.name_table(specs)
    tensors = {}
    for name, arr in host_tensors(model, specs):
        tensors[table[name]] = (arr.astype(np.float32), Q4_0 if arr.ndim == 2 else None)
    _write(tmp_path / "small.gguf", tensors)
    q = gguf_io.load_gguf(tmp_path / "small.gguf", config, dtype=jnp.float32)
    assert isinstance(q.embed_tokens, quant.QuantEmbedding)
    qc = quant.quant_config_of(q)
    assert (qc.bits, qc.group_size, qc.scale_dtype) == (4, 32, "float16")
    # every projection dequantizes to gguf's own dequantization of its tensor
    reader = gguf.GGUFReader(str(tmp_path / "small.gguf"))
    t = next(x for x in reader.tensors if x.name == "blk.2.ffn_down.weight")
    theirs = gguf.quants.dequantize(np.asarray(t.data), Q4_0).reshape(128, 384)
    down = q.layers.layer(2).mlp.down_proj
    np.testing.assert_array_equal(np.asarray(down.dequantized()).T, theirs)
    ids = jnp.arange(2, 66)
    ref, out = model(ids), q(ids)
    assert float(jnp.mean(jnp.argmax(out, -1) == jnp.argmax(ref, -1))) >= 0.75
    assert float(jnp.max(jnp.abs(out - ref))) < 5.0
