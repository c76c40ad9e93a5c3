"""A matrix stage that cannot run is named where it is built or handed to a
transform: out-of-range hyperparameters of the library's stages (they gave
NaN or a reversed step, silently, where the matching transform refused
them), and hand-written stages that break the protocol (errors that named
nothing, or no error: a state that changed dtype, an output of the wrong
shape, a class that fails only on a mesh)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import orthax
from orthax import matrix_stages as MS
from orthax import transforms as T

PARAMS = {'w': jnp.ones((8, 16)) + jnp.eye(8, 16)}


@pytest.mark.parametrize('make,match', [
    # NeuronNormalize(beta2=2) gave NaN; eps=-1 and ScaleToRms(rms=-0.2) a
    # step pointing the other way (cosine -1 with Newton–Schulz's).
    (lambda: MS.NeuronNormalize(beta2=2.0), r'^neuron_normalize: beta2 must be in \[0, 1\)'),
    (lambda: MS.NeuronNormalize(0.95, eps=-1.0), r'^neuron_normalize: eps must be > 0'),
    (lambda: MS.ScaleToRms(rms=-0.2), r'^scale_to_rms: rms must be >= 0'),
    (lambda: MS.ScaleByShape('moonlight', rms=-0.2), r'^scale_by_shape: rms must be >= 0'),
    (lambda: MS.ClipOutliers(quantile=1.5), r'^clip_outliers: quantile must be in \[0, 1\]'),
    (lambda: MS.CoshNormalize(gamma=-1.0), r'^cosh_normalize: gamma must be >= 0'),
    (lambda: MS.DCTAdam(b2=1.0), r'^dct_adam: b2 must be in \[0, 1\)'),
    (lambda: MS.TrionStep(momentum=-0.1), r'^trion: momentum must be in \[0, 1\)'),
    (lambda: MS.FismoStep(damping=0.0), r'^fismo: damping must be > 0'),
    (lambda: MS.AroRotate(eps=0.0), r'^aro_rotate: eps must be > 0'),
    (lambda: MS.NoiseAdaptStep('scalar', 0.1, 1, mu2=1.5), r'^noise_adapt: mu2 must be in \[0, 1\)'),
])
def test_stage_hyperparameters_are_checked_at_construction(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_checks_pass_traced_values_and_pytree_placeholders():
  # Under jit (inject_hyperparams, schedules) the values are tracers, and
  # JAX rebuilds stages with placeholders (None, PartitionSpecs): neither
  # is a number to check.
  st = MS.NeuronNormalize(0.95)
  assert jax.tree.structure(jax.tree.map(lambda _: None, st)) is not None
  jax.tree.map(lambda _: jax.sharding.PartitionSpec(), st)
  out = jax.jit(lambda b: MS.NeuronNormalize(b).beta2 * 2)(jnp.float32(0.5))
  assert float(out) == 1.0


def _run(stage):
  tx = T.orthogonalize(then=[stage])
  return tx.update(PARAMS, tx.init(PARAMS))


@MS.stage
class _ThreeTuple(MS.MatrixStage):
  name = 'three_tuple'

  def apply(self, o, state, blocks):
    return o, state, jnp.zeros(o.shape[0])


@MS.stage
class _DeclaredOutput(MS.MatrixStage):
  name = 'declared_output'

  def shapes(self, fan_in, fan_out):
    return MS.StageShapes(output=())

  def apply(self, o, state, blocks):
    return o, state


@MS.stage
class _WrongOutput(_DeclaredOutput):
  name = 'wrong_output'

  def apply(self, o, state, blocks):
    return o, state, jnp.zeros((o.shape[0], 5))


@MS.stage
class _TupleShapes(MS.MatrixStage):
  name = 'tuple_shapes'

  def shapes(self, fan_in, fan_out):
    return (fan_out,)

  def apply(self, o, state, blocks):
    return o, state


@MS.stage
class _IntState(_TupleShapes):
  name = 'int_state'

  def shapes(self, fan_in, fan_out):
    return MS.StageShapes(state=fan_out)


@MS.stage
class _BadAxis(_TupleShapes):
  name = 'bad_axis'

  def shapes(self, fan_in, fan_out):
    return MS.StageShapes(state=(fan_out,), axis=0)


@MS.stage
class _WrongInit(MS.MatrixStage):
  name = 'wrong_init'

  def shapes(self, fan_in, fan_out):
    return MS.StageShapes(state=(fan_out,), axis=-1)

  def initial_state(self, fan_in, fan_out, dtype):
    return jnp.ones((fan_in,), dtype)

  def apply(self, o, state, blocks):
    return o, state


@MS.stage
class _StateDtype(_WrongInit):
  name = 'state_dtype'

  def initial_state(self, fan_in, fan_out, dtype):
    return jnp.zeros((fan_out,), dtype)

  def apply(self, o, state, blocks):
    return o, (state + 1).astype(jnp.bfloat16)


class _Undecorated(MS.MatrixStage):
  name = 'undecorated'

  def apply(self, o, state, blocks):
    return o, state


@MS.stage
class _ModeNotStatic(MS.MatrixStage):
  name = 'mode_not_static'
  mode: str = 'a'

  def apply(self, o, state, blocks):
    return o, state


@pytest.mark.parametrize('stage,match', [
    (_ThreeTuple(), r'^three_tuple: apply returned a tuple of 3; it returns '
     r'\(stack, state\)'),
    (_DeclaredOutput(), r'^declared_output: apply returned a tuple of 2; it '
     r'returns \(stack, state, output\)'),
    (_TupleShapes(), r"^orthogonalize: stage 'tuple_shapes': shapes\(2, 3\) "
     'returned'),
    (_IntState(), r"^orthogonalize: stage 'int_state': shapes\(2, 3\)\.state "
     'must be'),
    (_BadAxis(), r"shapes\(2, 3\)\.axis must be None, -2 \(fan-in\) or -1"),
    (_WrongInit(), r"^matrix stage 'wrong_init': initial_state\(8, 16\) "
     r'returned shapes \(8,\); shapes\(\) declares \(16,\) \(a smaller '
     'shape that broadcasts'),
    (_Undecorated(), r'^orthogonalize: stage _Undecorated is not a '
     r'registered pytree: decorate its class with '
     r'@orthax\.matrix_stages\.stage'),
    (_ModeNotStatic(), r"^orthogonalize: stage 'mode_not_static' field "
     r"'mode' holds 'a', which is not a number"),
])
def test_a_stage_that_breaks_the_protocol_is_named(stage, match):
  with pytest.raises(ValueError, match=match):
    _run(stage)


def test_an_output_of_the_wrong_shape_is_named():
  tx = T.orthogonalize()
  with pytest.raises(ValueError, match=r'^wrong_output: apply returned an '
                     r'output shaped \(1, 5\); shapes\(\) declares \(\) per '
                     r'matrix, so \(1,\)'):
    tx.update_with_stages(PARAMS, tx.init(PARAMS), [_WrongOutput()], [None])


@pytest.mark.parametrize('arg', ['then', 'before'])
def test_one_stage_where_a_list_is_taken_is_named(arg):
  with pytest.raises(ValueError, match=f'^orthogonalize: {arg} takes a list '
                     'of stages'):
    T.orthogonalize(**{arg: MS.ClipOutliers()})


def test_slot_step_and_stage_transforms_check_their_stages():
  with pytest.raises(ValueError, match=r'^my_step: stage _Undecorated'):
    T.slot_step(lambda count: _Undecorated(), None, None, 'my_step')
  with pytest.raises(ValueError, match=r"^my_step: stage 'tuple_shapes'"):
    T.slot_step(lambda count: MS.AroRotate(), None, None, 'my_step',
                then=[_TupleShapes()])


def test_a_valid_custom_stage_still_runs():
  @MS.stage
  class Halve(MS.MatrixStage):
    name = 'halve'
    factor: float = 0.5

    def apply(self, o, state, blocks):
      return o * self.factor, state

  u, _ = _run(Halve())
  ref, _ = T.orthogonalize().update(PARAMS, T.orthogonalize().init(PARAMS))
  np.testing.assert_allclose(np.asarray(u['w']), 0.5 * np.asarray(ref['w']),
                             rtol=1e-6)


def test_a_state_keeps_the_dtype_init_gave_it():
  """A stage whose new state comes back in another dtype (a float64
  hyperparameter under jax_enable_x64 promotes NorMuon's and FISMO's) is
  cast back: the state's type never changes from step to step."""
  tx = T.orthogonalize(then=[_StateDtype()])
  state = tx.init(PARAMS)
  _, new = tx.update(PARAMS, state)
  assert jax.tree.map(lambda x: x.dtype, new) == jax.tree.map(
      lambda x: x.dtype, state)


