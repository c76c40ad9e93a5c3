"""Recipes with ``distributed=`` on 8 fake CPU devices vs one device.

Run as a script (``tests/test_sharding.py`` does, in a subprocess with
``--xla_force_host_platform_device_count=8``). Two jitted steps of muon,
normuon, namo and namo_d (the cases in ``RECIPE_KEYS``), and of root, spectra,
hybrid_auon and lanton (the last two also at ``reference='paper'``) and
auon (``OTHER_RECIPES``; f32 on the two Auto meshes), on a tree of kernels
(FSDP-sharded, a scan-stacked leaf, a leaf count that does not divide 8),
biases and an embedding, on Auto meshes ``(8,)`` and ``(4, 2)`` and on an
Explicit ``(8,)`` mesh: the maximum relative difference of the updates against
the same recipe without ``distributed`` on a single device, the number of
all-to-alls in the compiled step, the bytes of its collectives (and the plan's
prediction), and whether updates keep the parameters' shardings. Prints one
JSON object on the last line.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os

if __name__ == '__main__':
  flag = '--xla_force_host_platform_device_count=8'
  if flag not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' ' + flag

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fake_devices
import orthax
from orthax import sharding
from orthax.sharding import hlo

SHAPES = {
    'blocks': {
        'a': {'kernel': ((64, 128), ('fsdp', None))},
        'b': {'kernel': ((128, 64), ('fsdp', None))},
        'c': {'kernel': ((64, 128), (None, 'tp'))},
        'scan': {'kernel': ((3, 64, 128), (None, 'fsdp', None)),
                 'bias': ((3, 128), (None, None))},
    },
    'embed': {'embedding': ((40, 64), (None, 'fsdp'))},
}


# recipe/mesh/wire cases of muon, normuon, namo and namo_d. f32 on every
# mesh; bf16 on the wire on every mesh for muon, and on fsdp4×tp2 (the mesh
# with the most collectives) for the others: the wire dtype is the
# executor's, the same for every recipe, and tests/sharding_stages_cases.py
# runs NorMuon's and NAMO's stages with bf16 on every mesh.
MESHES = ('fsdp8', 'fsdp4tp2', 'explicit_fsdp8', 'fsdp4tp2_gram')
RECIPE_KEYS = tuple(
    f'{r}/{m}/{w}' for r in ('muon', 'normuon', 'namo', 'namo_d')
    for m in MESHES for w in ('f32', 'bf16')
    if w == 'f32' or r == 'muon' or m == 'fsdp4tp2')


def leaves(fn):
  return jax.tree.map(fn, SHAPES, is_leaf=lambda x: isinstance(x, tuple)
                      and len(x) == 2 and isinstance(x[0], tuple))


def specs(axes):
  def spec(entry):
    return P(*[a if a in axes else None for a in entry[1]])
  return leaves(spec)


def tree(seed):
  rng = np.random.default_rng(seed)
  return leaves(lambda e: jnp.asarray(rng.standard_normal(e[0]), jnp.float32))


# Hyperparameters given to optax.inject_hyperparams (traced in the step; the
# stages that use them run inside shard_map).
INJECT = {
    'normuon': (lambda learning_rate, beta2, distributed=None: orthax.normuon(
        learning_rate, beta2=beta2, distributed=distributed),
                dict(learning_rate=0.02, beta2=0.9)),
    'namo': (lambda learning_rate, beta, mu2, distributed=None: orthax.namo(
        learning_rate, beta=beta, mu2=mu2, distributed=distributed),
             dict(learning_rate=0.02, beta=0.9, mu2=0.95)),
    # ROOT's quantile reaches the clip that runs before Newton–Schulz.
    'root': (lambda learning_rate, quantile, distributed=None: orthax.root(
        learning_rate, quantile=quantile, distributed=distributed),
             dict(learning_rate=0.02, quantile=0.8)),
}


OTHER_RECIPES = ('root', 'spectra', 'hybrid_auon', 'hybrid_auon@paper',
                 'lanton', 'lanton@paper', 'auon')


def _recipe(recipe, inject, **kw):
  """``recipe`` by name; ``name@mode`` picks its ``reference=`` mode."""
  if not inject:
    name, _, mode = recipe.partition('@')
    return orthax.recipe(name, learning_rate=0.02,
                         **(dict(reference=mode) if mode else {}), **kw)
  factory, hyper = INJECT[recipe]
  return optax.inject_hyperparams(functools.partial(factory, **kw))(**hyper)


@functools.lru_cache(maxsize=None)
def reference_updates(recipe, inject):
  """The single-device updates of both steps (the same for every mesh and
  wire dtype: computed once per recipe)."""
  params, grads = tree(0), [tree(1), tree(2)]
  ref_tx = _recipe(recipe, inject)
  state = ref_tx.init(params)
  ref = []
  ref_step = jax.jit(ref_tx.update)  # one jit: a new one per step recompiles
  for g in grads:
    u, state = ref_step(g, state, params)
    ref.append(u)
  return ref


def _distributed(recipe, inject, mesh, axis_type, comm_dtype, pspecs,
                 dist_kw):
  """The recipe with ``distributed=`` on ``mesh`` (specs read from the
  arrays on an Explicit mesh), and a function placing a tree on it."""
  explicit = axis_type == AxisType.Explicit
  dist = sharding.Distributed(mesh, None if explicit else pspecs,
                              comm_dtype=comm_dtype, **dist_kw)
  shard = lambda t: jax.tree.map(
      lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, pspecs)
  return _recipe(recipe, inject, distributed=dist), shard


def run(recipe, mesh, axis_type, comm_dtype, inject=False, **dist_kw):
  pspecs = specs(mesh.axis_names)
  params, grads = tree(0), [tree(1), tree(2)]
  ref = reference_updates(recipe, inject)

  tx, shard = _distributed(recipe, inject, mesh, axis_type, comm_dtype,
                           pspecs, dist_kw)
  explicit = axis_type == AxisType.Explicit
  p = shard(params)
  step, st = fake_devices.pinned_step(tx, tx.init(p), mesh)
  text = step.lower(shard(grads[0]), st, p).compile().as_text()
  err, abs_err, kept = 0.0, 0.0, True
  for g, r in zip(grads, ref):
    u, st = step(shard(g), st, p)
    for a, b, s in zip(jax.tree.leaves(u), jax.tree.leaves(r),
                       jax.tree.leaves(pspecs, is_leaf=lambda x: isinstance(x, P))):
      a_, b_ = np.asarray(a, np.float64), np.asarray(b, np.float64)
      err = max(err, float(np.linalg.norm(a_ - b_) / max(np.linalg.norm(b_), 1e-30)))
      abs_err = max(abs_err, float(np.abs(a_ - b_).max()) / 0.02)
      kept &= a.sharding.is_equivalent_to(NamedSharding(mesh, s), a.ndim)
  ops = hlo.collectives(text)
  kinds = [op['op'] for op in ops]
  try:  # auon distributes nothing: no plan
    with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
      plan_bytes = sharding.plan(tx, p).bytes_per_device
  except sharding.NotDistributedError:
    plan_bytes = None
  guard = orthax.nonfinite_status(st)
  return {'rel_err': err, 'max_abs_err_over_lr': abs_err,
          'plan_bytes': plan_bytes,
          # check_finite's flags: the all-reduces of bools (pred).
          'flag_bytes': sum(o['wire_bytes'] for o in ops
                            if o['op'].startswith('all-reduce')
                            and o['shape'].lstrip('(').startswith('pred')),
          'guard': guard is not None,
          'wire_bytes': sum(o['wire_bytes'] for o in ops),
          'sharding_kept': bool(kept),
          'all_to_all': sum(k.startswith('all-to-all') for k in kinds),
          'other_collectives': sorted({k for k in kinds
                                       if not k.startswith('all-to-all')}),
          'all_reduce_bytes': sum(o['wire_bytes'] for o in ops
                                  if o['op'].startswith('all-reduce')),
          'other_bytes': sum(o['wire_bytes'] for o in ops
                             if not o['op'].startswith('all-to-all')),
          'a2a_bytes': sum(o['wire_bytes'] for o in ops
                           if o['op'].startswith('all-to-all'))}


# jax.grad through a distributed update (meta-gradients): muon on the Auto
# and Explicit fsdp8 meshes, where the 64×128 group (a and the three scan
# layers) pads 4 matrices to 8 slots. f32 on the wire failed XLA:CPU's HLO
# verifier in the reverse all-to-all (the cotangent of the padded output).
# NAMO-D's norms and the gram group's normalizer take roots of split sums
# (scale_safe.split_root, block_norm), whose unselected branch was √0: NaN.
GRAD_KEYS = tuple(f'muon_grad/{m}/{w}' for m in ('fsdp8', 'explicit_fsdp8')
                  for w in ('f32', 'bf16')) + (
                      'namo_d_grad/fsdp4tp2/f32', 'muon_grad/fsdp4tp2_gram/f32')


def _meta_loss(tx, params, state):
  def loss(g):
    u, _ = tx.update(g, state, params)
    return sum(jnp.sum(x * jnp.sin(x / 0.02)) for x in jax.tree.leaves(u))
  return loss


def grad_run(recipe, mesh, axis_type, comm_dtype, **dist_kw):
  """The gradient of a scalar of the second step's update with respect to
  that step's gradients, distributed against one device."""
  pspecs = specs(mesh.axis_names)
  params, g1, g2 = tree(0), tree(1), tree(2)
  ref_tx = _recipe(recipe, False)
  _, ref_state = ref_tx.update(g1, ref_tx.init(params), params)
  ref = jax.jit(jax.grad(_meta_loss(ref_tx, params, ref_state)))(g2)
  tx, shard = _distributed(recipe, False, mesh, axis_type, comm_dtype,
                           pspecs, dist_kw)
  p = shard(params)
  _, state = jax.jit(tx.update)(shard(g1), tx.init(p), p)
  got = jax.jit(jax.grad(_meta_loss(tx, p, state)))(shard(g2))
  a = np.concatenate([np.asarray(x, np.float64).ravel()
                      for x in jax.tree.leaves(got)])
  b = np.concatenate([np.asarray(x, np.float64).ravel()
                      for x in jax.tree.leaves(ref)])
  return {'rel_err': float(np.linalg.norm(a - b) / np.linalg.norm(b)),
          'finite': bool(np.all(np.isfinite(a))),
          'ref_norm': float(np.linalg.norm(b))}


