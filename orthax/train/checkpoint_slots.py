"""Slot states in checkpoints: restored in the layout they were saved in,
then moved into this mesh's.

ARO, FISMO, DCT-AdamW and Trion keep per-matrix state
(:class:`orthax.engine.SlotState`) on the device that owns each matrix, so
its arrays' shapes and the place of each matrix in them are the mesh's. The
state saves that layout with it (``ids``). On restore,
:meth:`~orthax.train.checkpoint.Checkpointer.restore` given a ``layout``
(the slot states of a fresh ``init`` on this mesh) reads each slot state in
its saved shapes (:func:`as_saved`) and moves it, matrix by matrix, into
the layout (:func:`orthax.transforms.relayout_state`): a run resumes on
another mesh or device count, and a same-shaped state from another mesh is
no longer read as this mesh's. A checkpoint written before the layout was
saved (no ``ids``) is read as laid out like this mesh, and refused across a
mesh change (:class:`UnknownLayoutError`), step by step: a fallback from a
damaged newer step may reach one.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

from orthax import engine
from orthax import transforms

_is_slot = lambda x: isinstance(x, engine.SlotState)


class UnknownLayoutError(ValueError):
  """A checkpoint's slot states were saved without their layout (by an
  orthax before 2026-12-07) on another mesh: they cannot be moved."""


def slot_states(tree: Any) -> Any:
  """``tree`` with its slot states kept and every other leaf ``None``
  (the ``layout`` :meth:`Checkpointer.restore` takes, from ``init``)."""
  return jax.tree.map(lambda x: x if _is_slot(x) else None, tree,
                      is_leaf=_is_slot)


def slot_state_paths(state: Any) -> list[str]:
  """The paths of ``state``'s slot states."""
  flat, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_slot)
  return [jax.tree_util.keystr(p) for p, x in flat if _is_slot(x)]


def _at(meta: Any, path: tuple) -> Any:
  """The node of orbax's metadata tree (nested dicts and lists) at a key
  path of the state; ``None`` where it has none."""
  node = getattr(meta, 'tree', meta)  # orbax's TreeMetadata
  for k in path:
    key = getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', None)))
    try:
      node = node[key]
    except (KeyError, IndexError, TypeError):
      return None
  return node


def _as_read(m: Any, here: Any = None, mesh: Any = None) -> Any:
  """Abstract arrays of the saved shapes of the metadata ``m``: with the
  sharding of ``here`` (this mesh's target) where its structure and shapes
  are the saved ones, else on one device (on several processes, whose
  arrays must span them all: replicated on ``mesh``)."""
  if jax.process_count() > 1 and mesh is not None:
    one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  else:
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  read = lambda a, sh=one: jax.ShapeDtypeStruct(tuple(a.shape), a.dtype,
                                                sharding=sh)
  try:
    if here is not None and all(jax.tree.leaves(jax.tree.map(
        lambda a, h: tuple(a.shape) == tuple(h.shape), m, here))):
      return jax.tree.map(lambda a, h: read(a, h.sharding), m, here)
  except (ValueError, TypeError):  # another structure (other groups)
    pass
  return jax.tree.map(read, m)


def _unknown_layout(where: str, mesh_changes: Sequence[str],
                    path: tuple) -> str:
  return (
      f'{where} was saved on another mesh ({", ".join(mesh_changes)} '
      'changed) by an orthax that did not record where each matrix\'s state '
      f'sits (before 2026-12-07), and this optimizer keeps per-matrix state '
      f'laid out by the mesh ({jax.tree_util.keystr(path)}). Restored on this '
      "mesh, matrices would read each other's state, so it is refused even "
      'with --force. Resume on the saved mesh once (its next checkpoint '
      'records the layout), or use another workdir.')


def as_saved(target: Any, meta: Any, layout: Any,
             mesh_changes: Sequence[str] = (), where: str = 'checkpoint'
             ) -> tuple[Any, Callable[[Any], Any]]:
  """``(saved_target, to_here)``: ``target`` (abstract, this mesh's
  shardings) with each slot state in its saved shapes (read onto one
  device where they are not this mesh's) and, with it, each guard's flags
  of the last step (one per leaf of its inner state, whose number follows
  the slot groups); and the function that moves the restored state into
  ``layout``'s slot layout and ``target``'s shardings. A slot state saved
  without its layout is read as laid out like this mesh, unless
  ``mesh_changes`` (``'key: old -> new'``) says it was saved on another:
  :class:`UnknownLayoutError`, naming ``where``."""
  likes = iter([x for x in jax.tree.leaves(layout, is_leaf=_is_slot)
                if _is_slot(x)])
  mesh = next((x.sharding.mesh for x in jax.tree.leaves(target)
               if isinstance(getattr(x, 'sharding', None),
                             jax.sharding.NamedSharding)), None)
  flat, treedef = jax.tree_util.tree_flatten_with_path(target,
                                                       is_leaf=_is_slot)
  saved, here = [], []
  for p, x in flat:
    node = _at(meta, p)
    if _is_slot(x):
      like = next(likes)
      here.append(like)
      if isinstance(node, dict) and 'slots' in node:
        if not node.get('ids') and mesh_changes:
          raise UnknownLayoutError(_unknown_layout(where, mesh_changes, p))
        x = engine.SlotState(_as_read(node['slots'], x.slots, mesh),
                             x.axes, x.members,
                             _as_read(node.get('ids') or {}, x.ids, mesh))
    elif (p and getattr(p[-1], 'name', None) == 'nonfinite_state'
          and hasattr(node, 'shape')):
      here.append(x)
      x = _as_read(node, mesh=mesh)
    else:
      here.append(x)
    saved.append(x)
  like_tree = jax.tree.unflatten(treedef, here)

  def to_here(restored: Any) -> Any:
    return transforms.relayout_state(_with_ids(restored, like_tree),
                                     like_tree)

  return jax.tree.unflatten(treedef, saved), to_here


def _with_ids(restored: Any, like: Any) -> Any:
  """Slot states restored without ids (an older checkpoint) given
  ``like``'s: laid out as this mesh lays them out."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(restored,
                                                       is_leaf=_is_slot)
  likes = [x for x in jax.tree.leaves(like, is_leaf=_is_slot)]
  out = [engine.SlotState(x.slots, x.axes, x.members, t.ids)
         if _is_slot(x) and _is_slot(t) and not x.ids and t.ids else x
         for (_, x), t in zip(flat, likes)]
  return jax.tree.unflatten(treedef, out)
