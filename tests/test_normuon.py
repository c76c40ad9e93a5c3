"""NorMuon (repo, paper and modded-nanogpt forms) vs float64 transcriptions of
ALGORITHMS.md §3.1, §3.3 and §12, plus the normalizer's invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
from reference_helpers import (AdamRef, SHAPES, assert_match,
                               assert_zero_updates, flat, from_torch,
                               make_tree, ns, polar_express, run_orthax,
                               torch_mats)


class NorMuonRef:
  """Per torch matrix ``W (m×n)``; AdamW (Keller's aux Adam) for the rest."""

  def __init__(self, params, reference, lr, wd, beta=0.95):
    self.p = flat(params)
    self.ref, self.lr, self.wd, self.beta = reference, lr, wd, beta
    self.beta2 = 0.9 if reference == 'modded' else 0.95
    self.buf, self.v, self.adam = {}, {}, {}
    for k, w in self.p.items():
      if k.endswith('kernel'):
        self.buf[k] = np.zeros_like(torch_mats(w))
        self.v[k] = [None] * len(self.buf[k])
      else:
        self.adam[k] = AdamRef(w, lr, 0.9, 0.95, 1e-10, 0.0, raw=False)
    self.t = 0

  def matrix(self, k, i, w, g):
    b, m, n = self.beta, *w.shape
    if self.ref == 'paper':
      buf = self.buf[k][i] = b * self.buf[k][i] + (1 - b) * g
      o = ns(buf)
    else:  # lerp momentum, nesterov lerp
      buf = self.buf[k][i] = self.buf[k][i] + (1 - b) * (g - self.buf[k][i])
      u = g + b * (buf - g)
      o = polar_express(u) if self.ref == 'modded' else ns(u)
    axis = 1 if (self.ref != 'modded' or m >= n) else 0
    stat = np.mean(o * o, axis=axis, keepdims=True)
    v = self.v[k][i]
    v = (1 - self.beta2) * stat if v is None else (
        self.beta2 * v + (1 - self.beta2) * stat)
    self.v[k][i] = v
    if self.ref == 'repo':
      oh = o / (np.sqrt(v) + 1e-10)
      oh = oh * np.linalg.norm(o) / (np.linalg.norm(oh) + 1e-10)
      oh = oh * np.sqrt(max(1, m / n))
      return w * (1 - self.lr * self.wd) - self.lr * oh
    if self.ref == 'paper':
      oh = o / (np.sqrt(v) + 1e-10)
      eta_hat = 0.2 * self.lr * np.sqrt(m * n) / np.linalg.norm(oh)
      return w - self.lr * self.wd * w - eta_hat * oh
    oh = o / np.sqrt(np.maximum(v, 1e-10))  # modded
    oh = oh * np.linalg.norm(o) / max(np.linalg.norm(oh), 1e-10)
    lr_eff = self.lr * np.sqrt(max(1, m / n))
    mask = (oh * w >= 0)
    return w - self.wd * self.lr * lr_eff * w * mask - lr_eff * oh

  def step(self, grads):
    self.t += 1
    for k, g in flat(grads).items():
      w = self.p[k]
      if k in self.adam:
        self.p[k] = self.adam[k].step(w, g, self.t)
        continue
      ws, gs = torch_mats(w), torch_mats(g)
      new = np.stack([self.matrix(k, i, wi, gi)
                      for i, (wi, gi) in enumerate(zip(ws, gs))])
      self.p[k] = from_torch(new, w.shape)
    return dict(self.p)


CASES = [('repo', 0.0), ('paper', 0.1), ('modded', 1.2)]


@pytest.mark.parametrize('reference,wd', CASES, ids=[c[0] for c in CASES])
def test_reference_modes_match_float64_transcription(x64, reference, wd):
  params = make_tree(0)
  grads = [make_tree(100 + t) for t in range(6)]
  lr = 0.05
  # The transcription's Adam branch runs at the matrices' rate.
  tx = orthax.normuon(lr, reference=reference, weight_decay=wd,
                      adam_learning_rate=lr)
  got = run_orthax(tx, params, grads)
  ref = NorMuonRef(params, reference, lr, wd)
  assert_match(got, [ref.step(g) for g in grads], 1e-9, 1e-12, reference)


@pytest.mark.parametrize('reference', ['repo', 'modded'])
def test_float32_close_to_float64_reference(reference):
  wd = 1.2 if reference == 'modded' else 0.0
  params = make_tree(1, dtype=np.float32)
  grads = [make_tree(200 + t, dtype=np.float32) for t in range(5)]
  got = run_orthax(orthax.normuon(0.05, reference=reference, weight_decay=wd,
                                  adam_learning_rate=0.05), params, grads)
  ref = NorMuonRef(make_tree(1), reference, 0.05, wd)
  for t in range(5):
    want = ref.step(make_tree(200 + t))
  for k, w in want.items():
    np.testing.assert_allclose(got[-1][k], w, rtol=1e-4, atol=1e-5,
                               err_msg=k)


def _apply(tx, x, steps):
  state = tx.init(x)
  upd = jax.jit(tx.update)
  for _ in range(steps):
    out, state = upd(x, state)
  return out, state


@pytest.mark.parametrize('shape', [(64, 32), (32, 64), (3, 32, 48)])
def test_equal_neuron_rms_when_v_converged(shape):
  """With a constant input, v → mean(O⊙O) per neuron, so every output neuron
  (kernel column) of the normalized update has the same RMS; the Frobenius
  norm is that of the input."""
  o = jax.random.normal(jax.random.key(0), shape)
  o = o * jnp.linspace(0.1, 3.0, shape[-1])  # very unequal neurons
  spec = orthax.MatrixSpec()
  tx = orthax.neuron_normalize(0.5, 1e-10, matrix_specs=spec)
  out, state = _apply(tx, o, 60)
  rms = jnp.sqrt(jnp.mean(out * out, axis=-2))  # per kernel column
  np.testing.assert_allclose(
      rms, np.broadcast_to(rms.mean(axis=-1, keepdims=True), rms.shape),
      rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(out, axis=(-2, -1)),
                             jnp.linalg.norm(o, axis=(-2, -1)), rtol=1e-5)
  assert state.nu.shape == shape[:-2] + (shape[-1],)


def test_longer_axis_and_clamp():
  """axis='longer' keeps the statistic along the longer side."""
  tx = orthax.neuron_normalize(axis='longer', eps_placement='clamp',
                               matrix_specs=orthax.MatrixSpec())
  wide = tx.init({'w': jnp.zeros((64, 32)), 's': jnp.zeros((3, 32, 48))})
  assert wide.nu['w'].shape == (64,)      # out=32 < in=64: per input feature
  assert wide.nu['s'].shape == (3, 48)    # out ≥ in: per output neuron
  o = {'w': jax.random.normal(jax.random.key(1), (64, 32)),
       's': jax.random.normal(jax.random.key(2), (3, 32, 48))}
  out, _ = tx.update(o, wide)
  for k in o:
    np.testing.assert_allclose(jnp.linalg.norm(out[k], axis=(-2, -1)),
                               jnp.linalg.norm(o[k], axis=(-2, -1)), rtol=1e-5)


def test_scale_to_rms():
  x = jax.random.normal(jax.random.key(3), (3, 32, 48)) * 7
  out, _ = orthax.scale_to_rms(0.2, matrix_specs=orthax.MatrixSpec()).update(
      x, optax.EmptyState())
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(out ** 2, axis=(-2, -1))),
                             0.2, rtol=1e-5)


