"""Trion vs a float64 NumPy transcription of ``shared/ALGORITHMS.md``
§13.3.3 (PyTorch layout, written here independently of the library), its
state, the plan's FLOPs, and 8 fake devices (``dct_cases.py``)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
from orthax import matrix_stages as MS
from fake_devices import run_cases
from reference_helpers import AdamRef, assert_match, flat, make_tree, ns
from reference_helpers import run_orthax
from test_dct_adamw import SHAPES, _router, dct_ref

SCALES = {'kj': lambda m, n: np.sqrt(max(1.0, m / n)),
          'none': lambda m, n: 1.0,
          'kimi': lambda m, n: 0.2 * np.sqrt(max(m, n)),
          'dion': lambda m, n: np.sqrt(m / n)}


class TrionRef:
  """§13.3.3 on one PyTorch weight ``(rows, cols)``, float64."""

  def __init__(self, rank, mu, scaling, nesterov=False):
    self.rank, self.mu, self.scaling, self.b = rank, mu, scaling, None
    self.nesterov = nesterov

  def step(self, w, g, lr, wd):
    self.b = g.copy() if self.b is None else self.b + g
    rows, cols = g.shape
    if rows >= cols:
      d = dct_ref(cols)
      s = self.b @ d
      idx = np.argsort(-np.abs(s).sum(0), kind='stable')[:self.rank]
      m = s[:, idx]
      self.b = self.b - (1 - self.mu) * m @ d[:, idx].T
      if self.nesterov:   # look-ahead: the gradient's coefficients + μM
        m = g @ d[:, idx] + self.mu * m
      upd = ns(m) @ d[:, idx].T
    else:
      d = dct_ref(rows)
      s = d @ self.b
      idx = np.argsort(-np.abs(s).sum(1), kind='stable')[:self.rank]
      m = s[idx, :]
      self.b = self.b - (1 - self.mu) * d[idx, :].T @ m
      if self.nesterov:
        m = d[idx, :] @ g + self.mu * m
      upd = d[idx, :].T @ ns(m)
    scale = SCALES[self.scaling](rows, cols)
    return w * (1 - lr * wd) - lr * scale * upd


class TreeRef:
  """Trion on a tree: kernels (Flax or PyTorch layout) by :class:`TrionRef`
  per matrix, vectors by Adam (3e-4, betas (0.9, 0.95), eps 1e-10)."""

  def __init__(self, params, torch_layout, lr, wd, rank, scaling, mu=0.95,
               nesterov=False):
    self.p, self.torch, self.lr, self.wd, self.t = (flat(params),
                                                    torch_layout, lr, wd, 0)
    self.mats, self.adam = {}, {}
    for k, w in self.p.items():
      if w.ndim == 1:
        self.adam[k] = AdamRef(w, 3e-4, 0.9, 0.95, 1e-10, wd, raw=False)
      else:
        self.mats[k] = [TrionRef(rank, mu, scaling, nesterov)
                        for _ in range(int(np.prod(w.shape[:-2])))]

  def _torch(self, x):
    x = x.reshape((-1,) + x.shape[-2:])
    return x if self.torch else np.swapaxes(x, -1, -2)

  def step(self, grads):
    self.t += 1
    gs = flat(grads)
    for k, refs in self.mats.items():
      w, g = self._torch(self.p[k]), self._torch(gs[k])
      new = np.stack([r.step(wi, gi, self.lr, self.wd)
                      for r, wi, gi in zip(refs, w, g)])
      new = new if self.torch else np.swapaxes(new, -1, -2)
      self.p[k] = new.reshape(self.p[k].shape)
    for k, a in self.adam.items():
      self.p[k] = a.step(self.p[k], gs[k], self.t)
    return dict(self.p)


@pytest.mark.parametrize('nesterov', [False, True])
@pytest.mark.parametrize('torch_layout', [False, True], ids=['flax', 'torch'])
@pytest.mark.parametrize('scaling', ['kj', 'none', 'kimi', 'dion'])
def test_matches_float64_transcription(x64, scaling, torch_layout, nesterov):
  params = make_tree(0, SHAPES)
  grads = [make_tree(100 + t, SHAPES) for t in range(5)]
  tx = orthax.trion(0.02, rank=5, weight_decay=0.1, scaling=scaling,
                    nesterov=nesterov, adam_learning_rate=3e-4,
                    router=_router(torch_layout))
  got = run_orthax(tx, params, grads)
  ref = TreeRef(params, torch_layout, 0.02, 0.1, 5, scaling,
                nesterov=nesterov)
  assert_match(got, [ref.step(g) for g in grads], 1e-9, 1e-12, scaling)


@pytest.mark.parametrize('reference, nesterov',
                         [('orthax', True), ('ista', False)])
def test_each_mode_takes_its_own_momentum(x64, reference, nesterov):
  """``nesterov=None`` is the mode's: the library mode looks ahead, the
  reference's step does not; passing the other setting overrides it."""
  params = make_tree(0, SHAPES)
  grads = [make_tree(100 + t, SHAPES) for t in range(4)]
  for flag in (None, not nesterov):
    tx = orthax.trion(0.02, reference=reference, rank=5, weight_decay=0.1,
                      nesterov=flag, adam_learning_rate=3e-4,
                      router=_router(False))
    got = run_orthax(tx, params, grads)
    ref = TreeRef(params, False, 0.02, 0.1, 5, 'kj',
                  nesterov=nesterov if flag is None else flag)
    assert_match(got, [ref.step(g) for g in grads], 1e-9, 1e-12,
                 f'{reference} nesterov={flag}')


