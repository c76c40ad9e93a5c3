"""ARO (ALGORITHMS.md §13.1) against a float64 NumPy transcription of the
dion ``dev/aro`` update, the tall-matrix defect of dion's rotated side, and
``distributed=`` on 8 fake devices (``aro_cases.py``); the QR kinds and the
stage's FLOP model are in ``test_aro_qr.py``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
from orthax.matrices import MatrixSpec
from orthax.matrix_stages import _rotate
from fake_devices import run_cases
from reference_helpers import AdamRef, flat, make_tree, run_orthax

# Flax kernels (in, out) and PyTorch-layout weights (out, in): wide, tall
# and square in both layouts, a stacked leaf, and two AdamW leaves.
TORCH = ('tw/weight', 'tt/weight')
SHAPES = {'a/kernel': (64, 32), 'b/kernel': (32, 64), 'c/kernel': (48, 48),
          'stack/kernel': (3, 48, 32), 'tw/weight': (24, 40),
          'tt/weight': (40, 24), 'b/bias': (64,), 'ln/scale': (48,)}
# The leaves whose PyTorch rows (dion's rotated side) are not more than
# their columns: dion's update is a function of the gradient there only.
DION_WELL_POSED = ('a/kernel', 'c/kernel', 'stack/kernel', 'tw/weight',
                   'b/bias', 'ln/scale')
ROUTER = orthax.Router(extra_rules=[orthax.Rule(
    r'^t[wt]/weight$', 'matrix', MatrixSpec.torch_linear())])
LR, WD, ADAM_LR = 0.01, 0.01, 3e-3


# The float64 transcription (PyTorch layout: W is m×n) ------------------------


def sinkhorn(x, iters=5, eps=1e-8):
  m, n = x.shape
  for _ in range(iters):
    x = x * np.sqrt(n) / np.maximum(np.linalg.norm(x, axis=1,
                                                   keepdims=True), eps)
    x = x * np.sqrt(m) / np.maximum(np.linalg.norm(x, axis=0,
                                                   keepdims=True), eps)
  return x


def base_map(x, base):
  if base == 'sinkhorn':
    return sinkhorn(x)
  if base == 'row_norm':
    return np.sqrt(x.shape[1]) * x / np.maximum(
        np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
  return np.sign(x)


def qr_q(c, kind):
  # Cholesky QR3 computes the Householder Q up to column signs, and the
  # update R f(RᵀA) does not see them (f commutes with a row sign flip).
  if kind in ('householder', 'cholesky_qr3'):
    return np.linalg.qr(c)[0]
  gram = c.T @ c + 1e-7 * np.sum(c * c) * np.eye(len(c))
  try:
    upper = np.linalg.cholesky(gram).T
  except np.linalg.LinAlgError:
    return np.linalg.qr(c)[0]
  return np.linalg.solve(upper.T, c.T).T  # C R⁻¹


class AroRef:
  """dion ``dev/aro``: M ← μM + (1-μ)G; with A = M (rotating the rows) or
  Mᵀ: C = A f(RᵀA)ᵀ, R ← Q(C), U = R f(RᵀA); W ← W(1-ηλ) - η c U. The
  AdamW leaves: optax-form AdamW (0.9, 0.95, 1e-8). ``guard``: where A
  has more rows than columns, what exact arithmetic gives (the float
  result is roundoff there, §13.1.4a). ``nesterov``: A is made of the
  look-ahead μM + (1-μ)G instead of M (the library mode's)."""

  def __init__(self, params, base, qr, rotate, scale, adam_wd, guard=True,
               nesterov=False):
    self.p = flat(params)
    self.base, self.qr, self.rotate, self.scale = base, qr, rotate, scale
    self.guard, self.nesterov = guard, nesterov
    self.M, self.R, self.adam = {}, {}, {}
    for k, w in self.p.items():
      if w.ndim >= 2:
        mats = self.torch(k, w)
        self.M[k] = np.zeros_like(mats)
        self.R[k] = [np.eye(self.side(*x.shape)[1]) for x in mats]
      else:
        self.adam[k] = AdamRef(w, ADAM_LR, 0.9, 0.95, 1e-8, adam_wd, False)
    self.t = 0

  @staticmethod
  def torch(k, x):
    if k in TORCH:
      return x[None].copy()
    x = x.reshape((-1,) + x.shape[-2:])
    return np.swapaxes(x, -1, -2).copy()

  @staticmethod
  def untorch(k, mats, shape):
    return mats[0] if k in TORCH else np.swapaxes(mats, -1, -2).reshape(shape)

  def side(self, m, n):
    """(rotates the rows, the rotated size)."""
    rows = self.rotate == 'fan_out' or (self.rotate == 'smaller' and n >= m)
    return rows, m if rows else n

  def factor(self, u, m, n):
    if self.scale == 'rms_norm':
      return 0.2 * np.sqrt(max(m, n))
    if self.scale == 'spectral_norm':
      return np.sqrt(m / n)
    if self.scale == 'update_rms':
      return 0.2 * np.sqrt(m * n) / (np.linalg.norm(u) + 1e-10)
    if self.scale == 'muon':
      return np.sqrt(max(1.0, m / n)) / power_sigma(u)
    return 1.0

  def step(self, grads):
    self.t += 1
    gs = flat(grads)
    for k in self.M:
      g = self.torch(k, gs[k])
      self.M[k] = 0.95 * self.M[k] + 0.05 * g
      look = 0.95 * self.M[k] + 0.05 * g if self.nesterov else self.M[k]
      w = self.torch(k, self.p[k])
      for i, mom in enumerate(look):
        m, n = mom.shape
        rows, _ = self.side(m, n)
        a = mom if rows else mom.T
        r = self.R[k][i]
        c = a @ base_map(r.T @ a, self.base).T
        s_, t_ = a.shape
        if self.guard and s_ > t_:
          # Exact arithmetic: C's trailing block after t reflectors is 0
          # (reflectors = identity) and so are the rows of QᵀA past t.
          r = self.R[k][i] = np.linalg.qr(c[:, :t_], mode='complete')[0]
          x = r.T @ a
          x[t_:] = 0
        else:
          r = self.R[k][i] = qr_q(c, self.qr)
          x = r.T @ a
        u = r @ base_map(x, self.base)
        u = u if rows else u.T
        w[i] = w[i] * (1 - LR * WD) - LR * self.factor(u, m, n) * u
      self.p[k] = self.untorch(k, w, self.p[k].shape)
    for k, opt in self.adam.items():
      self.p[k] = opt.step(self.p[k], gs[k], self.t)
    return dict(self.p)


def power_sigma(u, iters=10):
  """``u``'s (``fan_out × fan_in``) top singular value by ``iters`` power
  iterations on ``u uᵀ`` from its fan-out energies times the tilt
  ``1 + ½·frac(j·0.618…)``, at least the longest fan-out row's norm:
  ``scale='muon'`` transcribed."""
  energy = np.sum(u * u, axis=1)
  v = energy * (1 + 0.5 * np.mod(np.arange(len(energy)) * 0.6180339887498949,
                                 1))
  for _ in range(iters):
    v = v / np.linalg.norm(v)
    w = u.T @ v
    v = u @ w
  return max(np.linalg.norm(v) / np.linalg.norm(w), np.sqrt(energy.max()))


def _run(keys, steps=5, **kw):
  shapes = {k: SHAPES[k] for k in keys}
  params = jax.tree.map(jnp.asarray, make_tree(0, shapes))
  grads = [jax.tree.map(jnp.asarray, make_tree(10 + t, shapes))
           for t in range(steps)]
  tx = orthax.aro(LR, weight_decay=WD, adam_learning_rate=ADAM_LR,
                  router=ROUTER, **kw)
  got = run_orthax(tx, params, grads)
  return got, params, grads


def _check(got, ref, p0, what):
  """Per step and leaf: the difference from the reference's parameters,
  relative to the reference's step."""
  prev = flat(p0)
  for t, want in enumerate(ref):
    for k, w in want.items():
      err = np.linalg.norm(got[t][k] - w) / np.linalg.norm(w - prev[k])
      assert err <= 1e-9, f'{what} step {t} {k}: {err:.2e}'
    prev = want


CASES = [  # (reference, base, qr, scale, leaves)
    ('dion', 'sinkhorn', 'householder', 'rms_norm', tuple(SHAPES)),
    ('dion', 'sinkhorn', 'householder', 'rms_norm', DION_WELL_POSED),
    ('dion', 'row_norm', 'householder', 'rms_norm', DION_WELL_POSED),
    ('dion', 'sign', 'householder', 'rms_norm', DION_WELL_POSED),
    ('dion', 'sinkhorn', 'shifted_cholesky', 'rms_norm', DION_WELL_POSED),
    *[('orthax', b, q, 'rms_norm', tuple(SHAPES)) for b in _rotate.BASES
      for q in _rotate.QR_KINDS if q != 'auto'],  # auto: test_aro_qr.py
    ('orthax', 'sinkhorn', 'householder', 'update_rms', tuple(SHAPES)),
    ('orthax', 'sinkhorn', 'householder', 'spectral_norm', tuple(SHAPES)),
    ('orthax', 'sinkhorn', 'householder', 'none', tuple(SHAPES)),
    ('orthax', 'sinkhorn', 'householder', 'muon', tuple(SHAPES)),
    ('orthax', 'sinkhorn', 'cholesky_qr3', 'muon', tuple(SHAPES)),
]


@pytest.mark.parametrize('reference,base,qr,scale,keys', CASES,
                         ids=lambda v: v if isinstance(v, str) else (
                             'raw' if v == DION_WELL_POSED else 'all'))
def test_matches_float64_transcription(x64, reference, base, qr, scale,
                                       keys):
  # On the well-posed leaves alone, the reference's plain arithmetic (no
  # guard, stable=False) must agree too.
  raw = keys == DION_WELL_POSED
  got, params, grads = _run(keys, reference=reference, base=base, qr=qr,
                            scale=scale, stable=not raw)
  ref = AroRef(params, base, qr, 'fan_out' if reference == 'dion'
               else 'smaller', scale, WD if reference == 'dion' else 0.0,
               guard=not raw, nesterov=reference == 'orthax')
  _check(got, [ref.step(g) for g in grads], params,
         f'aro {reference} {base} {qr} {scale}')


@pytest.mark.parametrize('reference', ['orthax', 'dion'])
def test_nesterov_overrides_the_mode(x64, reference):
  """Each mode with the other mode's momentum: 'orthax' without the
  look-ahead, 'dion' with it."""
  keys = DION_WELL_POSED
  nesterov = reference == 'dion'
  got, params, grads = _run(keys, reference=reference, nesterov=nesterov)
  d = reference == 'dion'
  ref = AroRef(params, 'sinkhorn', 'householder',
               'fan_out' if d else 'smaller', 'rms_norm' if d else 'muon',
               WD if d else 0.0, nesterov=nesterov)
  _check(got, [ref.step(g) for g in grads], params,
         f'aro {reference} nesterov={nesterov}')


def test_rotate_fan_in_matches_transcription(x64):
  """Rotating fan-in is dion's algorithm on the transposed weight: well
  posed on PyTorch-tall matrices."""
  keys = ('b/kernel', 'c/kernel', 'tt/weight')
  got, params, grads = _run(keys, reference='dion', rotate='fan_in')
  ref = AroRef(params, 'sinkhorn', 'householder', 'fan_in', 'rms_norm', WD)
  _check(got, [ref.step(g) for g in grads], params, 'aro fan_in')


def _tall_update_change(reference, steps=2, **kw):
  """‖U(G) − U(G + 10⁻¹⁴‖G‖E)‖/‖U(G)‖ after ``steps`` steps on a PyTorch
  64×32 weight (a 32×64 kernel), float64."""
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.standard_normal((32, 64)))}
  gs = [rng.standard_normal((32, 64)) for _ in range(steps)]
  outs = []
  for eps in (0.0, 1e-14):
    tx = orthax.aro(LR, reference=reference, weight_decay=0.0, **kw)
    state = tx.init(params)
    for g in gs:
      e = rng.standard_normal(g.shape) if eps else 0
      g = g + eps * np.linalg.norm(g) * e / np.linalg.norm(e) if eps else g
      u, state = tx.update({'w': jnp.asarray(g)}, state, params)
    outs.append(np.asarray(u['w']))
  return np.linalg.norm(outs[1] - outs[0]) / np.linalg.norm(outs[0])


