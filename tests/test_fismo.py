"""FISMO (ALGORITHMS.md §13.2, a reconstruction): a float64 NumPy
transcription of the rule, the huge-damping limit (Muon with EMA momentum,
with and without Nesterov), the factors' invariants, and the recipe on 8 fake devices
(``fismo_cases.py``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import trees
import orthax
from orthax import matrix_stages as MS
from orthax.matrices import MatrixSpec

from fake_devices import run_cases  # noqa: E402  pylint: disable=g-import-not-at-top

JORDAN = (3.4445, -4.7750, 2.0315)

# Leaf: (shape, spec). Wide, tall and square, as Flax kernels (in, out) and
# as PyTorch weights (out, in), plus a stack of kernels.
LEAVES = {
    'wide': ((12, 20), MatrixSpec()),
    'tall': ((20, 12), MatrixSpec()),
    'square': ((16, 16), MatrixSpec()),
    'wide_t': ((12, 20), MatrixSpec.torch_linear()),
    'tall_t': ((20, 12), MatrixSpec.torch_linear()),
    'stack': ((3, 12, 16), MatrixSpec.stacked(0)),
}


def _ns(u, steps=5, eps=1e-7):
  """Newton–Schulz (Keller Jordan's quintic) in float64, wide orientation."""
  tall = u.shape[0] > u.shape[1]
  x = u.T if tall else u
  x = x / (np.linalg.norm(x) + eps)
  a, b, c = JORDAN
  for _ in range(steps):
    g = x @ x.T
    x = a * x + (b * g + c * g @ g) @ x
  return x.T if tall else x


def _power(s, p, floor):
  w, v = np.linalg.eigh(s)
  return (v * np.maximum(w, floor) ** p) @ v.T


def _factor(old, stat, gamma, mu, invariant=False):
  k = old.shape[0]
  if invariant:  # the statistic at mean eigenvalue 1, μ relative to it
    x = gamma * old + (1 - gamma) * (k * stat / np.trace(stat)
                                     + mu * np.eye(k))
  else:
    x = gamma * old + (1 - gamma) * (stat + mu * np.trace(old) / k
                                     * np.eye(k))
  x = k * x / np.trace(x)
  return (x + x.T) / 2


class FismoRef:
  """§13.2.1 on one PyTorch-layout matrix ``G`` (m×n), float64."""

  def __init__(self, m, n, beta, gamma, mu, floor=1e-6, scale=1.0,
               every=1, nesterov=False, invariant=False):
    self.p, self.q, self.mom = np.eye(m), np.eye(n), np.zeros((m, n))
    self.beta, self.gamma, self.mu, self.floor = beta, gamma, mu, floor
    self.nesterov, self.invariant = nesterov, invariant
    self.scale, self.every, self.t = scale, every, 0
    # Inverse roots as of the last refresh (``every`` > 1 only).
    self.roots = {'p': (np.eye(m), np.eye(m)), 'q': (np.eye(n), np.eye(n))}

  def _roots(self, side, x):
    if self.every == 1 or (self.t - 1) % self.every == 0:
      self.roots[side] = (_power(x, -1, self.floor),
                          _power(x, -0.5, self.floor))
    return self.roots[side]

  def step(self, g):
    m, n = g.shape
    self.t += 1
    if self.every == 1:  # the method as written: Q⁻¹ of the old Q
      q_inv = _power(self.q, -1, self.floor)
    else:
      q_inv = self.roots['q'][0]
    left = g @ q_inv @ g.T / n
    self.p = _factor(self.p, left, self.gamma, self.mu, self.invariant)
    p_inv, pr = self._roots('p', self.p)
    right = g.T @ p_inv @ g / m
    self.q = _factor(self.q, right, self.gamma, self.mu, self.invariant)
    _, qr = self._roots('q', self.q)
    white = pr @ g @ qr
    self.mom = self.beta * self.mom + (1 - self.beta) * white
    look = self.mom
    if self.nesterov:
      look = self.beta * self.mom + (1 - self.beta) * white
    return self.scale * pr @ _ns(look) @ qr


def _torch(x, spec):
  """The leaf's matrices as PyTorch weights [b, out, in]."""
  k = np.asarray(orthax.matrices.to_matrices(jnp.asarray(x), spec))
  return np.swapaxes(k, -1, -2)


def _grads(seed, dtype):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.standard_normal(s), dtype)
          for k, (s, _) in LEAVES.items()}


SPECS = {k: spec for k, (_, spec) in LEAVES.items()}