@pytest.mark.parametrize('reference', ['repo', 'paper', 'modded'])
def test_zero_gradients_give_zero_updates(reference):
  params = jax.tree.map(jnp.asarray, make_tree(4, dtype=np.float32))
  tx = orthax.normuon(0.02, reference=reference, weight_decay=0.0)
  assert_zero_updates(tx, params, steps=2)


def test_bad_inputs_name_the_leaf():
  with pytest.raises(ValueError, match='axis'):
    orthax.neuron_normalize(axis='rows')
  with pytest.raises(ValueError, match='eps_placement'):
    orthax.neuron_normalize(eps_placement='inside')
  with pytest.raises(ValueError, match='reference'):
    orthax.normuon(reference='dion')
  with pytest.raises(ValueError, match="'net/w'"):
    orthax.neuron_normalize().init({'net': {'w': jnp.zeros((2, 3, 4))}})


def test_state_is_one_vector_per_matrix():
  params = jax.tree.map(jnp.asarray, make_tree(5, dtype=np.float32))
  st = optax.tree.get(orthax.normuon().init(params), 'neuron_normalize')
  shapes = {k: v.shape for k, v in flat(st.nu).items()}
  assert shapes == {'a/kernel': (32,), 'b/kernel': (64,), 'c/kernel': (48,),
                    'stack/kernel': (3, 48)}
  assert set(SHAPES) > set(shapes)
