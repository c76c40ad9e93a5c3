"""Slot stages: per-matrix state of any shape that lives with the device
that works on the matrix (``StageShapes(slots=True)``), on one device and on
8 fake devices, and a recipe added by writing only its stage, the recipe and
its registration (``tests/slot_recipe.py``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import orthax
from orthax import engine
from orthax import matrix_stages as MS
from orthax.matrices import MatrixSpec

import slot_recipe  # noqa: E402  pylint: disable=g-import-not-at-top
from fake_devices import run_cases  # noqa: E402  pylint: disable=g-import-not-at-top

SPECS = {'w': MatrixSpec(), 'tall': MatrixSpec(),
         'scan': MatrixSpec.stacked(0), 'w2': MatrixSpec()}
SHAPES = {'w': (8, 16), 'tall': (16, 8), 'scan': (3, 8, 16), 'w2': (8, 16)}


def _tree(seed):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.standard_normal(s), jnp.float32)
          for k, s in SHAPES.items()}


def _matrices(x, spec):
  return np.asarray(orthax.matrices.to_matrices(x, spec), np.float64)


def test_slot_state_layout_on_one_device():
  tx = orthax.orthogonalize(matrix_specs=SPECS,
                            then=[slot_recipe.GramEMA()])
  st = tx.init(_tree(0)).stages['gram_ema']
  assert isinstance(st, engine.SlotState) and st.axes == ()
  # Wide 8×16 matrices (w, w2, the 3 of scan) in one group, the tall one in
  # its own (a stage sees one orientation per group): [D=1, k, m, m].
  shapes = sorted(tuple(a['gram'].shape) for a in st.slots.values())
  assert shapes == [(1, 1, 16, 16), (1, 5, 8, 8)]


@MS.stage
class _Rotate(MS.MatrixStage):
  """``R ← R·Q(φ)`` per matrix, ``O ← R O``; ``t ← t + 1`` (a dict state
  with an identity initial rotation)."""

  name = 'rotate'
  angle: float = 0.3

  def shapes(self, fan_in, fan_out):
    return MS.StageShapes(state={'r': (fan_in, fan_in), 't': ()},
                          slots=True)

  def initial_state(self, fan_in, fan_out, dtype):
    return {'r': jnp.eye(fan_in, dtype=dtype), 't': jnp.zeros((), dtype)}

  def apply(self, o, state, blocks):
    n = blocks.fan_in
    c, s = np.cos(self.angle), np.sin(self.angle)
    q = jnp.eye(n).at[0, 0].set(c).at[1, 1].set(c).at[0, 1].set(-s).at[
        1, 0].set(s)
    r = state['r'] @ q
    return (jnp.einsum('kil,klj->kij', r, o.astype(r.dtype)).astype(o.dtype),
            {'r': r, 't': state['t'] + 1})


def test_dict_slot_state_starts_at_its_initial_value():
  """A state of several arrays, one starting at the identity: after two
  steps each matrix is rotated by Q then Q² (in slots), the counter is 2."""
  spec = {'w': MatrixSpec(), 'tall': MatrixSpec()}
  shapes = {'w': (4, 6), 'tall': (6, 4)}
  ones = {k: jnp.ones(s) for k, s in shapes.items()}
  tx = orthax.orthogonalize(matrix_specs=spec, then=[_Rotate()])
  plain = orthax.orthogonalize(matrix_specs=spec)
  state = tx.init(ones)
  st = state.stages['rotate']
  for a in st.slots.values():
    np.testing.assert_array_equal(a['r'][0, 0], np.eye(a['r'].shape[-1]))
  c, s = np.cos(0.3), np.sin(0.3)
  for step in (1, 2):
    got, state = jax.jit(tx.update)(ones, state)
    o, _ = plain.update(ones, plain.init(ones))
    for k in shapes:
      m = _matrices(o[k], spec[k])[0]
      q = np.eye(m.shape[0])
      q[:2, :2] = [[c, -s], [s, c]]
      want = np.linalg.matrix_power(q, step) @ m
      np.testing.assert_allclose(_matrices(got[k], spec[k])[0], want,
                                 rtol=1e-5, atol=1e-6)
  ts = [float(a['t'][0, 0]) for a in state.stages['rotate'].slots.values()]
  assert ts == [2.0, 2.0]


def test_dict_state_needs_slots():

  @MS.stage
  class Two(MS.MatrixStage):
    name = 'two'

    def shapes(self, fan_in, fan_out):
      return MS.StageShapes(state={'a': (), 'b': ()})

    def apply(self, o, state, blocks):
      return o, state

  p = {'w': jnp.ones((4, 8))}
  with pytest.raises(ValueError, match="stage 'two': a state of several"):
    orthax.orthogonalize(then=[Two()]).init(p)


def test_slot_stage_equals_a_float64_transcription():
  """Three steps of orthogonalize(then=[GramEMA]) against orthogonalize()
  followed by the rule written out in NumPy, one state per matrix."""
  beta, alpha = 0.8, 0.3
  fused = orthax.orthogonalize(matrix_specs=SPECS,
                               then=[slot_recipe.GramEMA(beta, alpha)])
  plain = orthax.orthogonalize(matrix_specs=SPECS)
  state = fused.init(_tree(0))
  ref_state = {}
  for step in range(3):
    g = _tree(step + 1)
    got, state = jax.jit(fused.update)(g, state)
    o, _ = plain.update(g, plain.init(g))
    for k, spec in SPECS.items():
      mats = _matrices(o[k], spec)
      want = []
      for b, m in enumerate(mats):
        s = ref_state.get((k, b), np.zeros((m.shape[0],) * 2))
        s = beta * s + (1 - beta) * m @ m.T / m.shape[1]
        ref_state[(k, b)] = s
        want.append(m + alpha * s @ m)
      np.testing.assert_allclose(_matrices(got[k], spec), np.stack(want),
                                 rtol=2e-5, atol=2e-6)


def test_slot_stage_rejects_an_output_or_scaling():

  @MS.stage
  class Bad(MS.MatrixStage):
    name = 'bad'

    def shapes(self, fan_in, fan_out):
      return MS.StageShapes(state=(), output=(), slots=True)

    def apply(self, o, state, blocks):
      return o, state, state

  tx = orthax.orthogonalize(then=[Bad()])
  p = {'w': jnp.ones((4, 8))}
  with pytest.raises(ValueError, match="stage 'bad': slots=True"):
    tx.update(p, tx.init(p))


def test_stage_is_a_pytree_with_static_modes():
  st = MS.NeuronNormalize(0.9, axis='longer')
  leaves, treedef = jax.tree.flatten(st)
  assert leaves == [0.9, 1e-10]
  back = jax.tree.unflatten(treedef, [jnp.float32(0.5), 1e-10])
  assert back.axis == 'longer' and float(back.beta2) == 0.5
  with pytest.raises(ValueError, match='axis must be one of'):
    MS.NeuronNormalize(axis='rows')


@pytest.mark.parametrize('stage,split,want', [
    (MS.NeuronNormalize(), -2, [16, 1, 1]),       # statistic + restore
    (MS.NeuronNormalize(), -1, [1, 1]),
    (MS.NeuronNormalize(restore_norm=False), -1, []),
    (MS.ScaleToRms(), -1, [1]),
    (MS.CoshNormalize(), -2, [1, 1]),
    (MS.ScaleByShape(), -1, []),
    (MS.NoiseAdaptStep('diagonal', 0.1, 1), -2, [2]),
    (MS.NoiseAdaptStep('scalar', 0.1, 1), -2, []),
])
def test_split_sums_are_traced_from_apply(stage, split, want):
  """What a plan counts for column blocks comes from tracing the stage."""
  assert MS.split_sums(stage, 8, 16, split) == want


@pytest.fixture
def slot_recipe_name():
  """The test recipe, registered for one test only (other test modules see
  the library's registry, whichever worker runs them)."""
  name = slot_recipe.register()
  yield name
  orthax.recipes.unregister(name)


def test_new_recipe_on_one_device_trains_and_keeps_its_state(
    slot_recipe_name):
  name = slot_recipe_name
  params = {**_tree(0), 'bias': jnp.zeros((16,))}
  tx = orthax.recipe(name, router=orthax.Router(
      extra_rules=[orthax.Rule('scan', 'matrix', MatrixSpec.stacked(0))]))
  state = tx.init(params)
  for step in range(2):
    g = {**_tree(step + 5), 'bias': jnp.ones((16,))}
    u, state = jax.jit(tx.update)(g, state, params)
  slots = jax.tree.leaves(optax_get(state, 'gram_ema'))
  assert slots and all(bool(jnp.any(s != 0)) for s in slots)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


def optax_get(state, name):
  import optax  # pylint: disable=g-import-not-at-top
  return optax.tree.get(state, name)


@pytest.fixture(scope='module')
def mesh_cases():
  return run_cases('slot_cases.py', timeout=600)


@pytest.mark.parametrize('mesh', ['fsdp8', 'fsdp4tp2', 'explicit_fsdp8',
                                  'dp8'])
def test_new_recipe_on_8_devices_equals_one_device(mesh_cases, mesh):
  r = mesh_cases[mesh]
  assert r['rel_err'] < 2e-6, r
  assert r['state_rel_err'] < 2e-6, r


@pytest.mark.parametrize('mesh', ['fsdp8', 'fsdp4tp2', 'explicit_fsdp8',
                                  'dp8'])
def test_slot_state_is_never_gathered(mesh_cases, mesh):
  """The m×m states stay on their owner devices: no all-gather, and the
  step moves exactly the bytes of plain Muon (the plan's, the stage adds
  none) plus check_finite's flag."""
  r = mesh_cases[mesh]
  assert 'all-gather' not in r['collectives'] or mesh == 'dp8', r
  assert r['plan_bytes'] == r['muon_plan_bytes'], r
  assert abs(r['wire_bytes'] - r['muon_wire_bytes']) <= 16, r
  assert r['state_sharded_over_all_axes'], r
  assert r['state_specs_owner'], r    # orthax.flax.state_specs agrees


def test_checkpoint_holds_slot_state(tmp_path, slot_recipe_name):
  """An orbax checkpoint (the trainer's Checkpointer) of a state with slot
  stages restores to the same tree, bit for bit."""
  from orthax.train import checkpoint  # pylint: disable=g-import-not-at-top
  name = slot_recipe_name
  params = {k: v for k, v in _tree(0).items() if k != 'scan'}
  tx = orthax.recipe(name)
  state = tx.init(params)
  _, state = jax.jit(tx.update)(
      {k: v for k, v in _tree(3).items() if k != 'scan'}, state, params)
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1)
  ckpt.save(1, state, force=True)
  ckpt.close()
  back = checkpoint.Checkpointer(str(tmp_path), every=1).restore(
      jax.eval_shape(lambda: state))
  assert jax.tree.structure(back) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  assert any(bool(jnp.any(x != 0)) for x in
             jax.tree.leaves(optax_get(back, 'gram_ema')))