@pytest.mark.parametrize('every,nesterov,invariant', [
    (1, False, False), (3, False, False), (1, True, False), (3, True, False),
    (1, True, True), (3, False, True)])
def test_matches_float64_transcription(x64, every, nesterov, invariant):
  beta, gamma, mu = 0.9, 0.8, 0.05
  tx = orthax.transforms.scale_by_fismo(beta, gamma, mu, matrix_specs=SPECS,
                                        precondition_every=every,
                                        nesterov=nesterov,
                                        scale_invariant=invariant)
  state = tx.init(_grads(0, jnp.float64))
  refs = {}
  step = jax.jit(tx.update)
  for t in range(5):
    g = _grads(t + 1, jnp.float64)
    u, state = step(g, state)
    for k, spec in SPECS.items():
      got = _torch(u[k], spec)
      want = []
      for b, gm in enumerate(_torch(g[k], spec)):
        m, n = gm.shape
        ref = refs.setdefault((k, b), FismoRef(
            m, n, beta, gamma, mu, scale=np.sqrt(max(1.0, m / n)),
            every=every, nesterov=nesterov, invariant=invariant))
        want.append(ref.step(gm))
      want = np.stack(want)
      err = np.linalg.norm(got - want) / np.linalg.norm(want)
      assert err < 1e-9, (t, k, err)
  # The transcription's factors are not near the identity (a real test).
  assert max(np.linalg.norm(r.p - np.eye(len(r.p))) for r in refs.values()) \
      > 0.1


def _factors(state):
  """(p, q) arrays of every live matrix in the slot state."""
  out = []
  if not isinstance(state, orthax.transforms.SlotStepState):
    state = optax.tree.get(state, 'fismo')  # inside the recipe
  for group in state.slots.slots.values():
    p = np.asarray(group['p'], np.float64).reshape(
        (-1,) + group['p'].shape[-2:])
    q = np.asarray(group['q'], np.float64).reshape(
        (-1,) + group['q'].shape[-2:])
    out += list(zip(p, q))
  return out


def test_factors_stay_symmetric_with_trace_m_and_n():
  tx = orthax.transforms.scale_by_fismo(damping=1e-3, matrix_specs=SPECS)
  state = tx.init(_grads(0, jnp.float32))
  for t in range(4):
    _, state = jax.jit(tx.update)(_grads(t + 1, jnp.float32), state)
  pairs = _factors(state)
  assert pairs
  for p, q in pairs:
    for f in (p, q):
      np.testing.assert_array_equal(f, f.T)
      assert abs(np.trace(f) - len(f)) < 1e-4 * len(f)
      assert np.linalg.eigvalsh(f).min() > 0
    assert np.linalg.norm(p - np.eye(len(p))) > 1e-2  # they moved


@pytest.mark.parametrize('nesterov', [False, True, None])
def test_huge_damping_is_muon_with_ema_momentum(nesterov):
  """``None``: both recipes' defaults, which are Nesterov's look-ahead."""
  params = trees.mixed_params()
  grads = trees.grads_for(params, steps=3)
  # Both branches' rates and decays given: the recipes' defaults differ.
  same = dict(weight_decay=0.2, adam_learning_rate=1.5e-3,
              adam_weight_decay=0.0)
  if nesterov is not None:
    same.update(nesterov=nesterov)
  fis = orthax.fismo(0.02, damping=1e14, **same)
  muon = orthax.muon(0.02, **same)
  sf, sm = fis.init(params), muon.init(params)
  for g in grads:
    uf, sf = jax.jit(fis.update)(g, sf, params)
    um, sm = jax.jit(muon.update)(g, sm, params)
    for a, b in zip(jax.tree.leaves(uf), jax.tree.leaves(um)):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      assert np.linalg.norm(a - b) <= 2e-6 * np.linalg.norm(b)


def test_differs_from_muon_at_a_small_damping():
  params = trees.mixed_params()
  g = trees.grads_for(params, steps=1)[0]
  fis = orthax.fismo(0.02, nesterov=False, weight_decay=0.0)
  muon = orthax.muon(0.02, nesterov=False, weight_decay=0.0)
  uf, _ = fis.update(g, fis.init(params), params)
  um, _ = muon.update(g, muon.init(params), params)
  a = np.asarray(uf['blocks']['0']['mlp']['kernel'])
  b = np.asarray(um['blocks']['0']['mlp']['kernel'])
  assert np.linalg.norm(a - b) > 1e-2 * np.linalg.norm(b)


