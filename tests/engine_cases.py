"""Edge cases of the engine on 8 fake CPU devices (run as a script by
``tests/test_engine.py``, in a subprocess with
``--xla_force_host_platform_device_count=8``). Prints one JSON object on the
last line: per case, the relative difference against one device or the
error message raised."""

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


def _mesh(shape, names, axis_type=AxisType.Auto):
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))


def spectra_explicit():
  mesh = _mesh((8,), ('fsdp',), AxisType.Explicit)
  with jax.set_mesh(mesh):
    return R.run('spectra', mesh, AxisType.Explicit, jnp.float32)


def explicit_plain(recipe, set_mesh=True):
  """No ``distributed=`` on an Explicit fsdp=8 mesh: whole matrices on every
  device; equals one device, and updates and states keep their shardings.
  ``set_mesh=False``: the arrays carry the mesh, no ``jax.set_mesh``."""
  mesh = _mesh((8,), ('fsdp',), AxisType.Explicit)
  pspecs = R.specs(mesh.axis_names)
  params, grads = R.tree(0), [R.tree(1), R.tree(2)]
  ref_tx = orthax.recipe(recipe, learning_rate=0.02)
  state = ref_tx.init(params)
  ref = []
  ref_step = jax.jit(ref_tx.update)  # one jit: a new one per step recompiles
  for g in grads:
    u, state = ref_step(g, state, params)
    ref.append(u)
  tx = orthax.recipe(recipe, learning_rate=0.02)
  err, kept = 0.0, True
  with jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext():
    p = _put(params, mesh, pspecs)
    st = tx.init(p)
    step = jax.jit(tx.update)
    for g, r in zip(grads, ref):
      u, st = step(_put(g, mesh, pspecs), st, p)
      for a, b, sp in zip(jax.tree.leaves(u), jax.tree.leaves(r),
                          jax.tree.leaves(pspecs,
                                          is_leaf=lambda x: isinstance(x, P))):
        err = max(err, float(np.linalg.norm(np.asarray(a) - np.asarray(b))
                             / np.linalg.norm(np.asarray(b))))
        kept &= a.sharding.is_equivalent_to(NamedSharding(mesh, sp), a.ndim)
  return {'rel_err': err, 'sharding_kept': bool(kept)}


def explicit_layer_sharded(recipe, distributed):
  """A scan-stacked kernel sharded on its layer axis (and a matrix on its
  rows) on an Explicit fsdp=8 mesh, with and without ``distributed=``:
  equals one device over two steps, and every state array keeps init's
  sharding (NorMuon's and NAMO's per-matrix states came back sharded like
  the layer axis, which check_finite's select refused; LANTON's noise EMA
  met the norms' sharding in a select)."""
  mesh = _mesh((8,), ('fsdp',), AxisType.Explicit)
  rng = np.random.default_rng(0)
  draw = lambda: {'scan': {'kernel': jnp.asarray(
      rng.standard_normal((8, 16, 32)), jnp.float32)},
                  'w': jnp.asarray(rng.standard_normal((16, 32)), jnp.float32),
                  'b': jnp.asarray(rng.standard_normal(32), jnp.float32)}
  params, grads = draw(), [draw(), draw()]
  pspecs = {'scan': {'kernel': P('fsdp', None, None)}, 'w': P('fsdp', None),
            'b': P()}
  ref_tx = orthax.recipe(recipe, learning_rate=0.02)
  state, ref, step = ref_tx.init(params), [], jax.jit(ref_tx.update)
  for g in grads:
    u, state = step(g, state, params)
    ref.append(u)
  err, kept = 0.0, True
  with jax.set_mesh(mesh):
    dist = (orthax.sharding.Distributed(mesh, comm_dtype=jnp.float32)
            if distributed else None)
    tx = orthax.recipe(recipe, learning_rate=0.02, distributed=dist)
    p = _put(params, mesh, pspecs)
    st = tx.init(p)
    init_sh = [x.sharding for x in jax.tree.leaves(st)]
    step = jax.jit(tx.update)
    for g, r in zip(grads, ref):
      u, st = step(_put(g, mesh, pspecs), st, p)
      for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(r)):
        err = max(err, float(np.linalg.norm(np.asarray(a) - np.asarray(b))
                             / np.linalg.norm(np.asarray(b))))
      kept &= all(x.sharding.is_equivalent_to(sh, x.ndim) for x, sh in
                  zip(jax.tree.leaves(st), init_sh))
  return {'rel_err': err, 'state_sharding_kept': bool(kept)}


