"""ROOT: the quantile clip, the per-shape Newton–Schulz table and the ``root``
recipe vs a float64 transcription of ``ROOT/examples/example_train.py``
(``shared/ALGORITHMS.md`` §6)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
from orthax import polar
from orthax.transforms import abs_quantile
from reference_helpers import flat, make_tree, run_orthax, torch_mats


JORDAN = (3.4445, -4.7750, 2.0315)
# Exercise the per-shape path in the parity test: a (32, 64) row of its own.
TABLE = {(32, 64): polar.ROOT_TABLE[(2048, 3072)]}


# Quantile ----------------------------------------------------------------------


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_abs_quantile_equals_jnp_quantile(dtype):
  """Equal to jnp.quantile(|x|, q, 'linear') up to the rounding of its final
  interpolation (≤ 2 ulp; XLA may fuse it differently), and exactly where the
  position q·(n-1) is an integer (pure order statistics), with ties, zeros
  and rows of one element."""
  rng = np.random.default_rng(0)
  ulp = float(jnp.finfo(dtype).eps)
  for n in (1, 2, 3, 10, 37, 1001, 4096):
    x = rng.standard_normal((3, n))
    if n > 4:
      x[0, : n // 2] = 0.5   # ties
      x[1, : n // 3] = 0.0   # zeros
    x = jnp.asarray(x, dtype)
    for q in (0.0, 0.1, 0.5, 0.9, 0.95, 1.0):
      got = np.asarray(abs_quantile(x, q), np.float64)
      want = np.asarray(jnp.quantile(jnp.abs(x), q, axis=-1), np.float64)
      np.testing.assert_allclose(got, want, rtol=2.5 * ulp, atol=0,
                                 err_msg=f'n={n} q={q}')
    if n > 1:
      q = 0.5 if (n - 1) % 2 == 0 else 0.0
      np.testing.assert_array_equal(
          abs_quantile(x, q), jnp.quantile(jnp.abs(x), q, axis=-1))


def test_abs_quantile_float64_and_traced_q(x64):
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 999)))
  f = jax.jit(abs_quantile)
  for q in (0.1, 0.37, 0.9):
    np.testing.assert_allclose(f(x, jnp.asarray(q)),
                               jnp.quantile(jnp.abs(x), q, axis=-1),
                               rtol=1e-15, atol=0)


def test_abs_quantile_differentiates_as_jnp_quantile(x64):
  """The lower order statistic came from its bit pattern, which carries no
  derivative: jax.grad dropped its weight (and ``jax.grad`` through ROOT's
  update was off by about half, with no error)."""
  x = jnp.asarray(np.random.default_rng(3).standard_normal((3, 37)))
  for q in (0.0, 0.37, 0.5, 0.9, 1.0):
    f = lambda x, q=q: jnp.sum(abs_quantile(x, q) * jnp.arange(1.0, 4.0))
    g = lambda x, q=q: jnp.sum(jnp.quantile(jnp.abs(x), q, axis=-1)
                               * jnp.arange(1.0, 4.0))
    np.testing.assert_allclose(jax.grad(f)(x), jax.grad(g)(x), rtol=1e-12,
                               atol=1e-15, err_msg=f'q={q}')
    t = jnp.asarray(np.random.default_rng(4).standard_normal(x.shape))
    np.testing.assert_allclose(jax.jvp(f, (x,), (t,))[1],
                               jax.jvp(g, (x,), (t,))[1], rtol=1e-12)


def test_abs_quantile_derivative_at_a_zero_statistic_and_nan_rows(x64):
  """A lower statistic of 0 tied with the masked entries' fill, and
  max's derivative was shared with them (weight k/n, not 1); a row whose
  last statistic is NaN read back 0 instead of NaN."""
  x = jnp.asarray([[0., 0., 5., 6.]])
  d = jnp.asarray([[1., 1., 0., 0.]])
  f = lambda x: abs_quantile(x, 0.0)
  g = lambda x: jnp.quantile(jnp.abs(x), 0.0, axis=-1)
  assert float(jnp.sum(jax.grad(lambda x: f(x).sum())(x))) == 1.0
  np.testing.assert_allclose(jax.jvp(f, (x,), (d,))[1],
                             jax.jvp(g, (x,), (d,))[1])
  nan = jnp.asarray([[1., 2., 3., 4., jnp.nan]])
  for q in (0.5, 0.9, 1.0):
    np.testing.assert_array_equal(abs_quantile(nan, q),
                                  jnp.quantile(jnp.abs(nan), q, axis=-1))


def test_root_update_differentiates_as_finite_differences(x64):
  """``jax.grad`` of a function of ROOT's second update, against central
  differences (float64): the clip's threshold moves with the gradient."""
  rng = np.random.default_rng(5)
  params = {'w': {'kernel': jnp.asarray(rng.standard_normal((8, 16)))}}
  g1, g2, d = (jax.tree.map(lambda p: jnp.asarray(
      rng.standard_normal(p.shape)), params) for _ in range(3))
  weights = jnp.arange(128.0).reshape(8, 16)
  tx = orthax.root()
  _, state = tx.update(g1, tx.init(params), params)
  f = lambda g: jnp.sum(tx.update(g, state, params)[0]['w']['kernel']
                        * weights)
  along = lambda t: jax.tree.map(lambda a, b: a + t * b, g2, d)
  analytic = jnp.vdot(jax.grad(f)(g2)['w']['kernel'], d['w']['kernel'])
  eps = 1e-6
  numeric = (f(along(eps)) - f(along(-eps))) / (2 * eps)
  np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


