"""ARO's QR kinds (``orthax/matrix_stages/_qr.py``): Cholesky QR3 against
float64 Householder, its certified fallback, float32 ARO with it against
float64, and the stage's FLOP model against XLA's count for every kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aro_fallback
import orthax
from orthax import matrix_stages as MS
from orthax.matrix_stages import _qr
from orthax.matrix_stages import _rotate

LR = 0.01


def test_shifted_cholesky_falls_back_to_householder():
  """A rank-deficient C (Cholesky of a singular Gram may fail): finite,
  orthonormal on the range."""
  c = jnp.zeros((2, 6, 6)).at[1].set(jnp.eye(6))
  q = np.asarray(_qr.shifted_cholesky_q(c))
  assert np.all(np.isfinite(q))
  np.testing.assert_allclose(np.abs(q[1]), np.eye(6), atol=1e-6)


def _conditioned(rng, m, n, kappa):
  """An m×n matrix with singular values spread log-evenly over [1/κ, 1]."""
  k = min(m, n)
  u = np.linalg.qr(rng.standard_normal((m, k)))[0]
  v = np.linalg.qr(rng.standard_normal((n, k)))[0]
  return (u * np.logspace(0, -np.log10(kappa), k)) @ v.T


@pytest.mark.parametrize('s', [64, 128])
def test_cholesky_qr3_is_householders_q_in_float32(s):
  """Up to column signs, Cholesky QR3's float32 ``Q`` is the exact ``Q`` of
  a matrix as close to the input as float32 Householder's (κ up to 10⁶:
  the part of ``QᵀC`` below the diagonal, relative to ``‖C‖``, a
  κ-independent backward error), as close to the float64 ``Q`` as
  Householder's where ``C`` is well conditioned (κ ≤ 10³), and orthonormal
  to float32 rounding; where it cannot certify its result (κ 10⁸, a
  rank-deficient or zero matrix) it is Householder's exactly. dion's
  one-pass shifted form is far from orthogonal already at κ 10³.

  At κ 10⁶ both forward errors are their rounding amplified by up to κ,
  with constants that vary with the machine's float32 kernels (Cholesky
  QR3's was 1.1× and 2.1× Householder's at s 64 and 128 on one CPU, under
  2× on another); the backward error is what the algorithm controls."""
  rng = np.random.default_rng(s)
  for kappa in (1e1, 1e3, 1e6):
    c = _conditioned(rng, s, s, kappa)
    exact = np.linalg.qr(c)[0]
    c32 = jnp.asarray(c, jnp.float32)[None]
    errs, backward, orth = {}, {}, {}
    for fn in (_qr.householder_q, _qr.cholesky_qr3_q,
               _qr.shifted_cholesky_q):
      q = np.asarray(fn(c32)[0], np.float64)
      q = q * np.sign(np.sum(q * exact, axis=0))
      errs[fn.__name__] = np.linalg.norm(q - exact) / np.sqrt(s)
      backward[fn.__name__] = (np.linalg.norm(np.tril(q.T @ c, -1))
                               / np.linalg.norm(c))
      orth[fn.__name__] = np.abs(q.T @ q - np.eye(s)).max()
    assert (backward['cholesky_qr3_q']
            <= 2 * backward['householder_q'] + 1e-7), (kappa, backward)
    assert backward['cholesky_qr3_q'] <= 1e-6, (kappa, backward)
    if kappa <= 1e3:
      assert errs['cholesky_qr3_q'] <= 2 * errs['householder_q'] + 1e-6, (
          kappa, errs)
    assert orth['cholesky_qr3_q'] <= 5e-6, (kappa, orth)
    if kappa >= 1e3:
      assert orth['shifted_cholesky_q'] > 0.1, (kappa, orth)
  bad = np.stack([_conditioned(rng, s, s, 1e8),
                  np.diag(np.r_[np.ones(s - 4), np.zeros(4)]),
                  np.zeros((s, s))]).astype(np.float32)
  np.testing.assert_array_equal(
      np.asarray(_qr.cholesky_qr3_q(jnp.asarray(bad))),
      np.asarray(_qr.householder_q(jnp.asarray(bad))))


@pytest.mark.parametrize('qr', ['cholesky_qr3', 'householder'])
def test_product_q_rebases_an_ill_conditioned_f(qr):
  """Where ``F``'s block ``B`` is too ill-conditioned for the one-pass
  Cholesky basis ``W`` (κ(B) 10⁴, 10⁵: its Cholesky fails in float32 or
  its diagonal spans too much) but
  has full rank, ``W`` comes from Cholesky QR3 of ``Bᵀ``: ``Q`` stays
  several times closer to the float64 ``Q`` of ``A Fᵀ`` than the explicit
  product's float32 ``Q`` (the fallback left for a singular ``B``)."""
  rng = np.random.default_rng(7)
  s, t = 64, 128
  for kappa in (1e4, 1e5):
    a, fm = _conditioned(rng, s, t, 10.0), _conditioned(rng, s, t, kappa)
    exact = np.linalg.qr(a @ fm.T)[0]
    a32, f32 = (jnp.asarray(x, jnp.float32)[None] for x in (a, fm))
    diag = np.diagonal(np.asarray(
        jnp.linalg.cholesky(_qr._gram(jnp.matrix_transpose(f32)))[0]))
    # product_q's test for the one-pass basis (its span, or a failure).
    assert not diag.min() > np.sqrt(100 * np.finfo(np.float32).eps) * (
        diag.max()), ('the one-pass basis would pass', kappa)
    err = {}
    for name, q in (('product', _qr.product_q(a32, f32, qr)),
                    ('explicit', _qr.householder_q(
                        a32 @ jnp.matrix_transpose(f32)))):
      q = np.asarray(q[0], np.float64)
      q = q * np.sign(np.sum(q * exact, axis=0))
      err[name] = np.linalg.norm(q - exact) / np.sqrt(s)
    assert err['product'] <= 0.5 * err['explicit'], (kappa, err)


