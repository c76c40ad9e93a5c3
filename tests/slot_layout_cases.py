"""Slot-state layouts on 8 fake CPU devices (run as a script by
``tests/test_slot_layout.py``, in a subprocess with
``--xla_force_host_platform_device_count=8``). Prints one JSON object on
the last line.

* ``ids/<mesh>``: a stage that records, in its slot, the value of the
  matrix it is handed runs on matrices filled with their own number (the
  leaves' matrices counted in order, each leaf's in row-major order of its
  batch axes, plus one): the slots it fills are compared with the ``ids``
  that ``init`` laid out.
* ``relayout/<recipe>/<from>-><to>``: two steps on one mesh, the state
  laid out for another (:func:`orthax.transforms.relayout_state`), two
  more steps there, against four steps on one device.
"""

from __future__ import annotations

import contextlib
import json
import os

if __name__ == '__main__':
  flag = '--xla_force_host_platform_device_count=8'
  if flag not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' ' + flag

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fake_devices
import orthax
import sharding_recipes_cases as R
from orthax import engine
from orthax import matrix_stages as MS
from orthax import transforms as T

MESHES = {
    'one': None,
    'fsdp8': ((8,), ('fsdp',), AxisType.Auto),
    'fsdp4tp2': ((4, 2), ('fsdp', 'tp'), AxisType.Auto),
    'explicit_fsdp2tp4': ((2, 4), ('fsdp', 'tp'), AxisType.Explicit),
    'dp8': ((8,), ('dp',), AxisType.Auto),
}

# (shape, spec entries): transposed, batch-sharded, padded, replicated and
# two-axis layouts.
ID_SHAPES = {
    'a': ((64, 128), ('fsdp', None)),
    'b': ((128, 64), ('fsdp', None)),
    'c': ((64, 128), (None, 'tp')),
    'experts': ((8, 32, 64), ('fsdp', None, None)),
    'moe': ((4, 2, 32, 64), ('tp', None, 'fsdp', None)),
    'scan': ((3, 64, 128), (None, 'fsdp', None)),
    'sq': ((32, 32), ('tp', 'fsdp')),
}


@MS.stage
class Record(MS.MatrixStage):
  """Keeps the first entry of the matrix it is handed (its slot's
  number, on matrices filled with their numbers)."""

  name = 'record'

  def shapes(self, fan_in, fan_out):
    return MS.StageShapes(state=(), slots=True)

  def apply(self, o, state, blocks, norms=()):
    return o, o[:, 0, 0].astype(state.dtype)


def _mesh(key):
  if MESHES[key] is None:
    return None
  shape, names, at = MESHES[key]
  return jax.make_mesh(shape, names, axis_types=(at,) * len(shape))


def _specs(mesh, entries):
  names = () if mesh is None else mesh.axis_names
  return P(*[a if a in names else None for a in entries])


def _numbered():
  """Each leaf's matrices filled with their number plus one."""
  out, start = {}, 0
  for key in sorted(ID_SHAPES):
    shape, _ = ID_SHAPES[key]
    batch = shape[:-2]
    count = int(np.prod(batch)) if batch else 1
    nums = start + 1 + np.arange(count, dtype=np.float32).reshape(batch)
    out[key] = jnp.asarray(np.broadcast_to(nums[..., None, None], shape))
    start += count
  return out


def ids_case(key):
  mesh = _mesh(key)
  grads = _numbered()
  pspecs = {k: _specs(mesh, e) for k, (_, e) in ID_SHAPES.items()}
  dist = (None if mesh is None else orthax.sharding.Distributed(
      mesh, pspecs, comm_dtype=jnp.float32))
  tx = T.slot_step(lambda t: Record(), orthax.MatrixSpec(), dist, 'record')
  if mesh is not None:
    grads = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                         grads, pspecs)
  explicit = mesh is not None and key.startswith('explicit')
  with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
    state = tx.init(grads)
    _, new = jax.jit(tx.update)(grads, state)
  slots, ids = new.slots.slots, new.slots.ids
  wrong = {}
  for g in ids:
    want = np.asarray(ids[g])
    want = np.where(want >= 0, (want >> 1) + 1, 0).astype(np.float32)
    got = np.asarray(slots[g])
    if got.shape != want.shape or not np.array_equal(got, want):
      wrong[g] = {'ids': want.tolist(), 'slots': got.tolist()}
  members = [list(p) for _, p in new.slots.members]
  transposed = {g: sorted({int(v) & 1 for v in np.asarray(ids[g]).ravel()
                           if v >= 0}) for g in ids}
  return {'wrong': wrong, 'groups': members, 'transposed': transposed,
          'padding': int(sum((np.asarray(i) < 0).sum() for i in ids.values())),
          'devices': int(next(iter(ids.values())).shape[0])}


