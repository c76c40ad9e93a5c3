"""orthax.sharding.plan of an optimizer or a Distributed, and
orthax.train.optim.plan of a config: tracing only, no devices needed (an
8-device ``AbstractMesh``)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import orthax
from orthax import matrix_stages as MS
from orthax import polar
from orthax import sharding
from orthax import transforms
from orthax.sharding import _inspect
from orthax.matrices import MatrixSpec

K = MatrixSpec()
MESH8 = AbstractMesh((8,), ('fsdp',))
MESH42 = AbstractMesh((4, 2), ('fsdp', 'tp'))


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


# The matrix stages each recipe runs in its orthogonalize pass.
RECIPE_STAGES = {
    'muon': lambda: [MS.ScaleByShape('keller')],
    'normuon': lambda: [MS.NeuronNormalize(), MS.ScaleByShape('keller')],
}


@pytest.mark.parametrize('name', ['muon', 'normuon'])
def test_plan_of_recipe_equals_distributed_form(name):
  tx = orthax.recipe(name, learning_rate=0.02, distributed=PLAN_DIST)
  got = sharding.plan(tx, _plan_params())
  # The matrix leaves only (biases and the embedding go to AdamW), with the
  # transform's own FLOP model (jordan, 5 steps, method 'auto').
  ref = sharding.plan(PLAN_DIST, _plan_params(True), MSPECS, steps=5,
                      method='auto', stages=RECIPE_STAGES[name]())
  assert got == ref
  assert _layout(got) == _layout(
      sharding.plan(PLAN_DIST, _plan_params(True), MSPECS,
                          stages=RECIPE_STAGES[name]()))
  assert [g.strategy for g in got.groups] == ['a2a'] * 3
  # Two all-to-alls per group; NorMuon's state adds one all-gather.
  assert [g.collectives for g in got.groups] == (
      [3 if name == 'normuon' else 2] * 3)
  stages = ('neuron_normalize → ' if name == 'normuon' else '') + (
      'scale_by_shape')
  assert f'matrix stages in the body of groups 0, 1, 2: {stages}' in str(got)
  assert got.group_of('blocks/scan/kernel').padded == 8  # 1 + 3 → 8 shards
  # Rectangular f32 matrices take the Gram iteration: fewer FLOPs than the
  # default (standard) model; the square one does not.
  default = sharding.plan(PLAN_DIST, _plan_params(True), MSPECS,
                          stages=RECIPE_STAGES[name]())
  assert got.group_of('blocks/a/kernel').flops_per_device < (
      default.group_of('blocks/a/kernel').flops_per_device)
  assert got.group_of('blocks/sq/kernel') == default.group_of(
      'blocks/sq/kernel')


@pytest.mark.parametrize('name', ['muon', 'normuon'])
def test_plan_flops_follow_the_transform(name):
  default = sharding.plan(PLAN_DIST, _plan_params(True), MSPECS,
                          stages=RECIPE_STAGES[name]())  # 5 steps
  three = sharding.plan(orthax.recipe(name, learning_rate=0.02, ns_steps=3,
                                      distributed=PLAN_DIST), _plan_params())
  assert _layout(three) == _layout(default)
  sq, sq5 = three.group_of('blocks/sq/kernel'), default.group_of(
      'blocks/sq/kernel')  # square: 'auto' is the standard iteration
  # The products scale with the steps, the normalizer's pass does not.
  normalize = sq.local_count * polar.FROBENIUS_FLOPS_PER_ENTRY * sq.m * sq.n
  assert ((sq.flops_per_device - normalize) * 5
          == (sq5.flops_per_device - normalize) * 3)
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
  optim = pytest.importorskip('orthax.train.optim')  # the trainer's extras
  config = {'name': 'normuon', 'learning_rate': 0.02,
            'adam_learning_rate': None, 'weight_decay': 0.1,
            'adam_weight_decay': None, 'unused_by_normuon': 1,
            'kwargs': {'ns_steps': 3}}
  got = optim.plan(config, _plan_params(), PLAN_DIST)
  tx = orthax.recipe('normuon', learning_rate=0.02, weight_decay=0.1,
                     ns_steps=3, distributed=PLAN_DIST)
  assert got == sharding.plan(tx, _plan_params())
  assert got == optim.plan(config, _plan_params(), distributed=PLAN_DIST)


def test_plan_of_config_errors():
  optim = pytest.importorskip('orthax.train.optim')
  params = _plan_params()
  with pytest.raises(ValueError, match="no 'name'"):
    optim.plan({'learning_rate': 0.02}, params, PLAN_DIST)
  with pytest.raises(ValueError, match='name must be a registered recipe'):
    optim.plan({'name': 'nope', 'learning_rate': 0.02}, params, PLAN_DIST)
  for name in ('auon', 'adamw'):
    with pytest.raises(sharding.NotDistributedError,
                       match='no distributed orthogonalization'):
      optim.plan({'name': name, 'learning_rate': 0.02}, params, PLAN_DIST)


def test_plan_reads_explicit_shardings():
  mesh = AbstractMesh((8,), ('fsdp',),
                      axis_types=(jax.sharding.AxisType.Explicit,))
  tx = orthax.recipe('muon', learning_rate=0.02,
                     distributed=sharding.Distributed(mesh))  # specs: arrays
  got = sharding.plan(tx, _plan_params(mesh=mesh))
  assert _layout(got) == _layout(sharding.plan(PLAN_DIST, _plan_params(True),
                                               MSPECS))


@pytest.mark.parametrize('name', ['muon', 'normuon', 'aro', 'dct_adamw'])
def test_plan_on_an_explicit_mesh_from_structs_without_sharding(name):
  """The docstring's promise, shapes and specs only: on an Explicit mesh
  the structs' lack of sharding= met shard_map's in_specs, an error naming
  nothing. The Distributed's specs place them (slot and per-leaf states
  included)."""
  mesh = AbstractMesh((8,), ('fsdp',),
                      axis_types=(jax.sharding.AxisType.Explicit,))
  dist = sharding.Distributed(mesh, PLAN_DIST.param_specs)
  got = sharding.plan(orthax.recipe(name, distributed=dist), _plan_params())
  want = sharding.plan(orthax.recipe(name, distributed=PLAN_DIST),
                       _plan_params())
  assert _layout(got) == _layout(want)


def test_an_unplaced_leaf_on_an_explicit_mesh_is_named():
  mesh = AbstractMesh((8,), ('fsdp',),
                      axis_types=(jax.sharding.AxisType.Explicit,))
  dist = sharding.Distributed(mesh, {'w': P(None, 'fsdp')})
  leaf = jax.ShapeDtypeStruct((32, 64), jnp.float32)  # no sharding=
  # (jax before 0.10 writes a spec as PartitionSpec(...), later as P(...))
  with pytest.raises(ValueError, match=(
      r"^leaf 'w' carries no sharding, but its spec "
      + re.escape(repr(P(None, 'fsdp'))) + ' names Explicit mesh axes')):
    jax.eval_shape(lambda x: sharding.distributed_orthogonalize(
        [x], [K], dist, lambda s: s, paths=['w'],
        param_specs=[P(None, 'fsdp')]), leaf)


def test_plan_merges_every_distributed_orthogonalization():
  params = _plan_params(True)
  orth = lambda d: transforms.orthogonalize(matrix_specs=MSPECS,
                                            distributed=d)
  one = sharding.plan(orth(PLAN_DIST), params)
  two = sharding.plan(optax.chain(orth(PLAN_DIST), orth(PLAN_DIST)), params)
  assert two.groups == one.groups * 2
  assert two.flops_per_device == 2 * one.flops_per_device
  dist42 = sharding.Distributed(MESH42, PLAN_DIST.param_specs)
  with pytest.raises(ValueError, match='mesh'):  # the executor or the merge
    sharding.plan(optax.chain(orth(PLAN_DIST), orth(dist42)), params)
  with pytest.raises(ValueError, match='several meshes'):
    _inspect._merge([one, sharding.plan(dist42, params, MSPECS)])


def test_plan_records_only_when_asked():
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
  params = _plan_params()
  for tx in (optax.adamw(1e-3), orthax.recipe('muon', learning_rate=0.02)):
    with pytest.raises(sharding.NotDistributedError, match='distributed='):
      sharding.plan(tx, params)
  config = {'name': 'muon', 'learning_rate': 0.02}
  with pytest.raises(TypeError, match=r'orthax\.train\.optim\.plan\(config'):
    sharding.plan(config, params)
  with pytest.raises(TypeError, match=r'orthax\.train\.optim\.plan'):
    sharding.plan(config, params, distributed=PLAN_DIST)
  with pytest.raises(TypeError, match='first argument'):
    sharding.plan(PLAN_DIST, params, distributed=PLAN_DIST)
  for bad in ('muon', 3, None):
    with pytest.raises(TypeError, match='GradientTransformation'):
      sharding.plan(bad, params)
  tx = orthax.recipe('muon', learning_rate=0.02, distributed=PLAN_DIST)
  with pytest.raises(ValueError, match='steps'):
    sharding.plan(tx, params, steps=3)
  with pytest.raises(ValueError, match='matrix_specs'):
    sharding.plan(tx, params, MSPECS)
  with pytest.raises(TypeError, match='its own distributed'):
    sharding.plan(tx, params, distributed=PLAN_DIST)


def test_plan_prints_one_row_per_group():
  p = sharding.plan(orthax.recipe('normuon', learning_rate=0.02,
                                  distributed=PLAN_DIST), _plan_params())
  lines = str(p).splitlines()
  assert lines[0].startswith(f'orthax sharding plan: {len(p.groups)} groups')
  rows = lines[3:3 + len(p.groups)]
  assert [r.split()[0] for r in rows] == [str(i) for i in range(len(p.groups))]
  assert lines[3 + len(p.groups)].startswith('total')
  # Then one line per set of matrix stages run in the body.
  assert lines[4 + len(p.groups):] == [
      'matrix stages in the body of groups 0, 1, 2: '
      'neuron_normalize → scale_by_shape']


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


def test_the_plan_counts_each_normalizers_work():
  """The plan adds the normalizer's element-wise FLOPs
  (``normalizer_flops``) to Newton–Schulz's products, Frobenius or AOL's;
  a FLOP model of one's own is not charged for it."""
  m, n = 64, 256
  frob = sharding.default_matrix_flops(5, 'standard')(m, n, jnp.float32)
  aol = sharding.default_matrix_flops(5, 'standard', normalizer='aol')(
      m, n, jnp.float32)
  none = sharding.default_matrix_flops(5, 'standard', normalizer='none')(
      m, n, jnp.float32)
  assert none == polar.standard_flops(m, n, 5)
  assert frob - none == polar.FROBENIUS_FLOPS_PER_ENTRY * m * n
  assert aol - none == 5 * m * n + 4 * m * m
  leaf = [sharding.LeafInfo('w', (m, n), jnp.float32, MatrixSpec(),
                            jax.sharding.PartitionSpec(None, 'fsdp'))]
  mesh = jax.sharding.AbstractMesh((8,), ('fsdp',))
  block = lambda **kw: sharding.plan_orthogonalize(  # pylint: disable=unnecessary-lambda-assignment
      leaf, mesh, 'gram', method='standard', **kw).groups[0].matrix_flops
  products = polar.standard_flops(m, n, 5, col_shards=8)
  assert block() == products + polar.FROBENIUS_BLOCK_FLOPS_PER_ENTRY * m * (
      n // 8)
  assert block(normalizer='aol') == products + 14 * m * (n // 8) + 4 * m * m
  assert block(normalizer='none') == products
  assert block(matrix_flops=lambda *_: 0) == products
  with pytest.raises(ValueError, match='normalizer_flops: normalizer must be '
                     "one of .*got 'Frobenius'"):
    polar.normalizer_flops('Frobenius', m, n)
  with pytest.raises(ValueError, match='normalizer_flops: col_shards must'):
    polar.normalizer_flops('aol', m, n, col_shards=0)
  aol_plan = sharding.plan(orthax.orthogonalize(
      'aol', distributed=sharding.Distributed(jax.make_mesh((1,), ('fsdp',)),
                                              {'w': None})),
                           {'w': jax.ShapeDtypeStruct((m, n), jnp.float32)})
  k = polar.get_preset('aol').steps
  assert aol_plan.groups[0].matrix_flops - polar.normalizer_flops(
      'aol', m, n) in (polar.standard_flops(m, n, k), polar.gram_flops(m, n, k))


def test_aol_never_runs_a_square_matrix_as_its_transpose():
  """A square matrix sharded along its rows runs under ``gram`` as its
  transpose, exact for every normalizer but AOL, which scales rows: on a
  mesh it gave another update than one device (4.6% apart on a 64×64
  Gaussian, ``fsdp8``). Under AOL ``auto`` keeps the whole matrices of
  ``a2a`` and ``gram`` says why it cannot."""
  leaf = [sharding.LeafInfo('sq', (64, 64), jnp.float32, MatrixSpec(),
                            P('fsdp', None))]
  mesh = jax.sharding.AbstractMesh((8,), ('fsdp',))
  plan = lambda s, **kw: sharding.plan_orthogonalize(  # pylint: disable=unnecessary-lambda-assignment
      leaf, mesh, s, max_local_matrix_bytes=1024, **kw).groups[0]
  for normalizer in ('frobenius', 'schatten4', 'none'):
    for s in ('auto', 'gram'):
      g = plan(s, normalizer=normalizer)
      assert (g.strategy, g.transposed) == ('gram', (True,)), normalizer
  g = plan('auto', normalizer='aol')
  assert (g.strategy, g.transposed) == ('a2a', (False,))
  with pytest.raises(ValueError, match=re.escape(
      "leaf 'sq' (shape (64, 64), spec P('fsdp', None)): strategy 'gram' "
      "would run this square matrix as its transpose")):
    plan('gram', normalizer='aol')


def test_a_conv_sharded_on_its_input_channels_is_told_the_view_that_works():
  """A conv kernel's default view has the window first among its fan-in
  axes, so the usual channel sharding was refused with no way forward; the
  error names the view with the sharded axis first, and that view plans."""
  shape, spec = (3, 3, 8, 16), P(None, None, 'fsdp', 'tp')
  params = {'conv': {'kernel': jax.ShapeDtypeStruct(shape, jnp.float32)}}
  dist = sharding.Distributed(MESH42, {'conv': {'kernel': spec}})
  tx = orthax.recipe('muon', learning_rate=0.02, distributed=dist)
  with pytest.raises(ValueError, match=re.escape(
      'orthax.MatrixSpec(fan_in=(2, 0, 1), fan_out=(3,))')):
    sharding.plan(tx, params)
  rule = orthax.Rule('conv/kernel$', 'matrix',
                     MatrixSpec(fan_in=(2, 0, 1), fan_out=(3,)))
  tx = orthax.recipe('muon', learning_rate=0.02, distributed=dist,
                     router=orthax.Router(extra_rules=[rule]))
  (group,) = sharding.plan(tx, params).groups
  assert (group.m, group.n) == (16, 72)