# Leaves whose matrix view merges axes, sharded over Explicit (fsdp, tp)
# axes the view merges: a conv kernel (kh·kw·in) × out sharded on out, an
# attention kernel d × (heads·hd) sharded on d and heads. NAMO, NAMO-D and
# LANTON reshaped the sharded leaves themselves (JAX refuses such a
# reshape on Explicit axes); muon is the control.
MERGED_KEYS = tuple(f'{r}_merged_views/explicit_fsdp2tp4/{d}'
                    for r in ('muon', 'namo', 'namo_d', 'lanton')
                    for d in ('local', 'distributed'))
_MERGED = {'conv': ((3, 3, 8, 16), P(None, None, None, 'tp')),
           'attn': ((16, 4, 8), P('fsdp', 'tp', None)),
           'dense': ((16, 8), P('fsdp', 'tp'))}


def merged_views_run(recipe, mesh, distributed):
  """Two steps on Explicit axes against one device (no mesh)."""
  router = orthax.Router(extra_rules=[
      orthax.Rule('^attn$', 'matrix', orthax.MatrixSpec(0, (1, 2))),
      orthax.Rule('^conv$', 'matrix', orthax.MatrixSpec.conv(4))])
  rng = np.random.default_rng(3)
  draw = lambda: {k: jnp.asarray(rng.standard_normal(v[0]), jnp.float32)
                  for k, v in _MERGED.items()}
  params, grads = draw(), [draw(), draw()]
  pspecs = {k: v[1] for k, v in _MERGED.items()}
  ref_tx = orthax.recipe(recipe, learning_rate=0.02, router=router)
  state, ref = ref_tx.init(params), []
  for g in grads:
    u, state = jax.jit(ref_tx.update)(g, state, params)
    ref.append(u)
  with jax.set_mesh(mesh):
    return _merged_views_on_mesh(recipe, router, mesh, distributed, params,
                                 grads, ref, pspecs)


