"""ARO with ``distributed=`` on 8 fake CPU devices against one device (run
as a script by ``tests/test_aro.py``, in a subprocess with
``--xla_force_host_platform_device_count=8``). Per mesh: the relative
difference of two steps' updates and of the rotations (as the multiset of
the per-matrix ``‖R − I‖_F``: the layouts differ, ``[1, k, s, s]`` on one
device and ``[8, k', s, s]`` on the mesh), the collectives of the compiled
step and its bytes against Muon's, where the rotations live; and on fsdp8
(8 kernels of 256×512) the plan's FLOPs per device against the compiled
step's. Prints one JSON object
on the last line."""

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

import aro_fallback
import fake_devices
import orthax
import orthax.flax
import sharding_recipes_cases as R
from orthax.matrix_stages import _rotate
from orthax.sharding import hlo


def _rotations(state):
  return list(optax.tree.get(state, 'aro_rotate').slots.slots.values())


def _offsets(state):
  """Sorted ``‖R − I‖_F`` of the rotations that moved (padding slots and
  unused ones stay the identity), duplicates (devices that hold the same
  matrices) dropped."""
  vals = []
  for a in _rotations(state):
    a = np.asarray(a, np.float64).reshape(-1, *a.shape[-2:])
    vals += list(np.linalg.norm(a - np.eye(a.shape[-1]), axis=(1, 2)))
  out = []
  for v in sorted(v for v in vals if v > 1e-6):
    if not out or abs(v - out[-1]) > 1e-6 * v:
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
  m = hlo.measure(step, shard(grads[0]), st, p)
  us = []
  for g in grads:
    u, st = step(shard(g), st, p)
    us.append(u)
  with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
    plan = orthax.sharding.plan(tx, p)
  return us, st, m, plan


def _qr_flops(plan):
  """The QR part of the plan's FLOPs per device (XLA cannot count a LAPACK
  call)."""
  total = 0
  for g in plan.groups:
    fi, fo = (g.n, g.m) if g.transposed[0] else (g.m, g.n)
    per_device = g.flops_per_device // max(g.matrix_flops, 1)
    total += per_device * _rotate.aro_flops(fi, fo)['qr']
  return total


def run(shape, names, axis_type):
  mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))
  explicit = axis_type == AxisType.Explicit
  pspecs = R.specs(names)
  params, grads = R.tree(0), [R.tree(1), R.tree(2)]
  ref_tx = orthax.aro()
  st = ref_tx.init(params)
  ref = []
  ref_step = jax.jit(ref_tx.update)  # one jit: a new one per step recompiles
  for g in grads:
    u, st = ref_step(g, st, params)
    ref.append(u)
  with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
    us, st8, m, plan = _step('aro', mesh, explicit, pspecs, params, grads)
    _, _, muon_m, muon_plan = _step('muon', mesh, explicit, pspecs, params,
                                    grads)
  err = max(float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b))
                  / np.linalg.norm(np.asarray(b)))
            for u, r in zip(us, ref)
            for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(r)))
  n1, n8 = _offsets(st), _offsets(st8)
  specs = orthax.flax.state_specs(st8, params, pspecs)
  slot_specs = jax.tree.leaves(optax.tree.get(specs, 'aro_rotate').slots,
                               is_leaf=lambda x: isinstance(x, P))
  return {
      'state_specs_owner': bool(slot_specs) and all(
          sp == P(tuple(names)) for sp in slot_specs),
      'rel_err': err,
      'state_rel_err': (float(np.max(np.abs(n1 - n8) / n1))
                        if n1.shape == n8.shape and n1.size
                        else float('inf')),
      'collectives': sorted({o['op'] for o in m['collectives']}),
      'wire_bytes': m['wire_bytes'],
      'muon_wire_bytes': muon_m['wire_bytes'],
      'plan_bytes': plan.bytes_per_device,
      'muon_plan_bytes': muon_plan.bytes_per_device,
      'state_sharded_over_all_axes': all(
          a.shape[0] == 8 and a.sharding.is_equivalent_to(
              NamedSharding(mesh, P(tuple(names))), a.ndim)
          for a in _rotations(st8)),
      'xla_flops': m['flops'], 'plan_flops': plan.flops_per_device,
      'plan_qr_flops': _qr_flops(plan),
  }


def flops_case():
  """fsdp8, 8 kernels of 256×512 (one per device, each rotating its 256
  side): the compiled step's FLOPs per device against the plan's, with the
  QR (LAPACK calls XLA's cost analysis does not count) taken out. At this
  size the per-entry work around the stage (momentum, decay, the finite
  check: ~30 FLOPs an entry) is ~2% of it."""
  mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(AxisType.Auto,))
  rng = np.random.default_rng(0)
  params = {f'l{i}': {'kernel': jnp.asarray(
      rng.standard_normal((256, 512)), jnp.float32)} for i in range(8)}
  grads = jax.tree.map(lambda x: x + 1, params)
  pspecs = jax.tree.map(lambda x: P('fsdp', None), params)
  _, _, m, plan = _step('aro', mesh, False, pspecs, params, [grads])
  # XLA also counts product_q's fallback branches, for the one matrix per
  # device (aro_fallback.besides_model;
  # test_aro_qr.py::test_flop_model_matches_compiled_stage).
  return {'xla_flops': m['flops'], 'plan_flops': plan.flops_per_device,
          'plan_qr_flops': _qr_flops(plan),
          'fallback_flops': aro_fallback.besides_model(256, 512)}


def low_rank_case():
  """fsdp8, a stacked ``(8, 16, 32)`` kernel (one layer per device),
  gradients of rank 4 (a batch of 4): each step's largest relative
  difference from one device. The rotation's columns past the momentum's
  rank were set by rounding, and the next step's rounded them differently
  on each layout (up to 0.3 at step 2)."""
  mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(AxisType.Auto,))
  rng = np.random.default_rng(0)
  params = {'blocks': {'kernel': jnp.zeros((8, 16, 32))}}
  grads = [{'blocks': {'kernel': jnp.asarray(np.einsum(
      'lik,lkj->lij', rng.normal(size=(8, 16, 4)),
      rng.normal(size=(8, 4, 32))), jnp.float32)}} for _ in range(3)]
  pspecs = {'blocks': {'kernel': P('fsdp', None, None)}}
  mesh_us = _step('aro', mesh, False, pspecs, params, grads)[0]
  tx, one_us = orthax.aro(), []
  st = tx.init(params)
  for g in grads:
    u, st = jax.jit(tx.update)(g, st, params)
    one_us.append(u)
  rel = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()
                           / np.abs(np.asarray(a)).max())
  return {'rel_err_per_step': [
      rel(a['blocks']['kernel'], b['blocks']['kernel'])
      for a, b in zip(one_us, mesh_us)]}


def main():
  meshes = {
      'fsdp8': ((8,), ('fsdp',), AxisType.Auto),
      'fsdp4tp2': ((4, 2), ('fsdp', 'tp'), AxisType.Auto),
      'explicit_fsdp8': ((8,), ('fsdp',), AxisType.Explicit),
  }
  out = {}
  for key, (shape, names, at) in meshes.items():
    out[key] = fake_devices.guarded(lambda: run(shape, names, at))
  out['flops'] = fake_devices.guarded(flops_case)
  out['low_rank'] = fake_devices.guarded(low_rank_case)
  print(json.dumps(out))


if __name__ == '__main__':
  main()