@MS.stage
class _Tag(MS.MatrixStage):
  """``O ← t·O``, ``t`` a per-matrix slot (what each leaf's slot holds)."""

  name = 'tag'

  def shapes(self, fan_in, fan_out):
    return MS.StageShapes(state=(), slots=True)

  def apply(self, o, state, blocks):
    return o * state[:, None, None].astype(o.dtype), state


def test_an_update_grouped_otherwise_than_init_is_refused():
  """Slots are per group of same shape and dtype: a gradient whose dtype is
  not its parameter's moved the leaf to another group, where it read
  another leaf's slot (b and c swapped states). A bfloat16 update of
  float32 parameters, which groups alike, still runs and keeps each slot;
  one that merges the groups is refused too."""
  f32, bf16 = jnp.float32, jnp.bfloat16
  params = {'a': jnp.ones((8, 16), f32), 'b': jnp.ones((8, 16), bf16),
            'c': jnp.ones((8, 16), f32), 'd': jnp.ones((8, 16), bf16)}
  tx = orthax.orthogonalize(then=[_Tag()])
  state = tx.init(params)
  slot = state.stages['tag']
  assert [p for _, p in slot.members] == [('a', 'c'), ('b', 'd')]
  tags = {'group0': jnp.array([[1.0, 3.0]]), 'group1': jnp.array([[2.0, 4.0]])}
  state = state._replace(stages={'tag': jax.tree.map(
      lambda a, t: t.astype(a.dtype), slot, engine.SlotState(
          tags, slot.axes, slot.members, slot.ids))})
  swapped = dict(params, b=params['b'].astype(f32), c=params['c'].astype(bf16))
  with pytest.raises(ValueError, match=r"^tag: its slot state was laid out "
                     r"at init .* \('b' is float32 here, bfloat16 at init\)"):
    tx.update(swapped, state)
  with pytest.raises(ValueError, match=r"\('a' is bfloat16 here, float32"):
    tx.update(jax.tree.map(lambda x: x.astype(bf16), params), state)
  params = jax.tree.map(lambda x: x.astype(f32), params)
  state = tx.init(params)
  slot = state.stages['tag']
  state = state._replace(stages={'tag': jax.tree.map(
      lambda a: jnp.arange(1.0, 5.0, dtype=a.dtype).reshape(a.shape), slot)})
  low = jax.tree.map(lambda x: x.astype(bf16), params)
  ones = orthax.orthogonalize().update(low, None)[0]
  u, new = tx.update(low, state)
  for k, t in zip('abcd', (1.0, 2.0, 3.0, 4.0)):
    np.testing.assert_allclose(np.asarray(u[k], np.float32),
                               t * np.asarray(ones[k], np.float32), rtol=2e-2)
  assert jax.tree.structure(new) == jax.tree.structure(state)