def test_tall_matrix_defect_of_dion_and_its_fix(x64):
  """§13.1.4a: rotating the larger side (dion on a PyTorch-tall weight) in
  the reference's arithmetic leaves half of Q, and so half of the update,
  to roundoff: a 1e-14 perturbation of the gradient moves the update by
  about one update (``stable=False``). Rotating the smaller side (the
  default) does not, nor does the dion mode with its rank guard."""
  raw = _tall_update_change('dion', stable=False)
  dion, default = _tall_update_change('dion'), _tall_update_change('orthax')
  print(f'tall 64x32, change of the update: dion arithmetic {raw:.3g}, '
        f'dion mode (rank guard) {dion:.3g}, orthax {default:.3g}')
  assert raw > 0.3, raw
  assert dion <= 1e-6, dion
  assert default <= 1e-6, default


def test_state_is_the_rotation_of_the_chosen_side():
  params = {'w': jnp.ones((32, 64)), 'v': jnp.ones((48, 16))}
  for ref, want in (('orthax', [(1, 1, 16, 16), (1, 1, 32, 32)]),
                    ('dion', [(1, 1, 16, 16), (1, 1, 64, 64)])):
    st = orthax.aro(reference=ref).init(params)
    rot = list(optax.tree.get(st, 'aro_rotate').slots.slots.values())
    assert sorted(r.shape for r in rot) == want, (ref, rot)
    assert all(np.array_equal(r[0, 0], np.eye(r.shape[-1])) for r in rot)


