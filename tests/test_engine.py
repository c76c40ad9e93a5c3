"""The engine (``orthax.engine.map_matrices``) and the edge cases it carries
for every recipe: no matrix leaf, zero-size leaves, a gradient of the wrong
shape, SPECTRA on an Explicit mesh, a Distributed for another mesh."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import optax
import orthax
from orthax import engine
from orthax import matrix_stages as MS
from orthax import polar

from fake_devices import run_cases  # noqa: E402  pylint: disable=g-import-not-at-top

RECIPES = orthax.recipe_names()


def _rand(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     jnp.float32)


def _step(tx, grads, params):
  return tx.update(grads, tx.init(params), params)


# map_matrices --------------------------------------------------------------


def test_map_matrices_equals_per_matrix_function():
  ns = functools.partial(polar.orthogonalize_stack, preset='jordan')
  leaves = [_rand((8, 16), 0), _rand((16, 8), 1), _rand((3, 8, 16), 2)]
  specs = [orthax.MatrixSpec()] * 3
  res = engine.map_matrices(ns, leaves, specs)
  assert isinstance(res, engine.MatrixMap)
  assert res.states == [] and res.outputs == []
  for x, y in zip(leaves, res.leaves):
    m = x.reshape((-1,) + x.shape[-2:])
    want = jnp.stack([ns(a[None])[0] for a in m]).reshape(x.shape)
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-6)


def test_map_matrices_same_structure_for_empty_and_zero_size_leaves():
  stage = MS.NeuronNormalize(0.9)
  empty = engine.map_matrices(None, [], [], stages=[stage], states=[[]])
  assert empty == engine.MatrixMap([], [[]], [[]])
  x, z = _rand((4, 8), 0), jnp.zeros((0, 8))
  spec = orthax.MatrixSpec()
  st = [engine.init_stage_states(stage, [x, z], [spec, spec])]
  res = engine.map_matrices(None, [x, z], [spec, spec], stages=[stage],
                            states=st)
  assert res.leaves[1] is z                  # passed through unchanged
  assert res.states[0][1] is st[0][1]        # its state unchanged
  assert res.states[0][0].shape == (8,) and bool(jnp.any(res.states[0][0]))


def test_map_matrices_outputs_for_zero_size_leaves_are_zero():
  step = MS.NoiseAdaptStep('diagonal', 0.01, 1)
  z, x = jnp.zeros((3, 0, 8)), _rand((3, 4, 8), 1)
  spec = orthax.MatrixSpec()
  st = [engine.init_stage_states(step, [z, x], [spec, spec])]
  res = engine.map_matrices(None, [z, x], [spec, spec], stages=[step],
                            states=st, aux=[z, x])
  assert res.outputs[0][0].shape == (3, 0)
  assert res.outputs[0][1].shape == (3, 4)


# Edge cases for every recipe -------------------------------------------------


@pytest.mark.parametrize('name', RECIPES)
def test_tree_without_matrix_leaf(name):
  """A lone 1-D parameter (optax's contrib harness): LANTON raised 'Need at
  least one array to stack'."""
  p = {'b': _rand((3,), 0)}
  u, _ = _step(orthax.recipe(name, learning_rate=0.01), {'b': _rand((3,), 1)},
               p)
  assert u['b'].shape == (3,) and bool(jnp.all(jnp.isfinite(u['b'])))


@pytest.mark.parametrize('name', RECIPES)
def test_matrix_leaf_that_is_not_real_floating_names_it(name):
  """A complex or integer leaf routed to the matrix branch raises, naming
  it and the rule that routes it elsewhere (before: NaN updates from five
  recipes, a jnp/LAPACK error naming nothing from the rest); the complex
  one then trains on the AdamW branch (whose root is real, |g|² as
  optax's)."""
  z = (_rand((8, 8), 4) + 1j * _rand((8, 8), 5)).astype(jnp.complex64)
  for leaf, label in ((z, 'adam'), (jnp.ones((8, 8), jnp.int32), 'frozen')):
    params = {'w': _rand((8, 16), 0), 'table': leaf}
    grads = {'w': _rand((8, 16), 1), 'table': leaf}
    with pytest.raises(ValueError, match=(
        rf"leaf 'table' has dtype {leaf.dtype.name}: matrix steps need real "
        rf"floating-point leaves.*orthax.Rule\('\^table\$', '{label}'\)")):
      _step(orthax.recipe(name, learning_rate=0.01), grads, params)
  if name == 'spectra':  # clips every 2-D leaf its router does not freeze
    return
  router = orthax.Router(extra_rules=[orthax.Rule('^table$', 'adam')])
  tx = orthax.recipe(name, learning_rate=0.01, router=router)
  params = {'w': _rand((8, 16), 0), 'table': z}
  u, state = _step(tx, {'w': _rand((8, 16), 1), 'table': z * 0.5}, params)
  u, _ = tx.update({'w': _rand((8, 16), 2), 'table': z}, state, params)
  assert u['table'].dtype == jnp.complex64
  assert bool(jnp.all(jnp.isfinite(u['table'])))
  assert float(jnp.max(jnp.abs(u['table']))) > 0


@pytest.mark.parametrize('name', RECIPES)
def test_integer_leaf_on_another_branch_names_it(name):
  """An integer leaf the router sends to the AdamW branch (a vector) got
  a zero update every step, silently; it is refused at ``init`` naming it
  and the rule that freezes it, and trains as frozen with that rule (a
  ``float0`` gradient, as ``jax.grad(allow_int=True)`` gives, included)."""
  params = {'w': _rand((8, 16), 0), 'counts': jnp.zeros((3,), jnp.int32)}
  grads = {'w': _rand((8, 16), 1), 'counts': jnp.array([5, -7, 9])}
  with pytest.raises(ValueError, match=(
      r"leaf 'counts' has dtype int32 and the router sends it to '\w+'.*"
      r"orthax.Rule\('\^counts\$', 'frozen'\)")):
    orthax.recipe(name).init(params)
  router = orthax.Router(extra_rules=[orthax.Rule('^counts$', 'frozen')])
  tx = orthax.recipe(name, router=router)
  u, state = _step(tx, grads, params)
  np.testing.assert_array_equal(u['counts'], 0)
  grads['counts'] = np.zeros((3,), jax.dtypes.float0)
  u, _ = tx.update(grads, state, params)
  assert bool(jnp.all(jnp.isfinite(u['w'])))
  new = optax.apply_updates(params, u)  # float0 + int32 is refused
  np.testing.assert_array_equal(new['counts'], params['counts'])
  # A Python int or bool parameter is refused the same way.
  for value in (3, True):
    with pytest.raises(ValueError, match="leaf 'n' has dtype"):
      orthax.recipe(name).init({'w': _rand((8, 16), 0), 'n': value})


@pytest.mark.parametrize('name', RECIPES)
def test_python_float_parameter_trains_on_the_adamw_branch(name):
  """A parameter kept as a Python float (optax's transforms take one) ended
  in ``AttributeError: 'float' object has no attribute 'astype'``."""
  params = {'w': _rand((4, 8), 0), 't': 1.0}
  grads = {'w': _rand((4, 8), 1), 't': 0.5}
  tx = orthax.recipe(name)
  u, state = _step(tx, grads, params)
  u, _ = jax.jit(tx.update)(grads, state, params)
  assert float(u['t']) < 0 and np.isfinite(float(u['t']))


def test_scale_safe_adam_on_complex_equals_optax():
  """Adam's second moment of a complex gradient is the EMA of |g|², kept
  real (optax's ``abs_sq``)."""
  z = (_rand((6, 5), 0) + 1j * _rand((6, 5), 1)).astype(jnp.complex64)
  ours = orthax.transforms.adam.scale_by_adam_scale_safe(0.9, 0.95)
  ref = optax.scale_by_adam(0.9, 0.95)
  s, r = ours.init(z), ref.init(z)
  assert s.nu_root.dtype == jnp.float32
  for i in range(3):
    g = z * (i + 1) + 0.3j
    u, s = ours.update(g, s)
    v, r = ref.update(g, r)
    np.testing.assert_allclose(u, v, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize('empty', [(0, 8), (0, 8, 8), (2, 0, 8)],
                         ids=['matrix', 'zero_layers', 'zero_rows'])
@pytest.mark.parametrize('name', RECIPES)
def test_zero_size_leaf_passes_through(name, empty):
  """A zero-size matrix leaf, a stack of zero layers among them (a
  ZeroDivisionError in NAMO and a min of nothing in LANTON before): it
  comes back empty and the other leaves get exactly what they get without
  it."""
  params = {'w': _rand((8, 16), 0), 'v': _rand((16, 4), 1)}
  grads = {'w': _rand((8, 16), 2), 'v': _rand((16, 4), 3)}
  tx = orthax.recipe(name, learning_rate=0.01)
  ref, _ = _step(tx, grads, params)
  kernel = {'kernel': jnp.zeros(empty)}
  u, _ = _step(tx, dict(grads, e=kernel), dict(params, e=kernel))
  assert u['e']['kernel'].shape == empty
  for k in ('w', 'v'):
    np.testing.assert_array_equal(u[k], ref[k])


@pytest.mark.parametrize('name', RECIPES)
def test_gradient_of_another_shape_names_the_leaf(name):
  params = {'layer': {'kernel': _rand((4, 8), 0)}, 'bias': _rand((8,), 1)}
  grads = {'layer': {'kernel': _rand((8, 4), 2)}, 'bias': _rand((8,), 3)}
  with pytest.raises(ValueError, match=r"'layer/kernel' has shape \(8, 4\) "
                     r'but its parameter has shape \(4, 8\)'):
    _step(orthax.recipe(name, learning_rate=0.01), grads, params)


def test_check_shapes_structure_mismatch():
  """The message names the parameters that have no gradient and the
  gradients that have no parameter, each on its own side."""
  tx = orthax.transforms.check_shapes()
  with pytest.raises(ValueError, match=(
      r"structure of the parameter tree: parameters without a gradient: "
      r"\['b', 'k/w'\]; gradients without a parameter: \['a'\]\.$")):
    tx.update({'a': jnp.ones(2), 'c': jnp.ones(2)}, tx.init({}),
              {'b': jnp.ones(2), 'c': jnp.ones(2), 'k': {'w': jnp.ones(2)}})
  with pytest.raises(ValueError, match=(
      r"parameters without a gradient: \['k'\]\.$")):
    tx.update({'w': jnp.ones(2)}, tx.init({}),
              {'w': jnp.ones(2), 'k': jnp.ones(2)})
  with pytest.raises(ValueError, match='structure of the parameter tree: '
                     '.*tuple'):  # same paths, another container: JAX's words
    tx.update((jnp.ones(2),), tx.init({}), [jnp.ones(2)])


# On 8 fake devices ------------------------------------------------------------


@pytest.fixture(scope='module')
def mesh_cases():
  return run_cases('engine_cases.py', timeout=600)


def test_spectra_on_explicit_mesh_equals_one_device(mesh_cases):
  """NotImplementedError before (a traced bound closed over in
  shard_map)."""
  r = mesh_cases['spectra/explicit_fsdp8']
  assert r['rel_err'] < 2e-6, r
  assert r['sharding_kept'] and r['all_to_all'] > 0


@pytest.mark.parametrize('recipe', ['muon', 'normuon', 'namo_d', 'root'])
def test_recipe_without_distributed_on_explicit_mesh(mesh_cases, recipe):
  """Explicit fsdp=8 axes and no ``distributed=``: every device works on
  whole matrices; equals one device and keeps the parameters' shardings
  (it raised a ShardingTypeError on the grouped stack before)."""
  r = mesh_cases[f'explicit_plain/{recipe}']
  assert r['rel_err'] < 1e-5, r
  assert r['sharding_kept']


@pytest.mark.parametrize('recipe', ['muon', 'aro'])
def test_explicit_mesh_without_set_mesh(mesh_cases, recipe):
  """The same with the mesh known only from the arrays' shardings (no
  ``jax.set_mesh``, as after ``jax.device_put`` onto a ``jax.make_mesh``
  mesh): it raised "Using PartitionSpec when you are not under a mesh
  context is not allowed" before."""
  r = mesh_cases[f'explicit_no_set_mesh/{recipe}']
  assert r['rel_err'] < 1e-5, r
  assert r['sharding_kept']


@pytest.mark.parametrize('distributed', [False, True])
@pytest.mark.parametrize('recipe', ['normuon', 'namo', 'namo_d', 'lanton'])
def test_layer_sharded_stack_on_explicit_mesh(mesh_cases, recipe,
                                              distributed):
  """A stacked kernel sharded on its layer axis (Explicit axes): raised
  ShardingTypeError (select cases must have the same shardings) before,
  with distributed= for NorMuon/NAMO/NAMO-D, always for LANTON."""
  r = mesh_cases[f'explicit_layer_sharded/{recipe}/{distributed}']
  assert 'error' not in r, r
  assert r['rel_err'] < 2e-6, r
  assert r['state_sharding_kept'], r


@pytest.mark.parametrize('recipe',
                         ['spectra', 'aro', 'fismo', 'dct_adamw', 'trion'])
def test_big_tensor_parallel_matrices_run_whole_where_they_must(mesh_cases,
                                                                recipe):
  r = mesh_cases[f'big_tp/{recipe}']
  assert r['strategies'] == ['a2a'], r
  assert r['rel_err'] < 2e-6, r
  assert r['raised'] and r['raised'].startswith(
      "leaf 'blk/kernel' (shape (16, 32)"), r
  assert "strategy 'gram' runs each matrix as column blocks, but" in (
      r['raised'])


def test_param_specs_that_disagree_with_explicit_arrays_are_named(
    mesh_cases):
  r = mesh_cases['explicit_spec_mismatch']
  # (jax before 0.10 writes a spec as PartitionSpec(...), later as P(...);
  # the cases script runs under this process's jax)
  assert r['wrong'] == (
      f"leaf 'a/kernel' is sharded as {P(None, 'tp')!r} but Distributed("
      f"param_specs=...) says {P('tp', None)!r}; fix param_specs, or leave "
      'them out on Explicit mesh axes, where each array carries its own.')
  assert r['same'] is None


@pytest.mark.parametrize('mode', ['auto_jit', 'eager', 'explicit', 'devices'])
def test_distributed_for_another_mesh_raises(mesh_cases, mode):
  msg = mesh_cases[f'other_mesh/{mode}']['raised']
  assert msg is not None, 'the update came back on the other mesh'
  assert "leaf 'w' lives on mesh fsdp=8" in msg
  assert ('fsdp=4×tp=2' in msg) if mode != 'devices' else ('devices' in msg)


@pytest.mark.parametrize('name', ['muon', 'normuon', 'namo', 'spectra'])
def test_zero_size_leaf_on_a_mesh(mesh_cases, name):
  r = mesh_cases[f'zero_size/{name}']
  assert r['empty_shape'] == [0, 64]
  assert r['rel_err'] < 2e-6, r