def _merged_views_on_mesh(recipe, router, mesh, distributed, params, grads,
                          ref, pspecs):
  dist = (sharding.Distributed(mesh, None, comm_dtype=jnp.float32)
          if distributed else None)
  tx = orthax.recipe(recipe, learning_rate=0.02, router=router,
                     distributed=dist)
  shard = lambda t: {k: jax.device_put(x, NamedSharding(mesh, pspecs[k]))
                     for k, x in t.items()}
  p = shard(params)
  st, err, kept = jax.jit(tx.init)(p), 0.0, True
  for g, r in zip(grads, ref):
    u, st = jax.jit(tx.update)(shard(g), st, p)
    for k in r:
      a, b = np.asarray(u[k], np.float64), np.asarray(r[k], np.float64)
      err = max(err, float(np.linalg.norm(a - b) / np.linalg.norm(b)))
      kept &= u[k].sharding.is_equivalent_to(p[k].sharding, a.ndim)
  return {'rel_err': err, 'sharding_kept': bool(kept)}


def slot_layout_errors():
  """A trion state made on fsdp8, given to the step on fsdp4 and on one
  device (as ``flax.serialization.from_bytes`` into their templates would:
  it checks no shapes): the error each step raises."""
  params = {f'a{i}': jnp.ones((64, 32)) * (i + 1) for i in range(3)}

  def build(n):
    if n == 1:
      return orthax.recipe('trion'), lambda t: t
    mesh = jax.make_mesh((n,), ('fsdp',), devices=jax.devices()[:n],
                         axis_types=(AxisType.Auto,))
    pspecs = {k: P('fsdp', None) for k in params}
    tx = orthax.recipe('trion', distributed=sharding.Distributed(mesh, pspecs))
    return tx, lambda t: jax.tree.map(
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, pspecs)

  tx8, sh8 = build(8)
  _, st8 = jax.jit(tx8.update)(sh8(params), tx8.init(sh8(params)), sh8(params))
  slots8 = [x for x in jax.tree.leaves(st8) if x.ndim == 4]
  out = {}
  for n in (4, 1):
    tx, sh = build(n)
    fresh = tx.init(sh(params))
    # The restored state: fsdp8's arrays in the new template's structure.
    moved = iter(slots8)
    state = jax.tree.map(lambda x: next(moved) if x.ndim == 4 else x, fresh)
    try:
      jax.jit(tx.update)(sh(params), state, sh(params))
      out[str(n)] = 'no error'
    except ValueError as e:
      out[str(n)] = str(e)
  return out


