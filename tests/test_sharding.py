"""orthax.sharding: plans (in process) and multi-device contracts.

The multi-device cases run once, in a subprocess with 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before
JAX starts), through ``tests/sharding_cases.py``, which prints JSON.
"""

from __future__ import annotations

import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from orthax import polar
from orthax import sharding
from orthax.benchmarking import gpt2_hidden_kernels
from orthax.matrices import MatrixSpec

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from fake_devices import run_cases  # noqa: E402  pylint: disable=g-import-not-at-top

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
  assert g.flops_per_device == 2 * (
      steps * (4 * m * m * n // 8 + 2 * m**3)
      + polar.FROBENIUS_BLOCK_FLOPS_PER_ENTRY * m * n // 8)
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
  # A compiled pattern was kept as its repr (never matching); a flat pair
  # failed to unpack; a bad regex raised re.error.
  assert sharding.Distributed(MESH8, overrides=[(
      re.compile('mlp'), 'local')]).overrides == (('mlp', 'local'),)
  for bad, match in ((('mlp', 'local'), "pairs .*got the entry 'mlp'"),
                     ([('mlp(', 'local')], "'mlp\\(' is not a regular "
                      'expression'),
                     ([(3, 'local')], 'patterns must be regular')):
    with pytest.raises(ValueError, match=f'^Distributed: overrides .*{match}'):
      sharding.Distributed(MESH8, overrides=bad)
  # Zeros on the wire; Inf past 6.5e4 (before the matrices' normalization).
  for bad in (jnp.int8, jnp.float16, jnp.float8_e4m3fn, 'bogus'):
    with pytest.raises(ValueError, match='^Distributed: comm_dtype must be '
                       r'bfloat16, float32 \(or wider\) or None'):
      sharding.Distributed(MESH8, comm_dtype=bad)
  with pytest.raises(ValueError, match='has flags; write them in the '
                     'pattern'):  # re.I was dropped: case-sensitive
    sharding.Distributed(MESH8, overrides=[(re.compile('mlp', re.I),
                                            'local')])
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
             'fsdp4tp2_gram', 'fsdp4tp2_gram_no_norm', 'fsdp4tp2_gram_aol',
             'fsdp4tp2_gram_schatten4', 'explicit_fsdp4tp2_gram_auto']


@pytest.fixture(scope='module')
def cases():
  return run_cases('sharding_cases.py', timeout=300)


@pytest.mark.parametrize('name', ALL_CASES)
def test_numerics_equal_single_device(cases, name):
  r = cases[name]
  assert r['out_specs_ok']
  assert r['f32_max_abs_err'] <= 1e-6
  if 'bf16_max_rel_err' in r:
    # bfloat16 on the wire only: its roundings (2^-9 relative each), which
    # Newton–Schulz amplifies (0.4–0.6% of the direction here).
    assert r['bf16_max_rel_err'] <= 1e-2
  if name in A2A_CASES:
    # Every matrix crosses the wire both ways: the result is the input and
    # the output rounded to bfloat16 with Newton–Schulz in float32 between
    # (it iterated in bfloat16: 1.2% from one device, 4× the wire's cost).
    assert r['bf16_vs_wire_model_rel_err'] <= 1e-3


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


def test_gram_without_a_normalizer_has_no_norm_all_reduce(cases):
  """``normalizer='none'``: one all-reduce per Gram product only; the plan
  counted one for the norm too (2 against the compiled program's 1)."""
  r = cases['fsdp4tp2_gram_no_norm']
  assert r['plan_collectives'] == len(r['groups'])
  assert r['collectives'] == {'all-reduce': r['plan_collectives']}


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
