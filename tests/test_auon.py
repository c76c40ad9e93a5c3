"""AuON and Hybrid-AuON: the cosh brake and the recipes vs float64
transcriptions of the paper formula and of ryyzn9/AuON @ bba2e82
(``shared/ALGORITHMS.md`` §5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import orthax
from reference_helpers import flat, make_tree, ns, run_orthax, torch_mats


def test_paper_formula_and_brake_size():
  """U = X/(r + 1e-8), X = G/(‖G‖_F + 1e-7), r = ‖cosh X‖_F/√N; and
  r - 1 ≈ γ²/2N (the brake is ≈ 1 at realistic sizes)."""
  g = np.random.default_rng(0).standard_normal((40, 24)).astype(np.float32)
  g[3, 5] = 100.0  # an outlier
  tx = orthax.cosh_normalize()
  u, _ = tx.update({'w': jnp.asarray(g)}, tx.init(None))
  x = g / (np.linalg.norm(g) + 1e-7)
  r = np.linalg.norm(np.cosh(x)) / np.sqrt(x.size)
  np.testing.assert_allclose(u['w'], x / (r + 1e-8), rtol=1e-6)
  assert 0 < r - 1 < 1e-3  # even with a 100σ outlier
  x = np.random.default_rng(1).standard_normal((40, 24))
  x /= np.linalg.norm(x)
  for gamma in (1.0, 1.5, 3.0):
    r = np.sqrt(np.mean(np.cosh(gamma * x) ** 2))
    np.testing.assert_allclose(r - 1, gamma**2 / (2 * x.size), rtol=0.05)


def test_zero_gradient_gives_zero_update():
  """Without decay (Hybrid-AuON's library mode decays by default)."""
  params = {'w': jnp.ones((8, 16)), 'b': jnp.ones((16,))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  for name in ('auon', 'hybrid_auon'):
    for ref in orthax.recipe_references(name):
      tx = orthax.recipe(name, learning_rate=0.1, reference=ref,
                         weight_decay=0.0)
      u, _ = tx.update(zeros, tx.init(params), params)
      for x in jax.tree.leaves(u):
        assert np.all(np.asarray(x) == 0), (name, ref)


def test_linear_time():
  """AuON's matrix work is O(mn): compiled FLOPs per entry stay constant as
  the matrix grows (Newton–Schulz's grow with the width)."""
  def flops(name, m, n):
    params = {'w': jnp.zeros((m, n))}
    tx = orthax.recipe(name, learning_rate=0.1, check_finite=False)
    c = jax.jit(tx.update).lower(params, tx.init(params), params).compile()
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost['flops'] / (m * n)
  small, big = flops('auon', 64, 128), flops('auon', 256, 512)
  assert big <= 1.2 * small and big < 100, (small, big)
  assert flops('muon', 256, 512) > 20 * big


# Transcriptions (float64, PyTorch layout) ---------------------------------------


def auon_matrix_update(u, reference, hybrid):
  """The per-matrix direction (before lr), torch layout (out, in)."""
  if reference == 'paper':
    if hybrid:  # one NS step, brake on the NS output itself
      o = ns(u, steps=1)
      r = np.linalg.norm(np.cosh(o)) / np.sqrt(o.size)
      d = o / (r + 1e-8)
    else:
      x = u / (np.linalg.norm(u) + 1e-7)
      r = np.linalg.norm(np.cosh(x)) / np.sqrt(x.size)
      d = x / (r + 1e-8)
    return d * np.sqrt(max(1, u.shape[0] / u.shape[1]))
  g = ns(u, steps=5) if hybrid else u  # auon/optimizer.py @ bba2e82
  gn = g / (np.linalg.norm(g) + 1e-7)
  r = np.sqrt(np.mean(np.cosh(1.5 * gn) ** 2))
  return g / (r + 1e-8)


class AuONReference:
  """Matrices: AuON / HybridAuON; the rest: Adam(0.9, 0.95, 1e-8), no wd."""

  def __init__(self, params, lr, wd, reference, hybrid, beta=0.95):
    self.p = {k: v.copy() for k, v in flat(params).items()}
    self.buf = {k: np.zeros_like(v) for k, v in self.p.items()}
    self.v = {k: np.zeros_like(v) for k, v in self.p.items()}
    self.lr, self.wd, self.beta = lr, wd, beta
    self.reference, self.hybrid, self.t = reference, hybrid, 0

  def step(self, grads):
    self.t += 1
    for k, g in flat(grads).items():
      w = self.p[k]
      if k.endswith('kernel'):
        shape = w.shape
        ws, gs, bs = torch_mats(w), torch_mats(g), torch_mats(self.buf[k])
        nw, nb = [], []
        for wi, gi, bi in zip(ws, gs, bs):
          wi = wi * (1 - self.lr * self.wd)
          bi = bi + (1 - self.beta) * (gi - bi)      # m.lerp_(grad, 1-β)
          u = gi + self.beta * (bi - gi)             # grad.lerp_(m, β)
          wi = wi - self.lr * auon_matrix_update(u, self.reference,
                                                 self.hybrid)
          nw.append(wi.T)
          nb.append(bi.T)
        self.p[k] = np.stack(nw).reshape(shape)
        self.buf[k] = np.stack(nb).reshape(shape)
      else:
        m = self.buf[k] = 0.9 * self.buf[k] + 0.1 * g
        v = self.v[k] = 0.95 * self.v[k] + 0.05 * g * g
        mh, vh = m / (1 - 0.9 ** self.t), v / (1 - 0.95 ** self.t)
        self.p[k] = w - self.lr * mh / (np.sqrt(vh) + 1e-8)


CASES = [(name, ref) for name in ('auon', 'hybrid_auon')
         for ref in ('paper', 'repo')]


@pytest.mark.parametrize('name,reference', CASES)
def test_reference_modes_match_float64_transcription(x64, name, reference):
  params = make_tree(0)
  grads = [make_tree(100 + t) for t in range(6)]
  lr, wd = 0.02, 0.1
  # The transcription's Adam branch runs at the matrices' rate.
  tx = orthax.recipe(name, learning_rate=lr, reference=reference,
                     weight_decay=wd, adam_learning_rate=lr)
  got = run_orthax(tx, params, grads)
  ref = AuONReference(params, lr, wd, reference, name == 'hybrid_auon')
  for t, g in enumerate(grads):
    ref.step(g)
    for k, w in ref.p.items():
      np.testing.assert_allclose(got[t][k], w, rtol=1e-9, atol=1e-12,
                                 err_msg=f'{name} {reference} step {t} {k}')


@pytest.mark.parametrize('name,reference', CASES)
def test_float32_close_to_float64_reference(name, reference):
  params = make_tree(1, dtype=np.float32)
  grads = [make_tree(200 + t, dtype=np.float32) for t in range(5)]
  tx = orthax.recipe(name, learning_rate=0.02, reference=reference,
                     adam_learning_rate=0.02)
  got = run_orthax(tx, params, grads)
  ref = AuONReference(make_tree(1), 0.02, 0.0, reference,
                      name == 'hybrid_auon')
  for t in range(5):
    ref.step(make_tree(200 + t))
  for k, w in ref.p.items():
    np.testing.assert_allclose(got[-1][k], w, rtol=1e-4, atol=1e-5,
                               err_msg=f'{name} {reference} {k}')


def test_bad_inputs():
  with pytest.raises(ValueError, match='brake_input'):
    orthax.cosh_normalize(brake_input='cosh')
  with pytest.raises(ValueError, match='reference'):
    orthax.auon(reference='torch')
  g = {'x': {'w': jnp.ones((2, 3, 4))}}
  tx = orthax.cosh_normalize()
  with pytest.raises(ValueError, match='x/w'):
    tx.update(g, tx.init(g))
