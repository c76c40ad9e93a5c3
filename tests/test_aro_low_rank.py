"""ARO on momenta of lower rank than the rotated side (a small batch, a
layer that sees few directions) and of extreme dynamic range: the step is
a continuous function of the gradient, as exact arithmetic's is, so a
perturbation at rounding level, or another device layout, moves it by
rounding only; and it does not depend on the gradient's scale."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax

SHAPES = [(16, 32), (32, 16), (24, 24)]
MODES = [dict(), dict(qr='cholesky_qr3'), dict(reference='dion'),
         dict(base='row_norm'), dict(base='sign')]


def _updates(tx, grads):
  params = {'w': jnp.zeros(grads[0].shape)}
  state, out = tx.init(params), []
  for g in grads:
    u, state = tx.update({'w': jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, u)
    out.append(np.asarray(u['w'], np.float64))
  return out


@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: f'{s[0]}x{s[1]}')
@pytest.mark.parametrize('kw', MODES, ids=lambda kw: str(kw) or 'default')
def test_a_rounding_perturbation_moves_a_low_rank_step_by_rounding(shape, kw):
  """Gradients of rank 4: a relative 1e-6 perturbation moved steps 2–4 by
  20–40% (the rotation's columns past the rank were rounding's, and the
  next step projected new directions on them); now by about that much."""
  rng = np.random.default_rng(0)
  grads = [(rng.normal(size=(shape[0], 4)) @ rng.normal(size=(4, shape[1])))
           .astype(np.float32) for _ in range(4)]
  noisy = [(g * (1 + 1e-6 * rng.normal(size=shape))).astype(np.float32)
           for g in grads]
  for t, (a, b) in enumerate(zip(_updates(orthax.aro(**kw), grads),
                                 _updates(orthax.aro(**kw), noisy))):
    change = np.abs(a - b).max() / np.abs(a).max()
    assert change < 3e-4, (t + 1, change)


@pytest.mark.parametrize('scale', [1e-10, 1e-15, 1e-30])
def test_a_tiny_low_rank_gradient_takes_the_same_step(scale):
  """A rank-1 gradient's step at any scale is the scale-1 step, of rank 1:
  below about 1e-10 the squares of the rounding rows of ``QᵀA`` underflowed,
  read as exact zeros, and the base map blew them up to whole rows."""
  rng = np.random.default_rng(1)
  g = np.outer(rng.standard_normal(64), rng.standard_normal(32))
  full = _updates(orthax.aro(0.02), [g.astype(np.float32)])[0]
  small = _updates(orthax.aro(0.02), [(g * scale).astype(np.float32)])[0]
  sv = np.linalg.svd(small, compute_uv=False)
  assert sv[1] < 1e-5 * sv[0], sv[:3]
  assert np.linalg.norm(small - full) < 1e-5 * np.linalg.norm(full)


def test_one_huge_entry_gives_the_step_of_one_direction():
  """One entry 1e30 among N(0, 1) entries (after the power-of-two scaling,
  the others at ~1e-30 of it, their squares below float32's range): the
  step of that one direction, as at 1e8; it was full rank."""
  base = np.random.default_rng(2).standard_normal((64, 32))
  steps = []
  for big in (1e8, 1e30):
    g = base.astype(np.float32)
    g[3, 5] = big
    steps.append(_updates(orthax.aro(0.02), [g])[0])
  for u in steps:
    sv = np.linalg.svd(u, compute_uv=False)
    assert sv[1] < 1e-5 * sv[0], sv[:3]
  np.testing.assert_allclose(steps[1], steps[0], atol=1e-6)


@pytest.mark.parametrize('kw', MODES[:3], ids=lambda kw: str(kw) or 'default')
def test_a_momentum_of_fixed_lower_rank_moves_by_rounding(kw):
  """Gradients ``X C_t Y`` sharing one rank-8 column space: the previous
  rotation's columns past the rank are orthogonal to it, so those rows of
  ``RᵀA`` are rounding, and Sinkhorn blew them up into the next
  cross-alignment (steps 2–3 moved by 2–5% under a 1e-6 perturbation; now
  ≤ 2e-5, and 5e-4 for dion's rotation of the larger side)."""
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(32, 8)), rng.normal(size=(8, 64))
  grads = [(x @ rng.normal(size=(8, 8)) @ y / 8 ** 1.5).astype(np.float32)
           for _ in range(3)]
  noisy = [(g * (1 + 1e-6 * rng.normal(size=g.shape))).astype(np.float32)
           for g in grads]
  for t, (a, b) in enumerate(zip(_updates(orthax.aro(**kw), grads),
                                 _updates(orthax.aro(**kw), noisy))):
    change = np.abs(a - b).max() / np.abs(a).max()
    assert change < 1e-3, (t + 1, change)
