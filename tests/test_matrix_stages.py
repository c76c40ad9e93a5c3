"""Matrix stages: fused into orthogonalize (then=) they equal the chained
transforms; on column blocks (Blocks.sum + psum) they equal whole matrices."""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
from orthax import matrix_stages as MS
from orthax.matrices import MatrixSpec

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from versions import JAXLIB  # noqa: E402  pylint: disable=g-import-not-at-top

K = MatrixSpec.kernel()
SPECS = {'w': K, 'tall': K, 'scan': MatrixSpec.stacked(0)}


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {'w': jnp.asarray(rng.standard_normal((32, 48)), jnp.float32),
          'tall': jnp.asarray(rng.standard_normal((48, 16)), jnp.float32),
          'scan': jnp.asarray(rng.standard_normal((3, 16, 40)), jnp.float32)}


CHAINS = {
    'repl': (lambda: [MS.NeuronNormalize(0.9), MS.ScaleByShape('keller')],
             lambda: [orthax.neuron_normalize(0.9, matrix_specs=SPECS),
                      orthax.scale_by_shape('keller', matrix_specs=SPECS)]),
    'longer': (lambda: [MS.NeuronNormalize(0.5, axis='longer',
                                           eps_placement='clamp'),
                        MS.ScaleByShape('moonlight')],
               lambda: [orthax.neuron_normalize(0.5, axis='longer',
                                                eps_placement='clamp',
                                                matrix_specs=SPECS),
                        orthax.scale_by_shape('moonlight',
                                              matrix_specs=SPECS)]),
    'paper': (lambda: [MS.NeuronNormalize(restore_norm=False),
                       MS.ScaleToRms(0.2)],
              lambda: [orthax.neuron_normalize(restore_norm=False,
                                               matrix_specs=SPECS),
                       orthax.scale_to_rms(0.2, matrix_specs=SPECS)]),
    'hybrid_auon': (lambda: [MS.CoshNormalize(1.5, normalize=False,
                                              brake_input='raw'),
                             MS.ScaleByShape('spectral')],
                    lambda: [orthax.cosh_normalize(1.5, normalize=False,
                                                   brake_input='raw',
                                                   matrix_specs=SPECS),
                             orthax.scale_by_shape('spectral',
                                                   matrix_specs=SPECS)]),
}


@pytest.mark.parametrize('name', list(CHAINS))
def test_then_equals_chained_transforms(name):
  stages, chained = CHAINS[name]
  fused = orthax.orthogonalize(matrix_specs=SPECS, then=stages())
  chain = optax.chain(orthax.orthogonalize(matrix_specs=SPECS), *chained())
  p = _params()
  s1, s2 = chain.init(p), fused.init(p)
  for seed in (1, 2, 3):
    g = _params(seed)
    u1, s1 = chain.update(g, s1)
    u2, s2 = fused.update(g, s2)
    for k in p:
      np.testing.assert_array_equal(np.asarray(u1[k]), np.asarray(u2[k]))
  nu1 = [x for x in jax.tree.leaves(s1) if x.ndim]
  nu2 = jax.tree.leaves(s2)
  assert len(nu1) == len(nu2) == (0 if name == 'hybrid_auon' else 3)
  for a, b in zip(nu1, nu2):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_then_state_is_found_by_name():
  tx = orthax.orthogonalize(matrix_specs=SPECS,
                            then=[MS.NeuronNormalize(), MS.ScaleByShape()])
  st = tx.init(_params())
  nu = optax.tree.get(st, 'neuron_normalize').nu
  assert nu['w'].shape == (48,) and nu['tall'].shape == (16,)
  assert nu['scan'].shape == (3, 40)
  assert isinstance(orthax.orthogonalize().init(_params()), optax.EmptyState)


def test_then_state_structure_is_stable_on_an_empty_tree():
  tx = orthax.orthogonalize(then=[MS.NeuronNormalize(), MS.ScaleByShape()])
  st = tx.init({})
  _, new = tx.update({}, st)
  assert jax.tree.structure(new) == jax.tree.structure(st)


def test_then_rejects_non_stages_and_duplicate_names():
  with pytest.raises(ValueError, match='MatrixStage'):
    orthax.orthogonalize(then=[orthax.scale_by_shape()])
  with pytest.raises(ValueError, match="two stages named 'scale_by_shape'"):
    orthax.orthogonalize(then=[MS.ScaleByShape(), MS.ScaleByShape('none')])
  with pytest.raises(ValueError, match='^scale_by_shape: mode must be one of'):
    MS.ScaleByShape('kellr')
  with pytest.raises(ValueError, match='axis'):
    MS.NeuronNormalize(axis='rows')


