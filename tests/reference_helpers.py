"""Shared helpers for the float64 reference tests (Muon, ROOT, AuON, SPECTRA,
NorMuon, NAMO, LANTON).

The float64 NumPy transcriptions in the test files are written from
``shared/ALGORITHMS.md`` in PyTorch layout: a weight is ``(out, in)``, a Flax
kernel ``(in, out)`` is its transpose, a stacked kernel ``(L, in, out)`` is
``L`` such weights. The ``x64`` fixture is in ``conftest.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import orthax

JORDAN = ((3.4445, -4.7750, 2.0315),)
POLAR_EXPRESS_C = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
SHAPES = {'a/kernel': (64, 32), 'b/kernel': (32, 64), 'c/kernel': (48, 48),
          'stack/kernel': (3, 32, 48), 'b/bias': (64,), 'ln/scale': (48,)}


def make_tree(seed, shapes=SHAPES, dtype=np.float64):
  """A nested dict of standard-normal leaves, one per ``'a/b': shape`` entry."""
  rng = np.random.default_rng(seed)
  tree = {}
  for path, shape in shapes.items():
    node = tree
    *parents, leaf = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = rng.standard_normal(shape).astype(dtype)
  return tree


def flat(tree):
  """``{'a/b': np.ndarray}`` for every leaf of ``tree``."""
  return {orthax._tree.path_str(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def ns(u, coeffs=JORDAN, steps=5, scale=1.0, eps=1e-7):
  """Newton–Schulz in the wide orientation, float64, torch layout."""
  x = u.copy()
  tall = x.shape[0] > x.shape[1]
  if tall:
    x = x.T
  x = x / (scale * np.linalg.norm(x) + eps)
  for k in range(steps):
    a, b, c = coeffs[min(k, len(coeffs) - 1)]
    g = x @ x.T
    x = a * x + (b * g + c * g @ g) @ x
  return x.T if tall else x


def polar_express(u):
  """modded-nanogpt / Dion Polar Express: Table C, 1.02‖X‖_F + 1e-6."""
  return ns(u, POLAR_EXPRESS_C, 5, 1.02, 1e-6)


def torch_mats(k):
  """Flax kernel (…, in, out) → array [L, out, in] of torch weights."""
  k = k.reshape((-1,) + k.shape[-2:])
  return np.swapaxes(k, -1, -2).copy()


def from_torch(mats, shape):
  return np.swapaxes(mats, -1, -2).reshape(shape)


class AdamRef:
  """AdamW on one leaf: ``eps_placement`` 'corrected' (optax / Keller aux
  Adam) or 'raw' (ε on √v before bias correction: NAMO, Moonlight)."""

  def __init__(self, w, lr, b1, b2, eps, wd, raw):
    self.m, self.v = np.zeros_like(w), np.zeros_like(w)
    self.lr, self.b1, self.b2, self.eps, self.wd, self.raw = (
        lr, b1, b2, eps, wd, raw)

  def step(self, w, g, t):
    self.m = self.b1 * self.m + (1 - self.b1) * g
    self.v = self.b2 * self.v + (1 - self.b2) * g * g
    if self.raw:
      u = (np.sqrt(1 - self.b2 ** t) / (1 - self.b1 ** t)
           * self.m / (np.sqrt(self.v) + self.eps))
    else:
      u = ((self.m / (1 - self.b1 ** t))
           / (np.sqrt(self.v / (1 - self.b2 ** t)) + self.eps))
    return w * (1 - self.lr * self.wd) - self.lr * u


def run_orthax(tx, params, grads_seq):
  """Params after every step (jitted update)."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for g in grads_seq:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    out.append(flat(params))
  return out


def assert_zero_updates(tx, params, steps):
  """Zero gradients give finite, exactly zero updates for ``steps`` steps."""
  zeros = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  for _ in range(steps):
    u, state = tx.update(zeros, state, params)
    for k, x in flat(u).items():
      assert np.all(np.isfinite(x)) and not np.any(x), k


def assert_match(got, ref_params_per_step, rtol, atol, what):
  for t, ref in enumerate(ref_params_per_step):
    for k, w in ref.items():
      np.testing.assert_allclose(got[t][k], w, rtol=rtol, atol=atol,
                                 err_msg=f'{what} step {t} {k}')
