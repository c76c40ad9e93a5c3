"""float16 and bfloat16 parameters: every recipe computes in float32 and
rounds its update to the parameters' dtype once.

For every registered recipe (read at collection; see ``CASES``): 3 jitted
steps on ``trees.mixed_params`` (2-D and stacked kernels, biases, norm
scales, an embedding and an LM head) in float16 and bfloat16, with gradients
of scale 1e-3, 1e-5 and 1, against float32 steps from the same gradients and
parameters (the low-precision values, widened).

Tolerance. Rounding a float32 value to a format with unit roundoff ``u``
(float16: 2^-11 ≈ 4.9e-4, bfloat16: 2^-8 ≈ 3.9e-3) moves it by at most
``u`` relatively while it is in the format's normal range; below it (a
float16 update under 6.1e-5, e.g. AuON's ``reference='repo'``, whose step
scales with the gradient) the spacing is absolute, 6e-8, and no dtype-true
result can be closer than the rounding itself. So, per leaf, with ``x`` the
float32 update: ``‖low - x‖ ≤ ‖round(x) - x‖ + u·‖x‖`` (at most one
rounding more than the unavoidable one). Where ``x`` is in the normal range
``‖round(x) - x‖ ≤ u‖x‖``, so the relative error is under ``2u`` (1e-3 and
7.8e-3). Measured: about ``0.6u`` (float16 2.5e-4, bfloat16 2.3e-3). Before
the fix float16 gave NaN in every AdamW branch and ~3e-2 in the matrix
branches at scale 1e-5; bfloat16 1-4e-2 (Newton–Schulz in bfloat16).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import contract  # tests/contract.py
import trees  # tests/trees.py
import orthax

# Every registered recipe in its default mode, and the modes with a precision
# path of their own: muon's 'optax' (NAdam branch, 2-D routing), AuON's
# 'repo' (a step that scales with the gradient: below float16's normal range)
# and Hybrid-AuON's 'paper' (the brake on one Newton–Schulz step's output).
CASES = [contract.Case(name) for name in orthax.recipe_names()] + [
    contract.Case('muon', (('reference', 'optax'),)),
    contract.Case('auon', (('reference', 'repo'),)),
    contract.Case('hybrid_auon', (('reference', 'paper'),))]
SCALES = (1e-3, 1e-5, 1.0)
STEPS = 3
UNIT_ROUNDOFF = {'float16': 2.0 ** -11, 'bfloat16': 2.0 ** -8,
                 'float8_e4m3fn': 2.0 ** -4}
_flat = trees.leaves_with_paths


def _grads(params, scale, step):
  """N(0, 1)·scale in the parameters' dtype."""
  g = trees.random_like(params, 100 + step, jnp.float32)
  return jax.tree.map(lambda x, p: (x * scale).astype(p.dtype), g, params)


@functools.lru_cache(maxsize=None)
def _optimizer(case):
  """One optimizer and jitted update per case: the float32 reference is
  compiled once for both low-precision dtypes."""
  tx = case.make(contract.LR)
  return tx, jax.jit(tx.update)


def _run(case, params, grads):
  """The updates of ``len(grads)`` steps and the last state; the params are
  held fixed, so both runs see the same parameters at every step."""
  tx, update = _optimizer(case)
  state, ups = tx.init(params), []
  for g in grads:
    u, state = update(g, state, params)
    ups.append(u)
  return ups, state


def _check_leaf(what, low, x, dtype):
  """``low`` (the leaf in ``dtype``) is ``x`` (float32) rounded, up to one
  more rounding error (see the module docstring)."""
  assert low.dtype == jnp.dtype(dtype), f'{what}: dtype {low.dtype}'
  low = np.asarray(low, np.float64)
  finite = bool(np.all(np.isfinite(low)))
  assert finite, f'{what}: not finite'
  x = np.asarray(x, np.float64)
  rounded = np.asarray(x.astype(np.float32).astype(jnp.dtype(dtype)),
                       np.float64)
  norm = np.linalg.norm(x)
  err, floor = np.linalg.norm(low - x), np.linalg.norm(rounded - x)
  assert err <= floor + UNIT_ROUNDOFF[dtype] * norm + 1e-30, (
      f'{what}: |low - f32| = {err:.3g}, rounding alone {floor:.3g}, '
      f'|f32| = {norm:.3g}')


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
@pytest.mark.parametrize('case', CASES, ids=[c.id for c in CASES])
def test_update_is_the_float32_update_rounded_once(case, dtype):
  params = trees.mixed_params(jnp.dtype(dtype))
  widen = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  for scale in SCALES:
    grads = [_grads(params, scale, i) for i in range(STEPS)]
    low_ups, state = _run(case, params, grads)
    ref_ups, _ = _run(case, widen(params), [widen(g) for g in grads])
    for i, (low, ref) in enumerate(zip(low_ups, ref_ups)):
      for (path, lo), (_, x) in zip(_flat(low), _flat(ref)):
        _check_leaf(f'{case.id} {dtype} scale {scale:g} step {i} {path}',
                    lo, x, dtype)
    # The moments and accumulators are float32 (no mu_dtype given).
    narrow = [p for p, x in _flat(state)
              if x.dtype in (jnp.dtype('float16'), jnp.dtype('bfloat16'))]
    assert not narrow, f'{case.id}: {dtype} state leaves: {narrow}'