def whole_matrix_recipes_on_big_tp_matrices(recipe):
  """A tensor-parallel matrix over ``max_local_matrix_bytes`` (1 KiB here,
  for the 2 GiB default): ``auto`` chose ``gram``, whose column blocks
  SPECTRA's clip and the slot stages (ARO, FISMO, DCT-AdamW, Trion) cannot
  take, and the step raised. Now ``a2a`` (equal to one device, f32 wire),
  and a requested ``gram`` is refused naming the leaf."""
  mesh = _mesh((2, 4), ('fsdp', 'tp'))
  specs = {'blk': {'kernel': P(None, 'tp')}}
  rng = np.random.default_rng(0)
  draw = lambda: {'blk': {'kernel': jnp.asarray(
      rng.standard_normal((16, 32)), jnp.float32)}}
  params, grads = draw(), [draw(), draw()]
  ref_tx = orthax.recipe(recipe, learning_rate=0.02)
  st, ref, step = ref_tx.init(params), [], jax.jit(ref_tx.update)
  for g in grads:
    u, st = step(g, st, params)
    ref.append(u)
  dist = lambda **kw: orthax.sharding.Distributed(
      mesh, specs, comm_dtype=jnp.float32, **kw)
  tx = orthax.recipe(recipe, learning_rate=0.02,
                     distributed=dist(max_local_matrix_bytes=1024))
  p = _put(params, mesh, specs)
  strategies = [g.strategy for g in orthax.sharding.plan(tx, p).groups]
  st, step, err = tx.init(p), jax.jit(tx.update), 0.0
  for g, r in zip(grads, ref):
    u, st = step(_put(g, mesh, specs), st, p)
    a, b = np.asarray(u['blk']['kernel']), np.asarray(r['blk']['kernel'])
    err = max(err, float(np.linalg.norm(a - b) / np.linalg.norm(b)))
  forced = orthax.recipe(recipe, learning_rate=0.02,
                         distributed=dist(strategy='gram'))
  try:
    forced.update(p, forced.init(p), p)
    raised = None
  except ValueError as e:
    raised = str(e)
  return {'rel_err': err, 'strategies': strategies, 'raised': raised}


def explicit_spec_mismatch():
  """``param_specs`` that disagree with an Explicit-axes array's own
  sharding: a raw shard_map in_specs error before, naming neither."""
  mesh = _mesh((2, 4), ('fsdp', 'tp'), AxisType.Explicit)
  with jax.set_mesh(mesh):
    p = {'a': {'kernel': jax.device_put(jnp.ones((16, 32)),
                                        NamedSharding(mesh, P(None, 'tp')))}}
    out = {}
    for name, spec in (('wrong', P('tp', None)), ('same', P(None, 'tp'))):
      tx = orthax.muon(0.02, distributed=orthax.sharding.Distributed(
          mesh, {'a': {'kernel': spec}}))
      try:
        jax.jit(tx.update)(p, tx.init(p), p)
        out[name] = None
      except ValueError as e:
        out[name] = str(e)
    return out


def _put(tree, mesh, specs):
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                      tree, specs)


