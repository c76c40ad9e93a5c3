"""Newton–Schulz against independent float64 references and the exact polar."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import orthax
from orthax import polar
from orthax.polar import presets as P

PRESETS = polar.preset_names()


def ns_reference(x, preset, steps=None):
  """A plain NumPy float64 transcription of the iteration (wide orientation)."""
  p = P.get_preset(preset)
  steps = p.steps if steps is None else steps
  x = np.array(x, np.float64)
  tall = x.shape[0] > x.shape[1]
  if tall:
    x = x.T
  rows = np.array(p.coeffs)
  a_mat = None
  if p.normalizer == 'frobenius':
    x = x / (p.norm_scale * np.linalg.norm(x) + p.eps)
  elif p.normalizer == 'aol':
    a_mat = x @ x.T
    s = 1 / np.sqrt(np.maximum(np.abs(a_mat).sum(axis=1), p.eps))
    x = s[:, None] * x
    a_mat = s[:, None] * a_mat * s[None, :]
  for k in range(steps):
    a, b, c = rows[min(k, len(rows) - 1)]
    g = a_mat if (k == 0 and a_mat is not None) else x @ x.T
    x = a * x + (b * g + c * g @ g) @ x
  return x.T if tall else x


def with_spectrum(rng, m, n, s):
  u, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
  v, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
  return (u * s) @ v.T, u @ v.T


@pytest.mark.parametrize('preset', PRESETS)
@pytest.mark.parametrize('shape', [(24, 40), (40, 24), (32, 32)])
def test_matches_float64_transcription(x64, preset, shape):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape)
  got = polar.newton_schulz(jnp.asarray(x), preset)
  np.testing.assert_allclose(np.asarray(got), ns_reference(x, preset),
                             rtol=0, atol=1e-12)


@pytest.mark.parametrize('preset', PRESETS)
def test_singular_values_in_documented_band(x64, preset):
  """Prescribed spectra spanning the preset's domain land inside its band."""
  p = P.get_preset(preset)
  rng = np.random.default_rng(1)
  k = 12
  # Normalized singular values s_i / (scale·‖s‖) span [~domain, ~1/scale·0.9].
  s = np.geomspace(1.0, 1.5 * p.domain * np.sqrt(k), k)
  x, polar_factor = with_spectrum(rng, 20, 36, s)
  if p.normalizer == 'aol':
    # AOL sets its own scale, and its row scaling D changes the target:
    # the iteration approximates polar(D X), not polar(X) (Turbo-Muon §3).
    x = rng.standard_normal((20, 36)) @ np.diag(np.geomspace(1, 0.2, 36))
    d = 1 / np.sqrt(np.abs(x @ x.T).sum(axis=1))
    polar_factor = np.asarray(polar.polar_svd(jnp.asarray(d[:, None] * x)))
  y = np.asarray(polar.newton_schulz(jnp.asarray(x), preset))
  sv = np.linalg.svd(y, compute_uv=False)[:k]
  lo, hi = p.band
  assert sv.min() >= lo - 1e-9 and sv.max() <= hi + 1e-9, (sv.min(), sv.max())
  # Same singular vectors as the exact polar factor: error within the band.
  err = np.linalg.norm(y - polar_factor, 2)
  assert err <= max(1 - lo, hi - 1) + 1e-9


def test_band_is_not_vacuous(x64):
  """Jordan's 5 steps leave σ = 1e-3 well below 1; 8 Polar Express paper
  steps do not."""
  s = np.array([1.0, 2e-3])
  x, _ = with_spectrum(np.random.default_rng(2), 8, 8, s)
  sj = np.linalg.svd(np.asarray(polar.newton_schulz(jnp.asarray(x))),
                     compute_uv=False)
  sp = np.linalg.svd(np.asarray(polar.newton_schulz(
      jnp.asarray(x), 'polar_express_paper')), compute_uv=False)
  assert sj[1] < 0.9 and abs(sp[1] - 1) < 1e-3


def test_polar_express_paper_converges_to_polar(x64):
  rng = np.random.default_rng(3)
  x = rng.standard_normal((30, 50))
  exact = np.asarray(polar.polar_svd(jnp.asarray(x)))
  errs = [np.linalg.norm(np.asarray(polar.newton_schulz(
      jnp.asarray(x), 'polar_express_paper', steps=k)) - exact, 2)
          for k in (4, 5, 6, 7, 8, 12)]
  assert errs[-1] < 1e-12 and errs[-2] < 1e-12
  assert all(b < a for a, b in zip(errs[:-1], errs[1:-1]))


def test_polar_express_table_c_repeats_last_row_to_its_fixed_point(x64):
  """Table C's last row has fixed point c* ≈ 1.035, not 1 (documented)."""
  a, b, c = P.POLAR_EXPRESS_C[-1]
  roots = np.roots([c, 0, b, 0, a - 1, 0])
  fixed = max(r.real for r in roots if abs(r.imag) < 1e-12 and 0.9 < r.real < 1.2)
  x = np.random.default_rng(4).standard_normal((16, 40))
  y = np.asarray(polar.newton_schulz(jnp.asarray(x), 'polar_express', steps=120))
  sv = np.linalg.svd(y, compute_uv=False)
  np.testing.assert_allclose(sv, fixed, rtol=1e-8)