def test_clip_outliers_equals_clip_at_quantile():
  rng = np.random.default_rng(2)
  u = {'w': jnp.asarray(rng.standard_normal((40, 24)), jnp.float32),
       's': jnp.asarray(rng.standard_normal((3, 16, 8)) * [[[1.]], [[10.]],
                                                          [[0.]]], jnp.float32)}
  specs = {'w': orthax.MatrixSpec(), 's': orthax.MatrixSpec()}
  tx = orthax.clip_outliers(0.9, matrix_specs=specs)
  out, _ = tx.update(u, tx.init(u))
  e = jnp.quantile(jnp.abs(u['w']), 0.9) + 1e-9
  np.testing.assert_allclose(out['w'], jnp.clip(u['w'], -e, e), rtol=1e-6)
  for i in range(3):  # one quantile per matrix of a stacked leaf
    m = u['s'][i]
    e = jnp.quantile(jnp.abs(m), 0.9) + 1e-9
    np.testing.assert_allclose(out['s'][i], jnp.clip(m, -e, e), rtol=1e-6)
  np.testing.assert_array_equal(out['s'][2], 0.0)  # zero stays zero
  assert float(jnp.mean(jnp.abs(out['w']) < jnp.abs(u['w']))) == pytest.approx(
      0.1, abs=0.01)


def _tall_wide_stacked(seed):
  rng = np.random.default_rng(seed)
  return {'tall': jnp.asarray(rng.standard_normal((48, 16)), jnp.float32),
          'wide': jnp.asarray(rng.standard_normal((16, 40)) ** 3, jnp.float32),
          's': jnp.asarray(rng.standard_normal((3, 24, 16)), jnp.float32)}


def test_orthogonalize_before_equals_the_clip_chained_before():
  """``orthogonalize(before=[ClipOutliers])`` runs the clip on the wide
  stack (a tall leaf transposed) just before Newton–Schulz: the same update,
  bit for bit, as the clip transform chained in front."""
  u = _tall_wide_stacked(3)
  specs = orthax.MatrixSpec()
  chained = optax.chain(orthax.clip_outliers(0.8, matrix_specs=specs),
                        orthax.orthogonalize(matrix_specs=specs))
  fused = orthax.orthogonalize(
      matrix_specs=specs, before=[orthax.matrix_stages.ClipOutliers(0.8)])
  want, _ = jax.jit(chained.update)(u, chained.init(u))
  got, _ = jax.jit(fused.update)(u, fused.init(u))
  for k in u:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  plain = orthax.orthogonalize(matrix_specs=specs)
  unclipped, _ = plain.update(u, plain.init(u))
  assert not np.allclose(unclipped['wide'], got['wide'], atol=1e-3)