@pytest.mark.parametrize('nesterov', [False, True])
def test_full_rank_is_muon(x64, nesterov):
  """At ``rank=1.0`` the selection keeps every DCT column, the feedback
  leaves ``μB``, and ``NS(YD)Dᵀ = NS(Y)`` for an orthogonal ``D``: Trion is
  KellerJordan's Muon (sum-form and EMA momentum differ by ``1-μ``, which
  Newton–Schulz's normalization removes up to its ``ε``: 1.4–2.7e-7 of the
  largest entry here, against 0.5 with the other ``nesterov``), with or
  without Nesterov."""
  params = {'a': jnp.zeros((24, 40)), 'b': jnp.zeros((40, 24)),
            'c': jnp.zeros((16, 16))}
  grads = [jax.tree.map(
      lambda x, i=i: jax.random.normal(jax.random.key(i), x.shape,
                                       jnp.float64), params)
           for i in range(4)]
  trion = orthax.trion(0.02, rank=1.0, weight_decay=0.0, nesterov=nesterov)
  muon = orthax.muon(0.02, reference='keller', nesterov=nesterov)
  got, want = run_orthax(trion, params, grads), run_orthax(muon, params,
                                                           grads)
  for g, w in zip(got, want):
    assert sorted(g) == sorted(w) and len(g) == 3
    for k in g:
      np.testing.assert_allclose(g[k], w[k], rtol=0,
                                 atol=2e-6 * np.abs(w[k]).max())


def test_state_is_the_buffer_in_kernel_layout():
  params = {'a': jnp.zeros((24, 40)), 'b': jnp.zeros((40, 24))}
  st = optax.tree.get(orthax.trion(rank=4).init(params), 'trion')
  shapes = sorted(tuple(g['b'].shape) for g in st.slots.slots.values())
  assert shapes == [(1, 1, 24, 40), (1, 1, 40, 24)]


def test_zero_gradient_gives_zero_update():
  params = {'w': jnp.ones((8, 16)), 'b': jnp.ones((16,))}
  tx = orthax.trion(0.1, rank=3, weight_decay=0.0)  # a decay steps zeros
  st = tx.init(params)
  for _ in range(2):
    u, st = tx.update(jax.tree.map(jnp.zeros_like, params), st, params)
    for x in jax.tree.leaves(u):
      assert np.all(np.asarray(x) == 0)


def _compiled_flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)['flops']


@pytest.mark.parametrize('nesterov', [False, True])
def test_plan_flops_match_compiled(nesterov):
  """The stage's declared FLOPs (§13.3.4) against XLA's count of the
  compiled step on one matrix (within 10%). XLA counts a loop body once, so
  Newton–Schulz's share is compared apart (its declared count is
  polar.standard_flops, checked in test_gram.py)."""
  shape = (96, 256)   # L = 256, s = 96, r = 24
  st = MS.TrionStep(rank=24, nesterov=nesterov)
  g = jnp.ones((1,) + shape)
  state = jax.tree.map(lambda a: a[None], st.initial_state(*shape,
                                                           jnp.float32))
  blocks = MS.Blocks(*shape)
  total = _compiled_flops(lambda o, s: st.apply(o, s, blocks), g, state)
  ns_compiled = _compiled_flops(
      lambda m: orthax.polar.newton_schulz(m, 'jordan'),
      jnp.ones((1, 256, 24)))
  ns_declared = orthax.polar.standard_flops(24, 256, 5)
  rest = (total - ns_compiled) / (st.flops(*shape) - ns_declared)
  assert abs(rest - 1) < 0.1, (total, ns_compiled, st.flops(*shape))