def main():
  out = {}
  out['slot_layout_errors'] = fake_devices.guarded(slot_layout_errors)
  meshes = {
      'fsdp8': ((8,), ('fsdp',), AxisType.Auto),
      'fsdp4tp2': ((4, 2), ('fsdp', 'tp'), AxisType.Auto),
      'explicit_fsdp8': ((8,), ('fsdp',), AxisType.Explicit),
      # c's long side is tp-sharded: tensor-parallel Newton–Schulz for it.
      'fsdp4tp2_gram': ((4, 2), ('fsdp', 'tp'), AxisType.Auto,
                        dict(overrides=(('c/kernel', 'gram'),))),
  }
  for key in RECIPE_KEYS:
    recipe, mname, wire = key.split('/')
    shape, names, at, *kw = meshes[mname]
    mesh = jax.make_mesh(shape, names, axis_types=(at,) * len(shape))
    out[key] = fake_devices.guarded(functools.partial(
        _run_in, mesh, at, recipe, jnp.float32 if wire == 'f32'
        else jnp.bfloat16, **(kw[0] if kw else {})))
  # Traced hyperparameters (inject_hyperparams), f32, Explicit fsdp8.
  for recipe in INJECT:
    shape, names, at = meshes['explicit_fsdp8']
    mesh = jax.make_mesh(shape, names, axis_types=(at,) * len(shape))
    key = f'{recipe}_inject/explicit_fsdp8/f32'
    out[key] = fake_devices.guarded(functools.partial(
        _run_in, mesh, at, recipe, jnp.float32, inject=True))
  # The other recipes: f32 on the wire, Auto fsdp8 and fsdp4×tp2.
  # Hybrid-AuON's paper form (one step, the brake on its raw output, the
  # Keller scale) has a body of its own beside the default five-step one.
  for recipe in OTHER_RECIPES:
    for mname in ('fsdp8', 'fsdp4tp2'):
      shape, names, at = meshes[mname]
      mesh = jax.make_mesh(shape, names, axis_types=(at,) * len(shape))
      key = f'{recipe}/{mname}/f32'
      out[key] = fake_devices.guarded(functools.partial(
          _run_in, mesh, at, recipe, jnp.float32))
  for key in MERGED_KEYS:
    recipe, mname, where = key.split('/')
    mesh = jax.make_mesh((2, 4), ('fsdp', 'tp'),
                         axis_types=(AxisType.Explicit,) * 2)
    out[key] = fake_devices.guarded(functools.partial(
        merged_views_run, recipe.removesuffix('_merged_views'), mesh,
        where == 'distributed'))
  for key in GRAD_KEYS:
    recipe, mname, wire = key.split('/')
    shape, names, at, *kw = meshes[mname]
    mesh = jax.make_mesh(shape, names, axis_types=(at,) * len(shape))
    out[key] = fake_devices.guarded(functools.partial(
        _run_in, mesh, at, recipe.removesuffix('_grad'),
        jnp.float32 if wire == 'f32' else jnp.bfloat16, fn=grad_run,
        **(kw[0] if kw else {})))
  print(json.dumps(out))


def _run_in(mesh, axis_type, recipe, wire, fn=run, **kw):
  """``fn`` (:func:`run`) under ``jax.set_mesh`` on an Explicit mesh."""
  ctx = (jax.set_mesh(mesh) if axis_type == AxisType.Explicit
         else contextlib.nullcontext())
  with ctx:
    return fn(recipe, mesh, axis_type, wire, **kw)


if __name__ == '__main__':
  main()
