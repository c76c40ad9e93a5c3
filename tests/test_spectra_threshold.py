"""SPECTRA's clip threshold over a run: the warm-up that keeps ``c_t·η_t``
constant, the decay at the end (to 0 included), and the settings no run can
mean (:func:`orthax.transforms.clip_threshold`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
from orthax.polar import spectral as S
from orthax.transforms import clip_threshold


def test_threshold_schedule():
  lr = optax.linear_schedule(0.0, 1e-3, 10)
  c_at = lambda t, **kw: float(clip_threshold(
      5.0, jnp.asarray(t), learning_rate=lr, warmup_steps=10, **kw))
  for t in (1, 4, 9):  # c·lr constant during warm-up
    np.testing.assert_allclose(c_at(t) * float(lr(t)), 5.0 * 1e-3, rtol=1e-6)
  assert c_at(10) == 5.0
  kw = dict(decay_fraction=0.2, final_scale=0.0, total_steps=100)
  for decay, f in (('linear', lambda p: 1 - p), ('sqrt', lambda p: 1 - p**.5),
                   ('cosine', lambda p: (1 + np.cos(np.pi * p)) / 2),
                   ('square', lambda p: 1 - p * p)):
    assert c_at(79, decay=decay, **kw) == 5.0
    for t in (80, 85, 90, 100, 120):
      p = min((t - 80) / 20, 1.0)
      np.testing.assert_allclose(c_at(t, decay=decay, **kw), 5.0 * f(p),
                                 rtol=1e-6, atol=1e-6, err_msg=decay)


def test_a_warmup_needs_a_schedule_or_a_base_rate():
  """A warm-up keeps ``c_t·η_t`` at ``c·η_base``, ``η_base`` defaulting to
  the rate itself: at a constant rate, and under
  ``optax.inject_hyperparams`` (which passes the rate as a number each
  step), it left ``c`` unchanged, silently. Now refused there; with
  ``base_learning_rate`` the injected rate warms the threshold up."""
  with pytest.raises(ValueError, match='^spectra: warmup_steps applies'):
    orthax.spectra(learning_rate=0.04, warmup_steps=10)
  params = {'w': jnp.ones((8, 16))}
  with pytest.raises(ValueError, match='^spectra: warmup_steps applies'):
    optax.inject_hyperparams(orthax.spectra)(
        learning_rate=0.04, warmup_steps=10).init(params)
  g = {'w': jnp.asarray(np.random.default_rng(0).standard_normal((8, 16)),
                        jnp.float32)}

  def top_singular_value(**kw):
    tx = optax.inject_hyperparams(orthax.spectra)(
        learning_rate=0.01, c=0.5, weight_decay=0.0, **kw)
    u, _ = tx.update(g, tx.init(params), params)
    return float(jnp.linalg.norm(u['w'], 2)) / (0.01 * 2 ** 0.5)

  plain = top_singular_value()
  warm = top_singular_value(warmup_steps=10, base_learning_rate=0.04)
  assert plain <= 0.5 + 1e-3            # clipped at c
  assert 0.5 * 1.5 < warm <= 2.0 + 1e-3  # at c·η_base/η_t = 4c


def test_a_threshold_decayed_to_zero_steps_by_weight_decay_alone():
  """``final_scale=0`` (the default) decays ``c_t`` to 0 at the end of the
  run, as the 780M runs do with ``clip_decay='sqrt'``. ``H_c`` divided by
  ``c``: from that step on the update was NaN, and SPECTRA's finite check
  skipped every later step, so training froze. ``H_c → 0`` as ``c → 0``:
  the clipped direction is zero and weight decay alone moves the weights."""
  w = {'blk': {'kernel': jax.random.normal(jax.random.key(0), (8, 16))},
       'bias': jnp.ones((16,))}
  clip = orthax.spectral_clip(decay='linear', total_steps=4,
                              decay_fraction=0.5, apply_to='all')
  for update in (jax.jit(clip.update), clip.update):  # traced c_t, and not
    state = clip.init(w)
    norms = []
    for _ in range(6):
      u, state = update(w, state, w)
      norms.append([float(jnp.linalg.norm(x)) for x in jax.tree.leaves(u)])
    assert np.all(np.isfinite(norms))
    assert all(n > 0 for n in norms[1]) and norms[4] == norms[5] == [0, 0]
  lr, wd = 0.01, 0.1
  tx = orthax.spectra(lr, weight_decay=wd, clip_decay='sqrt', total_steps=4)
  state = tx.init(w)
  for _ in range(6):
    u, state = jax.jit(tx.update)(w, state, w)
    assert orthax.skip_cause(state) is None
  np.testing.assert_allclose(u['blk']['kernel'], -lr * wd * w['blk']['kernel'],
                             rtol=1e-6)


@pytest.mark.parametrize('call, message', [
    (lambda: orthax.spectral_clip(decay='cosine'),
     r"^spectral_clip: total_steps must be > 0 with decay='cosine'"),
    (lambda: orthax.spectra(clip_decay='sqrt'),
     r"^spectra: total_steps must be > 0 with clip_decay='sqrt'"),
    (lambda: orthax.transforms.spectral_preclip(decay='linear'),
     r'^spectral_preclip: total_steps must be > 0'),
    (lambda: orthax.spectral_clip(final_scale=0.5),
     r"^spectral_clip: final_scale sets the threshold's decay, which "
     r"decay='constant'"),
    (lambda: orthax.spectra(total_steps=1000),
     r'^spectra: total_steps sets the threshold'),
    (lambda: orthax.spectra(clip_decay_fraction=0.3),
     r'^spectra: clip_decay_fraction sets the threshold'),
    (lambda: clip_threshold(-1.0, jnp.int32(0)),
     r'^clip_threshold: c must be > 0'),
    (lambda: clip_threshold(1.0, jnp.int32(0), decay='cosine'),
     r'^clip_threshold: total_steps must be > 0'),
    (lambda: orthax.spectra(apply_to='vectors'),
     r'^spectra: apply_to must be one of'),
    (lambda: orthax.spectral_clip(step_rule='fast'),
     r'^spectral_clip: step_rule must be one of'),
    (lambda: S.soft_clip_svd(jnp.ones((3, 3)), -1.0),
     r'^soft_clip_svd: c must be > 0'),
    (lambda: S.soft_clip_vector(jnp.ones(3), 0.0),
     r'^soft_clip_vector: c must be > 0'),
])
def test_threshold_settings_no_run_can_mean_are_refused(call, message):
  """A decay over ``total_steps=0`` started at step 1 and went straight to
  ``c·final_scale``; a decay's settings beside ``decay='constant'`` changed
  nothing; a negative ``c`` for the helpers squared away its sign."""
  with pytest.raises(ValueError, match=message):
    call()