def _tx(recipe, mesh):
  dist = (None if mesh is None else orthax.sharding.Distributed(
      mesh, R.specs(mesh.axis_names), comm_dtype=jnp.float32))
  return orthax.recipe(recipe, distributed=dist)


def _place(tree, mesh):
  if mesh is None:
    return tree
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                      tree, R.specs(mesh.axis_names))


def _run(recipe, key, state, steps):
  """``steps`` = [(params, grads)] on mesh ``key`` from ``state`` (None:
  init, else laid out from a state of another mesh); the updates and the
  final state."""
  mesh = _mesh(key)
  explicit = mesh is not None and key.startswith('explicit')
  tx = _tx(recipe, mesh)
  with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
    fresh = tx.init(_place(steps[0][0], mesh))
    st = fresh if state is None else T.relayout_state(state, fresh)
    step, us = jax.jit(tx.update), []
    for p, g in steps:
      u, st = step(_place(g, mesh), st, _place(p, mesh))
      us.append(u)
  return us, st


def relayout_case(recipe, src, dst):
  params = R.tree(0)
  steps = [(params, R.tree(s)) for s in (1, 2, 3, 4)]
  ref, _ = _run(recipe, 'one', None, steps)
  _, mid = _run(recipe, src, None, steps[:2])
  us, _ = _run(recipe, dst, mid, steps[2:])
  # Control: the two steps on dst from a fresh state (the slot state lost).
  lost, _ = _run(recipe, dst, None, steps[2:])
  rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - b)
                           / max(np.linalg.norm(np.asarray(b, np.float64)),
                                 1e-30))
  err = lambda outs: max(
      rel(a, b) for u, r in zip(outs, ref[2:])
      for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(r)))
  return {'rel_err': err(us), 'rel_err_state_lost': err(lost)}


RELAYOUTS = (('aro', 'fsdp8', 'fsdp4tp2'), ('aro', 'fsdp4tp2', 'one'),
             ('aro', 'one', 'fsdp8'), ('dct_adamw', 'fsdp8', 'fsdp4tp2'),
             ('dct_adamw', 'explicit_fsdp2tp4', 'fsdp8'),
             ('trion', 'fsdp4tp2', 'dp8'), ('fismo', 'dp8', 'fsdp8'))


def replicated_state_case():
  """A recipe's state placed replicated (as a restore into replicated
  targets gives it) on an Explicit mesh, stepped with the guard on (it met
  a ShardingTypeError in the guard's select); the update equals the one
  from init's placement."""
  mesh = _mesh('explicit_fsdp2tp4')
  out = {}
  for recipe in ('muon', 'aro'):
    tx = _tx(recipe, mesh)
    p, g = _place(R.tree(0), mesh), _place(R.tree(1), mesh)
    with jax.set_mesh(mesh):
      st = tx.init(p)
      rep = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())),
                         st)
      u, _ = jax.jit(tx.update)(g, st, p)
      v, _ = jax.jit(tx.update)(g, rep, p)
    out[recipe] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                      for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v)))
  return out


def main():
  out = {'replicated_state': fake_devices.guarded(replicated_state_case)}
  for key in MESHES:
    out[f'ids/{key}'] = fake_devices.guarded(lambda k=key: ids_case(k))
  for recipe, src, dst in RELAYOUTS:
    out[f'relayout/{recipe}/{src}->{dst}'] = fake_devices.guarded(
        lambda r=recipe, s=src, d=dst: relayout_case(r, s, d))
  print(json.dumps(out))


if __name__ == '__main__':
  main()