@pytest.mark.parametrize('stage', [
    orthax.matrix_stages.ScaleByShape(),      # needs the orientation
    orthax.matrix_stages.NeuronNormalize(),   # keeps a state
    'clip'])
def test_orthogonalize_before_refuses_what_cannot_run_there(stage):
  with pytest.raises(ValueError, match='^orthogonalize: before '):
    orthax.orthogonalize(before=[stage])


def test_a_stage_with_input_norms_cannot_follow_before_stages():
  """NAMO's step takes the norms of the matrix entering Newton–Schulz; with
  a clip before it, it would see the unclipped one: refused."""
  u = {'w': jnp.ones((8, 16))}
  tx = orthax.orthogonalize(before=[orthax.matrix_stages.ClipOutliers()])
  step = orthax.matrix_stages.NoiseAdaptStep('scalar', 0.3, 2)
  with pytest.raises(ValueError, match="Norm\\('input'\\)"):
    tx.update_with_stages(u, tx.init(u), [step], [[None]], aux=u)


def test_root_takes_an_injected_quantile():
  """Under ``optax.inject_hyperparams`` ROOT's quantile is a traced value
  that reaches the clip (an argument of the Newton–Schulz pass): two steps
  equal the recipe built with that number, and another value differs."""
  params = _tall_wide_stacked(4)
  grads = [_tall_wide_stacked(5), _tall_wide_stacked(6)]

  def run(tx):
    state, out = tx.init(params), []
    for g in grads:
      u, state = jax.jit(tx.update)(g, state, params)
      out.append(u)
    return out

  router = orthax.Router(extra_rules=[orthax.Rule('^s$', 'matrix')])
  inj = optax.inject_hyperparams(orthax.root)(learning_rate=0.02,
                                               quantile=0.5, router=router)
  want = run(orthax.root(0.02, quantile=0.5, router=router))
  other = run(orthax.root(0.02, quantile=0.95, router=router))
  for got_u, want_u, other_u in zip(run(inj), want, other):
    for k in params:
      np.testing.assert_allclose(got_u[k], want_u[k], rtol=1e-6, atol=1e-7)
    assert not np.allclose(got_u['wide'], other_u['wide'], atol=1e-5)


# Per-shape coefficients --------------------------------------------------------


def test_shape_table_lookup_either_orientation():
  for (m, n), row in polar.ROOT_TABLE.items():
    np.testing.assert_array_equal(polar.shape_coeffs(m, n), [row])
    np.testing.assert_array_equal(polar.shape_coeffs(n, m), [row])
  np.testing.assert_array_equal(polar.shape_coeffs(768, 3072), [JORDAN])


def test_orthogonalize_picks_the_published_rows(monkeypatch):
  """For the four published shapes (both orientations) orthogonalize passes
  ROOT's row to Newton–Schulz, Keller's default elsewhere (abstract
  evaluation: nothing this large is computed)."""
  seen = {}
  real = polar.orthogonalize_stack

  def spy(x, *args, coeffs=None, **kwargs):
    seen[tuple(x.shape[-2:])] = coeffs
    return real(x, *args, coeffs=coeffs, **kwargs)

  monkeypatch.setattr(polar, 'orthogonalize_stack', spy)
  shapes = [(2048, 2048), (2048, 3072), (8192, 2048), (16384, 2048),
            (512, 2048)]
  tree = {f'w{i}': jax.ShapeDtypeStruct(s, jnp.float32)
          for i, s in enumerate(shapes)}
  tx = orthax.orthogonalize(coeffs_for_shape='root')
  jax.eval_shape(lambda u: tx.update(u, optax.EmptyState())[0], tree)
  for (m, n), row in polar.ROOT_TABLE.items():
    np.testing.assert_array_equal(seen[(m, n)], [row])
  assert seen[(512, 2048)] is None  # the preset's (Keller's) table