def test_zero_gradients_give_zero_updates():
  params = {'w': jnp.ones((16, 8)), 'b': jnp.ones(8)}
  for qr in _rotate.QR_KINDS:
    tx = orthax.aro(qr=qr, weight_decay=0.0)
    state = tx.init(params)
    for _ in range(2):
      u, state = tx.update(jax.tree.map(jnp.zeros_like, params), state,
                           params)
      assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
      assert all(np.all(np.isfinite(np.asarray(x)))
                 for x in jax.tree.leaves(state))


def test_step_size_does_not_follow_the_gradient_scale(x64):
  """As documented: the base map normalizes and ``scale='muon'`` divides by
  the spectral norm, so a tiny gradient takes a full step (as in Muon)."""
  del x64
  params = {'w': jnp.ones((16, 8), jnp.float64)}
  g = jax.random.normal(jax.random.key(0), (16, 8), jnp.float64)
  tx = orthax.aro(weight_decay=0.0)
  full, small, tiny = (
      np.asarray(tx.update({'w': g * k}, tx.init(params), params)[0]['w'])
      for k in (1.0, 1e-6, 1e-12))
  top = np.abs(full).max()
  assert np.linalg.norm(full, 2) > 0.01
  np.testing.assert_allclose(small, full, rtol=1e-9, atol=1e-12 * top)
  # Below the base map's 1e-8 floors: the same spectral norm, nearly the
  # same direction.
  np.testing.assert_allclose(np.linalg.norm(tiny, 2), np.linalg.norm(full, 2),
                             rtol=1e-5)
  np.testing.assert_allclose(tiny, full, rtol=0, atol=2e-3 * top)