def test_docstring_examples_run():
  import doctest  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top
  for name in ('orthax.recipes.trion', 'orthax.transforms.trion'):
    mod = importlib.import_module(name)
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert res.attempted >= 1 and res.failed == 0, (mod, res)


MESHES = ['fsdp8', 'fsdp4tp2', 'explicit_fsdp8']


@pytest.fixture(scope='module')
def mesh_cases():
  return run_cases('dct_cases.py', timeout=900)


@pytest.mark.parametrize('mesh', MESHES)
def test_distributed_equals_one_device(mesh_cases, mesh):
  r = mesh_cases[f'trion/{mesh}']
  assert r['rel_err'] < 1e-5, r
  assert r['state_rel_err'] < 1e-5, r


@pytest.mark.parametrize('mesh', MESHES)
def test_slot_state_stays_with_its_owner(mesh_cases, mesh):
  """The buffers never travel: no all-gather, plain Muon's bytes, the state
  sharded over every mesh axis; the plan counts the stage's FLOPs (XLA
  counts Newton–Schulz's loop body once, 4/5 of its 5 steps are missing
  from the compiled count: hence the lower bound; the exact per-stage check
  is test_plan_flops_match_compiled)."""
  r = mesh_cases[f'trion/{mesh}']
  assert 'all-gather' not in r['collectives'], r
  assert r['plan_bytes'] == r['muon_plan_bytes'], r
  assert abs(r['wire_bytes'] - r['muon_wire_bytes']) <= 16, r
  assert r['state_sharded_over_all_axes'] and r['state_specs_owner'], r
  assert 0.7 * r['plan_flops'] <= r['flops'] <= 2 * r['plan_flops'], r
  assert r['flops'] < r['muon_flops'], r


@pytest.mark.parametrize('name', ['dct_adamw', 'trion'])
def test_an_int_rank_above_the_smaller_side_is_full_rank(name):
  """One ``rank`` for a tree of mixed sizes: 100 on a 16×32 matrix is 16."""
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)}
  grads = [{'w': jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)}
           for _ in range(2)]
  out = []
  for rank in (100, 16):
    tx = orthax.recipe(name, rank=rank)
    state = tx.init(params)
    for g in grads:
      u, state = tx.update(g, state, params)
    out.append(np.asarray(u['w']))
  np.testing.assert_array_equal(out[0], out[1])


def test_fraction_scale_steps_as_the_fraction_kept(x64):
  """At ``rank=0.25`` a side of 1 keeps its one column: unscaled, a
  Muon step at Trion's rate, 4× Muon's (a 64×1 head trained to 13×
  AdamW's loss at the defaults). The library mode scales the step by
  ``rank·s/r``: 1/4 there, 3/4 on a side of 6 (r = 2), exactly 1 where
  ``rank·s`` is whole; the buffers are the same either way."""
  rng = np.random.default_rng(7)
  shapes = {'head': (64, 1), 'odd': (6, 40), 'whole': (8, 64)}
  params = {k: jnp.asarray(rng.standard_normal(s)) for k, s in shapes.items()}
  grads = [{k: jnp.asarray(rng.standard_normal(s)) for k, s in shapes.items()}
           for _ in range(3)]
  matrix = orthax.Router(extra_rules=[orthax.Rule('.*', 'matrix')])
  runs = {}
  for scaled in (True, False):
    tx = orthax.trion(0.1, rank=0.25, weight_decay=0.0, router=matrix,
                      fraction_scale=scaled)
    state, ups = tx.init(params), []
    for g in grads:
      u, state = tx.update(g, state, params)
      ups.append(u)
    runs[scaled] = ups
  for t in range(3):
    np.testing.assert_allclose(runs[True][t]['head'],
                               0.25 * runs[False][t]['head'], rtol=1e-12)
    np.testing.assert_allclose(runs[True][t]['odd'],
                               0.75 * runs[False][t]['odd'], rtol=1e-12)
    np.testing.assert_array_equal(runs[True][t]['whole'],
                                  runs[False][t]['whole'])
  # The reference's step is unscaled.
  heads = []
  for kw in ({}, {'fraction_scale': True}):
    ista = orthax.trion(0.1, reference='ista', rank=0.25, router=matrix, **kw)
    heads.append(ista.update(grads[0], ista.init(params), params)[0]['head'])
  np.testing.assert_allclose(heads[1], 0.25 * heads[0], rtol=1e-12)
