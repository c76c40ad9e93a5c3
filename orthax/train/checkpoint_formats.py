"""Optimizer-state layouts that older orthax wrote to checkpoints, and how
:meth:`~orthax.train.checkpoint.Checkpointer.restore` reads them into
today's.

Two changes so far, each undone by a pair of functions (today's target ->
the older layout to restore into; the restored tree -> today's):

* a stage renamed (:data:`RENAMED_STAGES`): its leaves are read under the
  former name;
* fields added to :class:`orthax.transforms.SkipIfNonfiniteState`
  (2026-12-06: ``nonfinite_updates`` and ``nonfinite_state``, the flags of
  a step skipped because its result overflowed): the older four fields are
  read and the new flags start False, as after ``init``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from orthax.transforms import SkipIfNonfiniteState

# Stages of the recipes' state renamed since checkpoints were first written:
# today's name -> the name older checkpoints hold it under.
RENAMED_STAGES = {
    # 2026-12-06: a stage named like the weight_decay hyperparameter was
    # overwritten by optax.tree_utils.tree_set(state, weight_decay=...).
    'decoupled_weight_decay': 'weight_decay',
}


def _former_path(path: tuple) -> tuple:
  return tuple(jax.tree_util.DictKey(RENAMED_STAGES[k.key])
               if isinstance(k, jax.tree_util.DictKey)
               and k.key in RENAMED_STAGES else k for k in path)


def under_former_names(tree: Any) -> Any:
  """``tree`` with each dict entry of :data:`RENAMED_STAGES` under its
  former name (at any depth)."""
  def walk(x):
    if isinstance(x, dict):
      return type(x)((RENAMED_STAGES.get(k, k), walk(v))
                     for k, v in x.items())
    return jax.tree.map(lambda y: walk(y) if isinstance(y, dict) else y, x,
                        is_leaf=lambda y: y is not x and isinstance(y, dict))
  return walk(tree)


def from_former_names(restored: Any, target: Any) -> Any:
  """``restored`` (read under the former names) in ``target``'s
  structure: each leaf found by its former path."""
  by_path = {_former_path(p): x for p, x in
             jax.tree_util.tree_flatten_with_path(restored)[0]}
  paths, treedef = jax.tree_util.tree_flatten_with_path(target)
  return jax.tree.unflatten(treedef, [by_path[_former_path(p)]
                                      for p, _ in paths])


class GuardStateBefore20261206(NamedTuple):
  """:class:`~orthax.transforms.SkipIfNonfiniteState` as checkpoints before
  2026-12-06 hold it (orbax saves a NamedTuple by its field names)."""
  inner_state: Any
  nonfinite: Any
  consecutive: Any
  total: Any


def _is_guard(x: Any) -> bool:
  return isinstance(x, SkipIfNonfiniteState)


def _is_old_guard(x: Any) -> bool:
  return isinstance(x, GuardStateBefore20261206)


def without_added_fields(tree: Any) -> Any:
  """``tree`` with each guard state, nested ones included (a recipe's
  guard inside ``skip_if_nonfinite``), in its layout before 2026-12-06."""
  def old(x):
    return GuardStateBefore20261206(without_added_fields(x.inner_state),
                                    *x[1:4])
  return jax.tree.map(lambda x: old(x) if _is_guard(x) else x, tree,
                      is_leaf=_is_guard)


def _false_like(x: Any) -> jax.Array:
  sharding = getattr(x, 'sharding', None)
  if sharding is None:
    return jnp.zeros(x.shape, x.dtype)
  return jax.device_put(jnp.zeros(x.shape, x.dtype), sharding)


def with_added_fields(restored: Any, target: Any) -> Any:
  """``restored`` (older guard layout) in ``target``'s: the added flags
  False, with ``target``'s dtypes and shardings; nested guards too. The
  outermost guards of both trees come in the same flatten order."""
  new = iter([x for x in jax.tree.leaves(target, is_leaf=_is_guard)
              if _is_guard(x)])

  def fill(old):
    today = next(new)
    return SkipIfNonfiniteState(
        with_added_fields(old.inner_state, today.inner_state), *old[1:4],
        nonfinite_updates=jax.tree.map(_false_like,
                                       today.nonfinite_updates),
        nonfinite_state=_false_like(today.nonfinite_state))
  return jax.tree.map(lambda x: fill(x) if _is_old_guard(x) else x,
                      restored, is_leaf=_is_old_guard)


def older_layouts(target: Any) -> list[tuple[Any, Callable[[Any], Any]]]:
  """``(older, to_today)`` for each older layout ``target`` may have been
  saved in: restore into ``older``, then ``to_today(restored)``."""
  dropped = without_added_fields(target)
  return [
      (under_former_names(target),
       lambda r: from_former_names(r, target)),
      (dropped, lambda r: with_added_fields(r, target)),
      (under_former_names(dropped),
       lambda r: with_added_fields(from_former_names(r, dropped), target)),
  ]
