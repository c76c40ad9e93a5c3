"""Which matrix sits in which slot of a slot stage's state, and moving a
state to another layout.

A slot stage's state (:class:`orthax.engine.SlotState`) holds, per group of
the plan, ``[D, k, *state]`` arrays: row ``d`` for the mesh's ``d``-th
device (its devices in row-major order of the mesh's axes), ``k`` matrices
each. Which matrix a slot holds follows from the mesh, the leaves'
shardings and the plan, so the layout is the mesh's. The state carries it
as data, ``ids`` (per group, ``[D, k]`` int32), which a checkpoint saves
with the slots:

* a slot's entry is ``2·i + t``: ``i`` numbers the matrices of the leaves
  in order (a leaf's matrices in row-major order of its batch axes), which
  no mesh changes, and ``t`` is 1 where the matrix runs transposed (its
  state is then of the transpose); ``-1`` marks a padding slot;
* :func:`relayout` moves a state restored from one layout into another's
  (a fresh ``init`` on the new mesh), matrix by matrix: resuming on another
  mesh or device count.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Sequence

import jax
import numpy as np

from orthax import sharding


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
  """The state of a slot stage (:attr:`StageShapes.slots
  <orthax.matrix_stages.StageShapes>`): per group of the plan (keys
  :func:`orthax.sharding.group_key`), a ``[D, k, *state]`` array (a dict of
  them for a state of several arrays), ``D`` the
  devices of the mesh (1 on one device) and ``k`` the matrices each device
  owns (:func:`orthax.sharding.slot_count`), sharded over ``axes``, every
  axis of the mesh: each device holds its own matrices' state.
  ``orthax.flax.state_specs`` gives each array ``PartitionSpec(axes)``.
  ``members``: each group's dtype and leaf paths at ``init``, which
  :func:`map_matrices` checks the update's grouping against (a leaf whose
  update has another dtype than its parameter would join another group,
  and read another leaf's state). ``ids``: per group, the ``[D, k]`` int32
  numbers of the matrices in its slots (``-1``: padding), the layout as
  data, saved with the state; :func:`~orthax.engine.relayout_slot_state` moves a state
  restored on another mesh into this mesh's layout."""
  slots: dict[str, jax.Array]
  axes: tuple[str, ...] = dataclasses.field(default=(),
                                            metadata={'static': True})
  members: tuple[tuple[str, tuple[str, ...]], ...] = dataclasses.field(
      default=(), metadata={'static': True})
  ids: dict[str, jax.Array] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    _register_with_flax_serialization()


# Public as orthax.engine.SlotState (documented, and pickled, there).
SlotState.__module__ = 'orthax.engine'

_FLAX_SERIALIZATION_REGISTERED = False


def _register_with_flax_serialization() -> None:
  """Lets ``flax.serialization`` (msgpack: a linen ``TrainState``'s
  ``to_bytes``) write a :class:`SlotState`, which it refuses unless the type
  is registered with it. Done at the first ``SlotState`` made after Flax is
  loaded (never importing it: the engine does not depend on Flax), which
  every step makes anew: only a state from ``init`` run before Flax was
  imported, written before any step, is refused. The ``slots`` are written,
  ``axes`` and ``members`` come back from the target."""
  global _FLAX_SERIALIZATION_REGISTERED
  serialization = sys.modules.get('flax.serialization')
  if _FLAX_SERIALIZATION_REGISTERED or serialization is None:
    return
  serialization.register_serialization_state(
      SlotState,
      lambda s: {'slots': serialization.to_state_dict(s.slots),
                 'ids': serialization.to_state_dict(s.ids)},
      lambda target, d: SlotState(
          _by_saved_keys(serialization, target.slots, d['slots']),
          target.axes, target.members,
          # written before the ids were kept: the target's
          _by_saved_keys(serialization, target.ids, d.get('ids',
                                                         target.ids))),
      override=True)  # a second registration (another thread) is harmless
  _FLAX_SERIALIZATION_REGISTERED = True


def _by_saved_keys(serialization: Any, target: dict, saved: dict) -> dict:
  """The saved groups, each read into the target's group of that key where
  there is one: a state written on a mesh with other slot groups (their
  number follows the mesh) keeps all of its own, for
  :func:`relayout` to move (Flax's dict restore drops keys the target
  lacks, and refuses one that lacks a target key)."""
  return {k: (serialization.from_state_dict(target[k], v) if k in target
              else v) for k, v in saved.items()}


def _ravel(coord: dict[str, int], sizes: dict[str, int],
           axes: Sequence[str]) -> int:
  """The linear index of a device along ``axes`` (the first major), as
  ``jax.lax.axis_index(axes)`` and a ``PartitionSpec`` entry number it."""
  j = 0
  for a in axes:
    j = j * sizes[a] + coord[a]
  return j