@pytest.mark.parametrize('preset', PRESETS)
def test_transpose_equivariance(x64, preset):
  x = jnp.asarray(np.random.default_rng(5).standard_normal((3, 12, 28)))
  a = polar.newton_schulz(x, preset)
  b = polar.newton_schulz(jnp.swapaxes(x, -1, -2), preset)
  np.testing.assert_allclose(np.asarray(a), np.asarray(jnp.swapaxes(b, -1, -2)),
                             atol=1e-13)


@pytest.mark.parametrize('preset', PRESETS)
def test_scale_invariance(x64, preset):
  x = jnp.asarray(np.random.default_rng(6).standard_normal((10, 30)))
  a = polar.newton_schulz(x, preset, eps=1e-30)
  for c in (1e-3, 7.0, 1e4):
    np.testing.assert_allclose(np.asarray(polar.newton_schulz(
        c * x, preset, eps=1e-30)), np.asarray(a), atol=1e-10)


@pytest.mark.parametrize('preset', PRESETS)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_zero_matrix_gives_zeros(preset, dtype):
  y = polar.newton_schulz(jnp.zeros((2, 6, 9), dtype), preset)
  assert y.dtype == dtype
  assert not np.any(np.isnan(np.asarray(y, np.float32)))
  assert np.all(np.asarray(y, np.float32) == 0)


def test_batch_is_independent(x64):
  rng = np.random.default_rng(7)
  x = rng.standard_normal((4, 8, 16))
  x[2] *= 0  # a zero member must not disturb the others
  y = np.asarray(polar.newton_schulz(jnp.asarray(x), 'polar_express'))
  for i in range(4):
    np.testing.assert_allclose(y[i], ns_reference(x[i], 'polar_express'),
                               atol=1e-12)


def test_bf16_iteration_close_to_f32():
  x = jax.random.normal(jax.random.key(0), (4, 64, 192))
  ref = polar.newton_schulz(x, 'polar_express')
  low = polar.newton_schulz(x, 'polar_express', dtype=jnp.bfloat16)
  assert low.dtype == jnp.float32
  rel = jnp.linalg.norm(low - ref) / jnp.linalg.norm(ref)
  assert 0 < float(rel) < 2e-2


def test_short_table_repeats_last_row(x64):
  x = np.random.default_rng(8).standard_normal((6, 10))
  rows = ((3.0, -3.2, 1.2), (2.0, -1.5, 0.5))
  got = polar.newton_schulz(jnp.asarray(x), coeffs=rows, steps=5)
  ref = x / (np.linalg.norm(x) + 1e-7)
  for k in range(5):
    a, b, c = rows[min(k, 1)]
    g = ref @ ref.T
    ref = a * ref + (b * g + c * g @ g) @ ref
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-12)


def test_traced_steps_and_unrolling_off_cpu_only():
  x = jnp.ones((8, 16)) + jnp.eye(8, 16)
  f = jax.jit(lambda x, k: polar.newton_schulz(x, 'jordan', steps=k))
  np.testing.assert_allclose(np.asarray(f(x, 5)),
                             np.asarray(polar.newton_schulz(x, 'jordan')),
                             atol=1e-6)
  dots = lambda k, platform: jax.jit(
      lambda x: polar.newton_schulz(x, steps=k)).trace(x).lower(
          lowering_platforms=(platform,)).as_text().count(
              'stablehlo.dot_general')
  # On CPU the program does not grow with the steps; elsewhere a static
  # step count is unrolled (orthax.polar.step_loop).
  assert dots(5, 'cpu') == dots(50, 'cpu') == 3
  assert dots(5, 'cuda') == 15 and dots(50, 'cuda') == 150


def test_schatten4_normalizer(x64):
  """Schatten-4 normalization: first step sees X/‖XXᵀ‖_F^{1/2}."""
  x = np.random.default_rng(9).standard_normal((6, 14))
  got = polar.newton_schulz(jnp.asarray(x), 'jordan', normalizer='schatten4',
                            steps=1)
  xn = x / np.sqrt(np.linalg.norm(x @ x.T))
  a, b, c = P.JORDAN[0]
  g = xn @ xn.T
  np.testing.assert_allclose(np.asarray(got), a * xn + (b * g + c * g @ g) @ xn,
                             atol=1e-12)


def test_bad_arguments():
  x = jnp.ones((4, 4))
  with pytest.raises(ValueError, match='Unknown Newton–Schulz preset'):
    polar.newton_schulz(x, 'nope')
  with pytest.raises(ValueError, match=r'shape \(3,\) or \(k, 3\)'):
    polar.newton_schulz(x, coeffs=[[1.0, 2.0]])
  with pytest.raises(ValueError, match='^newton_schulz: steps must be >= 1'):
    polar.newton_schulz(x, steps=0)
  with pytest.raises(ValueError, match='normalizer'):
    polar.newton_schulz(x, normalizer='spectral2')
  with pytest.raises(ValueError, match=r'\[\.\.\., m, n\]'):
    polar.newton_schulz(jnp.ones(4))