def test_fallbacks_factor_only_the_failing_matrices():
  """A stack with one matrix Cholesky QR3 cannot certify: that matrix
  alone is factored by Householder (one ``[s, s]`` QR, not the stack's),
  and the others keep their Cholesky QR3 ``Q``."""
  rng = np.random.default_rng(3)
  good = [_conditioned(rng, 32, 32, 10.0) for _ in range(2)]
  bad = np.diag(np.r_[np.ones(28), np.zeros(4)])
  c = jnp.asarray(np.stack([good[0], bad, good[1]]), jnp.float32)
  q = np.asarray(_qr._cholesky_qr3_q(c, 1e-6))  # the stack path
  np.testing.assert_array_equal(q[1], np.asarray(_qr.householder_q(c[1])))
  for i in (0, 2):
    np.testing.assert_array_equal(
        q[i], np.asarray(_qr._cholesky_qr3(c[i], 1e-6)[0]))
  hlo = jax.jit(lambda c: _qr._cholesky_qr3_q(c, 1e-6)).lower(
      c).compile().as_text()
  geqrf = [line for line in hlo.splitlines() if 'geqrf' in line
           and 'custom_call_target' in line]
  assert geqrf and all('f32[3,' not in line for line in geqrf), geqrf


@pytest.mark.parametrize('shape', [(64, 256), (128, 128)])
def test_float32_aro_with_cholesky_qr3_tracks_float64_as_householder(
    x64, shape):
  """8 steps on gradients with singular values over [10⁻⁸, 1]: the float32
  update's distance from the float64 run's is the same (within 10%) with
  ``qr='cholesky_qr3'`` as with Householder."""
  rng = np.random.default_rng(1)
  grads = [_conditioned(rng, *shape, 1e8) for _ in range(8)]
  dev = {}
  for qr in ('householder', 'cholesky_qr3'):
    outs = []
    for dtype in (jnp.float64, jnp.float32):
      params = {'w': jnp.zeros(shape, dtype)}
      tx = orthax.aro(LR, qr=qr, weight_decay=0.0)
      state = tx.init(params)
      for g in grads:
        u, state = tx.update({'w': jnp.asarray(g, dtype)}, state, params)
      outs.append(np.asarray(u['w'], np.float64))
    dev[qr] = np.linalg.norm(outs[1] - outs[0]) / np.linalg.norm(outs[0])
  assert abs(dev['cholesky_qr3'] - dev['householder']) <= (
      0.1 * dev['householder']), dev


@pytest.mark.parametrize('qr', [q for q in _rotate.QR_KINDS
                                if q != 'auto'])
