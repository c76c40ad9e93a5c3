"""DCT-AdamW vs a float64 NumPy transcription of ``shared/ALGORITHMS.md``
§13.3.1–13.3.2 (PyTorch layout, written here independently of
``orthax/polar/dct.py``), the slot remap, the fallback routing, the state
size, the plan's FLOPs, and 8 fake devices (``dct_cases.py``)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
from orthax import matrix_stages as MS
from orthax.matrices import MatrixSpec
from orthax.polar import dct
from fake_devices import run_cases
from reference_helpers import AdamRef, assert_match, flat, make_tree
from reference_helpers import run_orthax

SHAPES = {'wide/kernel': (40, 24), 'tall/kernel': (24, 40),
          'square/kernel': (32, 32), 'stack/kernel': (3, 16, 24),
          'tall/bias': (40,)}


def dct_ref(k):
  """D[i, j] = sqrt(2/k) cos(π i (2j+1) / 2k), row 0 times 1/√2."""
  d = np.empty((k, k))
  for i in range(k):
    for j in range(k):
      d[i, j] = np.sqrt(2.0 / k) * np.cos(np.pi * i * (2 * j + 1) / (2 * k))
  d[0] /= np.sqrt(2.0)
  return d


class DctAdamRef:
  """§13.3.2 on one PyTorch weight ``(rows, cols)``, float64; ``remap``:
  ``rotate_subspace`` as meant (the product taken before assigning)."""

  def __init__(self, rank, gap, b1, b2, eps, remap, min_side):
    self.rank, self.gap, self.b1, self.b2, self.eps = rank, gap, b1, b2, eps
    self.remap, self.m, self.v, self.idx = remap, None, None, None
    self.min_side = min_side  # None: the step unscaled

  def step(self, w, g, t, lr, wd):
    rows, cols = g.shape
    right = rows >= cols
    d = dct_ref(cols if right else rows)
    if self.min_side:  # the rate per unit of the smaller side, from s_0 up
      lr = lr / max(min(rows, cols), self.min_side)
    w = w * (1 - lr * wd)
    if t == 1 or t % self.gap == 0:
      s = g @ d if right else d.T @ g
      score = np.abs(s).sum(axis=0 if right else 1)
      idx = np.argsort(-score, kind='stable')[:self.rank]
      a = s[:, idx] if right else s[idx, :]
      if self.remap and t > 1:
        # The 0/1 slot map (D orthonormal); rounded, since the float64
        # product's 1e-17 off-diagonal terms would add to small a² in v.
        p = np.round(d[:, self.idx].T @ d[:, idx])
        if right:
          self.m, self.v = self.m @ p, np.abs(self.v @ p)
        else:
          self.m, self.v = p.T @ self.m, np.abs(p.T @ self.v)
      self.idx = idx
    else:
      b = d[:, self.idx]
      a = g @ b if right else b.T @ g
    if self.m is None:
      self.m, self.v = np.zeros_like(a), np.zeros_like(a)
    self.m = self.b1 * self.m + (1 - self.b1) * a
    self.v = self.b2 * self.v + (1 - self.b2) * a * a
    c2 = np.sqrt(1 - self.b2 ** t)
    u = self.m / (np.sqrt(self.v) + self.eps * c2)
    b = d[:, self.idx]
    back = u @ b.T if right else b @ u
    return w - lr * c2 / (1 - self.b1 ** t) * back


class TreeRef:
  """The recipe on a tree: kernels (Flax or PyTorch layout) by
  :class:`DctAdamRef` per matrix, vectors by AdamW at ``adam_lr``."""

  def __init__(self, params, torch_layout, lr, wd, rank, gap, remap,
               min_side, adam_lr, b1=0.9, b2=0.999, eps=1e-8):
    self.p = flat(params)
    self.torch, self.lr, self.wd, self.t = torch_layout, lr, wd, 0
    self.mats, self.adam = {}, {}
    for k, w in self.p.items():
      if w.ndim == 1:
        self.adam[k] = AdamRef(w, adam_lr, b1, b2, eps, wd, raw=False)
      else:
        self.mats[k] = [DctAdamRef(rank, gap, b1, b2, eps, remap,
                                   min_side)
                        for _ in range(int(np.prod(w.shape[:-2])))]

  def _torch(self, x):
    x = x.reshape((-1,) + x.shape[-2:])
    return x if self.torch else np.swapaxes(x, -1, -2)

  def step(self, grads):
    self.t += 1
    gs = flat(grads)
    for k, refs in self.mats.items():
      w, g = self._torch(self.p[k]), self._torch(gs[k])
      new = np.stack([r.step(wi, gi, self.t, self.lr, self.wd)
                      for r, wi, gi in zip(refs, w, g)])
      new = new if self.torch else np.swapaxes(new, -1, -2)
      self.p[k] = new.reshape(self.p[k].shape)
    for k, a in self.adam.items():
      self.p[k] = a.step(self.p[k], gs[k], self.t)
    return dict(self.p)


def _router(torch_layout):
  if not torch_layout:
    return None
  return orthax.Router(extra_rules=[
      orthax.routing.Rule('kernel', 'matrix', MatrixSpec.torch_linear())])


CASES = [dict(reference='orthax', update_every=1),
         dict(reference='orthax', update_every=2),
         # 1/s on every side; 1/max(s, 24): sides 16 and 24 alike, 32 not
         dict(reference='orthax', update_every=1, min_side=1),
         dict(reference='orthax', update_every=2, min_side=24),
         dict(reference='orthax', update_every=1, scale='none'),
         dict(reference='ista', update_every=1),
         dict(reference='ista', update_every=2)]


@pytest.mark.parametrize('torch_layout', [False, True], ids=['flax', 'torch'])
@pytest.mark.parametrize('kw', CASES, ids=lambda kw: '-'.join(
    str(v) for v in kw.values()))
def test_matches_float64_transcription(x64, kw, torch_layout):
  """reference='orthax': the step and decay at η/max(s, s_0) (s the
  smaller side, s_0 = min_side, 128 by default: every side here), the
  AdamW branch at η·0.0085/1.5; 'ista': all at η (``scale='none'``)."""
  params = make_tree(0, SHAPES)
  grads = [make_tree(100 + t, SHAPES) for t in range(5)]
  ours = kw['reference'] == 'orthax'
  per_side = ours and kw.get('scale') != 'none'
  min_side = kw.get('min_side', 128) if per_side else None
  # steps of a like size: 1.28/128, 0.3/s, 0.24/24 against 0.01
  lr = {None: 0.01, 1: 0.3}.get(min_side, 0.01 * (min_side or 1))
  tx = orthax.dct_adamw(lr, rank=5, weight_decay=0.1,
                        router=_router(torch_layout), **kw)
  got = run_orthax(tx, params, grads)
  ref = TreeRef(params, torch_layout, lr, 0.1, 5, kw['update_every'],
                remap=ours, min_side=min_side,
                adam_lr=lr * 0.0085 / 1.5 if per_side else lr)
  assert_match(got, [ref.step(g) for g in grads], 1e-9, 1e-12, str(kw))


def test_scale_is_checked_and_named():
  with pytest.raises(ValueError, match="dct_adamw: scale must be one of"):
    orthax.dct_adamw(scale='keller')
  with pytest.raises(ValueError,
                     match="scale_by_dct_adam: scale must be one of"):
    orthax.transforms.scale_by_dct_adam(scale='wide')
  assert orthax.recipes.adam_rate_ratio('dct_adamw') == pytest.approx(
      0.0085 / 1.5)
  # Unscaled, the matrices' step is AdamW's size: one rate for both.
  params = {'w': jnp.ones((8, 16)), 'b': jnp.zeros((16,))}
  grads = {'w': jnp.ones((8, 16)), 'b': jnp.linspace(-1.0, 1.0, 16) + 0.03}
  for scale, adam_lr in (('none', 0.04),
                         ('inverse_side', 0.04 * 0.0085 / 1.5)):
    tx = orthax.dct_adamw(0.04, scale=scale)
    u, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.abs(u['b']), adam_lr, rtol=1e-4)
  # The default rate follows the step's scale: 1.5 per unit of the side,
  # 0.0085 unscaled (also reference='ista's); the AdamW branch at 0.0085.
  for kw, matrix_lr in ((dict(), 1.5), (dict(scale='none'), 0.0085),
                        (dict(reference='ista'), 0.0085)):
    tx = orthax.dct_adamw(**kw)
    rates = orthax.recipes.recipe_routing(tx).learning_rates
    assert (rates['matrix'], rates['adam']) == pytest.approx(
        (matrix_lr, 0.0085)), kw
    u, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.abs(u['b']), 0.0085, rtol=1e-4)


def test_remap_is_the_slot_map_of_the_dct_product():
  """remap_slots(x, old, new) = x P, P = D[:, old]ᵀ D[:, new]: kept indices
  carry their column to the new slot, new ones are zero."""
  d = dct_ref(12)
  old, new = np.array([[3, 7, 1, 9]]), np.array([[1, 4, 3, 11]])
  x = np.random.default_rng(0).standard_normal((1, 5, 4)).astype(np.float32)
  p = d[:, old[0]].T @ d[:, new[0]]
  got = np.asarray(dct.remap_slots(jnp.asarray(x), jnp.asarray(old),
                                   jnp.asarray(new)))
  np.testing.assert_allclose(got[0], x[0] @ p, atol=1e-6)
  np.testing.assert_array_equal(got[0][:, 0], x[0][:, 2])  # index 1
  np.testing.assert_array_equal(got[0][:, 2], x[0][:, 0])  # index 3
  assert not got[0][:, 1].any() and not got[0][:, 3].any()


def test_dct_matrix_is_orthonormal_dct2():
  for k in (1, 7, 32, 333):
    d = np.asarray(dct.dct_matrix(k), np.float64)
    np.testing.assert_allclose(d @ d.T, np.eye(k), atol=2e-5)
    if k <= 32:
      np.testing.assert_allclose(d, dct_ref(k), atol=2e-6)
  # The largest size whose phase fits int32 is accepted (traced only: 4 GiB)
  # and one beyond it refused, not silently wrapped.
  k = 32767
  rows = jax.eval_shape(lambda: dct.dct_matrix(k))
  assert rows.shape == (k, k)
  with pytest.raises(ValueError, match='dct_matrix: size 32768'):
    dct.dct_matrix(32768)


def test_selection_is_in_descending_score_order():
  s = jnp.asarray(np.random.default_rng(0).standard_normal((2, 10, 8)))
  sc = dct.column_scores(s)
  idx = dct.select(sc, 5)
  got = np.take_along_axis(np.asarray(sc), np.asarray(idx), axis=-1)
  assert np.all(np.diff(got, axis=-1) < 0)
  np.testing.assert_allclose(sc, np.abs(np.asarray(s)).sum(1), rtol=1e-6)


def test_ell_norm_scores_and_huge_values():
  s = np.random.default_rng(1).standard_normal((1, 9, 6))
  for p in (0.5, 2.0, 3.0):
    want = (np.abs(s) ** p).sum(1) ** (1 / p)
    np.testing.assert_allclose(dct.column_scores(jnp.asarray(s), p), want,
                               rtol=1e-5)
  # Huge values: the exact scores times one power of two per matrix (1
  # below 2³²), so none overflows and the order is kept.
  for p, scale in ((2.0, 1e30), (1.0, 1e30), (1.0, 1e37)):
    big = np.asarray(dct.column_scores(jnp.asarray(s * scale, jnp.float32),
                                       p), np.float64)
    want = (np.abs(s) ** p).sum(1) ** (1 / p) * scale
    ratio = big / want
    assert np.all(np.isfinite(big))
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)
    assert np.log2(ratio.flat[0]) == pytest.approx(
        round(np.log2(ratio.flat[0])), abs=1e-4)
    np.testing.assert_array_equal(dct.select(jnp.asarray(big), 4),
                                  dct.select(jnp.asarray(want), 4))


def test_a_huge_gradient_selects_the_columns_of_the_unscaled_one():
  """DCT-AdamW and Trion select the same columns, and so make the same
  step, for a gradient times 2¹²⁴ (entries near 1e38, finite) as for the
  gradient itself: their L1 column scores overflowed to inf, tied, and the
  first columns were taken (an update orthogonal to the right one)."""
  g = np.random.default_rng(2).standard_normal((32, 16)).astype(np.float32)
  params = {'w': {'kernel': jnp.zeros((32, 16))}}
  for tx in (orthax.dct_adamw(), orthax.trion()):
    def step(scale, tx=tx):
      u, _ = jax.jit(tx.update)({'w': {'kernel': jnp.asarray(g * scale)}},
                                tx.init(params), params)
      return np.asarray(u['w']['kernel'], np.float64)
    want, big = step(1.0), step(2.0 ** 124)
    np.testing.assert_allclose(big, want, rtol=1e-5, atol=1e-6 * np.abs(
        want).max())


def _slot_elements(state):
  slots = optax.tree.get(state, 'dct_adam').slots.slots
  return sum(x.size for x in jax.tree.leaves(slots))


@pytest.mark.parametrize('shape,rank', [((64, 256), 16), ((256, 64), 8),
                                        ((128, 128), 0.125)])
def test_state_is_at_most_2r_over_n_of_adamw(shape, rank):
  params = {'w': jnp.zeros(shape)}
  st = orthax.dct_adamw(rank=rank).init(params)
  adam = optax.adamw(1e-3).init(params)
  adam_elems = sum(x.size for x in jax.tree.leaves(adam) if x.ndim)
  n = min(shape)
  r = dct.resolve_rank(rank, n)
  assert _slot_elements(st) <= 2 * r / n * adam_elems
  assert _slot_elements(st) == 2 * max(shape) * r + r


def test_fallback_routes_vectors_and_large_matrices_to_adamw():
  params = {'a': {'kernel': jnp.ones((48, 8))},
            'b': {'kernel': jnp.ones((8, 16))}, 'b2': {'bias': jnp.ones(8)}}
  recipe = importlib.import_module('orthax.recipes.dct_adamw')
  expected = {'a': {'kernel': 'adam'}, 'b': {'kernel': 'matrix'},
              'b2': {'bias': 'adam'}}
  limited = recipe.limit_matrix_size(orthax.Router(), 48)
  assert limited.labels(params) == expected
  # A labels callable is wrapped the same way (default matrix views).
  plain = lambda p: orthax.Router().labels(p)
  assert recipe.limit_matrix_size(plain, 48)(params) == expected
  # describe() reads the limited router: each leaf's branch and rate.
  table = orthax.describe(params, optimizer=orthax.dct_adamw(max_shape=48))
  rows = {line.split()[0]: line.split() for line in table.splitlines()[2:]}
  assert rows['a/kernel'][-3:] == ['adam', '0.0085', '0']
  assert 'matrix' in rows['b/kernel'] and rows['b/kernel'][-2:] == ['1.5', '0']
  with pytest.raises(ValueError, match='max_side must be a positive int'):
    orthax.Router(max_side=0)
  tx = orthax.dct_adamw(0.1, rank=2, max_shape=48)
  u, _ = tx.update(params, tx.init(params), params)
  # At the AdamW branch's rate: 0.0085 per 1.5 of the matrices'.
  ref = optax.adamw(0.1 * 0.0085 / 1.5, b2=0.999, weight_decay=0.0)
  ua, _ = ref.update(params['a'], ref.init(params['a']), params['a'])
  np.testing.assert_allclose(u['a']['kernel'], ua['kernel'], rtol=1e-6)


def test_zero_gradient_gives_zero_update():
  params = {'w': jnp.ones((8, 16)), 'b': jnp.ones((16,))}
  for ref in orthax.recipe_references('dct_adamw'):
    tx = orthax.dct_adamw(0.1, reference=ref, rank=3)
    st = tx.init(params)
    for _ in range(2):
      u, st = tx.update(jax.tree.map(jnp.zeros_like, params), st, params)
      for x in jax.tree.leaves(u):
        assert np.all(np.asarray(x) == 0)


def test_rank_fraction_and_static_injection():
  params = {'w': jnp.ones((8, 20))}
  st = orthax.dct_adamw(rank=0.3).init(params)
  slots = optax.tree.get(st, 'dct_adam').slots.slots
  assert [a['idx'].shape[-1] for a in slots.values()] == [3]  # ceil(2.4)
  # A whole rank·s is that rank, whatever the float product's last bit
  # (0.07·100 = 7.000000000000001 kept 8 columns).
  for r in range(1, 101):
    for s in (30, 100, 1100, 4096):
      assert dct.resolve_rank(r / 100, s) == max(1, -(-r * s // 100)), (r, s)
  tx = optax.inject_hyperparams(orthax.dct_adamw, static_args=(
      'rank', 'update_every'))(learning_rate=0.1, rank=2, update_every=2)
  g = {'w': jnp.arange(160.0).reshape(8, 20) / 100}
  u, _ = jax.jit(tx.update)(g, tx.init(params), params)
  assert np.all(np.isfinite(np.asarray(u['w']))) and np.any(u['w'])


def test_plan_flops_match_compiled():
  """The stage's declared FLOPs (§13.3.4, update_every=1) against XLA's
  count of the compiled step on one matrix."""
  shape = (96, 256)   # fan_in 96, fan_out 256: L = 256, s = 96
  st = MS.DCTAdam(rank=24)
  g = jnp.ones((1,) + shape)
  state = jax.tree.map(lambda a: a[None], st.initial_state(*shape,
                                                           jnp.float32))
  blocks = MS.Blocks(*shape)
  cost = jax.jit(lambda o, s: st.apply(o, s, blocks)).lower(
      g, state).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  assert abs(cost['flops'] / st.flops(*shape) - 1) < 0.1, (
      cost['flops'], st.flops(*shape))


def test_docstring_examples_run():
  import doctest  # pylint: disable=g-import-not-at-top
  for name in ('orthax.recipes.dct_adamw', 'orthax.transforms.dct_adam'):
    mod = importlib.import_module(name)
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert res.attempted >= 1 and res.failed == 0, (mod, res)


# 8 fake devices (tests/dct_cases.py) ----------------------------------------

MESHES = ['fsdp8', 'fsdp4tp2', 'explicit_fsdp8']


@pytest.fixture(scope='module')
def mesh_cases():
  return run_cases('dct_cases.py', timeout=900)


@pytest.mark.parametrize('mesh', MESHES)
def test_distributed_equals_one_device(mesh_cases, mesh):
  """Three steps (re-selections and a remap with update_every=2) on 8
  devices equal one device; so do the slot states."""
  r = mesh_cases[f'dct_adamw/{mesh}']
  assert r['rel_err'] < 1e-5, r
  assert r['state_rel_err'] < 1e-5, r


@pytest.mark.parametrize('mesh', MESHES)
def test_slot_state_stays_with_its_owner(mesh_cases, mesh):
  """The indices and moments never travel: no all-gather, the bytes of
  plain Muon (whole matrices to their owners and back), the state sharded
  over every mesh axis (and so in orthax.flax.state_specs); the plan's
  FLOPs are the matrix stage's, below the compiled step's (which adds the
  AdamW branch, the DCT matrices and both branches of the re-selection)."""
  r = mesh_cases[f'dct_adamw/{mesh}']
  assert 'all-gather' not in r['collectives'], r
  assert r['plan_bytes'] == r['muon_plan_bytes'], r
  assert abs(r['wire_bytes'] - r['muon_wire_bytes']) <= 16, r
  assert r['state_sharded_over_all_axes'] and r['state_specs_owner'], r
  assert r['plan_flops'] <= r['flops'] <= 2 * r['plan_flops'], r
  assert r['flops'] < 0.5 * r['muon_flops'], r
