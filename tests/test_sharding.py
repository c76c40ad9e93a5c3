"""orthax.sharding: plans (in process) and multi-device contracts.

The multi-device cases run once, in a subprocess with 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before
JAX starts), through ``tests/sharding_cases.py``, which prints JSON.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from orthax import sharding
from orthax.benchmarking import gpt2_hidden_kernels
from orthax.matrices import MatrixSpec

K = MatrixSpec()
MESH8 = AbstractMesh((8,), ('fsdp',))
MESH42 = AbstractMesh((4, 2), ('fsdp', 'tp'))
MiB = 2.0**20


def _leaves(tree_shapes, spec_fn, dtype=jnp.float32, mspec=K):
  flat = jax.tree_util.tree_flatten_with_path(
      tree_shapes, is_leaf=lambda x: isinstance(x, tuple))[0]
  return [sharding.LeafInfo(jax.tree_util.keystr(p), s, dtype, mspec,
                            spec_fn(s)) for p, s in flat]


# Plans: static, no devices needed ---------------------------------------------


def test_gpt2_fsdp8_plan_matches_lower_bound():
  leaves = _leaves(gpt2_hidden_kernels(), lambda s: P('fsdp', None))
  p32 = sharding.plan_orthogonalize(leaves, MESH8, comm_dtype=jnp.float32)
  p16 = sharding.plan_orthogonalize(leaves, MESH8)
  assert len(p32.groups) == 4
  assert all(g.strategy == 'a2a' and g.count == 12 and g.padded == 16
             for g in p32.groups)
  assert p32.collectives == 8
  # MEASURING.md: the all-to-all lower bound is 94.5 MiB f32, ~47 MiB bf16.
  assert abs(p32.bytes_per_device / MiB - 94.5) < 0.05
  assert abs(p16.bytes_per_device / MiB - 47.25) < 0.05
  # Padded ideal: 2 matrices of each shape per device, 5 steps.
  assert abs(p32.flops_per_device / 1e9 - 253.7) < 0.1
  text = str(p32)
  assert 'a2a' in text and 'total' in text and '94.50' in text


def test_gpt2_fsdp4tp2_plan_same_bytes_as_fsdp8():
  leaves = _leaves(gpt2_hidden_kernels(), lambda s: P('fsdp', 'tp'))
  p = sharding.plan_orthogonalize(leaves, MESH42, comm_dtype=jnp.float32)
  assert [g.split_axes for g in p.groups] == [('fsdp', 'tp')] * 3 + [
      ('tp', 'fsdp')]  # the tall c_proj is transposed: rows are tp
  assert abs(p.bytes_per_device / MiB - 94.5) < 0.05


def test_auto_strategies_and_padding():
  leaves = [
      sharding.LeafInfo('fsdp', (64, 128), jnp.float32, K, P('fsdp')),
      sharding.LeafInfo('layers', (8, 64, 128), jnp.float32,
                        MatrixSpec.stacked(0), P('fsdp', None, None)),
      sharding.LeafInfo('repl', (3, 64, 128), jnp.float32,
                        MatrixSpec.stacked(0), P()),
      sharding.LeafInfo('repl16', (16, 64, 64), jnp.float32,
                        MatrixSpec.stacked(0), P()),
  ]
  p = sharding.plan_orthogonalize(leaves, MESH8)
  assert [g.strategy for g in p.groups] == ['a2a', 'local', 'replicated']
  a2a, local, repl = p.groups
  assert (a2a.local_count, a2a.padded, a2a.padding) == (1, 8, 7)
  # Fewer replicated matrices than shards: redundant local NS, no gather.
  assert p.group_of('repl') is local and p.group_of('layers') is local
  assert local.local_count == 1 + 3 and local.bytes_per_device == 0
  assert (repl.padded, repl.shards, repl.paths) == (16, 8, ('repl16',))


def test_overrides_pick_strategy_by_path():
  leaves = [sharding.LeafInfo('blocks/mlp', (4, 64, 128), jnp.float32,
                              MatrixSpec.stacked(0), P('fsdp', None, None))]
  auto = sharding.plan_orthogonalize(leaves, MESH42)
  assert auto.groups[0].strategy == 'local'  # redundant over tp
  over = sharding.plan_orthogonalize(leaves, MESH42,
                                     overrides=[('mlp$', 'replicated')])
  g = over.groups[0]
  assert g.strategy == 'replicated' and g.split_axes == ('tp',)
  assert g.local_count == 1 and g.padded == 2


def test_gram_plan_predicts_column_block_work():
  """``gram``: no padding, each device multiplies its m×n/G block, the m×m
  work is replicated; one f32 all-reduce per Gram product plus the norm."""
  leaves = [sharding.LeafInfo('w', (768, 3072), jnp.bfloat16, K,
                              P(None, 'fsdp')),
            sharding.LeafInfo('t', (3072, 768), jnp.bfloat16, K,
                              P('fsdp', None))]
  p = sharding.plan_orthogonalize(leaves, MESH8, 'gram', method='standard')
  (g,) = p.groups
  assert g.paths == ('w', 't') and g.transposed == (False, True)
  assert (g.local_count, g.padded, g.shards) == (2, 2, 8)
  m, n, steps = 768, 3072, 5
  assert g.flops_per_device == 2 * steps * (4 * m * m * n // 8 + 2 * m**3)
  assert g.wire_dtype == jnp.float32 and g.collectives == steps + 1
  assert g.bytes_per_device == 2 * 7 / 8 * 2 * (steps * m * m + 1) * 4
  # Gram Newton–Schulz: Gram products only at restarts (blocks 2+2+1).
  pg = sharding.plan_orthogonalize(leaves, MESH8, 'gram', method='gram')
  assert pg.groups[0].collectives == 3 + 1
  # A square matrix sharded along its rows runs as its transpose.
  sq = sharding.plan_orthogonalize(
      [sharding.LeafInfo('sq', (64, 64), jnp.float32, K, P('fsdp', None))],
      MESH8, 'gram')
  assert sq.groups[0].transposed == (True,)
  assert sq.groups[0].col_axes == ('fsdp',)


def test_auto_picks_gram_above_max_local_matrix_bytes():
  leaves = [sharding.LeafInfo('big', (1024, 4096), jnp.float32, K,
                              P(None, 'fsdp')),
            sharding.LeafInfo('small', (64, 256), jnp.float32, K,
                              P(None, 'fsdp')),
            sharding.LeafInfo('rows', (2048, 4096), jnp.float32, K,
                              P('fsdp', None))]
  p = sharding.plan_orthogonalize(leaves, MESH8,
                                  max_local_matrix_bytes=2**20)
  assert p.group_of('big').strategy == 'gram'
  assert p.group_of('small').strategy == 'a2a'
  # Its short side is sharded: gram does not apply, a2a still does.
  assert p.group_of('rows').strategy == 'a2a'
  default = sharding.plan_orthogonalize(leaves, MESH8)
  assert {g.strategy for g in default.groups} == {'a2a'}
  assert sharding.Distributed(MESH8).max_local_matrix_bytes == 2**31


@pytest.mark.parametrize('leaf, strategy, match', [
    (((64, 128), K, P('fsdp')), 'gram', 'long dimension .* sharded'),
    (((128, 64), K, P(None, 'fsdp')), 'gram', 'long dimension .* sharded'),
    (((64, 128), K, P()), 'gram', 'long dimension .* sharded'),
    (((64, 128), K, P('fsdp')), 'local', "use 'a2a'"),
    (((64, 128), K, P()), 'a2a', 'needs a sharded matrix'),
    (((8, 64, 128), MatrixSpec.stacked(0), P('fsdp')), 'replicated',
     "use 'local'"),
    (((3, 3, 16, 32), MatrixSpec.conv(), P(None, None, 'fsdp')), 'auto',
     'only the first fan_in axis'),
    (((64, 128), K, P('data')), 'auto', 'no axis'),
    (((12, 128), K, P('fsdp')), 'auto', 'not divisible'),
])
def test_plan_errors_name_the_leaf(leaf, strategy, match):
  shape, ms, ps = leaf
  with pytest.raises(ValueError, match=match) as e:
    sharding.plan_orthogonalize(
        [sharding.LeafInfo('net/w', shape, jnp.float32, ms, ps)], MESH8,
        strategy)
  assert 'net/w' in str(e.value)


def test_distributed_validates_and_specs_by_path():
  with pytest.raises(ValueError, match='strategy'):
    sharding.Distributed(MESH8, strategy='fast')
  with pytest.raises(ValueError, match='strategy'):
    sharding.Distributed(MESH8, overrides=[('x', 'nope')])
  dist = sharding.Distributed(
      MESH8, param_specs={'a': {'w': P('fsdp')}, 'b': None, 'c': P()})
  updates = {'a': {'w': jnp.zeros((8, 8))}, 'b': jnp.zeros((8, 8))}
  assert sharding.specs_for(updates, dist) == [P('fsdp'), P()]
  with pytest.raises(ValueError, match="'z'"):
    sharding.specs_for({'z': jnp.zeros((8, 8))}, dist)
  with pytest.raises(ValueError, match='param_specs'):
    sharding.array_spec(jax.ShapeDtypeStruct((8, 8), jnp.float32), 'w')


# Multi-device contracts (subprocess, 8 fake CPU devices) ----------------------

HERE = pathlib.Path(__file__).resolve().parent
A2A_CASES = ['fsdp8_a2a', 'fsdp4tp2_a2a', 'explicit_fsdp4tp2']
ALL_CASES = ['fsdp8_a2a', 'fsdp8_local', 'fsdp8_replicated', 'fsdp4tp2_a2a',
             'fsdp4tp2_local', 'explicit_fsdp8', 'explicit_fsdp4tp2',
             'fsdp4tp2_gram', 'explicit_fsdp4tp2_gram_auto']


@pytest.fixture(scope='module')
def cases():
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      ' --xla_force_host_platform_device_count=8').strip()
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join(
      [str(HERE.parent)] + [p for p in [env.get('PYTHONPATH')] if p])
  proc = subprocess.run([sys.executable, str(HERE / 'sharding_cases.py')],
                        env=env, capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  for name, r in res.items():
    assert 'error' not in r, f"{name}: {r['error']}\n{r.get('trace')}"
  return res


@pytest.mark.parametrize('name', ALL_CASES)
def test_numerics_equal_single_device(cases, name):
  r = cases[name]
  assert r['out_specs_ok']
  assert r['f32_max_abs_err'] <= 1e-6
  if 'bf16_max_rel_err' in r:
    assert r['bf16_max_rel_err'] <= 5e-2


@pytest.mark.parametrize('name', ALL_CASES)
def test_flops_and_bytes_match_plan(cases, name):
  r = cases[name]
  assert abs(r['flops'] / r['plan_flops'] - 1) <= 0.05
  for dt in ('f32', 'bf16'):
    plan, got = r[f'plan_bytes_{dt}'], r[f'wire_bytes_{dt}']
    assert abs(got - plan) <= 0.05 * plan + 1e-9, (dt, got, plan)


@pytest.mark.parametrize('name', A2A_CASES + ['explicit_fsdp8'])
def test_a2a_two_all_to_alls_per_group(cases, name):
  r = cases[name]
  n_a2a = sum(g['strategy'] == 'a2a' for g in r['groups'])
  assert n_a2a >= 3
  assert r['collectives'] == {'all-to-all': 2 * n_a2a}
  assert r['lowered_bf16'] == {'all-to-all': 2 * n_a2a}
  assert r['collectives_outside_entry'] == 0


@pytest.mark.parametrize('name', ['fsdp8_local', 'fsdp4tp2_local'])
def test_local_has_no_collectives(cases, name):
  r = cases[name]
  assert {g['strategy'] for g in r['groups']} == {'local'}
  assert r['collectives'] == {} and r['wire_bytes_f32'] == 0


def test_gram_all_reduces_only(cases):
  """Tensor-parallel NS: per group one all-reduce per Gram product (1 step)
  and one for the norm, nothing else; no padding."""
  r = cases['fsdp4tp2_gram']
  assert {g['strategy'] for g in r['groups']} == {'gram'}
  assert all(g['padded'] == g['local'] for g in r['groups'])
  assert r['plan_collectives'] == 2 * len(r['groups'])
  assert r['collectives'] == {'all-reduce': r['plan_collectives']}
  assert r['lowered_bf16'] == {'all-reduce': r['plan_collectives']}


def test_auto_mixes_gram_and_a2a_on_explicit_mesh(cases):
  r = cases['explicit_fsdp4tp2_gram_auto']
  by = {g['strategy']: g for g in r['groups']}
  assert set(by) == {'gram', 'a2a'}
  assert r['collectives'] == {'all-reduce': 2, 'all-to-all': 2}


def test_replicated_one_all_gather_per_group(cases):
  r = cases['fsdp8_replicated']
  assert {g['strategy'] for g in r['groups']} == {'replicated'}
  assert r['collectives'] == {'all-gather': len(r['groups'])}


def test_padding_and_scan_stacking_cases(cases):
  g = cases['fsdp8_a2a']['groups'][0]
  assert g['paths'] == ['a1', 'a2', 'a3', 'scan'] and g['count'] == 6
  assert g['padded'] == 8  # 6 matrices padded to the 8 shards
  mixed = [g for g in cases['fsdp4tp2_a2a']['groups']
           if g['paths'] == ['mixed']][0]
  assert mixed['local'] == 1 and mixed['shards'] == 4  # batch over tp


def test_optax_baseline_fails_on_explicit_mesh(cases):
  r = cases['optax_explicit']
  assert not r['ok'], 'optax.contrib.muon now compiles on an Explicit mesh'


# Recipes with distributed= (subprocess, 8 fake CPU devices) -------------------

RECIPE_KEYS = [f'{r}/{m}/{w}' for r in ('muon', 'normuon', 'namo')
               for m in ('fsdp8', 'fsdp4tp2', 'explicit_fsdp8',
                         'fsdp4tp2_gram')
               for w in ('f32', 'bf16')]


@pytest.fixture(scope='module')
def recipe_cases():
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      ' --xla_force_host_platform_device_count=8').strip()
  env['JAX_PLATFORMS'] = 'cpu'
  proc = subprocess.run(
      [sys.executable, str(HERE / 'sharding_recipes_cases.py')], env=env,
      capture_output=True, text=True, timeout=1200, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('key', RECIPE_KEYS)
def test_recipes_distributed_equal_single_device(recipe_cases, key):
  """Two steps of muon/normuon/namo with distributed= on Auto and Explicit
  meshes equal the single-device recipe; updates keep the params' sharding.

  f32 on the wire: the only differences are one-ulp rounding differences
  in the sharded elementwise stages (seen at step 2 on a TP-sharded leaf),
  amplified by Newton–Schulz: ≤ 2e-6 of the direction (update / lr)."""
  r = recipe_cases[key]
  assert 'error' not in r, r.get('trace', r['error'])
  assert r['sharding_kept']
  gram = '_gram/' in key
  if key.endswith('f32'):
    assert r['rel_err'] <= 2e-6
    # gram sums c's Gram matrices across devices, a different summation
    # order than one device: ulp-level differences in O, which NAMO's
    # shape factor 0.2·√128 ≈ 2.3 scales up in the step.
    assert r['max_abs_err_over_lr'] <= (5e-6 if gram else 2e-6)
  else:
    assert r['rel_err'] <= 5e-2
  # One all-to-all in and one out per a2a group: on fsdp8 the fan-in-sharded
  # 64×128 stack (a, scan) and the transposed b; on fsdp4×tp2 also c, unless
  # c runs tensor-parallel (gram: all-reduces, no all-to-all).
  assert r['all_to_all'] == (6 if 'fsdp4tp2' in key and not gram else 4)
  if gram:
    assert r['other_collectives'] == ['all-reduce']
    return
  # Whatever else the step communicates (finiteness flags, row statistics)
  # is tiny next to the matrices themselves.
  assert r['other_bytes'] <= 0.05 * r['a2a_bytes']


# orthax.sharding.plan of an optimizer (tracing only, no devices needed) -------

PLAN_SHAPES = {  # (shape, PartitionSpec on MESH8, MatrixSpec or None: AdamW)
    'blocks': {
        'a': {'kernel': ((64, 128), P('fsdp', None), K)},
        'b': {'kernel': ((128, 64), P('fsdp', None), K)},  # tall: transposed
        'sq': {'kernel': ((128, 128), P(None, 'fsdp'), K)},
        'scan': {'kernel': ((3, 64, 128), P(None, 'fsdp', None),
                            MatrixSpec.stacked(0)),
                 'bias': ((3, 128), P(), None)},
    },
    'embed': {'embedding': ((40, 64), P(None, 'fsdp'), None)},
}


def _matrices(tree):
  if isinstance(tree, dict):
    out = {k: _matrices(v) for k, v in tree.items()}
    return {k: v for k, v in out.items() if v is not None}
  return tree if tree[2] is not None else None


def _plan_tree(fn, matrices_only=False):
  is_entry = lambda x: isinstance(x, tuple) and isinstance(x[1], P)
  tree = _matrices(PLAN_SHAPES) if matrices_only else PLAN_SHAPES
  return jax.tree.map(fn, tree, is_leaf=is_entry)


def _plan_params(matrices_only=False, mesh=None):
  sh = (lambda e: {} if mesh is None
        else dict(sharding=jax.sharding.NamedSharding(mesh, e[1])))
  return _plan_tree(lambda e: jax.ShapeDtypeStruct(e[0], jnp.float32, **sh(e)),
                    matrices_only)


PLAN_DIST = sharding.Distributed(MESH8, _plan_tree(lambda e: e[1]))
MSPECS = _plan_tree(lambda e: e[2], matrices_only=True)


def _layout(p):
  """Everything of a plan but its FLOPs."""
  return [(g.strategy, g.m, g.n, g.paths, g.transposed, g.count,
           g.local_count, g.padded, g.padding, g.split_axes,
           g.bytes_per_device, g.collectives) for g in p.groups]


@pytest.mark.parametrize('name', ['muon', 'normuon'])
def test_plan_of_recipe_equals_distributed_form(name):
  import orthax  # pylint: disable=g-import-not-at-top
  tx = orthax.recipe(name, learning_rate=0.02, distributed=PLAN_DIST)
  got = sharding.plan(tx, _plan_params())
  # The matrix leaves only (biases and the embedding go to AdamW), with the
  # transform's own FLOP model (jordan, 5 steps, method 'auto').
  ref = sharding.plan(PLAN_DIST, _plan_params(True), MSPECS, steps=5,
                      method='auto')
  assert got == ref
  assert _layout(got) == _layout(
      sharding.plan(PLAN_DIST, _plan_params(True), MSPECS))
  assert [g.strategy for g in got.groups] == ['a2a'] * 3
  assert got.group_of('blocks/scan/kernel').padded == 8  # 1 + 3 → 8 shards
  # Rectangular f32 matrices take the Gram iteration: fewer FLOPs than the
  # default (standard) model; the square one does not.
  default = sharding.plan(PLAN_DIST, _plan_params(True), MSPECS)
  assert got.group_of('blocks/a/kernel').flops_per_device < (
      default.group_of('blocks/a/kernel').flops_per_device)
  assert got.group_of('blocks/sq/kernel') == default.group_of(
      'blocks/sq/kernel')


@pytest.mark.parametrize('name', ['muon', 'normuon'])
def test_plan_flops_follow_the_transform(name):
  import orthax  # pylint: disable=g-import-not-at-top
  default = sharding.plan(PLAN_DIST, _plan_params(True), MSPECS)  # 5 steps
  three = sharding.plan(orthax.recipe(name, learning_rate=0.02, ns_steps=3,
                                      distributed=PLAN_DIST), _plan_params())
  assert _layout(three) == _layout(default)
  sq, sq5 = three.group_of('blocks/sq/kernel'), default.group_of(
      'blocks/sq/kernel')  # square: 'auto' is the standard iteration
  assert sq.flops_per_device * 5 == sq5.flops_per_device * 3
  standard = sharding.plan(orthax.recipe(
      name, learning_rate=0.02, ns_method='standard', distributed=PLAN_DIST),
                           _plan_params())
  assert standard == default
  # A bf16 iteration: 'auto' keeps the standard iteration everywhere.
  bf16 = sharding.plan(orthax.recipe(
      name, learning_rate=0.02, ns_dtype=jnp.bfloat16, distributed=PLAN_DIST),
                       _plan_params())
  assert bf16 == default


def test_plan_of_config_equals_plan_of_recipe():
  import orthax  # pylint: disable=g-import-not-at-top
  config = {'name': 'normuon', 'learning_rate': 0.02,
            'adam_learning_rate': None, 'weight_decay': 0.1,
            'adam_weight_decay': None, 'kwargs': {'ns_steps': 3}}
  got = sharding.plan(config, _plan_params(), distributed=PLAN_DIST)
  tx = orthax.recipe('normuon', learning_rate=0.02, weight_decay=0.1,
                     ns_steps=3, distributed=PLAN_DIST)
  assert got == sharding.plan(tx, _plan_params())


def test_plan_reads_explicit_shardings():
  import orthax  # pylint: disable=g-import-not-at-top
  mesh = AbstractMesh((8,), ('fsdp',),
                      axis_types=(jax.sharding.AxisType.Explicit,))
  tx = orthax.recipe('muon', learning_rate=0.02,
                     distributed=sharding.Distributed(mesh))  # specs: arrays
  got = sharding.plan(tx, _plan_params(mesh=mesh))
  assert _layout(got) == _layout(sharding.plan(PLAN_DIST, _plan_params(True),
                                               MSPECS))


def test_plan_merges_every_distributed_orthogonalization():
  import optax  # pylint: disable=g-import-not-at-top
  from orthax import transforms  # pylint: disable=g-import-not-at-top
  params = _plan_params(True)
  orth = lambda d: transforms.orthogonalize(matrix_specs=MSPECS,
                                            distributed=d)
  one = sharding.plan(orth(PLAN_DIST), params)
  two = sharding.plan(optax.chain(orth(PLAN_DIST), orth(PLAN_DIST)), params)
  assert two.groups == one.groups * 2
  assert two.flops_per_device == 2 * one.flops_per_device
  dist42 = sharding.Distributed(MESH42, PLAN_DIST.param_specs)
  with pytest.raises(ValueError, match='several meshes'):
    sharding.plan(optax.chain(orth(PLAN_DIST), orth(dist42)), params)


def test_plan_records_only_when_asked():
  from orthax.sharding import _inspect  # pylint: disable=g-import-not-at-top
  leaves = [jax.ShapeDtypeStruct((64, 128), jnp.float32)]
  run = lambda: jax.eval_shape(lambda x: sharding.distributed_orthogonalize(
      x, [K], PLAN_DIST, lambda s: s, param_specs=[P('fsdp')]), leaves)
  run()  # not recording: nothing kept, nothing raised
  with _inspect.recording() as plans:
    run()
  assert len(plans) == 1 and plans[0].groups[0].paths == ('0',)
  _inspect.record(plans[0])  # outside: a no-op
  assert len(plans) == 1


def test_plan_errors():
  import optax  # pylint: disable=g-import-not-at-top
  import orthax  # pylint: disable=g-import-not-at-top
  params = _plan_params()
  for tx in (optax.adamw(1e-3), orthax.recipe('muon', learning_rate=0.02)):
    with pytest.raises(sharding.NotDistributedError, match='distributed='):
      sharding.plan(tx, params)
  with pytest.raises(ValueError, match='distributed='):
    sharding.plan({'name': 'muon', 'learning_rate': 0.02}, params)
  with pytest.raises(ValueError, match='Unknown recipe'):
    sharding.plan({'name': 'adamw', 'learning_rate': 0.02}, params,
                  distributed=PLAN_DIST)
  with pytest.raises(sharding.NotDistributedError,
                     match='no distributed orthogonalization'):
    sharding.plan({'name': 'auon', 'learning_rate': 0.02}, params,
                  distributed=PLAN_DIST)
  for bad in ('muon', 3, None):
    with pytest.raises(TypeError, match='GradientTransformation'):
      sharding.plan(bad, params)
  tx = orthax.recipe('muon', learning_rate=0.02, distributed=PLAN_DIST)
  with pytest.raises(ValueError, match='steps'):
    sharding.plan(tx, params, steps=3)
  with pytest.raises(ValueError, match='matrix_specs'):
    sharding.plan(tx, params, MSPECS)
  with pytest.raises(ValueError, match='its own distributed'):
    sharding.plan(tx, params, distributed=PLAN_DIST)


def test_plan_prints_one_row_per_group():
  import orthax  # pylint: disable=g-import-not-at-top
  p = sharding.plan(orthax.recipe('normuon', learning_rate=0.02,
                                  distributed=PLAN_DIST), _plan_params())
  lines = str(p).splitlines()
  assert lines[0].startswith(f'orthax sharding plan: {len(p.groups)} groups')
  rows = lines[3:-1]
  assert [r.split()[0] for r in rows] == [str(i) for i in range(len(p.groups))]
  assert lines[-1].startswith('total')


def test_dry_run_report_prints_the_plan():
  pytest.importorskip('ml_collections')
  pytest.importorskip('orbax.checkpoint')
  from orthax.train import dry_run  # pylint: disable=g-import-not-at-top
  r = dict(hardware='cpu', mesh={'fsdp': 8}, devices=8, num_layers=1,
           params=1e6, param_bytes=1.0, opt_state_bytes=1.0,
           argument_bytes=1.0, temp_bytes=1.0, xla_flops=1.0, model_flops=1.0,
           collectives={}, collective_bytes=0.0, compile_seconds=1.0)
  assert 'sharding plan' not in dry_run.format_report(dict(r, plan=None))
  text = str(sharding.plan(PLAN_DIST, _plan_params(True), MSPECS))
  report = dry_run.format_report(dict(r, plan=text))
  assert all(line in report for line in text.splitlines())


OTHER_RECIPE_KEYS = [f'{r}/{m}/f32'
                     for r in ('root', 'spectra', 'hybrid_auon', 'lanton',
                               'auon')
                     for m in ('fsdp8', 'fsdp4tp2')]


@pytest.mark.parametrize('key', OTHER_RECIPE_KEYS)
def test_every_recipe_accepts_distributed(recipe_cases, key):
  """Every registered recipe takes distributed=: its matrix function
  (Newton–Schulz, SPECTRA's soft clip) runs on whole matrices per device by
  all-to-all, and two steps equal the single-device recipe. AuON has no
  matrix function: nothing moves, the result is still exact."""
  r = recipe_cases[key]
  assert 'error' not in r, r.get('trace', r['error'])
  assert r['sharding_kept']
  assert r['rel_err'] <= 2e-6 and r['max_abs_err_over_lr'] <= 2e-6
  if key.startswith('auon/'):
    assert r['all_to_all'] == 0
  else:
    assert r['all_to_all'] >= 4 and r['all_to_all'] % 2 == 0

