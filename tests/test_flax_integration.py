"""orthax.flax: logical axes to PartitionSpecs and optimizer-state specs
(needs no Flax), and the trainer's re-exports of them."""

from __future__ import annotations

import doctest
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orthax
import orthax.flax

RULES = {'layers': None, 'embed': 'fsdp', 'heads': 'tensor', 'mlp': 'tensor',
         'batch': ('data', 'fsdp')}

PARAMS = {  # shape, logical axes
    'blocks': {'mlp': {'kernel': ((3, 64, 128), ('layers', 'embed', 'mlp')),
                       'bias': ((3, 128), ('layers', 'mlp'))}},
    'embed': {'embedding': ((40, 64), (None, 'embed'))},
    'head': {'kernel': ((64, 96), ('embed', 'heads'))},
    'scale': ((), ()),
}


def _is_entry(x):
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)


def _abstract():
  return jax.tree.map(lambda e: jax.ShapeDtypeStruct(e[0], jnp.float32),
                      PARAMS, is_leaf=_is_entry)


def _logical():
  return jax.tree.map(lambda e: e[1], PARAMS, is_leaf=_is_entry)


def _keys(path):
  return tuple(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))
               for k in path)


def test_logical_to_spec_maps_names_through_the_rules():
  assert orthax.flax.logical_to_spec(('layers', 'embed', 'mlp'), RULES) == P(
      None, 'fsdp', 'tensor')
  assert orthax.flax.logical_to_spec((None, 'heads'), RULES) == P(
      None, 'tensor')
  assert orthax.flax.logical_to_spec(('batch', None), RULES) == P(
      ('data', 'fsdp'), None)
  assert orthax.flax.logical_to_spec((), RULES) == P()


def test_logical_to_spec_drops_a_repeated_mesh_axis():
  # 'heads' and 'mlp' both map onto 'tensor': the first dimension keeps it.
  assert orthax.flax.logical_to_spec(('heads', 'mlp'), RULES) == P(
      'tensor', None)
  assert orthax.flax.logical_to_spec(('embed', 'embed'), RULES) == P(
      'fsdp', None)
  # A tuple sharing one axis with an earlier dimension is dropped whole.
  assert orthax.flax.logical_to_spec(('embed', 'batch'), RULES) == P(
      'fsdp', None)


def test_logical_to_spec_names_an_unknown_axis():
  with pytest.raises(ValueError, match="'kv_heads' has no rule"):
    orthax.flax.logical_to_spec(('embed', 'kv_heads'), RULES)
  with pytest.raises(ValueError, match="'kv_heads'"):
    orthax.flax.param_specs({'a': ('kv_heads',)}, RULES)


def test_param_specs_of_a_tree():
  specs = orthax.flax.param_specs(_logical(), RULES)
  assert specs == {
      'blocks': {'mlp': {'kernel': P(None, 'fsdp', 'tensor'),
                         'bias': P(None, 'tensor')}},
      'embed': {'embedding': P(None, 'fsdp')},
      'head': {'kernel': P('fsdp', 'tensor')},
      'scale': P(),
  }


@pytest.mark.parametrize('name', ['muon', 'normuon'])
def test_state_specs_mirror_the_params(name):
  params = _abstract()
  specs = orthax.flax.param_specs(_logical(), RULES)
  tx = orthax.recipe(name, learning_rate=0.02)
  state = jax.eval_shape(tx.init, params)
  got = orthax.flax.state_specs(state, params, specs)
  assert (jax.tree.structure(got, is_leaf=lambda x: isinstance(x, P))
          == jax.tree.structure(state))
  by_path = {_keys(p): (x.shape, s) for (p, x), s in zip(
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))}
  mirrored = set()
  flat_specs = jax.tree.leaves(got, is_leaf=lambda x: isinstance(x, P))
  for (path, x), spec in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                             flat_specs):
    keys = _keys(path)
    hit = next((k for k in by_path if keys[-len(k):] == k
                and by_path[k][0] == x.shape), None)
    if hit is None:  # counts, per-neuron statistics: replicated
      assert spec == P(), keys
    else:
      assert spec == by_path[hit][1], keys
      mirrored.add(hit)
    if x.shape == ():
      assert spec == P(), keys
  # Momentum (the matrices) and Adam's moments (the rest) mirror every param.
  assert mirrored == set(by_path)


def test_state_specs_of_a_plain_optax_state():
  params = _abstract()
  specs = orthax.flax.param_specs(_logical(), RULES)
  state = jax.eval_shape(optax.adamw(1e-3).init, params)
  got = orthax.flax.state_specs(state, params, specs)
  assert got[0].count == P()
  assert got[0].mu == specs and got[0].nu == specs


