"""Key-path helpers over pytrees: find, list and replace nodes by their `jax.tree_util` key paths."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax


def follow(tree, path) -> Any:
    """The node at a `jax.tree_util` key path."""
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            tree = getattr(tree, k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            tree = tree[k.idx]
        elif isinstance(k, jax.tree_util.DictKey):
            tree = tree[k.key]
        else:
            raise TypeError(f"unsupported key {k!r}")
    return tree


def paths_of(tree, predicate) -> list[tuple]:
    """Key paths of the nodes of `tree` that satisfy `predicate` (not descended into)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=predicate)
    return [path for path, x in flat if predicate(x)]


def replace_nodes(tree, predicate, fn):
    """`tree` with every node satisfying `predicate` replaced by `fn(node)` (one `eqx.tree_at`)."""
    paths = paths_of(tree, predicate)
    if not paths:
        return tree
    new = [fn(follow(tree, p)) for p in paths]
    return eqx.tree_at(lambda t: [follow(t, p) for p in paths], tree, replace=new, is_leaf=predicate)