STAGE_SETS = {
    'fan_out': [MS.NeuronNormalize(0.8), MS.ScaleByShape('keller')],
    'longer': [MS.NeuronNormalize(0.8, axis='longer', eps_placement='clamp')],
    'rms': [MS.NeuronNormalize(0.8, restore_norm=False), MS.ScaleToRms()],
    'cosh': [MS.CoshNormalize(1.5, normalize=False, brake_input='raw')],
    'cosh_paper': [MS.CoshNormalize()],
    # NAMO's step: norms of the inputs, a state and an output.
    'namo': [MS.NoiseAdaptStep('scalar', 0.3, 2)],
    'namo_d': [MS.NeuronNormalize(0.8),
               MS.NoiseAdaptStep('diagonal', 0.3, 2, clamp_c=0.5)],
}


def _split(x, G, axis, blocked):
  """``[G, ...]``: ``x`` in ``G`` blocks along ``axis``, or repeated."""
  if blocked:
    return jnp.stack(jnp.split(x, G, axis=axis))
  return jnp.stack([x] * G)


def _join(x, axis, blocked):
  return np.concatenate(list(x), axis=axis) if blocked else np.asarray(x[0])


@pytest.mark.parametrize('split', [-1, -2])
@pytest.mark.parametrize('fan', [(16, 48), (48, 16)])
@pytest.mark.parametrize('name', list(STAGE_SETS))
def test_stages_on_blocks_equal_whole_matrices(name, fan, split):
  """Four blocks of the split axis under a named vmap axis, sums through
  Blocks.sum with psum: output, state and stage outputs equal the
  whole-matrix stage (norms of the whole matrices come in blocks along
  their kept axis, as the executor hands them over)."""
  stages = STAGE_SETS[name]
  fi, fo = fan
  rng = np.random.default_rng(0)
  o = jnp.asarray(rng.standard_normal((2, fi, fo)), jnp.float32)
  src = {k: jnp.asarray(rng.standard_normal((2, fi, fo)), jnp.float32)
         for k in ('input', 'aux')}
  states = [None if not st.stateful else jnp.asarray(
      rng.random((2,) + st.shapes(fi, fo).state), jnp.float32)
            for st in stages]
  norms = MS.stage_norms(stages, src, fi, fo)
  want, want_st, want_out = MS.apply_stages(stages, o, states,
                                            MS.Blocks(fi, fo), norms)

  G = 4
  ob = _split(o, G, split, True)                 # [G, 2, ...]
  vec = lambda st: st.shapes(fi, fo).axis == split
  blocked_state = [None if s is None else _split(s, G, -1, vec(st))
                   for st, s in zip(stages, states)]
  blocked_norms = [[_split(n, G, split, n.shape[split] > 1) for n in per]
                   for per in norms]
  blocks = MS.Blocks(fi, fo, split, lambda a: jax.lax.psum(a, 'c'))
  got, got_st, got_out = jax.vmap(
      lambda x, ss, nn: MS.apply_stages(stages, x, ss, blocks, nn),
      axis_name='c')(ob, blocked_state, blocked_norms)
  np.testing.assert_allclose(_join(got, split, True), np.asarray(want),
                             rtol=2e-6, atol=1e-7)
  for st, s, w, x, wx in zip(stages, got_st, want_st, got_out, want_out):
    assert (w is None) == (not st.stateful)
    assert (wx is None) == (not st.has_output)
    if w is not None:
      np.testing.assert_allclose(_join(s, -1, vec(st)), np.asarray(w),
                                 rtol=2e-6, atol=1e-9)
    if wx is not None:
      np.testing.assert_allclose(_join(x, -1, vec(st)), np.asarray(wx),
                                 rtol=2e-6, atol=1e-9)


def _spectral_case(kind, shape, rng):
  if kind == 'leading_direction':  # an update's spectrum: one large
    k, fi, fo = shape              # direction over a noise floor
    lead = rng.standard_normal((k, fi, 1)) @ rng.standard_normal((k, 1, fo))
    return lead + 0.3 * rng.standard_normal(shape)
  return np.sign(rng.standard_normal(shape))  # iid: the flattest spectrum


@pytest.mark.parametrize('shape', [(2, 64, 192), (2, 192, 64), (2, 80, 80)])
@pytest.mark.parametrize('kind,tol', [('leading_direction', 1e-6),
                                      ('iid_sign', 0.08)])
def test_scale_to_spectral_norm_against_svd(x64, shape, kind, tol):
  """After the stage, each matrix's exact (SVD) spectral norm is Muon's
  √max(1, fan_out/fan_in): to 1e-6 where the top singular value stands
  out, and from above by at most 8% on iid signs, where power iteration
  converges slowest (its estimate is from below)."""
  x = _spectral_case(kind, shape, np.random.default_rng(1))
  _, fi, fo = shape
  o, st = MS.ScaleToSpectralNorm('keller').apply(jnp.asarray(x), None,
                                                 MS.Blocks(fi, fo))
  assert st is None
  want = np.sqrt(max(1.0, fo / fi))
  got = np.linalg.norm(np.asarray(o), 2, axis=(-2, -1)) / want
  assert np.all(got >= 1 - 1e-9) and np.all(got <= 1 + tol), got
  # The direction is the input's: o is a positive multiple of x.
  ratio = np.asarray(o) / x
  np.testing.assert_allclose(ratio, ratio[:, :1, :1] * np.ones_like(ratio),
                             rtol=1e-12)