@pytest.mark.parametrize('shape', [(64, 128), (128, 64), (96, 96)])
def test_flop_model_matches_compiled_stage(shape, qr):
  """The stage's declared FLOPs less its QR (LAPACK calls, which XLA's cost
  analysis does not count) are what XLA counts for the stage, which also
  counts :func:`product_q`'s fallback branches (the plan leaves them out;
  :func:`aro_fallback.besides_model`)."""
  st = MS.AroRotate(qr=qr)
  o = jax.ShapeDtypeStruct((1,) + shape, jnp.float32)
  r = jax.ShapeDtypeStruct((1,) + st.shapes(*shape).state, jnp.float32)
  ca = jax.jit(lambda o, r: st.apply(o, r, MS.Blocks(*shape))).lower(
      o, r).compile().cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  s, t = min(shape), max(shape)
  fallback = (aro_fallback.besides_model(s, t) if qr != 'shifted_cholesky'
              else 0)
  want = (st.flops(*shape) - _rotate.aro_flops(*shape, qr=qr)['qr']
          + fallback)
  assert abs(ca['flops'] / want - 1) <= 0.05, (ca['flops'], want)


@pytest.mark.parametrize('backend, kind', [('cpu', 'householder'),
                                           ('gpu', 'cholesky_qr3'),
                                           ('tpu', 'cholesky_qr3')])
def test_auto_qr_is_householder_on_cpu_only(backend, kind):
  assert MS.resolve_qr('auto', backend) == kind
  for given in _qr.QR_KINDS:
    if given != 'auto':
      assert MS.resolve_qr(given, backend) == given


def test_default_aro_runs_householder_on_this_cpu():
  """The recipe's default update on CPU is ``qr='householder'``'s bit for
  bit, and differs from Cholesky QR3's by rounding only (the same ``Q`` up
  to column signs)."""
  assert jax.default_backend() == 'cpu' and MS.AroRotate().qr == 'auto'
  rng = np.random.default_rng(0)
  params = {'w': jnp.zeros((48, 96))}
  grads = [{'w': jnp.asarray(rng.standard_normal((48, 96)), jnp.float32)}
           for _ in range(3)]
  ups = {}
  for qr in (None, 'householder', 'cholesky_qr3'):
    tx = orthax.aro(LR) if qr is None else orthax.aro(LR, qr=qr)
    state = tx.init(params)
    for g in grads:
      u, state = jax.jit(tx.update)(g, state, params)
    ups[qr] = np.asarray(u['w'])
  np.testing.assert_array_equal(ups[None], ups['householder'])
  assert np.max(np.abs(ups[None] - ups['cholesky_qr3'])) > 0
  np.testing.assert_allclose(ups[None], ups['cholesky_qr3'], rtol=1e-4,
                             atol=1e-4 * np.max(np.abs(ups[None])))


def test_auto_qr_follows_the_platform_it_is_lowered_for():
  """``'auto'`` picks its QR when the step is lowered: a GPU or TPU program
  has Cholesky QR3's four Cholesky factorizations per matrix (``W``'s and
  three passes) and ``qr='cholesky_qr3'``'s program; a CPU one has
  ``qr='householder'``'s, with one."""
  shape = (32, 64)
  o = jax.ShapeDtypeStruct((2,) + shape, jnp.float32)
  r = jax.ShapeDtypeStruct((2, 32, 32), jnp.float32)

  def lowered(qr, platform):
    st = MS.AroRotate(qr=qr)
    fn = lambda o, r: st.apply(o, r, MS.Blocks(*shape))
    return jax.jit(fn).trace(o, r).lower(
        lowering_platforms=(platform,)).as_text()

  def choleskys(text):
    return sum(text.count(k) for k in ('potrf', 'cholesky'))

  for platform, kind in (('cpu', 'householder'), ('cuda', 'cholesky_qr3'),
                         ('tpu', 'cholesky_qr3')):
    auto, same, other = (lowered('auto', platform), lowered(kind, platform),
                         lowered('householder' if kind == 'cholesky_qr3'
                                 else 'cholesky_qr3', platform))
    assert choleskys(auto) == choleskys(same) != choleskys(other), platform


@pytest.mark.parametrize('kw', [{}, {'reference': 'dion'},
                                {'rotate': 'fan_in', 'qr': 'householder'}])
@pytest.mark.parametrize('shape,rank', [((16, 16), 2), ((16, 32), 3),
                                        ((24, 48), 4)])
