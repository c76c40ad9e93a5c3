"""The recipes' defaults on a model far smaller than the learning-rate
sweep's: an 8→64→64→1 regression MLP, whose 64×1 head and 8-input layer
have sides far below 128 (where the sweep's rules were tuned)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import orthax


def _small_regression(tx, steps=500):
  """Final loss of an 8→64→64→1 ReLU MLP fitting a smooth target (a
  64×1 head, an 8-input first layer: sides far below the sweep's)."""
  rng = np.random.RandomState(0)
  w, v = rng.randn(8, 16) / np.sqrt(8), rng.randn(16) / 4
  x = rng.randn(4096, 8).astype(np.float32)
  y = jnp.asarray((np.sin(x @ w) @ v)[:, None], jnp.float32)
  x = jnp.asarray(x)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  dims = [(8, 64), (64, 64), (64, 1)]
  p0 = {f'l{i}': {'kernel': jax.random.normal(k, d) / np.sqrt(d[0]),
                  'bias': jnp.zeros(d[1])}
        for i, (k, d) in enumerate(zip(keys, dims))}

  def loss(p, xb, yb):
    h = xb
    for i in range(3):
      h = h @ p[f'l{i}']['kernel'] + p[f'l{i}']['bias']
      h = jax.nn.relu(h) if i < 2 else h
    return jnp.mean((h - yb) ** 2)

  batches = jnp.asarray(rng.randint(0, 4096, (steps, 128)))

  def step(carry, b):
    p, s = carry
    u, s = tx.update(jax.grad(loss)(p, x[b], y[b]), s, p)
    return (optax.apply_updates(p, u), s), None

  with warnings.catch_warnings():
    warnings.simplefilter('ignore', orthax.OutputLayerWarning)
    (p, _), _ = jax.jit(lambda p, s: jax.lax.scan(step, (p, s), batches))(
        p0, tx.init(p0))
  return float(loss(p, x, y))


def test_default_trains_a_model_of_small_sides():
  """With the step per unit of the side on every side (``min_side=1``), a
  64×1 head stepped at η = 1.5 and an 8-input layer at 0.19: a small
  regression MLP ended at 55× AdamW's loss (2026-12-07). Below 128 the
  side now counts as 128."""
  adamw = _small_regression(optax.adamw(3e-3))
  default = _small_regression(orthax.dct_adamw())
  per_side = _small_regression(orthax.dct_adamw(min_side=1))
  assert default < 3 * adamw, (default, adamw)
  assert per_side > 10 * adamw, (per_side, adamw)
