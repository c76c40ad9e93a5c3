"""Matrix stages: fused into orthogonalize (then=) they equal the chained
transforms; on column blocks (Blocks.sum + psum) they equal whole matrices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
from orthax import matrix_stages as MS
from orthax.matrices import MatrixSpec

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
  with pytest.raises(ValueError, match='scale mode'):
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
