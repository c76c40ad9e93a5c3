"""DCT-AdamW (and Trion, once registered) with ``distributed=`` on 8 fake
CPU devices against one device (run as a script by
``tests/test_dct_adamw.py`` / ``tests/test_trion.py`` in a subprocess with
``--xla_force_host_platform_device_count=8``). Per recipe and mesh: the
relative difference of three steps' updates (re-selection at steps 1 and 2
with ``update_every=2``), the slot states compared as the multiset of the
per-matrix ``m`` / ``b`` norms (the layouts differ: ``[1, k, ...]`` on one
device, ``[8, k, ...]`` on the mesh), the compiled step's collectives and
bytes against plain Muon's, where the states live, and the plan's FLOPs
against the compiled program's. Prints one JSON object on the last line."""

from __future__ import annotations

import contextlib
import json
import os
import sys

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
from orthax.sharding import hlo

# The state entry of each recipe and the per-matrix array compared.
RECIPES = {'dct_adamw': ('dct_adam', 'm'), 'trion': ('trion', 'b')}


def _kwargs(name):
  # DCT-AdamW: its decay at the step's own rate (rate_scale) on the mesh too.
  return dict(update_every=2, weight_decay=0.1) if name == 'dct_adamw' else {}


def _slots(state, name):
  return optax.tree.get(state, RECIPES[name][0]).slots


def _norms(state, name):
  """Sorted norms of the nonzero per-matrix states, duplicates (devices
  holding the same matrices) dropped."""
  vals = []
  for g in _slots(state, name).slots.values():
    a = np.asarray(g[RECIPES[name][1]], np.float64)
    vals += list(np.linalg.norm(a.reshape(-1, *a.shape[-2:]), axis=(1, 2)))
  vals = sorted(v for v in vals if v > 0)
  out = []
  for v in vals:
    if not out or abs(v - out[-1]) > 1e-6 * max(v, 1e-30):
      out.append(v)
  return np.asarray(out)


def _step(name, mesh, explicit, pspecs, params, grads, kw):
  dist = orthax.sharding.Distributed(mesh, None if explicit else pspecs,
                                     comm_dtype=jnp.float32)
  tx = orthax.recipe(name, distributed=dist, **kw)
  shard = lambda t: jax.tree.map(
      lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, pspecs)
  p = shard(params)
  st = tx.init(p)
  step = jax.jit(tx.update)
  m = hlo.measure(step, shard(grads[0]), st, p)
  us = []
  for g in grads:
    u, st = step(shard(g), st, p)
    us.append(u)
  with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
    plan = orthax.sharding.plan(tx, p)
  return us, st, m, plan


def run(name, shape, names, axis_type):
  mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))
  explicit = axis_type == AxisType.Explicit
  pspecs = R.specs(names)
  params, grads = R.tree(0), [R.tree(1), R.tree(2), R.tree(3)]
  kw = _kwargs(name)
  ref_tx = orthax.recipe(name, **kw)
  st = ref_tx.init(params)
  ref = []
  ref_step = jax.jit(ref_tx.update)  # one jit: a new one per step recompiles
  for g in grads:
    u, st = ref_step(g, st, params)
    ref.append(u)
  with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
    us, st8, m, plan = _step(name, mesh, explicit, pspecs, params, grads, kw)
    _, _, muon, muon_plan = _step('muon', mesh, explicit, pspecs, params,
                                  grads[:1], {})
  err = max(float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b))
                  / np.linalg.norm(np.asarray(b)))
            for u, r in zip(us, ref)
            for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(r)))
  n1, n8 = _norms(st, name), _norms(st8, name)
  slots = jax.tree.leaves(_slots(st8, name).slots)
  specs = orthax.flax.state_specs(st8, params, pspecs)
  slot_specs = jax.tree.leaves(_slots(specs, name).slots,
                               is_leaf=lambda x: isinstance(x, P))
  ops = m['collectives']
  return {
      'rel_err': err,
      'state_rel_err': (float(np.max(np.abs(n1 - n8) / n1))
                        if n1.shape == n8.shape else float('inf')),
      'collectives': sorted({o['op'] for o in ops}),
      'wire_bytes': m['wire_bytes'], 'muon_wire_bytes': muon['wire_bytes'],
      'plan_bytes': plan.bytes_per_device,
      'muon_plan_bytes': muon_plan.bytes_per_device,
      'flops': m['flops'], 'plan_flops': plan.flops_per_device,
      'muon_flops': muon['flops'],
      'strategies': sorted({g.strategy for g in plan.groups}),
      'state_sharded_over_all_axes': bool(slots) and all(
          a.shape[0] == 8 and a.sharding.is_equivalent_to(
              NamedSharding(mesh, P(tuple(names))), a.ndim) for a in slots),
      'state_specs_owner': bool(slot_specs) and all(
          sp == P(tuple(names)) for sp in slot_specs),
  }


def main():
  meshes = {
      'fsdp8': ((8,), ('fsdp',), AxisType.Auto),
      'fsdp4tp2': ((4, 2), ('fsdp', 'tp'), AxisType.Auto),
      'explicit_fsdp8': ((8,), ('fsdp',), AxisType.Explicit),
  }
  names = [n for n in (sys.argv[1:] or RECIPES) if n in orthax.recipe_names()]
  out = {}
  for name in names:
    for key, (shape, axes, at) in meshes.items():
      out[f'{name}/{key}'] = fake_devices.guarded(
          lambda: run(name, shape, axes, at))
  print(json.dumps(out))


if __name__ == '__main__':
  main()
