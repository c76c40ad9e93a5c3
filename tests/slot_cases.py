"""The recipe of ``slot_recipe.py`` (an m×m slot state per matrix) on 8 fake
CPU devices against one device (run as a script by
``tests/test_slot_stages.py``, in a subprocess with
``--xla_force_host_platform_device_count=8``). Per mesh: the relative
difference of two steps' updates and of the slot states (as the multiset of
the per-matrix states' norms: the layouts differ, [1, k, m, m] on one
device and [8, k, m, m] on the mesh), the collectives of the compiled step
and its bytes against plain Muon's, and where the states live. Prints one
JSON object on the last line."""

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
import optax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fake_devices
import orthax
import orthax.flax
import sharding_recipes_cases as R
import slot_recipe
from orthax.sharding import hlo


def _norms(state):
  """Sorted Frobenius norms of the nonzero per-matrix states, duplicates
  (devices that hold the same matrices) dropped."""
  vals = []
  for a in jax.tree.leaves(optax.tree.get(state, 'gram_ema').slots):
    a = np.asarray(a, np.float64)
    vals += list(np.linalg.norm(a.reshape(-1, *a.shape[-2:]), axis=(1, 2)))
  vals = sorted(v for v in vals if v > 0)
  out = []
  for v in vals:
    if not out or abs(v - out[-1]) > 1e-6 * max(v, 1e-30):
      out.append(v)
  return np.asarray(out)


def _step(name, mesh, explicit, pspecs, params, grads):
  dist = orthax.sharding.Distributed(mesh, None if explicit else pspecs,
                                     comm_dtype=jnp.float32)
  tx = orthax.recipe(name, distributed=dist)
  shard = lambda t: jax.tree.map(
      lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, pspecs)
  p = shard(params)
  st = tx.init(p)
  step = jax.jit(tx.update)
  text = step.lower(shard(grads[0]), st, p).compile().as_text()
  us = []
  for g in grads:
    u, st = step(shard(g), st, p)
    us.append(u)
  with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
    plan_bytes = orthax.sharding.plan(tx, p).bytes_per_device
  return us, st, hlo.collectives(text), plan_bytes


def run(shape, names, axis_type):
  mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))
  explicit = axis_type == AxisType.Explicit
  pspecs = R.specs(names)
  if names == ('dp',):  # every matrix replicated
    pspecs = jax.tree.map(lambda s: P(), pspecs,
                          is_leaf=lambda x: isinstance(x, P))
  name = slot_recipe.register()
  params, grads = R.tree(0), [R.tree(1), R.tree(2)]
  ref_tx = orthax.recipe(name)
  st = ref_tx.init(params)
  ref = []
  ref_step = jax.jit(ref_tx.update)  # one jit: a new one per step recompiles
  for g in grads:
    u, st = ref_step(g, st, params)
    ref.append(u)
  with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
    us, st8, ops, plan_bytes = _step(name, mesh, explicit, pspecs, params,
                                     grads)
    _, _, muon_ops, muon_plan = _step('muon', mesh, explicit, pspecs, params,
                                      grads)
  err = max(float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b))
                  / np.linalg.norm(np.asarray(b)))
            for u, r in zip(us, ref)
            for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(r)))
  n1, n8 = _norms(st), _norms(st8)
  slots = jax.tree.leaves(optax.tree.get(st8, 'gram_ema'))  # and its ids
  # The trainer's state shardings put slot states on their owner devices.
  specs = orthax.flax.state_specs(st8, params, pspecs)
  slot_specs = jax.tree.leaves(optax.tree.get(specs, 'gram_ema'),
                               is_leaf=lambda x: isinstance(x, P))
  return {
      'state_specs_owner': bool(slot_specs) and all(
          sp == P(tuple(names)) for sp in slot_specs),
      'rel_err': err,
      'state_rel_err': (float(np.max(np.abs(n1 - n8) / n1))
                        if n1.shape == n8.shape else float('inf')),
      'collectives': sorted({o['op'] for o in ops}),
      'wire_bytes': sum(o['wire_bytes'] for o in ops),
      'muon_wire_bytes': sum(o['wire_bytes'] for o in muon_ops),
      'plan_bytes': plan_bytes, 'muon_plan_bytes': muon_plan,
      'state_sharded_over_all_axes': all(
          a.shape[0] == 8 and a.sharding.is_equivalent_to(
              NamedSharding(mesh, P(tuple(names))), a.ndim) for a in slots),
  }


def main():
  meshes = {
      'fsdp8': ((8,), ('fsdp',), AxisType.Auto),
      'fsdp4tp2': ((4, 2), ('fsdp', 'tp'), AxisType.Auto),
      'explicit_fsdp8': ((8,), ('fsdp',), AxisType.Explicit),
      'dp8': ((8,), ('dp',), AxisType.Auto),
  }
  out = {}
  for key, (shape, names, at) in meshes.items():
    out[key] = fake_devices.guarded(lambda: run(shape, names, at))
  print(json.dumps(out))


if __name__ == '__main__':
  main()