@pytest.mark.parametrize('case', CASES, ids=[c.id for c in CASES])
def test_float8_parameters_compute_in_float32(case):
  """float8 parameters (which JAX promotes to nothing implicitly) ended in
  JAX's ``TypePromotionError`` at ``init``, naming no leaf; they now widen
  to float32 like float16 and bfloat16 (two steps, gradients of scale 1)."""
  dtype = 'float8_e4m3fn'
  params = trees.mixed_params(jnp.dtype(dtype))
  widen = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  grads = [_grads(params, 1.0, i) for i in range(2)]
  low_ups, state = _run(case, params, grads)
  ref_ups, _ = _run(case, widen(params), [widen(g) for g in grads])
  for i, (low, ref) in enumerate(zip(low_ups, ref_ups)):
    for (path, lo), (_, x) in zip(_flat(low), _flat(ref)):
      _check_leaf(f'{case.id} step {i} {path}', lo, x, dtype)
  assert {x.dtype for _, x in _flat(state)
          if jnp.issubdtype(x.dtype, jnp.floating)} <= {
              jnp.dtype(jnp.float32)}


@pytest.mark.parametrize('make', [
    lambda: orthax.orthogonalize(), lambda: orthax.spectral_clip(),
    lambda: orthax.neuron_normalize(), lambda: orthax.scale_by_shape(),
    lambda: orthax.cosh_normalize(), lambda: orthax.clip_outliers(),
    lambda: orthax.scale_to_rms()],
    ids=['orthogonalize', 'spectral_clip', 'neuron_normalize',
         'scale_by_shape', 'cosh_normalize', 'clip_outliers', 'scale_to_rms'])
def test_float8_in_a_matrix_primitive_names_the_leaf_and_the_fix(make):
  """A matrix primitive used on its own got float8 updates as they are and
  failed in JAX's TypePromotionError, naming no leaf; it now raises naming
  the leaf and in_float32, which runs it (float32 inside, rounded once)."""
  params = {'w': jnp.asarray(np.random.default_rng(0).standard_normal((8, 16)),
                             jnp.float8_e4m3fn)}
  with pytest.raises(ValueError, match=r"leaf 'w' has dtype float8_e4m3fn, "
                     r'which JAX promotes to no other dtype.*'
                     r'orthax\.transforms\.in_float32\('):
    tx = make()
    tx.update(params, tx.init(params), params)
  tx = orthax.transforms.in_float32(make())
  u, _ = tx.update(params, tx.init(params), params)
  wide = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  ref = make()
  r, _ = ref.update(wide, ref.init(wide), wide)
  assert u['w'].dtype == jnp.float8_e4m3fn
  np.testing.assert_array_equal(np.asarray(u['w'], np.float32), np.asarray(
      r['w'].astype(jnp.float8_e4m3fn), np.float32))


def test_float8_momentum_accumulates_in_float32():
  """``orthax.momentum`` on float8 gradients: its float32 accumulator met
  them in JAX's TypePromotionError; it now computes in float32, as on
  float32 gradients, the update rounded once."""
  rng = np.random.default_rng(0)
  grads = [{'w': jnp.asarray(rng.standard_normal((8, 16)), jnp.float8_e4m3fn)}
           for _ in range(3)]
  tx = orthax.momentum(0.9, nesterov=True)
  state, ref_state = tx.init(grads[0]), tx.init(
      jax.tree.map(lambda x: x.astype(jnp.float32), grads[0]))
  for g in grads:
    u, state = tx.update(g, state)
    r, ref_state = tx.update(
        jax.tree.map(lambda x: x.astype(jnp.float32), g), ref_state)
    assert u['w'].dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(u['w'], np.float32), np.asarray(
        r['w'].astype(jnp.float8_e4m3fn), np.float32))
  np.testing.assert_array_equal(state.mu['w'], ref_state.mu['w'])


def test_inject_hyperparams_with_bf16_parameters_names_hyperparam_dtype():
  """optax.inject_hyperparams casts every numeric default to bfloat16
  parameters' dtype: DCT-AdamW's b2 = 0.999 became 1.0 and was refused
  with a message about an argument the user never passed; it now names
  the cause and hyperparam_dtype, with which it runs."""
  params = {'w': jnp.ones((8, 16), jnp.bfloat16)}
  factory = orthax.recipe_factory('dct_adamw')
  tx = optax.inject_hyperparams(factory)(learning_rate=0.01)
  with pytest.raises(ValueError, match=(
      r'^dct_adamw: b2 must be in \[0, 1\), got 1 \(a bfloat16 value: '
      r'optax.inject_hyperparams .*hyperparam_dtype=jnp.float32\)')):
    tx.init(params)
  tx = optax.inject_hyperparams(factory, hyperparam_dtype=jnp.float32)(
      learning_rate=0.01)
  tx.update(params, tx.init(params), params)


def test_accumulator_dtype_stays_configurable():
  """``mu_dtype`` still chooses the stored momentum (here bfloat16)."""
  params = trees.mixed_params(jnp.bfloat16)
  state = orthax.muon(mu_dtype=jnp.bfloat16).init(params)
  mu = optax.tree.get(state, 'momentum').mu
  assert {x.dtype for x in jax.tree.leaves(mu)} == {jnp.dtype(jnp.bfloat16)}
  state = orthax.muon().init(params)
  mu = optax.tree.get(state, 'momentum').mu
  assert {x.dtype for x in jax.tree.leaves(mu)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize('name', orthax.recipe_names())
def test_a_dtype_without_zero_is_refused_by_name(name):
  """``float8_e8m0fnu`` (powers of two only: no zero, no sign) gave all-NaN
  updates, silently; ``init`` names the leaf, and the frozen rule takes
  it."""
  params = {'w': jnp.ones((8, 16), jnp.float8_e8m0fnu), 'b': jnp.ones((16,))}
  with pytest.raises(ValueError, match=(
      "leaf 'w' has dtype float8_e8m0fnu, which holds no zero")):
    orthax.recipe(name).init(params)
  router = orthax.Router(extra_rules=[orthax.Rule('^w$', 'frozen')])
  orthax.recipe(name, router=router).init(params)