def _local_ids(ids: np.ndarray, batch: Sequence[int], entries, coord,
               sizes) -> np.ndarray:
  """The block of a leaf's ``ids`` (its batch shape) that the device at
  ``coord`` holds, by the leaf's ``PartitionSpec`` ``entries``."""
  for pos, d in enumerate(batch):
    axes = entries[d]
    n = math.prod(sizes[a] for a in axes)
    if n > 1:
      blk = ids.shape[pos] // n
      j = _ravel(coord, sizes, axes)
      ids = np.take(ids, np.arange(j * blk, (j + 1) * blk), axis=pos)
  return ids


def slot_ids(plan: Any, leaves: Sequence[Any], specs: Sequence[Any],
             pspecs: Sequence[Any], mesh: Any) -> dict[str, np.ndarray]:
  """Per group of ``plan`` (keys :func:`orthax.sharding.group_key`), the
  ``[D, k]`` ids (module docstring) of the matrices in its slots: the
  device's local stack (each member leaf's block of matrices, in order),
  padded, and for ``a2a`` and ``replicated`` its share by its index along
  the split axes, as the executor's bodies take them. ``leaves`` (shapes),
  ``specs`` and ``pspecs`` are those the plan was made from; ``mesh``
  ``None`` on one device."""
  names = () if mesh is None else tuple(mesh.axis_names)
  sizes = {} if mesh is None else dict(mesh.shape)
  counts = [s.matrix_shape(x.shape)[0] for x, s in zip(leaves, specs)]
  offsets = np.cumsum([0] + counts)
  coords = [dict(zip(names, c)) for c in
            np.ndindex(*[sizes[a] for a in names])] or [{}]
  out = {}
  for gi, g in enumerate(plan.groups):
    members = []
    for i, t in zip(g.leaves, g.transposed):
      shape = tuple(leaves[i].shape)
      batch = specs[i].resolve(shape)[0]
      ids = 2 * (offsets[i] + np.arange(counts[i]).reshape(
          [shape[d] for d in batch])) + int(t)
      members.append((ids, batch, sharding.spec_entries(pspecs[i],
                                                        len(shape))))
    # A device's row depends only on its place along these axes.
    axes = sorted({a for _, b, e in members for d in b for a in e[d]}
                  | set(g.split_axes))
    rows = {}
    for coord in coords:
      key = tuple(coord[a] for a in axes)
      if key not in rows:
        rows[key] = _row(g, members, coord, sizes)
    out[sharding.group_key(gi)] = np.stack(
        [rows[tuple(c[a] for a in axes)] for c in coords]).astype(np.int32)
  return out


def _row(g: Any, members, coord, sizes) -> np.ndarray:
  """The ids of the ``k`` slots of the device at ``coord`` in group ``g``:
  its local stack (each member's block, in order), padded, and for
  ``a2a`` and ``replicated`` its share by its index along the split
  axes."""
  local = np.concatenate([_local_ids(ids, batch, entries, coord, sizes)
                          .ravel() for ids, batch, entries in members])
  k = sharding.slot_count(g)
  if g.strategy in ('a2a', 'replicated'):
    j = _ravel(coord, sizes, g.split_axes)
    local = np.concatenate([local, np.full(g.padded - len(local), -1)])
    local = local[j * k:(j + 1) * k]
  return local


def _host(x: Any) -> np.ndarray:
  """``x`` on the host; the array inside a box (an ``nnx.Variable`` of an
  ``nnx.Optimizer``'s state) too. An array with shards on other processes
  (a multi-host mesh) is gathered from all of them: every process calls
  this in the same order."""
  leaves = jax.tree.leaves(x)
  if len(leaves) != 1:
    raise ValueError(f'expected one array, got {len(leaves)} leaves.')
  a = leaves[0]
  if (isinstance(a, jax.Array) and not a.is_fully_addressable
      and not a.is_fully_replicated):
    # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))
  return np.asarray(jax.device_get(a))


def _sources(saved: Any) -> dict[int, tuple[str, int, int]]:
  """``{matrix: (group key, flat slot, transposed)}`` of ``saved``'s ids
  (the first of replicated copies)."""
  src = {}
  for key, ids in saved.ids.items():
    flat = _host(ids).reshape(-1)
    for pos in np.flatnonzero(flat >= 0):
      src.setdefault(int(flat[pos]) >> 1, (key, int(pos), int(flat[pos]) & 1))
  return src


def placed_like(x: Any, like: Any) -> jax.Array:
  """``x`` with ``like``'s sharding where that is a mesh's; else on the
  default device, uncommitted (as ``init`` leaves its scalars), so that
  ``jit`` places it with the arrays it meets."""
  sh = getattr(like, 'sharding', None)
  if isinstance(sh, jax.sharding.NamedSharding):
    return jax.device_put(x, sh)
  return jax.numpy.asarray(_host(x))


