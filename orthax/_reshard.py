"""Resharding small per-matrix values on Explicit mesh axes: back to the
sharding a state came in with (:func:`reshard_like`), or replicated before
a reshape against their leaf (:func:`replicated`). Used by the engine and
by transforms that compute such values outside it."""

from __future__ import annotations

from typing import Any

import jax

from orthax import sharding


def _P():
  return jax.sharding.PartitionSpec()


def reshard_like(tree: Any, like: Any) -> Any:
  """Each array of ``tree`` resharded to its twin's in ``like`` (same
  structure, ``None`` entries included) where that twin is sharded over
  Explicit mesh axes; on Auto axes or one device, ``tree`` as it is. For a
  state updated from differently sharded values (per-matrix norms of a
  leaf sharded on its layer axis) that must keep its own sharding."""
  return _map_arrays(sharding.explicit_spec, tree, like)


def replicated(tree: Any) -> Any:
  """Each array of ``tree`` sharded over Explicit mesh axes made
  replicated; others as they are. For small per-matrix values about to be
  reshaped against their leaf (:func:`orthax.matrices.per_matrix_to_leaf`),
  which an Explicit sharding may not allow."""
  return _map_arrays(
      lambda x: None if sharding.explicit_spec(x) is None else _P(), tree,
      tree)


def _map_arrays(spec_of, tree, like):
  """Each array of ``tree`` resharded to ``spec_of(its twin in like)``
  where that is a spec and differs from its own Explicit spec (``tree``
  and ``like`` have one structure, ``None`` entries included)."""
  is_none = lambda v: v is None
  flat, treedef = jax.tree.flatten(tree, is_leaf=is_none)
  twins, like_def = jax.tree.flatten(like, is_leaf=is_none)
  if like_def != treedef:
    raise AssertionError(f'engine: {treedef} != {like_def}')
  out = []
  for x, twin in zip(flat, twins):
    spec = None if x is None or twin is None else spec_of(twin)
    current = None if spec is None else sharding.explicit_spec(x)
    # A full sharding on x's own mesh: a bare spec needs ``jax.set_mesh``.
    out.append(x if current is None or current == spec
               else jax.sharding.reshard(x, jax.sharding.NamedSharding(
                   jax.typeof(x).sharding.mesh, spec)))
  return jax.tree.unflatten(treedef, out)