def _spectral_norms(scale, steps=20, **kw):
  """Spectral norms of FISMO's direction over ``steps`` random gradients
  of std ``scale`` on a 32 × 16 kernel (fan-in the longer side)."""
  rng = np.random.default_rng(0)
  tx = orthax.transforms.scale_by_fismo(nesterov=True, **kw)
  g0 = {'w': jnp.zeros((32, 16))}
  state, step, out = tx.init(g0), jax.jit(tx.update), []
  for _ in range(steps):
    g = {'w': jnp.asarray(rng.standard_normal((32, 16)) * scale,
                          jnp.float32)}
    u, state = step(g, state)
    out.append(np.asarray(u['w'], np.float64))
  return out


def test_scale_invariant_steps_do_not_depend_on_the_gradient_scale():
  """The summarised rule's damping is absolute: gradients of std 10 make
  the averages keep little of the past, the fan-in factor near-singular,
  and the step's spectral norm grows over 1000-fold in 20 steps (the
  docstring's hazard). ``scale_invariant`` averages the statistics at mean
  eigenvalue 1: the same steps, bit for bit, for gradients of std 1, 2⁷
  and 2²⁰ (powers of two: the same numbers throughout), and no growth.
  At 2⁻¹⁰ only Newton–Schulz's absolute ε (10⁻⁷ against a look-ahead of
  norm about 2·10⁻³, as in Muon) moves them, by about 10⁻⁴."""
  norm2 = lambda u: np.linalg.norm(u, 2)  # pylint: disable=unnecessary-lambda-assignment
  raw = _spectral_norms(10.0)
  assert norm2(raw[-1]) > 1000 * norm2(raw[0])
  steps = {c: _spectral_norms(c, scale_invariant=True)
           for c in (2.0 ** -10, 1.0, 2.0 ** 7, 2.0 ** 20)}
  for got, want, big, small in zip(steps[2.0 ** 7], steps[1.0],
                                   steps[2.0 ** 20], steps[2.0 ** -10]):
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(big, want)
    assert np.abs(small - want).max() <= 2e-4 * np.abs(want).max()
  assert norm2(steps[2.0 ** 7][-1]) < 2 * norm2(steps[2.0 ** 7][0])


def test_zero_and_huge_gradients_stay_finite():
  tx = orthax.transforms.scale_by_fismo(matrix_specs=SPECS)
  state = tx.init(_grads(0, jnp.float32))
  zero = jax.tree.map(jnp.zeros_like, _grads(0, jnp.float32))
  u, state = jax.jit(tx.update)(zero, state)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u))
  huge = jax.tree.map(lambda x: x * 1e19, _grads(1, jnp.float32))
  u, state = jax.jit(tx.update)(huge, state)
  for x in jax.tree.leaves((u, state)):
    assert np.all(np.isfinite(np.asarray(x)))
  assert all(np.any(np.asarray(x)) for x in jax.tree.leaves(u))