def test_orthogonalize_default_unchanged_by_unused_table():
  rng = np.random.default_rng(3)
  u = {'a': jnp.asarray(rng.standard_normal((24, 40)), jnp.float32),
       'b': jnp.asarray(rng.standard_normal((40, 24)), jnp.float32)}
  plain = orthax.orthogonalize().update(u, optax.EmptyState())[0]
  unused = orthax.orthogonalize(coeffs_for_shape={(7, 9): JORDAN}).update(
      u, optax.EmptyState())[0]
  for k in u:
    np.testing.assert_array_equal(plain[k], unused[k])
  row = polar.ROOT_TABLE[(2048, 8192)]
  used = orthax.orthogonalize(coeffs_for_shape={(24, 40): row}).update(
      u, optax.EmptyState())[0]
  np.testing.assert_allclose(used['b'], polar.newton_schulz(u['b'],
                                                            coeffs=row),
                             rtol=1e-5, atol=1e-6)


def test_fit_quintic_improves_on_its_sample():
  """The generator fits a fixed row to the sample it is given (Gaussian
  here) and lowers Σ(p⁵(σ) - 1)² below Keller's row on that sample."""
  sigma = polar.gaussian_sample_singular_values(64, 256, count=2)
  row = polar.fit_quintic(sigma)
  assert (polar.orthogonalization_error(row, sigma)
          < 0.5 * polar.orthogonalization_error(JORDAN, sigma))
  held_out = polar.gaussian_sample_singular_values(64, 256, count=2, seed=9)
  assert (polar.orthogonalization_error(row, held_out)
          < polar.orthogonalization_error(JORDAN, held_out))


# The recipe vs the reference ----------------------------------------------------


def root5(g, steps=5):
  """example_train.py root5 (float64, torch layout)."""
  m, n = g.shape
  a, b, c = TABLE.get((min(m, n), max(m, n)), JORDAN)
  x = g / (np.linalg.norm(g) + 1e-7)
  tall = x.shape[0] > x.shape[1]
  if tall:
    x = x.T
  for _ in range(steps):
    s = x @ x.T
    x = a * x + (b * s + c * s @ s) @ x
  return x.T if tall else x


class RootReference:
  """ROOT(lr, wd, root_params=kernels, adamw_params=rest, momentum=0.95,
  nesterov=True, root_steps=5)."""

  def __init__(self, params, lr, wd, mu=0.95, b1=0.9, b2=0.95, eps=1e-8,
               scale='moonlight', adam_lr=None):
    self.p = {k: v.copy() for k, v in flat(params).items()}
    self.scale = scale
    self.adam_lr = lr if adam_lr is None else adam_lr
    self.buf = {k: np.zeros_like(v) for k, v in self.p.items()}
    self.v = {k: np.zeros_like(v) for k, v in self.p.items()}
    self.lr, self.wd, self.mu, self.b1, self.b2, self.eps = (
        lr, wd, mu, b1, b2, eps)
    self.t = 0

  def step(self, grads):
    self.t += 1
    lr, wd = self.lr, self.wd
    for k, g in flat(grads).items():
      w = self.p[k]
      if k.endswith('kernel'):
        shape = w.shape
        ws, gs, bs = torch_mats(w), torch_mats(g), torch_mats(self.buf[k])
        nw, nb = [], []
        for wi, gi, bi in zip(ws, gs, bs):
          bi = self.mu * bi + gi
          u = gi + self.mu * bi
          eps_q = np.quantile(np.abs(u), 0.9) + 1e-9
          o = np.sign(u) * np.maximum(np.abs(u) - eps_q, 0)
          x = root5(u - o)
          out, inp = wi.shape  # PyTorch rows: the kernel's output axis
          f = (0.2 * np.sqrt(max(out, inp)) if self.scale == 'moonlight'
               else np.sqrt(max(1.0, out / inp)))  # Muon's (Keller's)
          wi = wi * (1 - lr * wd) - lr * f * x
          nw.append(wi.T)
          nb.append(bi.T)
        self.p[k] = np.stack(nw).reshape(shape)
        self.buf[k] = np.stack(nb).reshape(shape)
      else:
        m = self.buf[k] = self.b1 * self.buf[k] + (1 - self.b1) * g
        v = self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
        alr = self.adam_lr
        step = (alr * np.sqrt(1 - self.b2 ** self.t) / (1 - self.b1 ** self.t)
                * m / (np.sqrt(v) + self.eps))
        self.p[k] = w * (1 - alr * wd) - step