def test_a_low_rank_gradient_gets_a_step_in_its_range(x64, kw, shape, rank):
  """§13.1.4a beyond tall matrices: where the momentum's rank is below the
  rotated side, the rows of ``QᵀM`` past it are zero in exact arithmetic
  and rounding in practice, which the base map scaled up to whole rows: a
  rank-2 gradient got a full-rank step, 93% of it outside the gradient's
  range, that a 1e-14 change of the gradient moved by more than its size.
  Those rows are now zeroed (the rank guard): the step lies in the range
  and does not move."""
  del x64
  rng = np.random.default_rng(0)
  g = rng.standard_normal((shape[0], rank)) @ rng.standard_normal(
      (rank, shape[1]))
  if shape == (24, 48):  # six rows unused: exact zeros beside rounding
    g[-6:] = 0
  params = {'w': jnp.zeros(shape)}

  def step(g):
    tx = orthax.aro(1.0, weight_decay=0.0, scale='none', **kw)
    u, _ = tx.update({'w': jnp.asarray(g)}, tx.init(params), params)
    return np.asarray(u['w'])

  u = step(g)
  moved = step(g * (1 + 1e-14 * rng.standard_normal(g.shape)))
  assert np.linalg.norm(u) > 1
  # The step lies in G's range on the rotated side: its columns in G's
  # column space (fan-in rotated) or its rows in G's row space (fan-out).
  left, _, right = np.linalg.svd(g)
  cols, rows = left[:, :rank], right[:rank].T
  outside = min(np.linalg.norm(u - cols @ (cols.T @ u)),
                np.linalg.norm(u - (u @ rows) @ rows.T))
  assert outside <= 1e-8 * np.linalg.norm(u)
  assert np.linalg.norm(moved - u) <= 1e-8 * np.linalg.norm(u)


def test_the_rank_guard_cuts_only_at_a_gap_at_the_rounding_level():
  """Rows of ``QᵀA`` are zeroed only below a gap of at least 100 between
  neighbouring row norms and at most 10³·ε of the largest: not a smooth
  tail of small real rows (whose sizes overlap the rounding rows' of
  other matrices), not real rows behind a gap but above that level (a
  momentum dominated by one direction, 2000-fold); a rank-3 block's
  rounding rows are, also next to exact zero rows (a gap to a zero row
  took the cut, and kept them)."""
  eps = float(jnp.finfo(jnp.float32).eps)
  rng = np.random.default_rng(7)
  dirs = rng.standard_normal((64, 96))  # s < t: no row zero by shape
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)

  def zeroed(norms):
    x = jnp.asarray((dirs * np.asarray(norms)[:, None])[None], jnp.float32)
    out = np.asarray(_rotate._beyond_rank_zeroed(x))[0]
    return np.flatnonzero(np.all(out == 0, axis=1))

  smooth = np.geomspace(1.0, 20 * eps, 64)         # ratios about 1.3
  assert zeroed(smooth).size == 0
  real = np.r_[np.ones(3), np.full(61, 1e-2)]      # a gap of 100
  assert zeroed(real).size == 0
  spiked = np.r_[1.0, np.geomspace(5e-4, 4e-6, 63)]  # a gap of 2000
  assert zeroed(spiked).size == 0
  rounding = np.r_[np.ones(3), np.full(61, 30 * eps)]
  np.testing.assert_array_equal(zeroed(rounding), np.arange(3, 64))
  with_zeros = np.r_[np.ones(3), np.full(55, 30 * eps), np.zeros(6)]
  np.testing.assert_array_equal(zeroed(with_zeros), np.arange(3, 64))


@pytest.mark.parametrize('shape', [(1, 8), (8, 1), (1, 1)])
def test_aro_steps_a_matrix_with_a_side_of_one(shape):
  """A rotated side of one row has no rank to guard (the sort of its row
  norms had no neighbours, and the guard raised)."""
  params = {'w': jnp.zeros(shape)}
  tx = orthax.aro(0.01)
  g = {'w': jnp.arange(1.0, 1.0 + np.prod(shape)).reshape(shape)}
  u, _ = tx.update(g, tx.init(params), params)
  assert np.all(np.isfinite(np.asarray(u['w'])))
  assert np.linalg.norm(np.asarray(u['w'])) > 0


@pytest.mark.parametrize('n,rank', [(512, 512), (512, 100), (1024, 1024)])
def test_the_rank_guard_on_float32_momenta(n, rank):
  """Through the stage's own QR: a full-rank float32 momentum loses no row
  (a bound of 16·√s·ε‖A‖_F, tried first, zeroed the smallest row of one
  1024² Gaussian in three, a row float32 had right to 1%); a rank-100 one
  loses exactly its 412 rounding rows."""
  rng = np.random.default_rng(1)
  for _ in range(2 if n == 1024 else 1):  # the second 1024² draw
    g = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, n))
  a = jnp.asarray(g[None], jnp.float32)
  q = _qr.product_q(a, _rotate.base_map(a, 'sinkhorn'), 'householder')
  x = jnp.matrix_transpose(q) @ a
  rows = np.linalg.norm(np.asarray(_rotate._beyond_rank_zeroed(x))[0],
                        axis=1)
  assert int(np.sum(rows == 0)) == n - rank
