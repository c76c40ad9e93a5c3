"""Gram Newton–Schulz: equivalence with ``newton_schulz``, stability, FLOPs.

Compilation dominates the run time of these tests, so each test compiles one
program covering all of its cases, and all compile with
``jax_disable_most_optimizations`` (the bf16/f32 error figures asserted below
come out bit-identical with and without it on CPU).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthax import polar
from orthax.polar.gram import gram_flops
from orthax.polar.gram import gram_newton_schulz
from orthax.polar.gram import prefer_gram
from orthax.polar.gram import standard_flops
from orthax.polar.newton_schulz import newton_schulz

SHAPES = [(32, 128), (128, 32), (48, 48), (3, 16, 64)]


@pytest.fixture(autouse=True)
def fast_compile():
  old = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', old)


def _rel(a, b):
  """Relative Frobenius error per matrix (over the last two axes)."""
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  return np.asarray(jnp.linalg.norm(a - b, axis=(-2, -1))
                    / jnp.linalg.norm(b, axis=(-2, -1)))


def _decaying(rng, m, n, lo):
  """``m×n`` with singular values log-spaced in ``[lo, 1]``."""
  u = np.linalg.qr(rng.standard_normal((m, m)))[0]
  v = np.linalg.qr(rng.standard_normal((n, m)))[0]
  return (u * np.logspace(0, np.log10(lo), m)) @ v.T


@pytest.mark.parametrize('preset', ['jordan', 'polar_express', 'aol'])
def test_matches_newton_schulz_float64(x64, preset):
  rng = np.random.default_rng(0)
  xs = [jnp.asarray(rng.standard_normal(s)) for s in SHAPES]
  assert all(x.dtype == jnp.float64 for x in xs)
  run = jax.jit(lambda xs: [(gram_newton_schulz(x, preset),
                             newton_schulz(x, preset)) for x in xs])
  for x, (got, want) in zip(xs, run(xs)):
    assert got.shape == x.shape and got.dtype == x.dtype
    np.testing.assert_allclose(got, want, atol=1e-10, rtol=0,
                               err_msg=str(x.shape))


def test_restart_schedules_normalizers_and_options_float64(x64):
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 24, 72)))
  kw = dict(steps=7, normalizer='schatten4')
  coeffs = [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]
  opts = dict(steps=4, coeffs=coeffs, norm_scale=1.1)
  x_none = x / (1.01 * jnp.linalg.norm(x, axis=(-2, -1), keepdims=True))

  @jax.jit
  def run(x, x_none):
    want = newton_schulz(x, 'polar_express_paper', **kw)
    # None: one block; 1: the plain cost; 3: blocks [3, 3, 1].
    pairs = [(gram_newton_schulz(x, 'polar_express_paper', restart_every=r,
                                 **kw), want) for r in (None, 1, 3)]
    pairs.append((gram_newton_schulz(x, symmetrize=False, **opts),
                  newton_schulz(x, **opts)))
    pairs.append((gram_newton_schulz(x_none, normalizer='none'),
                  newton_schulz(x_none, normalizer='none')))
    return pairs

  for i, (got, want) in enumerate(run(x, x_none)):
    np.testing.assert_allclose(got, want, atol=1e-10, rtol=0,
                               err_msg=f'case {i}')


def test_traced_steps_float64(x64):
  """A traced step count: one trace serves every count (counted by the
  traces themselves: the jit cache's size read 0 in one full-suite run,
  where the C++ fast path was off)."""
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 16, 40)))
  traces = []

  def gram_ns(x, s):
    traces.append(s)
    return gram_newton_schulz(x, 'polar_express', steps=s, restart_every=2)

  f = jax.jit(gram_ns)
  g = jax.jit(lambda x, s: newton_schulz(x, 'polar_express', steps=s))
  for steps in (1, 2, 3, 5, 8):
    s = jnp.asarray(steps)
    np.testing.assert_allclose(f(x, s), g(x, s), atol=1e-10, rtol=0)
  assert len(traces) == 1


def test_loop_is_rolled_on_cpu_and_unrolled_elsewhere():
  """On CPU the program does not grow with the steps; lowered for a GPU
  it is unrolled, each restart chosen while tracing (orthax.polar.step_loop)."""
  x = jnp.ones((8, 24), jnp.float32)

  def n_dots(steps, restart_every, platform):
    text = jax.jit(lambda x: gram_newton_schulz(
        x, steps=steps, restart_every=restart_every)).trace(x).lower(
            lowering_platforms=(platform,)).as_text()
    return text.count('stablehlo.dot_general')

  for r in (None, 2, 3):
    assert n_dots(5, r, 'cpu') == n_dots(40, r, 'cpu')
    assert n_dots(40, r, 'cuda') > 8 * n_dots(5, r, 'cpu')


def test_float32_gaussian_close_to_newton_schulz():
  x = jnp.asarray(np.random.default_rng(4).standard_normal((256, 1024)),
                  jnp.float32)
  presets = ('jordan', 'polar_express', 'aol')
  run = jax.jit(lambda x: [(gram_newton_schulz(x, p), newton_schulz(x, p))
                           for p in presets])
  for p, (got, want) in zip(presets, run(x)):
    assert _rel(got, want) < 1e-5, p


def test_bfloat16_restart_is_as_accurate_as_plain():
  """bf16: restarted Gram NS is as close to f32 NS as plain bf16 NS is.

  Ill-conditioned inputs (singular values down to 1e-4; low rank plus noise)
  make the computed bf16 Gram matrix indefinite; without restarts the
  spurious negative eigenvalues blow up (relative errors of O(1) to O(1e5)).
  """
  rng = np.random.default_rng(5)
  x = jnp.asarray(np.stack([
      _decaying(rng, 128, 512, 1e-4),
      rng.standard_normal((128, 8)) @ rng.standard_normal((8, 512))
      + 0.01 * rng.standard_normal((128, 512)),
  ]), jnp.float32)
  presets = ('jordan', 'polar_express', 'aol')
  bf16 = jnp.bfloat16

  @jax.jit
  def run(x):
    outs = {p: (newton_schulz(x, p), newton_schulz(x, p, dtype=bf16),
                gram_newton_schulz(x, p, dtype=bf16)) for p in presets}
    naive = gram_newton_schulz(x, 'polar_express', dtype=bf16,
                               restart_every=None)
    return outs, naive

  outs, naive = run(x)
  for p, (ref, plain, gram) in outs.items():
    plain, gram = _rel(plain, ref), _rel(gram, ref)
    assert np.all(gram <= 1.5 * plain + 5e-3), (p, gram, plain)
    if p == 'polar_express':  # without restarts: O(1e3) and worse
      naive = _rel(naive, ref)
      assert np.all(naive > 10 * plain), (naive, plain)


def test_zero_and_dtype():
  z = jnp.zeros((2, 4, 16), jnp.float16)
  x = jnp.asarray(np.random.default_rng(6).standard_normal((6, 30)),
                  jnp.float32)
  out_z, out_x, want = jax.jit(lambda z, x: (
      gram_newton_schulz(z), gram_newton_schulz(x, dtype=jnp.bfloat16),
      newton_schulz(x)))(z, x)
  assert out_z.dtype == jnp.float16 and out_z.shape == z.shape
  assert not jnp.any(out_z)
  assert out_x.dtype == jnp.float32
  assert _rel(out_x, want) < 0.05


def test_flop_counts_by_hand():
  # m=2, n=8, 5 steps. Plain step: XXᵀ 2·2·8·2=64, A² 16, BX 64 -> 144.
  assert standard_flops(2, 8, 5) == 720
  assert standard_flops(8, 2, 5) == 720
  # restart_every=2 -> blocks [2, 2, 1]: 3·(64 + 64 + 16) + 2·(4·16) = 560.
  assert gram_flops(2, 8, 5, 2) == 560
  assert gram_flops(8, 2, 5, 2) == 560
  # never restart: 144 + 4·64 = 400; restart every step == plain.
  assert gram_flops(2, 8, 5, None) == 400
  assert gram_flops(2, 8, 5, 0) == 400
  assert gram_flops(2, 8, 5, 1) == 720
  assert gram_flops(2, 8, 5, 3) == 2 * 144 + 3 * 64


def test_prefer_gram():
  assert prefer_gram(768, 3072, 5)
  assert prefer_gram(3072, 768, 5)
  assert not prefer_gram(512, 512, 5)
  assert not prefer_gram(100, 150, 5)  # exactly break-even at n = 1.5m
  assert prefer_gram(100, 151, 5)
  assert not prefer_gram(768, 3072, 5, restart_every=1)
  assert not prefer_gram(768, 3072, 1)  # one step: one block, same cost


def test_validation():
  x = jnp.ones((4, 8))
  with pytest.raises(ValueError, match='steps'):
    gram_newton_schulz(x, steps=0)
  with pytest.raises(ValueError, match='restart_every'):
    gram_newton_schulz(x, restart_every=-1)
  with pytest.raises(ValueError, match='restart_every'):
    gram_newton_schulz(x, restart_every=1.5)
  with pytest.raises(ValueError, match='normalizer'):
    gram_newton_schulz(x, normalizer='spectral')
  with pytest.raises(ValueError, match=r'\[\.\.\., m, n\]'):
    gram_newton_schulz(jnp.ones(4))


def test_flops_of_a_column_block_and_gram_products():
  """``col_shards``: the ``m×n`` products shrink with the block, the ``m×m``
  work does not; Gram products are one per block of steps."""
  m, n, g = 64, 512, 8
  assert polar.standard_flops(m, n, 5, col_shards=g) == 5 * (
      4 * m * m * n // g + 2 * m**3)
  assert polar.standard_flops(n, m, 5, col_shards=g) == (
      polar.standard_flops(m, n, 5, col_shards=g))
  assert polar.gram_flops(m, n, 5, 2, col_shards=g) == (
      3 * (4 * m * m * n // g + 2 * m**3) + 2 * 8 * m**3)
  assert [polar.gram_products(5, r) for r in (1, 2, 3, None)] == [5, 3, 2, 1]


def test_symmetrize_is_taken_whichever_method_runs():
  """``orthogonalize_stack(symmetrize=False)`` raised a ``TypeError`` from
  the plain iteration (square matrices, bf16, a traced step count), which
  has no Gram matrix: it is taken there and changes nothing; where Gram
  runs it is passed on."""
  from orthax.polar import orthogonalize_stack  # pylint: disable=g-import-not-at-top
  key = jax.random.key(3)
  square = jax.random.normal(key, (2, 16, 16))
  np.testing.assert_array_equal(orthogonalize_stack(square, symmetrize=False),
                                orthogonalize_stack(square))
  wide = jax.random.normal(key, (2, 16, 64))
  assert orthogonalize_stack(wide, method='auto', symmetrize=False).shape == (
      2, 16, 64)
  with pytest.raises(TypeError, match='^orthogonalize_stack: symmetrize '):
    orthogonalize_stack(square, symmetrize='no')