def test_root_matches_float64_transcription(x64):
  params = make_tree(0)
  grads = [make_tree(100 + t) for t in range(6)]
  # 'repo': the toy script's λ 0.1 and Moonlight scale.
  tx = orthax.root(1e-3, reference='repo', coeffs_for_shape=TABLE)
  got = run_orthax(tx, params, grads)
  ref = RootReference(params, 1e-3, 0.1)
  for t, g in enumerate(grads):
    ref.step(g)
    for k, w in ref.p.items():
      np.testing.assert_allclose(got[t][k], w, rtol=1e-9, atol=1e-12,
                                 err_msg=f'step {t} {k}')


def test_library_mode_scales_as_muon(x64):
  """``reference='orthax'`` is the toy script's step with Muon's shape scale
  √max(1, out/in) in place of 0.2·√max(out, in), at its default rates
  (0.05656, the AdamW branch 3e-3) and λ 0.2."""
  params = make_tree(0)
  grads = [make_tree(100 + t) for t in range(5)]
  got = run_orthax(orthax.root(coeffs_for_shape=TABLE), params, grads)
  ref = RootReference(params, 0.05656, 0.2, scale='keller', adam_lr=3e-3)
  moon = RootReference(params, 0.05656, 0.2, adam_lr=3e-3)
  for t, g in enumerate(grads):
    ref.step(g)
    moon.step(g)
    for k, w in ref.p.items():
      np.testing.assert_allclose(got[t][k], w, rtol=1e-9, atol=1e-12,
                                 err_msg=f'step {t} {k}')
  # The scale is what differs from the reference's (Moonlight's) step.
  assert max(np.max(np.abs(moon.p[k] - ref.p[k]))
             for k in ref.p if k.endswith('kernel')) > 1e-3


def test_root_float32_close_to_float64_reference():
  params = make_tree(1, dtype=np.float32)
  grads = [make_tree(200 + t, dtype=np.float32) for t in range(5)]
  # 'repo': the toy script's λ 0.1 and Moonlight scale.
  tx = orthax.root(1e-3, reference='repo', coeffs_for_shape=TABLE)
  got = run_orthax(tx, params, grads)
  ref = RootReference(make_tree(1), 1e-3, 0.1)
  for t in range(5):
    ref.step(make_tree(200 + t))
  for k, w in ref.p.items():
    np.testing.assert_allclose(got[-1][k], w, rtol=1e-4, atol=1e-5, err_msg=k)


def test_bad_inputs():
  with pytest.raises(ValueError, match='Unknown per-shape'):
    orthax.orthogonalize(coeffs_for_shape='nope')
  g = {'x': {'w': jnp.ones((2, 3, 4))}}
  tx = orthax.clip_outliers()
  with pytest.raises(ValueError, match='x/w'):
    tx.update(g, tx.init(g))
  with pytest.raises(ValueError, match='reference'):
    orthax.root(reference='paper')