@pytest.mark.parametrize('rows', [slice(1, 9), slice(1, 16, 2)])
def test_scale_to_spectral_norm_of_a_start_in_the_null_space(rows):
  """Hadamard rows other than the first: equal column energies, rows that
  sum to 0, so the column energies (the old start) are in the null space:
  σ̂ was 0 and the result 2.8e30 (also ARO's step, scale='muon')."""
  h = np.array([[1.0]])
  while h.shape[0] < 16:
    h = np.block([[h, h], [h, -h]])
  x = h[rows]
  o, _ = MS.ScaleToSpectralNorm('keller').apply(
      jnp.asarray(x[None], jnp.float32), None, MS.Blocks(*x.shape))
  want = np.sqrt(max(1.0, x.shape[1] / x.shape[0]))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(o[0], np.float64), 2),
                             want, rtol=1e-5)


def test_scale_to_spectral_norm_is_scale_free_and_keeps_zeros():
  rng = np.random.default_rng(2)
  x = jnp.asarray(_spectral_case('leading_direction', (3, 16, 24), rng),
                  jnp.float32)
  x = x.at[1].set(0.0)
  st = MS.ScaleToSpectralNorm('spectral')
  base, _ = st.apply(x, None, MS.Blocks(16, 24))
  for c in (1e-30, 1e30, 3e38):
    got, _ = st.apply(x * jnp.float32(c) if c < 1e38 else
                      x / jnp.max(jnp.abs(x)) * jnp.float32(c), None,
                      MS.Blocks(16, 24))
    assert np.all(np.isfinite(np.asarray(got))), c
    np.testing.assert_allclose(np.asarray(got), np.asarray(base), rtol=2e-5,
                               atol=1e-7)
  assert not np.any(np.asarray(base[1]))


def test_scale_to_spectral_norm_rejects_bad_input():
  with pytest.raises(ValueError,
                     match='^scale_to_spectral_norm: mode must be one of'):
    MS.ScaleToSpectralNorm('kellr')
  with pytest.raises(ValueError, match='iters'):
    MS.ScaleToSpectralNorm(iters=0)
  with pytest.raises(ValueError, match='whole matrices'):
    MS.ScaleToSpectralNorm().apply(jnp.ones((1, 4, 8)), None,
                                   MS.Blocks(4, 16, -1, lambda a: a))


@pytest.mark.skipif(JAXLIB < (0, 10, 2), reason=(
    "XLA's cost analysis before jaxlib 0.10.2 counted 1.75x (64x128)"))
@pytest.mark.parametrize('shape', [(64, 128), (128, 64), (96, 96)])
def test_scale_to_spectral_norm_flops_are_what_xla_counts(shape):
  """The declared FLOPs (the sharding plan's cost model) against XLA's
  cost analysis of the compiled stage."""
  st = MS.ScaleToSpectralNorm()
  o = jax.ShapeDtypeStruct((1,) + shape, jnp.float32)
  ca = jax.jit(lambda o: st.apply(o, None, MS.Blocks(*shape))[0]).lower(
      o).compile().cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  assert abs(ca['flops'] / st.flops(*shape) - 1) <= 0.05, (
      ca['flops'], st.flops(*shape))


def test_a_stage_returning_other_shapes_is_named():
  """What a custom stage returns is checked against what it was given: a
  per-matrix scalar for a declared ``(fan_out,)`` state changed the
  state's shape after one step; a stack missing a column failed in a
  reshape that named nothing."""

  @MS.stage
  class BadState(MS.MatrixStage):
    name = 'bad_state'

    def shapes(self, fan_in, fan_out):
      return MS.StageShapes(state=(fan_out,))

    def apply(self, o, state, blocks):
      return o, jnp.sum(o * o, axis=(-2, -1))

  @MS.stage
  class BadStack(MS.MatrixStage):
    name = 'bad_stack'

    def apply(self, o, state, blocks):
      return o[..., :-1], state

  g = {'w': jnp.ones((8, 16))}
  for stage, what in ((BadState(), r'state shaped \[\(1,\)\] for one shaped '
                       r'\[\(1, 16\)\]'),
                      (BadStack(), r'stack shaped \[\(1, 8, 15\)\] for one '
                       r'shaped \[\(1, 8, 16\)\]')):
    tx = orthax.orthogonalize(then=[stage])
    with pytest.raises(ValueError, match=f'^{stage.name}: apply returned a '
                       f'{what}'):
      tx.update(g, tx.init(g))
