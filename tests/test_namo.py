"""NAMO and NAMO-D vs float64 transcriptions of ALGORITHMS.md §4 (the
minxin-zhg/namo repository after the eps fix), plus invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
from reference_helpers import (AdamRef, assert_match, assert_zero_updates,
                               flat, from_torch, make_tree, ns, run_orthax,
                               torch_mats)


class NamoRef:
  """NAMO / NAMO_D ``.step()`` per torch matrix; AdamW (raw ε) for the rest,
  with the same lr and ``adamw_wd = wd``."""

  def __init__(self, params, lr, wd, diagonal, c=0.75, mu1=0.95, mu2=0.99,
               eps=1e-8, scale_coeff=0.2, shape='moonlight'):
    self.p = flat(params)
    self.shape = shape
    self.lr, self.wd, self.diag, self.c = lr, wd, diagonal, c
    self.mu1, self.mu2, self.eps, self.sc = mu1, mu2, eps, scale_coeff
    self.m, self.v, self.adam = {}, {}, {}
    for k, w in self.p.items():
      if k.endswith('kernel'):
        mats = torch_mats(w)
        self.m[k] = np.zeros_like(mats)
        self.v[k] = (np.zeros(mats.shape[::2]) if diagonal  # [L, cols]
                     else np.zeros(len(mats)))
      else:
        self.adam[k] = AdamRef(w, lr, 0.9, 0.95, 1e-8, wd, raw=True)
    self.t = 0

  def factor(self, a, b):
    """The shape factor of an out×in (a×b) matrix."""
    return (np.sqrt(max(a, b)) if self.shape == 'moonlight'
            else np.sqrt(max(1.0, a / b)))  # 'keller'

  def matrix(self, k, i, w, g):
    mu1, mu2, t = self.mu1, self.mu2, self.t
    a, b = w.shape
    self.m[k][i] = m = mu1 * self.m[k][i] + (1 - mu1) * g
    u = (1 - mu1) * g + mu1 * m
    o = ns(u)
    base = self.lr * np.sqrt(1 - mu2 ** t) / (1 - mu1 ** t + 1e-12)
    if not self.diag:
      self.v[k][i] = v = mu2 * self.v[k][i] + (1 - mu2) * np.sum(g * g)
      alpha = base * np.linalg.norm(u) / (np.sqrt(v) + self.eps)
      w = w * (1 - self.wd * min(alpha, 1))
      return w - min(alpha * self.sc * self.factor(a, b), 1) * o
    self.v[k][i] = v = (mu2 * self.v[k][i]
                        + (1 - mu2) * np.sum(g * g, axis=0))  # per column
    d = np.linalg.norm(u, axis=0) / (np.sqrt(v) + self.eps)
    if 0 < self.c <= 1:
      mean = np.nanmean(d)
      if np.isfinite(mean) and mean > 0:
        d = np.clip(d, self.c * mean, mean / self.c)
      else:
        d = np.clip(d, 0, np.inf)
    w = w * np.maximum(0, 1 - self.wd * np.minimum(d * base, 1))[None, :]
    eta = np.minimum(d * base * self.sc * self.factor(a, b), 1)
    return w - o * eta[None, :]

  def step(self, grads):
    self.t += 1
    for k, g in flat(grads).items():
      w = self.p[k]
      if k in self.adam:
        self.p[k] = self.adam[k].step(w, g, self.t)
        continue
      new = np.stack([self.matrix(k, i, wi, gi) for i, (wi, gi) in
                      enumerate(zip(torch_mats(w), torch_mats(g)))])
      self.p[k] = from_torch(new, w.shape)
    return dict(self.p)


# (recipe, lr, c): lr 2.0 drives the min(·, 1) clamps; c = 0.3 a loose clamp.
CASES = [('namo', 0.01, None), ('namo', 2.0, None), ('namo_d', 0.01, 0.75),
         ('namo_d', 2.0, 0.3)]


@pytest.mark.parametrize('name,lr,c', CASES,
                         ids=[f'{n}-lr{lr}' for n, lr, _ in CASES])
def test_matches_float64_transcription(x64, name, lr, c):
  params = make_tree(0)
  grads = [make_tree(100 + t) for t in range(6)]
  kw = {} if c is None else dict(clamp_c=c)
  # The repository runs its AdamW branch at the matrices' rate.
  tx = orthax.recipe(name, learning_rate=lr, adam_learning_rate=lr,
                     reference='repo', weight_decay=0.1, **kw)
  got = run_orthax(tx, params, grads)
  ref = NamoRef(params, lr, 0.1, diagonal=name == 'namo_d', c=c or 0.75)
  assert_match(got, [ref.step(g) for g in grads], 1e-9, 1e-12, name)


@pytest.mark.parametrize('name,lr', [('namo', 0.05), ('namo', 2.0),
                                     ('namo_d', 0.05)])
def test_keller_shape_matches_float64_transcription(x64, name, lr):
  """The default ``reference='orthax'``: ``shape='keller'``, the factor
  √max(1, out/in) (tall, wide and square kernels in the tree), times
  ``scale_coeff=2``."""
  params = make_tree(0)
  grads = [make_tree(100 + t) for t in range(4)]
  tx = orthax.recipe(name, learning_rate=lr, adam_learning_rate=lr,
                     weight_decay=0.1, adam_weight_decay=0.1)  # keller, c_s 2
  got = run_orthax(tx, params, grads)
  ref = NamoRef(params, lr, 0.1, diagonal=name == 'namo_d',
                scale_coeff=2.0, shape='keller')
  assert_match(got, [ref.step(g) for g in grads], 1e-9, 1e-12, name)


def test_bad_shape_is_named():
  with pytest.raises(ValueError, match="shape must be one of"):
    orthax.namo(shape='muon')


@pytest.mark.parametrize('name', ['namo', 'namo_d'])
def test_float32_close_to_float64_reference(name):
  params = make_tree(1, dtype=np.float32)
  grads = [make_tree(200 + t, dtype=np.float32) for t in range(5)]
  got = run_orthax(orthax.recipe(name, learning_rate=0.02,
                                 adam_learning_rate=0.02, reference='repo'),
                   params, grads)
  ref = NamoRef(make_tree(1), 0.02, 0.1, diagonal=name == 'namo_d')
  for t in range(5):
    want = ref.step(make_tree(200 + t))
  for k, w in want.items():
    np.testing.assert_allclose(got[-1][k], w, rtol=1e-4, atol=1e-5, err_msg=k)


def _diag_step(c, lr=0.01, shape=(64, 32)):
  """The per-input-feature steps d_j·base of NAMO-D's second update, read
  off the update with λ = 0 and W = 0 from Δ = -O·diag(η_j)."""
  scale = jnp.logspace(-2, 1, shape[0])[:, None]  # very unequal input rows
  gs = [jax.random.normal(jax.random.key(0), shape) * scale,
        jax.random.normal(jax.random.key(1), shape) * scale[::-1]]
  w = jnp.zeros(shape)
  tx = orthax.noise_adapt(orthax.momentum(0.95), orthax.orthogonalize(),
                          learning_rate=lr, mode='diagonal', weight_decay=0.0,
                          clamp_c=c, scale_coeff=1.0 / np.sqrt(max(shape)))
  ref = optax.chain(orthax.momentum(0.95), orthax.orthogonalize())
  st, rst = tx.init(w), ref.init(w)
  for g in gs:
    delta, st = tx.update(g, st, w)
    o, rst = ref.update(g, rst, w)
  return -jnp.sum(delta * o, axis=1) / jnp.sum(o * o, axis=1)


@pytest.mark.parametrize('c', [0.75, 0.9])
def test_namo_d_entries_within_clamp(c):
  eta = _diag_step(c)
  free = _diag_step(0.0)  # no clamp
  mean = jnp.mean(free)
  assert bool(jnp.any((free < c * mean) | (free > mean / c)))  # clamp active
  np.testing.assert_allclose(eta, jnp.clip(free, c * mean, mean / c),
                             rtol=1e-4)
  assert float(eta.min()) >= c * float(mean) * (1 - 1e-4)
  assert float(eta.max()) <= float(mean) / c * (1 + 1e-4)


@pytest.mark.parametrize('name', ['namo', 'namo_d'])
def test_zero_gradients_give_zero_updates(name):
  params = jax.tree.map(jnp.asarray, make_tree(4, dtype=np.float32))
  tx = orthax.recipe(name, weight_decay=0.0, adam_weight_decay=0.0)
  assert_zero_updates(tx, params, steps=2)


@pytest.mark.parametrize('name', ['namo', 'namo_d'])
def test_weight_decay_reaches_the_adamw_branch_in_the_repository_mode_only(
    name):
  """The library mode decays its AdamW branch by its own 0.1 whatever
  ``weight_decay`` is; ``reference='repo'`` shares ``weight_decay`` (the
  repository's class default); an explicit ``adam_weight_decay`` wins in
  both."""
  def decays(**kw):
    got = orthax.recipes.recipe_routing(
        orthax.recipe(name, **kw)).weight_decays
    return {k: got[k] for k in ('matrix', 'adam')}
  assert decays() == {'matrix': 0.4, 'adam': 0.1}
  assert decays(weight_decay=0.3) == {'matrix': 0.3, 'adam': 0.1}
  assert decays(reference='repo') == {'matrix': 0.1, 'adam': 0.1}
  assert decays(reference='repo', weight_decay=0.3) == {'matrix': 0.3,
                                                        'adam': 0.3}
  for ref in ('orthax', 'repo'):
    assert decays(reference=ref, weight_decay=0.3,
                  adam_weight_decay=0.05) == {'matrix': 0.3, 'adam': 0.05}


def test_state_sizes():
  params = jax.tree.map(jnp.asarray, make_tree(5, dtype=np.float32))
  for name, want in (('namo', {'a/kernel': (), 'stack/kernel': (3,)}),
                     ('namo_d', {'a/kernel': (64,), 'b/kernel': (32,),
                                 'stack/kernel': (3, 32)})):
    st = optax.tree.get(orthax.recipe(name).init(params), 'noise_adapt')
    shapes = {k: v.shape for k, v in flat(st.nu).items()}
    assert {k: shapes[k] for k in want} == want, name


def test_bad_inputs():
  with pytest.raises(ValueError, match='mode'):
    orthax.noise_adapt(orthax.momentum(), orthax.orthogonalize(),
                       learning_rate=0.1, mode='full')
  tx = orthax.noise_adapt(orthax.momentum(), orthax.orthogonalize(),
                          learning_rate=0.1)
  with pytest.raises(ValueError, match="'x/w'"):
    tx.init({'x': {'w': jnp.zeros(4)}})
  with pytest.raises(ValueError, match='params'):
    w = {'w': jnp.zeros((4, 4))}
    tx.update(w, tx.init(w))
  with pytest.raises(ValueError, match='reference'):
    orthax.namo(reference='levanter')


_SPECS = orthax.MatrixSpec.kernel()


def _namo(inner, mode):
  return orthax.noise_adapt(orthax.momentum(0.9), inner, learning_rate=0.3,
                            b1=0.9, mode=mode, clamp_c=0.5,
                            matrix_specs=_SPECS)


@pytest.mark.parametrize('mode', ['scalar', 'diagonal'])
@pytest.mark.parametrize('normuon', [False, True])
def test_step_in_orthogonalize_pass_equals_step_after_it(mode, normuon):
  """Wrapping an orthax.orthogonalize, NAMO's step runs as a matrix stage
  in its pass (on a mesh: in its shard_map body); wrapping any other
  transform (here the same chain), after it. Bit for bit the same, for
  updates and state, over three steps."""
  stages = [orthax.matrix_stages.NeuronNormalize(0.9)] if normuon else []
  fused = _namo(orthax.orthogonalize(matrix_specs=_SPECS, then=stages), mode)
  chained = [('orthogonalize', orthax.orthogonalize(matrix_specs=_SPECS))]
  if normuon:
    chained.append(('neuron_normalize',
                    orthax.neuron_normalize(0.9, matrix_specs=_SPECS)))
  after = _namo(optax.named_chain(*chained), mode)
  rng = np.random.default_rng(0)
  tree = lambda: {'w': jnp.asarray(rng.standard_normal((24, 40)),
                                   jnp.float32),
                  'tall': jnp.asarray(rng.standard_normal((40, 16)),
                                      jnp.float32)}
  params = tree()
  s1, s2 = fused.init(params), after.init(params)
  for _ in range(3):
    g = tree()
    u1, s1 = jax.jit(fused.update)(g, s1, params)
    u2, s2 = jax.jit(after.update)(g, s2, params)
    for k in params:
      np.testing.assert_array_equal(np.asarray(u1[k]), np.asarray(u2[k]))
  np.testing.assert_array_equal(s1.count, s2.count)
  for a, b in zip(jax.tree.leaves(s1.nu), jax.tree.leaves(s2.nu)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  if normuon:
    np.testing.assert_array_equal(
        np.asarray(optax.tree.get(s1, 'neuron_normalize').nu['w']),
        np.asarray(optax.tree.get(s2, 'neuron_normalize').nu['w']))


def test_update_with_stages_needs_the_aux_tree():
  tx = orthax.orthogonalize()
  w = {'w': jnp.ones((4, 6))}
  step = orthax.matrix_stages.NoiseAdaptStep('scalar', 0.1, 1)
  with pytest.raises(ValueError, match="'aux'"):
    tx.update_with_stages(w, tx.init(w), [step], [[jnp.zeros(())]])
  with pytest.raises(ValueError, match='mode'):
    orthax.matrix_stages.NoiseAdaptStep('full', 0.1, 1)
