"""Moving an optimizer state to another mesh or device count."""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp

from orthax import _slot_layout as slot_layout
from orthax import engine
from orthax.transforms.check_finite import SkipIfNonfiniteState


def _is_node(x: Any) -> bool:
  return isinstance(x, (engine.SlotState, SkipIfNonfiniteState))


def _placed_like(x: Any, like: Any, where: str) -> Any:
  if not hasattr(x, 'shape') or not hasattr(like, 'shape'):
    return x
  if tuple(x.shape) != tuple(like.shape):
    raise ValueError(f'relayout_state: {where or "state"} has shape '
                     f'{tuple(x.shape)}, {tuple(like.shape)} here: a state '
                     'of another model or optimizer.')
  return slot_layout.placed_like(x, like)


def _guard(x: SkipIfNonfiniteState, like: SkipIfNonfiniteState,
           where: str) -> SkipIfNonfiniteState:
  """A guard's fields moved; its last step's state flags (one per inner
  leaf, whose number the slot groups of the mesh set) start False where
  their number differs: no step has run on this mesh yet."""
  flags, want = x.nonfinite_state, like.nonfinite_state
  if ([tuple(a.shape) for a in jax.tree.leaves(flags)]
      != [tuple(a.shape) for a in jax.tree.leaves(want)]):
    # like's own may be abstract (the trainer's restore target)
    flags = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), want)
  return SkipIfNonfiniteState(**{
      f: relayout_state(flags if f == 'nonfinite_state' else getattr(x, f),
                        getattr(like, f), f'{where}.{f}')
      for f in x._fields})


def _refuse_nnx_state(*trees: Any) -> None:
  """An ``nnx.State`` holds a slot state taken apart into dicts, which
  cannot be found (never imports Flax)."""
  nnx = sys.modules.get('flax.nnx')
  state_type = getattr(nnx, 'State', None)
  if state_type is not None and any(isinstance(t, state_type) for t in trees):
    raise ValueError(
        'relayout_state: got an nnx.State, in which Flax keeps a slot state '
        'as plain dicts; pass the optimizer states themselves '
        '(nnx.Optimizer.opt_state) and assign the result to '
        'optimizer.opt_state.')


def relayout_state(state: Any, like: Any, where: str = '') -> Any:
  """An optimizer state made on another mesh or device count (or restored
  from a checkpoint saved there) for this one.

  ``like`` is the same optimizer's state from ``init`` here (concrete).
  Each :class:`~orthax.engine.SlotState` (ARO's, FISMO's, DCT-AdamW's and
  Trion's per-matrix state, kept on the device that owns each matrix, so
  laid out by the mesh) is moved matrix by matrix into ``like``'s layout
  (:func:`orthax.engine.relayout_slot_state`); every other leaf is
  ``state``'s, placed with ``like``'s sharding. A state from this mesh
  comes back with the same values. Restore a checkpoint's slot arrays, and
  the recipe guard's ``nonfinite_state`` flags (one per leaf of the state),
  in their saved shapes (they depend on the mesh; with orbax,
  :func:`orthax.train.checkpoint_slots.as_saved` builds that target); the
  trainer does this on its own. For an ``nnx.Optimizer``, move its ``opt_state`` (a fresh
  optimizer's as ``like``) and assign the result to ``opt_state``.

  Args:
    state: the state to move (from another mesh or device count, or
      restored from a checkpoint in its saved shapes).
    like: the same optimizer's state from ``init`` on this mesh (concrete):
      the layout and sharding to move to.
    where: a prefix of the paths that errors name (default ``''``: the
      whole state, where an ``nnx.State`` is refused; the guard's fields
      are moved with their own).

  Example:

  >>> import jax, jax.numpy as jnp, numpy as np, orthax
  >>> tx = orthax.aro(learning_rate=0.02)
  >>> params = {'w': jnp.ones((8, 16))}
  >>> grads = {'w': jnp.arange(128.0).reshape(8, 16) / 128}
  >>> _, state = tx.update(grads, tx.init(params), params)
  >>> moved = orthax.transforms.relayout_state(state, tx.init(params))
  >>> all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(moved),
  ...                                          jax.tree.leaves(state)))
  True

  Raises:
    ValueError: naming the path, where a matrix has no state in ``state``
      or a leaf has another shape (another model or optimizer).
  """
  if not where:  # (nested nnx.States of parameter-shaped trees are fine)
    _refuse_nnx_state(state, like)
  flat, treedef = jax.tree_util.tree_flatten_with_path(state,
                                                       is_leaf=_is_node)
  targets = jax.tree.leaves(like, is_leaf=_is_node)
  if len(targets) != len(flat):
    raise ValueError(f'relayout_state: {where or "the state"} has '
                     f'{len(flat)} leaves, {len(targets)} here: a state of '
                     'another model or optimizer.')
  out = []
  for (p, x), t in zip(flat, targets):
    at = where + jax.tree_util.keystr(p)
    if isinstance(x, engine.SlotState) and isinstance(t, engine.SlotState):
      out.append(engine.relayout_slot_state(
          x, t, f'relayout_state: {at or "slot state"}'))
    elif isinstance(x, SkipIfNonfiniteState) and isinstance(
        t, SkipIfNonfiniteState):
      out.append(_guard(x, t, at))
    else:
      out.append(_placed_like(x, t, at))
  return jax.tree.unflatten(treedef, out)
