"""Multi-device placement with JAX's own machinery: a ("fsdp", "tp") `Mesh` and partition rules as data.

A rule is `(regex, PartitionSpec)`: the first rule whose regex `re.search`es a parameter's path gives the spec
of the *unstacked* parameter (a linear weight is `[in, out]`). Paths are the Equinox attribute paths with the
decoder run's layer type after its index, e.g.

    embed_tokens                                                   [vocab, hidden]
    layers.runs.0.sliding_attention.self_attn.q_proj.weight        [hidden, heads * head_dim]
    layers.runs.1.full_attention.self_attn.k_proj.weight           [hidden, 1 * global_head_dim]
    layers.runs.0.sliding_attention.mlp.down_proj.weight           [intermediate, hidden]
    norm.weight, embed_vision.patch_dense.weight, embed_audio.projection.embedding_projection.weight

Decoder leaves carry two leading stacked axes `[repeats, run_length]` (see `layers/decoder.py`); those stay
unsharded (the scan slices them), so a rule's spec is applied to the trailing axes. A dimension that does not
divide its mesh axes is replicated along them (never padded), a mesh axis the mesh does not have is ignored
(a mesh with one axis, or a size-1 axis, is valid), and a parameter no rule matches is replicated.

Use: `mesh = make_mesh(fsdp=2, tp=4)`, then `g4.load(path, mesh=mesh, rules=FSDP_TP)` (each device reads
only its own rows from disk) or `shard_model(model, mesh, rules)` for a model already in memory; `jax.jit`
propagates the shardings through the forward, `generate` and gradient steps. Several hosts: call
`jax.distributed.initialize()` on every host first, then build the mesh over `jax.devices()` (all hosts'
devices); `g4.load` builds each array with `jax.make_array_from_callback`, which asks only for the shards of the
calling host's devices, so each host reads only its part of the checkpoint.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import equinox as eqx
import jax
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

FSDP_AXIS, TP_AXIS = "fsdp", "tp"  # mesh axis names
AXES = (FSDP_AXIS, TP_AXIS)

Rules = tuple[tuple[str, P], ...]
# Every `..._proj.weight` pattern also matches the frozen base of a LoRA-wrapped projection (`..._proj.base.weight`,
# `g4.surgery.add_lora`), so adapting a model keeps its big matrices sharded; the small adapters (`lora_a`, `lora_b`)
# fall through to the last rule and are replicated.

# Fully sharded data parallel: every matrix split along its first axis over "fsdp" (gathered per layer inside
# the jitted step); norms and scalars replicated. The batch goes along "fsdp" too (`batch_sharding`).
FSDP: Rules = (
    (r"^embed_tokens$", P(FSDP_AXIS, None)),
    (r"(_proj(\.base)?|patch_dense)\.weight$", P(FSDP_AXIS, None)),
    (r"pos_embedding$", P(None, None, FSDP_AXIS)),
    (r".", P()),
)

# Megatron tensor parallelism: q/k/v and gate/up split by output (heads / intermediate), o and down by input,
# the embedding by vocabulary. The full layers' single KV head (k_proj, 1 x 512 wide, which also serves as
# the values) is replicated, so no device holds a fraction of a head that every query head reads.
TP: Rules = (
    (r"^embed_tokens$", P(TP_AXIS, None)),
    (r"full_attention\.self_attn\.k_proj(\.base)?\.weight$", P()),
    (r"self_attn\.[qkv]_proj(\.base)?\.weight$", P(None, TP_AXIS)),
    (r"self_attn\.o_proj(\.base)?\.weight$", P(TP_AXIS, None)),
    (r"mlp\.(gate|up)_proj(\.base)?\.weight$", P(None, TP_AXIS)),
    (r"mlp\.down_proj(\.base)?\.weight$", P(TP_AXIS, None)),
    (r".", P()),
)

# Both (the default for the 12B): the tensor-parallel split above, with the other axis of every matrix
# (hidden, for the decoder) split over "fsdp"; multimodal projections split over "fsdp" only.
FSDP_TP: Rules = (
    (r"^embed_tokens$", P(TP_AXIS, FSDP_AXIS)),
    (r"full_attention\.self_attn\.k_proj(\.base)?\.weight$", P(FSDP_AXIS, None)),
    (r"self_attn\.[qkv]_proj(\.base)?\.weight$", P(FSDP_AXIS, TP_AXIS)),
    (r"self_attn\.o_proj(\.base)?\.weight$", P(TP_AXIS, FSDP_AXIS)),
    (r"mlp\.(gate|up)_proj(\.base)?\.weight$", P(FSDP_AXIS, TP_AXIS)),
    (r"mlp\.down_proj(\.base)?\.weight$", P(TP_AXIS, FSDP_AXIS)),
    (r"(patch_dense|embedding_projection)\.weight$", P(None, FSDP_AXIS)),
    (r"pos_embedding$", P(None, None, FSDP_AXIS)),
    (r".", P()),
)

DEFAULT_RULES = FSDP_TP


def single_device(device=None) -> jax.sharding.Sharding:
    """The sharding that puts a whole array on `device` (default: the first local device).

    `jax.sharding.make_single_device_sharding` where this JAX has it (0.12 deprecates naming the class), the class
    itself on older JAX (the accelerator image runs 0.11).
    """
    device = jax.local_devices()[0] if device is None else device
    make = getattr(jax.sharding, "make_single_device_sharding", None)
    return make(device) if make is not None else jax.sharding.SingleDeviceSharding(device)


def commit_like(tree, model):
    """`tree`'s uncommitted arrays placed where `model`'s first committed array lives (replicated over its mesh,
    or on its one device); `tree` as it is when none of `model`'s arrays is committed.

    jit keys its compiled programs on whether each argument is committed, and a program's outputs are committed
    when any of its inputs was: state made eagerly (an optimizer's, an empty KV cache, the adapters `add_lora`
    draws) is not, the same state after one step of a loaded (committed) model is, so the second call would
    compile the whole program again.
    """
    like = next((x.sharding for x in jax.tree.leaves(model) if isinstance(x, jax.Array) and x.committed), None)
    if like is None:
        return tree
    place = (NamedSharding(like.mesh, P()) if isinstance(like, NamedSharding)
             else single_device(next(iter(like.device_set))))
    commit = lambda x: jax.device_put(x, place) if isinstance(x, jax.Array) and not x.committed else x
    return jax.tree.map(commit, tree)


def make_mesh(fsdp: int | None = None, tp: int | None = None, devices: Sequence | None = None) -> Mesh:
    """A `Mesh` of shape `(fsdp, tp)` with axes ("fsdp", "tp") over `devices` (default: all of `jax.devices()`).

    Give one size and the other is inferred; give none and every device goes to "fsdp". Sizes of 1 are valid.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    for name, size in (("fsdp", fsdp), ("tp", tp)):
        if size is not None and (size < 1 or n % size):
            raise ValueError(f"{name}={size}: expected a positive divisor of the {n} devices")
    if fsdp is None and tp is None:
        fsdp, tp = n, 1
    elif fsdp is None:
        fsdp = n // tp
    elif tp is None:
        tp = n // fsdp
    if fsdp * tp != n:
        raise ValueError(f"fsdp={fsdp} x tp={tp} = {fsdp * tp} devices, but {n} are given; pass "
                         f"devices=jax.devices()[:{fsdp * tp}] to use fewer")
    return jax.make_mesh((fsdp, tp), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def _key_name(k) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _is_param(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def parameter_path(model, key_path) -> tuple[str, int]:
    """(rule path, number of stacked leading axes) of the leaf at `key_path` in a `Gemma4`."""
    parts = [_key_name(k) for k in key_path]
    if parts[:2] == ["layers", "runs"]:
        run = int(parts[2])
        return ".".join(parts[:3] + [model.layers.pattern[run][0]] + parts[3:]), 2
    return ".".join(parts), 0


def _resolve(spec: P, shape: tuple[int, ...], mesh: Mesh | AbstractMesh, what: str) -> tuple:
    """The spec's entries for `shape`, without axes the mesh lacks or that do not divide their dimension."""
    entries = tuple(spec)
    if len(entries) > len(shape):
        raise ValueError(f"{what}: rule spec {spec} has {len(entries)} entries for a parameter of shape {shape}")
    used = [a for e in entries if e is not None for a in ((e,) if isinstance(e, str) else e)]
    if len(used) != len(set(used)):
        raise ValueError(f"{what}: rule spec {spec} uses a mesh axis twice")
    out = []
    for dim, entry in zip(shape, entries + (None,) * (len(shape) - len(entries))):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        axes = tuple(a for a in axes if a in mesh.shape)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]  # does not divide: replicate along the remaining axes, never pad
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return tuple(out)


def partition_spec(path: str, shape: tuple[int, ...], n_stacked: int, mesh: Mesh | AbstractMesh, rules: Rules) -> P:
    """The `PartitionSpec` the first matching rule gives a parameter (stacked leading axes unsharded)."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            break
    else:
        spec = P()  # no rule: replicated
    inner = _resolve(spec, shape[n_stacked:], mesh, path)
    return P(*((None,) * n_stacked + inner)) if inner else P()


def param_shardings(abstract_model, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """A pytree like the model with a `NamedSharding` for every array (concrete or `ShapeDtypeStruct`) leaf."""

    def one(key_path, leaf):
        if not _is_param(leaf):
            return None
        path, n_stacked = parameter_path(abstract_model, key_path)
        return NamedSharding(mesh, partition_spec(path, tuple(leaf.shape), n_stacked, mesh, rules))

    return jax.tree_util.tree_map_with_path(one, abstract_model)


def shard_model(model, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """`model` with every array placed by `jax.device_put` with the sharding its rule names."""
    params, static = eqx.partition(model, eqx.is_array)
    shardings, _ = eqx.partition(param_shardings(model, mesh, rules), lambda s: isinstance(s, NamedSharding))
    return eqx.combine(jax.device_put(params, shardings), static)


def describe(model, mesh: Mesh | AbstractMesh, rules: Rules = DEFAULT_RULES) -> list[tuple[str, tuple[int, ...], P]]:
    """(path, shape, applied spec) for every parameter: what the rules do on this mesh, for reading."""
    rows = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(model)[0]:
        if _is_param(leaf):
            path, n_stacked = parameter_path(model, key_path)
            rows.append((path, tuple(leaf.shape), partition_spec(path, tuple(leaf.shape), n_stacked, mesh, rules)))
    return rows


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Inputs `[batch, ...]` split along "fsdp" (replicated if the batch does not divide), the rest whole."""
    return NamedSharding(mesh, P(*_resolve(P(FSDP_AXIS), tuple(shape), mesh, "batch")))
