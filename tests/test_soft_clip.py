"""SPECTRA's matrix function: the soft spectral clip ``H_c`` by coupled
Newton–Schulz against its SVD formula, its early stop, its derivatives, the
reference's vector rule and the clip's FLOP model
(``shared/ALGORITHMS.md`` §7; mlolab/llm-spectral-clipping @ ed9df11)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import orthax
from orthax.polar import spectral as S
from test_spectra import ref_clip_sigvals  # the reference, transcribed


def with_spectrum(m, n, s, seed=0):
  rng = np.random.default_rng(seed)
  k = min(m, n)
  u, _ = np.linalg.qr(rng.standard_normal((m, k)))
  v, _ = np.linalg.qr(rng.standard_normal((n, k)))
  return (u * s) @ v.T


def rel(a, b):
  return float(np.linalg.norm(np.asarray(a) - np.asarray(b))
               / np.linalg.norm(np.asarray(b)))


# The matrix function -----------------------------------------------------------


@pytest.mark.parametrize('ratio', [1.0, 10.0, 100.0, 600.0, 1e3])
def test_default_steps_match_svd_formula_float64(x64, ratio):
  """≤ 1e-6 relative (Frobenius) at the default step count for σ_max/c up to
  1e3, for a log-spread spectrum (every scale from 1e-4 to σ_max) and a
  single spike over a bulk below c, both orientations."""
  c = 2.0
  for (m, n) in ((64, 64), (40, 96), (96, 40)):
    k = min(m, n)
    for s in (np.geomspace(1e-4, ratio * c, k),
              np.concatenate([[ratio * c], np.linspace(0.01, c, k - 1)])):
      x = jnp.asarray(with_spectrum(m, n, s, seed=m + n))
      got = S.soft_clip_matrix(x, c)
      assert rel(got, S.soft_clip_svd(x, c)) <= 1e-6, (m, n, ratio)


def test_reference_ten_plain_steps_fall_short(x64):
  """The reference's 10 plain steps: accurate for moderate σ_max/c, not for
  large (documented in orthax.polar.spectral)."""
  s = np.geomspace(1e-4, 600.0, 64)
  x = jnp.asarray(with_spectrum(64, 64, s))
  want = S.soft_clip_svd(x, 1.0)
  plain10 = S.soft_clip_matrix(x, 1.0, steps=10, step_rule='plain')
  assert rel(plain10, want) > 0.1
  assert rel(S.soft_clip_matrix(x, 1.0, steps=24, step_rule='plain'),
             want) < 1e-6
  small = jnp.asarray(with_spectrum(64, 64, np.geomspace(1e-4, 5.0, 64)))
  assert rel(S.soft_clip_matrix(small, 1.0, steps=10, step_rule='plain'),
             S.soft_clip_svd(small, 1.0)) < 1e-9


def test_identity_below_threshold(x64):
  """σ ≪ c: ``H_c(X) = X(1 - σ²/2c² + O(σ⁴/c⁴))``, so "identity" means
  ‖H - X‖/‖X‖ ≤ (σ_max/c)²/2 — here 5e-7 for σ_max = 1e-3·c."""
  c = 10.0
  s = np.linspace(1e-4, 1e-2, 32)
  x = jnp.asarray(with_spectrum(32, 80, s))
  h = S.soft_clip_matrix(x, c)
  assert rel(h, x) <= (s.max() / c) ** 2 / 2 * 1.01
  assert rel(h, S.soft_clip_svd(x, c)) < 1e-12


def test_batched_bound_per_matrix_or_shared(x64):
  """Default: each matrix of a batch gets its own λ̂ (the batch result equals
  clipping each alone). ``shared_bound=True`` is the reference's
  ``min(max_b row-sum, max_b ‖S‖_F)``."""
  big = with_spectrum(24, 40, np.geomspace(1e-2, 400.0, 24), seed=1)
  small = with_spectrum(24, 40, np.geomspace(1e-3, 2.0, 24), seed=2)
  x = jnp.asarray(np.stack([big, small]))
  per = S.soft_clip_matrix(x, 1.0)
  for i in range(2):
    np.testing.assert_allclose(per[i], S.soft_clip_matrix(x[i], 1.0),
                               rtol=0, atol=1e-13)
  shared = S.soft_clip_matrix(x, 1.0, steps=10, step_rule='plain',
                              shared_bound=True)
  np.testing.assert_allclose(shared, ref_clip_sigvals(np.asarray(x), 1.0, 10),
                             rtol=1e-12, atol=1e-13)
  # The shared bound is the big matrix's: the small one is under-iterated.
  alone = S.soft_clip_matrix(x[1], 1.0, steps=10, step_rule='plain')
  assert rel(shared[1], alone) > 1e-3


def test_zero_and_extreme_inputs():
  z = jnp.zeros((3, 16, 24))
  for rule in S.STEP_RULES:
    np.testing.assert_array_equal(S.soft_clip_matrix(z, 1.0, step_rule=rule), z)
  # float32, far beyond what float32 can resolve: finite and bounded by ~c.
  x = jnp.asarray(with_spectrum(48, 64, np.geomspace(1e-3, 1e7, 48)),
                  jnp.float32)
  for rule in S.STEP_RULES:
    h = S.soft_clip_matrix(x, 1.0, step_rule=rule, steps=24)
    assert np.all(np.isfinite(np.asarray(h)))
    assert float(jnp.linalg.norm(h, 2)) <= 1.5


def test_early_stop_skips_the_steps_left(x64):
  """The default tolerance stops once every singular value is within it:
  the result is, bit for bit, that of fewer steps run unconditionally."""
  x = jnp.asarray(with_spectrum(24, 40, np.linspace(0.5, 3.0, 24), seed=4))
  got = S.soft_clip_matrix(x, 1.0)
  same = [k for k in range(1, S.DEFAULT_STEPS) if np.array_equal(
      got, S.soft_clip_matrix(x, 1.0, steps=k, tol=0))]
  assert same, 'the default ran every one of its steps'


def test_soft_clip_differentiates_in_reverse_mode(x64):
  """The early stop was a while_loop, which jax.grad cannot transpose:
  ``jax.grad`` through SPECTRA failed with JAX's loop error."""
  rng = np.random.default_rng(6)
  x = jnp.asarray(with_spectrum(12, 20, np.linspace(0.2, 8.0, 12), seed=5))
  d = jnp.asarray(rng.standard_normal(x.shape))
  w = jnp.asarray(rng.standard_normal(x.shape))
  f = lambda a: jnp.sum(S.soft_clip_matrix(a, 1.0) * w)
  eps = 1e-6
  numeric = (f(x + eps * d) - f(x - eps * d)) / (2 * eps)
  np.testing.assert_allclose(jnp.vdot(jax.grad(f)(x), d), numeric,
                             rtol=1e-6)
  params = {'w': {'kernel': x}}
  tx = orthax.spectra()
  # (after a first step: at the first, Adam's direction is g/|g|, whose
  # derivative is 0 almost everywhere)
  _, state = tx.update({'w': {'kernel': jnp.asarray(
      rng.standard_normal(x.shape))}}, tx.init(params), params)
  g = lambda grads: jnp.sum(tx.update(grads, state, params)[0]['w'][
      'kernel'] * w)
  grads = {'w': {'kernel': x * 3.0}}
  along = lambda t: {'w': {'kernel': grads['w']['kernel'] + t * d}}
  np.testing.assert_allclose(
      jnp.vdot(jax.grad(g)(grads)['w']['kernel'], d),
      (g(along(eps)) - g(along(-eps))) / (2 * eps), rtol=1e-6)