def other_mesh(mode):
  """Parameters on fsdp=8, Distributed built for fsdp=4×tp=2 (or for another
  device order): the update must refuse, naming the leaf."""
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)}
  specs = {'w': P('fsdp', None)}
  on = _mesh((8,), ('fsdp',),
             AxisType.Explicit if mode == 'explicit' else AxisType.Auto)
  if mode == 'devices':
    other = jax.sharding.Mesh(np.array(jax.devices()[::-1]), ('fsdp',))
  else:
    other = _mesh((4, 2), ('fsdp', 'tp'),
                  AxisType.Explicit if mode == 'explicit' else AxisType.Auto)
  p = _put(params, on, specs)
  tx = orthax.muon(0.02, distributed=orthax.sharding.Distributed(
      other, None if mode == 'explicit' else specs))
  try:
    if mode == 'explicit':
      with jax.set_mesh(on):
        jax.jit(tx.update)(p, tx.init(p), p)
    elif mode in ('eager', 'devices'):
      tx.update(p, tx.init(p), p)
    else:
      jax.jit(tx.update)(p, tx.init(p), p)
  except ValueError as e:
    return {'raised': str(e)}
  return {'raised': None}


def zero_size(recipe):
  """A ``(0, 64)`` leaf beside real ones, distributed on fsdp=8: it comes
  back unchanged and the others equal one device."""
  rng = np.random.default_rng(1)
  shapes = {'a': (64, 128), 'b': (128, 64), 'empty': (0, 64)}
  params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32)
            for k, s in shapes.items()}
  grads = {k: jnp.asarray(rng.standard_normal(s), jnp.float32)
           for k, s in shapes.items()}
  specs = {k: P('fsdp', None) if k != 'empty' else P(None, 'fsdp')
           for k in shapes}
  mesh = _mesh((8,), ('fsdp',))
  ref_tx = orthax.recipe(recipe, learning_rate=0.02)
  ref, _ = jax.jit(ref_tx.update)(grads, ref_tx.init(params), params)
  tx = orthax.recipe(recipe, learning_rate=0.02,
                     distributed=orthax.sharding.Distributed(
                         mesh, specs, comm_dtype=jnp.float32))
  p, g = _put(params, mesh, specs), _put(grads, mesh, specs)
  u, _ = jax.jit(tx.update)(g, tx.init(p), p)
  err = max(float(np.linalg.norm(np.asarray(u[k]) - np.asarray(ref[k]))
                  / np.linalg.norm(np.asarray(ref[k]))) for k in ('a', 'b'))
  return {'rel_err': err, 'empty_shape': list(u['empty'].shape)}


def main():
  cases = {'spectra/explicit_fsdp8': spectra_explicit}
  for mode in ('auto_jit', 'eager', 'explicit', 'devices'):
    cases[f'other_mesh/{mode}'] = lambda mode=mode: other_mesh(mode)
  for recipe in ('muon', 'normuon', 'namo', 'spectra'):
    cases[f'zero_size/{recipe}'] = lambda r=recipe: zero_size(r)
  for recipe in ('muon', 'normuon', 'namo_d', 'root'):
    cases[f'explicit_plain/{recipe}'] = lambda r=recipe: explicit_plain(r)
  for recipe in ('normuon', 'namo', 'namo_d', 'lanton'):
    for dist in (False, True):
      cases[f'explicit_layer_sharded/{recipe}/{dist}'] = (
          lambda r=recipe, d=dist: explicit_layer_sharded(r, d))
  cases['explicit_spec_mismatch'] = explicit_spec_mismatch
  for recipe in ('spectra', 'aro', 'fismo', 'dct_adamw', 'trion'):
    cases[f'big_tp/{recipe}'] = (
        lambda r=recipe: whole_matrix_recipes_on_big_tp_matrices(r))
  for recipe in ('muon', 'aro'):
    cases[f'explicit_no_set_mesh/{recipe}'] = (
        lambda r=recipe: explicit_plain(r, set_mesh=False))
  out = {}
  for name, fn in cases.items():
    out[name] = fake_devices.guarded(fn)
  print(json.dumps(out))


if __name__ == '__main__':
  main()