def test_an_initial_state_that_broadcasts_is_taken():
  @MS.stage
  class ScalarInit(_WrongInit):
    name = 'scalar_init'

    def initial_state(self, fan_in, fan_out, dtype):
      return jnp.ones((), dtype)

  tx = T.orthogonalize(then=[ScalarInit()])
  state = tx.init(PARAMS)
  assert jax.tree.leaves(state)[0].shape == (16,)
  np.testing.assert_array_equal(np.asarray(jax.tree.leaves(state)[0]), 1.0)


@pytest.mark.parametrize('make', [
    lambda: orthax.normuon(0.02, beta2=np.float64(0.95)),
    lambda: orthax.fismo(0.02, gamma=np.float64(0.9)),
])
def test_float64_hyperparameters_under_x64_keep_the_state_float32(make):
  jax.config.update('jax_enable_x64', True)
  try:
    p = {'w': jnp.ones((8, 16), jnp.float32) + jnp.eye(8, 16)}
    tx = make()
    state = tx.init(p)
    _, new = tx.update(p, state, p)
    assert jax.tree.map(lambda x: x.dtype, new) == jax.tree.map(
        lambda x: x.dtype, state)
  finally:
    jax.config.update('jax_enable_x64', False)


def test_init_without_shardings_leaves_the_stage_state_unplaced():
  """init places a per-leaf stage state where the step leaves it, from the
  leaves' shardings; numpy parameters or an abstract tree without
  shardings (to build a state to restore into) have none, and
  Distributed(param_specs=None) gives none: the state is left unplaced
  (the step places it), as before, not refused."""
  mesh = jax.make_mesh((1,), ('fsdp',),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  tx = T.orthogonalize(then=[MS.NeuronNormalize()],
                       distributed=orthax.sharding.Distributed(mesh))
  params = {'w': np.ones((8, 16), np.float32)}
  assert jax.tree.leaves(tx.init(params))[0].shape == (16,)
  abstract = jax.eval_shape(tx.init, {'w': jax.ShapeDtypeStruct((8, 16),
                                                                jnp.float32)})
  assert jax.tree.leaves(abstract)[0].shape == (16,)