@pytest.mark.parametrize('reference', ['orthax', 'dion'])
def test_a_dead_unit_gets_no_update(x64, reference):
  """A zero row of the rotated side's momentum (a dead unit) makes ``B`` in
  :func:`product_q` singular: the stable mode must then give the
  reference's arithmetic, whose update of that row is exactly 0."""
  rng = np.random.default_rng(3)
  # Each mode's rotated side the smaller one (where dion is well posed):
  # orthax rotates a 12×20 kernel's fan-in (its rows), dion a 20×12
  # kernel's fan-out (its columns).
  shape = (20, 12) if reference == 'dion' else (12, 20)
  row = (slice(None), 5) if reference == 'dion' else (5, slice(None))
  params = {'w': jnp.asarray(rng.standard_normal(shape))}
  grads = [rng.standard_normal(shape) for _ in range(4)]
  for g in grads:
    g[row] = 0
  outs = {}
  for stable in (True, False):
    tx = orthax.aro(LR, reference=reference, weight_decay=0.0, stable=stable)
    state = tx.init(params)
    for t, g in enumerate(grads):
      u, state = tx.update({'w': jnp.asarray(g)}, state, params)
      assert np.all(np.asarray(u['w'])[row] == 0), (stable, t)
    outs[stable] = np.asarray(u['w'])
  np.testing.assert_allclose(outs[True], outs[False], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('kw', [dict(base='newton'), dict(qr='cgs'),
                                dict(rotate='rows'), dict(scale='keller'),
                                dict(reference='torch')])
def test_bad_options_name_the_recipe(kw):
  with pytest.raises(ValueError, match=r'aro'):
    orthax.aro(**kw)


@pytest.fixture(scope='module')
def mesh_cases():
  return run_cases('aro_cases.py', timeout=900)


MESHES = ['fsdp8', 'fsdp4tp2', 'explicit_fsdp8']


@pytest.mark.parametrize('mesh', MESHES)
def test_8_devices_equal_one_device(mesh_cases, mesh):
  r = mesh_cases[mesh]
  assert r['rel_err'] < 1e-5, r
  assert r['state_rel_err'] < 1e-5, r


def test_low_rank_gradients_on_a_mesh_equal_one_device(mesh_cases):
  """Rank-4 gradients of 16×32 layers (their rotation's columns past the
  rank are exact arithmetic's, not rounding's): fsdp8 equals one device
  at every step (was 0.3 apart at the second)."""
  errs = mesh_cases['low_rank']['rel_err_per_step']
  assert len(errs) == 3 and max(errs) < 1e-5, errs


@pytest.mark.parametrize('mesh', MESHES)
def test_rotation_stays_with_its_owner(mesh_cases, mesh):
  """R lives sharded over every mesh axis and is never gathered: the step
  moves the bytes of plain Muon's (the plan's), plus check_finite's flag."""
  r = mesh_cases[mesh]
  assert 'all-gather' not in r['collectives'], r
  assert r['plan_bytes'] == r['muon_plan_bytes'], r
  assert abs(r['wire_bytes'] - r['muon_wire_bytes']) <= 16, r
  assert r['state_sharded_over_all_axes'], r
  assert r['state_specs_owner'], r


def test_plan_flops_match_compiled_program(mesh_cases):
  """fsdp8: the plan's FLOPs per device (the stage's declaration) agree
  with the compiled step's, once the QR that XLA cannot count is taken
  out (and the fallback branch XLA counts besides, see
  ``test_aro_qr.py::test_flop_model_matches_compiled_stage``)."""
  r = mesh_cases['flops']
  want = r['plan_flops'] - r['plan_qr_flops'] + r['fallback_flops']
  assert abs(r['xla_flops'] / want - 1) <= 0.05, r
