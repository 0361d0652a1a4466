"""The 12B preset, built abstractly: exact parameter counts and shapes, no weight materialised."""

import equinox as eqx
import jax
import jax.numpy as jnp

import gemma4_eqx as g4


def _abstract_12b():
    cfg = g4.Gemma4Config.gemma4_12b()
    return eqx.filter_eval_shape(lambda: g4.Gemma4(cfg, key=jax.random.key(0), dtype=jnp.bfloat16))


def test_12b_counts_exactly():
    model = _abstract_12b()
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(model))
    total = g4.count_parameters(model)
    multimodal = g4.count_parameters(model.embed_vision) + g4.count_parameters(model.embed_audio)
    assert total - multimodal == 11_907_350_320
    assert multimodal == 52_379_904
    assert total == 11_959_730_224


def test_12b_stack_is_8_repeats_of_5_sliding_and_1_full():
    stack = _abstract_12b().layers
    assert stack.pattern == (("sliding_attention", 5), ("full_attention", 1))
    assert stack.num_repeats == 8
    sliding, full = stack.runs
    assert sliding.self_attn.q_proj.weight.shape == (8, 5, 3840, 4096)
    assert sliding.self_attn.k_proj.weight.shape == (8, 5, 3840, 2048)
    assert sliding.self_attn.v_proj.weight.shape == (8, 5, 3840, 2048)
    assert full.self_attn.q_proj.weight.shape == (8, 1, 3840, 8192)
    assert full.self_attn.k_proj.weight.shape == (8, 1, 3840, 512)
    assert full.self_attn.v_proj is None
    assert full.self_attn.o_proj.weight.shape == (8, 1, 8192, 3840)
    assert stack.locate(47) == (1, 7, 0) and stack.locate(46) == (0, 7, 4)


def test_12b_tensor_table_matches_the_checkpoint_layout():
    from gemma4_eqx.io.checkpoint import tensor_specs

    specs = {s.name: s.shape for s in tensor_specs(_abstract_12b())}
    assert len(specs) == 677
    assert specs["model.language_model.layers.5.self_attn.q_proj.weight"] == (8192, 3840)
    assert specs["model.language_model.layers.4.self_attn.v_proj.weight"] == (2048, 3840)
    assert "model.language_model.layers.5.self_attn.v_proj.weight" not in specs
    assert specs["model.language_model.layers.0.layer_scalar"] == (1,)
    assert specs["model.vision_embedder.pos_embedding"] == (1120, 2, 3840)
    assert specs["model.vision_embedder.patch_dense.weight"] == (3840, 6912)
    assert specs["model.embed_vision.embedding_projection.weight"] == (3840, 3840)
    assert specs["model.embed_audio.embedding_projection.weight"] == (3840, 640)
    assert "lm_head.weight" not in specs