def test_vector_rule_is_discontinuous():
  c = 2.0
  g = jnp.asarray([1.2, 1.6])  # ‖g‖ = 2 = c: unchanged
  np.testing.assert_array_equal(S.soft_clip_vector(g, c), g)
  g2 = g * 1.0001  # just above: divided by ≈ √2
  out = S.soft_clip_vector(g2, c)
  np.testing.assert_allclose(out, g2 / np.sqrt(1 + 1.0001**2), rtol=1e-6)


@pytest.mark.parametrize('shape', [(64, 256), (256, 64), (96, 96)])
def test_soft_clip_flop_model_matches_compiled_program(shape):
  """The FLOP model a distributed SPECTRA plan uses (XXᵀ, ZX and three
  m×m products per step) is what XLA counts for the soft clip. Two steps
  keep the loop (XLA counts its body once: the model's one step); a single
  step gets unrolled and its dead last product dropped."""
  from orthax.transforms.spectral_clip import soft_clip_flops  # pylint: disable=g-import-not-at-top
  x = jax.ShapeDtypeStruct((1,) + shape, jnp.float32)
  f = jax.jit(lambda a: orthax.polar.spectral.soft_clip_matrix(
      a, 1.0, steps=2, tol=0))
  ca = f.lower(x).compile().cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  want = soft_clip_flops(1)(*shape, jnp.float32)
  assert abs(ca['flops'] / want - 1) <= 0.05, (ca['flops'], want)