def test_polar_svd_partial_isometry(x64):
  x, _ = with_spectrum(np.random.default_rng(10), 9, 7, np.array([3.0, 1.0]))
  q = np.asarray(polar.polar_svd(jnp.asarray(x)))
  np.testing.assert_allclose(np.linalg.svd(q, compute_uv=False),
                             [1, 1, 0, 0, 0, 0, 0], atol=1e-12)
  assert np.all(np.asarray(polar.polar_svd(jnp.zeros((3, 4)))) == 0)


# Tensor-parallel form: column blocks + a psum of the column sums ------------


@pytest.mark.parametrize('preset', PRESETS)
@pytest.mark.parametrize('method', ['standard', 'gram'])
def test_column_blocks_with_psum_equal_whole_matrix(preset, method):
  """``col_reduce=psum`` over 4 column blocks (a named ``vmap`` axis stands
  in for the devices) equals Newton–Schulz on the whole wide matrix, for
  every preset (Frobenius, Schatten-4 and AOL normalizers) and both
  methods."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 32, 128)), jnp.float32)
  whole = polar.orthogonalize_stack(x, preset, method=method)
  blocks = jnp.stack(jnp.split(x, 4, axis=-1))        # [4, 2, 32, 32]
  out = jax.vmap(
      lambda b: polar.orthogonalize_stack(
          b, preset, method=method, col_shards=4,
          col_reduce=lambda a: jax.lax.psum(a, 'dev')),
      axis_name='dev')(blocks)
  got = jnp.concatenate(list(out), axis=-1)
  tol = 2e-6
  np.testing.assert_allclose(got, whole, atol=tol)
  # The method is chosen for the whole 32×128 matrix, not the 32×32 block.
  assert polar.choose_method(32, 32 * 4, 5, jnp.float32) == 'gram'


def test_bad_arguments_are_named_errors():
  """Each raised a raw jax/LAPACK error, or ran: steps=2.5 failed in
  fori_loop, an int iteration dtype returned garbage, polar_svd refused
  bfloat16 inside LAPACK, soft_clip_matrix(c=0) returned NaN and a bad
  coeffs table passed orthogonalize's construction."""
  x = jax.random.normal(jax.random.key(0), (8, 12))
  with pytest.raises(TypeError, match='steps must be an int, got 2.5'):
    polar.newton_schulz(x, steps=2.5)
  with pytest.raises(TypeError, match='dtype must be a floating-point'):
    polar.newton_schulz(x, dtype=jnp.int32)
  with pytest.raises(TypeError, match='x must hold real floating-point'):
    polar.newton_schulz(jnp.ones((4, 6), jnp.int32))
  with pytest.raises(ValueError, match='c must be > 0'):
    polar.soft_clip_matrix(x, 0.0)
  with pytest.raises(ValueError,
                     match=r'^orthogonalize: coeffs must .*\(1, 2\)'):
    orthax.orthogonalize(coeffs=[[1.0, 2.0]])
  # bfloat16 goes through LAPACK in float32 and comes back in bfloat16.
  u = polar.polar_svd(x.astype(jnp.bfloat16))
  assert u.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(u, np.float32),
                             np.asarray(polar.polar_svd(x)), atol=2e-2)


@pytest.mark.parametrize('normalizer', polar.NORMALIZERS)
@pytest.mark.parametrize('blocks', [False, True])
def test_the_plans_normalizer_count_is_xlas(normalizer, blocks):
  """A sharding plan counts each normalizer's element-wise work as
  :func:`orthax.polar.normalizer_flops` (per entry of ``X`` and of its Gram
  matrix); XLA's cost analysis of the compiled normalizer agrees, per-matrix
  scalars aside. The Gram matrix that Schatten-4 and AOL form is the first
  step's product, counted with the iteration's."""
  ns = importlib.import_module('orthax.polar.newton_schulz')
  kw = dict(col_reduce=lambda a: a) if blocks else {}
  fit = []
  for m, n in [(32, 96), (64, 256), (128, 128), (64, 1024)]:
    x = jnp.ones((4, m, n))
    prep = lambda x: tuple(a for a in ns.prepare(  # pylint: disable=cell-var-from-loop
        x, 'jordan', steps=1, coeffs=None, normalizer=normalizer,
        norm_scale=None, eps=None, dtype=None, who='t', **kw)[:2]
                           if a is not None)
    cost = jax.jit(prep).lower(x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gram_product = (2 * m * m * n if normalizer in ('aol', 'schatten4')
                    else 0)
    want = polar.normalizer_flops(normalizer, m, n,
                                  col_shards=1 if blocks else None)
    fit.append((cost.get('flops', 0.0) / 4 - gram_product - want) / (m * n))
  # What is left is a few scalars per matrix: under 0.05 per entry.
  assert max(abs(r) for r in fit) <= 0.05, fit