def _shapes(tree: Any) -> Any:
  flat, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, [(tuple(np.shape(a)), np.dtype(a.dtype)) for a in flat]


def relayout(saved: Any, like: Any, where: str = 'slot state') -> Any:
  """``saved`` (an :class:`~orthax.engine.SlotState`, e.g. restored from a
  checkpoint made on another mesh) in ``like``'s layout (``like``: the same
  stage's state from ``init`` on this mesh, whose ``ids`` are concrete):
  each matrix's state moved to the slot ``like`` gives it, padding slots
  as in ``like``, each array placed with ``like``'s sharding (only placed
  when its ids already are ``like``'s). Raises
  ``ValueError`` (naming ``where``) when a matrix of ``like`` has no state
  in ``saved``, runs in the other orientation there, or has another state
  shape or structure."""
  same = (saved.ids.keys() == like.ids.keys() and all(
      np.array_equal(_host(saved.ids[k]), _host(like.ids[k]))
      for k in like.ids)) and _shapes(saved.slots) == _shapes(like.slots)
  if same:  # placed as like's
    return type(like)(
        jax.tree.map(lambda x, t: placed_like(x, t), saved.slots,
                     like.slots),
        like.axes, like.members,
        jax.tree.map(lambda x, t: placed_like(x, t), saved.ids, like.ids))
  if not like.ids and like.slots:
    raise ValueError(f'{where}: the target state has no slot ids.')
  if any(not hasattr(a, 'addressable_shards') and not isinstance(a, np.ndarray)
         for a in jax.tree.leaves(like.ids)):
    raise ValueError(f'{where}: the target state must be concrete, '
                     'tx.init(params) on this mesh (its ids say where each '
                     'matrix goes), not jax.eval_shape of it.')
  src = _sources(saved)
  slots = {}
  for key, ids in like.ids.items():
    want = _host(ids).reshape(-1)
    live = np.flatnonzero(want >= 0)
    missing = [int(want[p]) >> 1 for p in live if int(want[p]) >> 1 not in src]
    if missing:
      gi = int(key.removeprefix('group')) if key.startswith('group') else -1
      leaves = list(like.members[gi][1]) if 0 <= gi < len(like.members) else []
      raise ValueError(
          f'{where}: the saved state has no state for matrices '
          f'{sorted(set(missing))[:5]} (of the leaves {leaves} here, '
          'numbered in the leaves\' order): it was made for other '
          'parameters, or some of its groups were lost on the way.')
    flipped = [int(want[p]) >> 1 for p in live
               if src[int(want[p]) >> 1][2] != int(want[p]) & 1]
    if flipped:
      raise ValueError(
          f'{where}: matrices {flipped[:5]} run transposed on one mesh and '
          'not on the other; their state cannot be moved.')
    slots[key] = _move(saved, like, key, want, live, src, where)
  return type(like)(slots, like.axes, like.members, like.ids)


def _move(saved, like, key, want, live, src, where):
  """Group ``key`` of ``like``'s slots filled from ``saved``."""
  like_flat, treedef = jax.tree_util.tree_flatten_with_path(like.slots[key])
  out = []
  for path, target in like_flat:
    base = _host(target)
    rows = base.reshape((-1,) + base.shape[2:]).copy()
    for skey in sorted({src[int(want[p]) >> 1][0] for p in live}):
      arr = _saved_leaf(saved, skey, path, where)
      if arr.shape[2:] != base.shape[2:] or arr.dtype != base.dtype:
        raise ValueError(
            f'{where}: {skey}{jax.tree_util.keystr(path)} is saved as '
            f'{arr.dtype}[..., {arr.shape[2:]}] per matrix; here it is '
            f'{base.dtype}[..., {base.shape[2:]}].')
      sel = [p for p in live if src[int(want[p]) >> 1][0] == skey]
      rows[sel] = arr.reshape((-1,) + arr.shape[2:])[
          [src[int(want[p]) >> 1][1] for p in sel]]
    out.append(placed_like(rows.reshape(base.shape), target))
  return jax.tree.unflatten(treedef, out)


def _saved_leaf(saved, skey, path, where) -> np.ndarray:
  try:
    node = saved.slots[skey]
    for p in path:
      if isinstance(p, jax.tree_util.GetAttrKey):
        node = getattr(node, p.name)
      else:
        node = node[p.key if isinstance(p, jax.tree_util.DictKey) else p.idx]
  except (KeyError, IndexError, TypeError, AttributeError):
    raise ValueError(f'{where}: the saved {skey} has no '
                     f'{jax.tree_util.keystr(path) or "array"} (another '
                     'stage\'s state).') from None
  return _host(node)