def test_state_specs_with_none_entries_and_a_mismatched_tree():
  """A ``None`` spec (unspecified: replicated) keeps its place: it was
  dropped from the flattened specs, and every later parameter took the
  spec of the one after it (a bias got a matrix's 2-entry spec, the
  matrix's momentum P())."""
  params = {'a_bias': jax.ShapeDtypeStruct((32,), jnp.float32),
            'w': jax.ShapeDtypeStruct((64, 32), jnp.float32)}
  specs = {'a_bias': None, 'w': P('fsdp', None)}
  state = jax.eval_shape(orthax.muon(0.02).init, params)
  got = orthax.flax.state_specs(state, params, specs)
  adam = optax.tree.get(got, 'adam').inner_state[0]
  assert adam.mu['a_bias'] == P()
  assert optax.tree.get(got, 'momentum').mu['w'] == P('fsdp', None)
  with pytest.raises(ValueError, match="specs must be shaped like the "
                     "parameters: none for parameter 'a_bias'"):
    orthax.flax.state_specs(state, params, {'w': P('fsdp', None)})
  with pytest.raises(ValueError, match="parameter 'w' has 'fsdp'"):
    orthax.flax.state_specs(state, params, {'a_bias': None, 'w': 'fsdp'})


def test_specs_in_an_nnx_state_for_a_dict_of_params():
  """nnx.get_partition_spec's State of specs (each under a Param's
  .value) for the pure-dict parameters: matched by path, as before the
  specs were matched by structure."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  st = nnx.State({'l': {'kernel': nnx.Param(jnp.zeros((8, 16))),
                        'bias': nnx.Param(jnp.zeros(16))}})
  specs = jax.tree.map(lambda x: P(None, 'tp') if x.ndim == 2 else P('tp'),
                       st)
  params = nnx.to_pure_dict(st)
  assert orthax.flax.spec_per_param(params, specs) == [P('tp'),
                                                       P(None, 'tp')]
  state = jax.eval_shape(orthax.muon(0.02).init, params)
  got = orthax.flax.state_specs(state, params, specs)
  assert optax.tree.get(got, 'momentum').mu['l']['kernel'] == P(None, 'tp')


def test_state_shardings_jit_an_init():
  mesh = jax.make_mesh((1, 1), ('fsdp', 'tensor'))
  rules = {k: v for k, v in RULES.items() if k != 'batch'}
  params = _abstract()
  specs = orthax.flax.param_specs(_logical(), rules)
  tx = orthax.muon(learning_rate=0.02)
  shardings = orthax.flax.state_shardings(tx, params, specs, mesh)
  leaves = jax.tree.leaves(shardings)
  assert all(isinstance(s, NamedSharding) and s.mesh == mesh for s in leaves)
  assert {s.spec for s in leaves} >= {P(), P(None, 'fsdp', 'tensor')}
  concrete = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), params)
  state = jax.jit(tx.init, out_shardings=shardings)(concrete)
  assert (jax.tree.structure(state) ==
          jax.tree.structure(jax.eval_shape(tx.init, params)))


def test_examples_run():
  result = doctest.testmod(orthax.flax, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= 4 and result.failed == 0, result


def test_import_orthax_loads_neither_flax_nor_the_integration():
  code = ('import sys, orthax; '
          "bad = {'flax', 'orthax.flax', 'orthax.train'} & set(sys.modules); "
          'assert not bad, bad')
  subprocess.run([sys.executable, '-c', code], check=True)


def test_the_trainer_keeps_the_old_names():
  partitioning = pytest.importorskip('orthax.train.partitioning')
  step = pytest.importorskip('orthax.train.step')
  assert step.state_specs is orthax.flax.state_specs
  # With no rules, the trainer's GPT rules.
  assert partitioning.logical_to_spec(('layers', 'embed', 'mlp')) == P(
      None, 'fsdp', 'tensor')
  assert partitioning.param_specs({'a': ('embed', 'heads')}) == {
      'a': P('fsdp', 'tensor')}


def test_config_plan_example_runs():
  optim = pytest.importorskip('orthax.train.optim')
  finder = doctest.DocTestFinder()
  runner = doctest.DocTestRunner()
  for test in finder.find(optim.plan, 'plan', globs={}):
    runner.run(test)
  result = runner.summarize(verbose=False)
  assert result.attempted >= 5 and result.failed == 0, result