def test_injected_hyperparameters_equal_plain():
  params = trees.mixed_params()
  grads = trees.grads_for(params, steps=2)
  kw = dict(learning_rate=0.01, beta=0.9, gamma=0.8, damping=0.05)
  plain = orthax.fismo(**kw)
  inj = optax.inject_hyperparams(orthax.fismo)(**kw)
  sp, si = plain.init(params), inj.init(params)
  for g in grads:
    up, sp = jax.jit(plain.update)(g, sp, params)
    ui, si = jax.jit(inj.update)(g, si, params)
  for a, b in zip(jax.tree.leaves(ui), jax.tree.leaves(up)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_refreshing_less_often_differs_and_caches_two_roots():
  g = _grads(1, jnp.float32)
  every = {k: orthax.transforms.scale_by_fismo(
      damping=0.05, matrix_specs=SPECS, precondition_every=k) for k in (1, 2)}
  states = {k: tx.init(g) for k, tx in every.items()}
  ups = {}
  for t in range(2):
    for k, tx in every.items():
      ups[k], states[k] = tx.update(_grads(t + 1, jnp.float32), states[k])
  group = next(iter(states[2].slots.slots.values()))
  assert set(group) == {'p', 'q', 'm', 'p_isqrt', 'q_isqrt'}
  assert set(next(iter(states[1].slots.slots.values()))) == {
      'p', 'q', 'm', 'q_isqrt'}
  # Step 2 reuses step 1's roots when k = 2: a different update.
  err = np.linalg.norm(ups[2]['wide'] - ups[1]['wide'])
  assert err > 1e-3 * np.linalg.norm(ups[1]['wide'])


@pytest.mark.parametrize('bad,error', [
    (0, ValueError), (2.0, TypeError), (True, TypeError)])
def test_precondition_every_is_a_positive_int(bad, error):
  with pytest.raises(error, match='fismo: precondition_every'):
    orthax.fismo(precondition_every=bad)


def test_stage_declares_flops_and_needs_whole_matrices():
  st = MS.FismoStep(ns_steps=1, ns_method='standard')
  n = m = 32
  ns = orthax.polar.standard_flops(n, m, 1)
  # Products 8(m²n + mn²) − 2nm², two eigh 9k³ and two roots 2k³ each.
  assert st.flops(n, m) == 14 * n ** 3 + 18 * n ** 3 + 4 * n ** 3 + ns
  tall = MS.FismoStep(ns_steps=1, ns_method='standard')
  ns = orthax.polar.standard_flops(8, 24, 1)
  assert tall.flops(8, 24) == (8 * (24 * 24 * 8 + 24 * 8 * 8) - 2 * 8 * 24 * 24
                               + 11 * (24 ** 3 + 8 ** 3) + ns)
  # Refreshing every 10 steps: the roots' share is a tenth, and where
  # fan-out is the shorter side 9 of 10 steps whiten with P^{-1/2} (2m²n).
  every = MS.FismoStep(ns_steps=1, ns_method='standard',
                       precondition_every=10)
  n, m = 24, 8
  assert every.flops(n, m) == (
      6 * (m * m * n + m * n * n) + (2 * m * n * n + 9 * 2 * m * m * n) // 10
      + 11 * (n ** 3 + m ** 3) // 10 + orthax.polar.standard_flops(n, m, 1))
  assert every.flops(m, n) == (
      6 * (n * n * m + n * m * m) + 2 * n * m * m
      + 11 * (n ** 3 + m ** 3) // 10 + orthax.polar.standard_flops(n, m, 1))
  with pytest.raises(ValueError, match='whole matrices'):
    MS.split_sums(st, 8, 16, -1)


@pytest.mark.parametrize('kw,match', [
    (dict(damping=0.0), 'damping must be > 0'),
    (dict(gamma=1.0), r'gamma must be in \[0, 1\)'),
    (dict(beta=1.0), r'beta must be in \[0, 1\)'),
    (dict(eig_floor=0.0), 'eig_floor must be > 0'),
])
def test_hyperparameters_are_checked(kw, match):
  with pytest.raises(ValueError, match='fismo: ' + match):
    orthax.fismo(**kw)


def test_bad_modes_are_rejected():
  with pytest.raises(ValueError, match='^fismo: scale must be one of'):
    orthax.fismo(scale='rows')
  with pytest.raises(ValueError, match='method'):
    orthax.fismo(ns_method='svd')


@pytest.fixture(scope='module')
def mesh_cases():
  return run_cases('fismo_cases.py', timeout=900)


MESHES = ['fsdp8', 'fsdp4tp2', 'explicit_fsdp8']


@pytest.mark.parametrize('mesh', MESHES)
def test_on_8_devices_equals_one_device(mesh_cases, mesh):
  r = mesh_cases[mesh]
  assert r['rel_err'] < 1e-5, r
  assert r['state_rel_err'] < 1e-5, r


@pytest.mark.parametrize('mesh', MESHES)
def test_slot_state_is_sharded_and_never_gathered(mesh_cases, mesh):
  r = mesh_cases[mesh]
  assert 'all-gather' not in r['collectives'], r
  assert r['state_sharded_over_all_axes'], r
  assert r['state_specs_owner'], r
  # The plan's bytes are Muon's (the stage moves nothing of its own), and
  # the compiled step moves what the plan says plus check_finite's flag.
  assert r['plan_bytes'] == r['muon_plan_bytes'], r
  assert abs(r['wire_bytes'] - r['muon_wire_bytes']) <= 16, r


def test_plan_flops_match_the_compiled_program(mesh_cases):
  """XLA's cost analysis counts no ``eigh`` (a LAPACK custom call on CPU)
  and a Newton–Schulz loop body once: with one Newton–Schulz step, the
  plan's FLOPs less its ``eigh`` estimate are the compiled program's within
  the element-wise work (a few percent)."""
  r = mesh_cases['flops']
  assert 0.95 < r['compiled'] / r['plan_without_eigh'] < 1.15, r
