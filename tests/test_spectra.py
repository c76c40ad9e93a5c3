"""SPECTRA: the soft spectral clip, the post-/pre-clip transforms and the
``spectra`` recipe vs float64 transcriptions of the reference
(``shared/ALGORITHMS.md`` §7; mlolab/llm-spectral-clipping @ ed9df11)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
from orthax.polar import spectral as S
from orthax.transforms import clip_threshold
from reference_helpers import flat, make_tree, run_orthax


# The reference, transcribed (float64, PyTorch layout) ---------------------------


def ref_clip_sigvals(g, c, ns_iter):
  """clip_sigvals @ ed9df11 (batched: bounds maxed over the batch)."""
  if g.ndim == 1:
    norm = np.linalg.norm(g)
    return g if norm <= c else g / np.sqrt(1 + (norm / c) ** 2)
  x = g
  tall = x.shape[-2] > x.shape[-1]
  if tall:
    x = np.swapaxes(x, -1, -2)
  m = x.shape[-2]
  s = x @ np.swapaxes(x, -1, -2)
  if x.ndim == 2:
    gers, fro = np.abs(s).sum(-1).max(), np.linalg.norm(s)
  else:
    gers = np.abs(s).sum(-1).max(-1).max()
    fro = np.sqrt((s**2).sum((-2, -1))).max()
  lam = min(gers, fro)
  eye = np.eye(m)
  alpha = 1.0 + lam / c**2
  y = (eye + s / c**2) / alpha
  z = np.broadcast_to(eye, y.shape).copy()
  for _ in range(ns_iter):
    t = 0.5 * (3.0 * eye - z @ y)
    y = y @ t
    z = t @ z
  out = (z / np.sqrt(alpha)) @ x
  return np.swapaxes(out, -1, -2) if tall else out


def exact_clip(g, c):
  if g.ndim == 1:
    return ref_clip_sigvals(g, c, 0)
  u, s, vt = np.linalg.svd(g, full_matrices=False)
  return (u * (s / np.sqrt(1 + (s / c) ** 2))[..., None, :]) @ vt


def torch_view(k):
  """Flax kernel (…, in, out) -> PyTorch weight (…, out, in); vectors as is."""
  return np.swapaxes(k, -1, -2) if k.ndim >= 2 else k


class SpectraAdamWReference:
  """SPECTRA(torch.optim.AdamW, post_process='clip', apply_to='all');
  ``nesterov``: its first moment as NAdam's (torch's ``NAdam`` with
  ``momentum_decay`` → ∞, optax's ``nesterov``):
  ``m̂ = β₁m/(1-β₁^{t+1}) + (1-β₁)g/(1-β₁^t)``."""

  def __init__(self, params, lr, wd, c, b1, b2, eps, clip, nesterov=False):
    self.p = {k: torch_view(v.copy()) for k, v in flat(params).items()}
    self.m = {k: np.zeros_like(v) for k, v in self.p.items()}
    self.v = {k: np.zeros_like(v) for k, v in self.p.items()}
    self.lr, self.wd, self.c, self.b1, self.b2, self.eps = lr, wd, c, b1, b2, eps
    self.clip, self.t, self.nesterov = clip, 0, nesterov

  def step(self, grads):
    self.t += 1
    for k, g in flat(grads).items():
      g, x = torch_view(g), self.p[k]
      self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
      self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
      mh = self.m[k] / (1 - self.b1 ** self.t)
      if self.nesterov:
        mh = (self.b1 * self.m[k] / (1 - self.b1 ** (self.t + 1))
              + (1 - self.b1) * g / (1 - self.b1 ** self.t))
      vh = self.v[k] / (1 - self.b2 ** self.t)
      x_next = x * (1 - self.lr * self.wd) - self.lr * mh / (np.sqrt(vh)
                                                             + self.eps)
      u = (x - x_next) / self.lr - self.wd * x   # the wrapper's recovery
      h = self.clip(u, self.c)
      alpha = (max(1, h.shape[-2] / h.shape[-1]) ** 0.5 if h.ndim >= 2
               else 1.0)
      self.p[k] = (1 - self.wd * self.lr) * x - self.lr * alpha * h

  def params(self):
    return {k: torch_view(v) for k, v in self.p.items()}


@pytest.mark.parametrize('reference,nesterov', [
    ('repo', None), ('orthax', None), ('repo', True), ('orthax', False)])
def test_spectra_recipe_matches_float64_transcription(x64, reference,
                                                      nesterov):
  """Each mode with its own base (None: 'repo' AdamW, 'orthax' NAdamW)
  and with the other's."""
  params = make_tree(0)
  grads = [make_tree(100 + t) for t in range(6)]
  lr, wd, c = 2e-3, 0.1, 4.0
  tx = orthax.spectra(lr, reference=reference, c=c, weight_decay=wd,
                      nesterov=nesterov)
  got = run_orthax(tx, params, grads)
  clip = ((lambda u, c: ref_clip_sigvals(u, c, 10)) if reference == 'repo'
          else exact_clip)
  ref = SpectraAdamWReference(
      params, lr, wd, c, 0.8, 0.999, 1e-8, clip,
      nesterov=reference == 'orthax' if nesterov is None else nesterov)
  for t, g in enumerate(grads):
    ref.step(g)
    for k, w in ref.params().items():
      np.testing.assert_allclose(got[t][k], w, rtol=1e-9, atol=1e-12,
                                 err_msg=f'{reference} step {t} {k}')


def test_repo_mode_forms_the_pytorch_weights_gram_on_a_square_kernel(x64):
  """At a small ``c`` the ten plain steps do not converge, so the result
  depends on the bound λ̂ of the Gram matrix; for a square kernel the
  reference forms ``WWᵀ`` of the PyTorch weight ``W = Kᵀ``, and orthax
  formed ``KKᵀ`` (4e-4 apart here)."""
  shapes = {'sq/kernel': (48, 48), 'wide/kernel': (32, 40)}
  params = make_tree(0, shapes)
  grads = [make_tree(300 + t, shapes) for t in range(3)]
  lr, wd, c = 2e-3, 0.1, 0.25
  got = run_orthax(orthax.spectra(lr, reference='repo', c=c, weight_decay=wd),
                   params, grads)
  ref = SpectraAdamWReference(params, lr, wd, c, 0.8, 0.999, 1e-8,
                              lambda u, c: ref_clip_sigvals(u, c, 10))
  for t, g in enumerate(grads):
    ref.step(g)
    for k, w in ref.params().items():
      np.testing.assert_allclose(got[t][k], w, rtol=1e-9, atol=1e-12,
                                 err_msg=f'step {t} {k}')


def test_threshold_in_float64_for_float64_updates(x64):
  """The threshold was formed in float32 whatever the updates' dtype, so a
  float64 run clipped at ``c`` rounded to float32 (1e-8 off at c = 0.3)."""
  assert float(clip_threshold(0.3, jnp.asarray(1), dtype=jnp.float64)) == 0.3
  assert clip_threshold(0.3, jnp.asarray(1)).dtype == jnp.float32
  u = np.random.default_rng(0).standard_normal((16, 24)) * 3
  tx = orthax.spectral_clip(0.3, learning_rate=1.0, aspect_scale=False)
  params = {'w': jnp.zeros((16, 24))}
  out, _ = tx.update({'w': jnp.asarray(u)}, tx.init(params), params)
  assert out['w'].dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(out['w']), exact_clip(u, 0.3),
                             rtol=1e-12, atol=1e-13)


def test_spectra_float32_close_to_float64_reference():
  params = make_tree(1, dtype=np.float32)
  grads = [make_tree(200 + t, dtype=np.float32) for t in range(5)]
  got = run_orthax(orthax.spectra(2e-3, c=4.0), params, grads)
  ref = SpectraAdamWReference(make_tree(1), 2e-3, 0.1, 4.0, 0.8, 0.999, 1e-8,
                              exact_clip, nesterov=True)  # the default's
  for t in range(5):
    ref.step(make_tree(200 + t))
  for k, w in ref.params().items():
    np.testing.assert_allclose(got[-1][k], w, rtol=1e-4, atol=1e-5, err_msg=k)


# The transforms ----------------------------------------------------------------


def test_post_clip_on_any_optax_optimizer_with_schedule():
  """With a threshold far above every σ, a square matrix and ``apply_to='all'``
  the post-clip gives back the base step (the direction is recovered exactly
  from the decoupled weight decay), for a schedule too."""
  params = {'w': jnp.asarray(np.random.default_rng(0).standard_normal((24, 24)),
                             jnp.float32),
            'b': jnp.ones((24,))}
  sched = optax.linear_schedule(1e-3, 1e-2, 5)
  base = optax.adamw(sched, weight_decay=0.3)
  both = optax.chain(optax.adamw(sched, weight_decay=0.3),
                     orthax.spectral_clip(1e6, learning_rate=sched,
                                          weight_decay=0.3, apply_to='all'))
  sb, sc = base.init(params), both.init(params)
  for t in range(4):
    g = jax.tree.map(lambda p: jnp.sin(p * (t + 1)), params)
    ub, sb = base.update(g, sb, params)
    uc, sc = both.update(g, sc, params)
    for k in params:
      np.testing.assert_allclose(uc[k], ub[k], rtol=2e-5, atol=1e-9)
    params = optax.apply_updates(params, uc)


def test_post_clip_aspect_scale():
  """Nothing clipped (threshold far above every σ): the reference's
  α = √max(1, fan_out/fan_in) makes a 16→32 kernel's step √2 times the
  base optimizer's direction, as the docstring says; ``aspect_scale=False``
  gives the base step back on every shape."""
  rng = np.random.default_rng(1)
  params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32)
            for k, s in (('up', (16, 32)), ('down', (32, 16)),
                         ('square', (16, 16)))}
  g = jax.tree.map(lambda p: jnp.cos(3 * p), params)
  lr, wd = 1e-2, 0.1
  base = optax.adamw(lr, weight_decay=wd)
  ub = base.update(g, base.init(params), params)[0]
  direction = lambda u, k: -u[k] / lr - wd * params[k]
  for aspect, up in ((True, np.sqrt(2.0)), (False, 1.0)):
    tx = optax.chain(optax.adamw(lr, weight_decay=wd), orthax.spectral_clip(
        1e6, learning_rate=lr, weight_decay=wd, aspect_scale=aspect))
    u = tx.update(g, tx.init(params), params)[0]
    for k in params:
      np.testing.assert_allclose(direction(u, k),
                                 (up if k == 'up' else 1.0) * direction(ub, k),
                                 rtol=2e-5, atol=2e-5)
  with pytest.raises(TypeError, match='aspect_scale must be True or False'):
    orthax.spectral_clip(aspect_scale='no')


def test_post_clip_caps_the_spectrum():
  """Δ = -η·α·H_c(U) with λ = 0: its top singular value is below η·α·c."""
  rng = np.random.default_rng(3)
  u = jnp.asarray(rng.standard_normal((32, 64)) * 10, jnp.float32)
  tx = orthax.spectral_clip(2.0, learning_rate=0.5)
  d, _ = tx.update({'w': -0.5 * u}, tx.init({'w': u}), {'w': u})
  alpha = np.sqrt(64 / 32)  # fan_out/fan_in of the (in, out) kernel
  want = -0.5 * alpha * S.soft_clip_svd(u, 2.0)
  np.testing.assert_allclose(d['w'], want, rtol=1e-4, atol=1e-5)
  assert float(jnp.linalg.norm(d['w'], 2)) < 0.5 * alpha * 2.0


def test_zero_lr_keeps_base_update_and_zero_grads_give_zero():
  params = {'w': jnp.ones((8, 8)), 'b': jnp.ones((8,))}
  tx = orthax.spectral_clip(1.0, learning_rate=optax.linear_schedule(0., 1., 4),
                            weight_decay=0.1, apply_to='all')
  zeros = jax.tree.map(jnp.zeros_like, params)
  u, _ = tx.update(zeros, tx.init(params), params)  # lr_0 = 0: no 0/0
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
  pre = orthax.spectral_preclip(0.1)
  u, _ = pre.update(zeros, pre.init(params))
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))


def test_preclip_clips_raw_gradients_2d_only():
  rng = np.random.default_rng(4)
  g = {'w': jnp.asarray(rng.standard_normal((16, 32)), jnp.float32),
       'b': jnp.asarray(rng.standard_normal((32,)), jnp.float32)}
  tx = orthax.spectral_preclip(0.1)
  out, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(out['w'], S.soft_clip_svd(g['w'], 0.1),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(out['b'], g['b'])


def test_spectra_routing_clips_every_leaf():
  """apply_to='all' (the recipe default): hidden kernels, the stacked kernel,
  the embedding and the LM head are clipped as matrices, vectors by the vector
  rule; '2d' leaves vectors with the plain AdamW step."""
  import trees  # pylint: disable=g-import-not-at-top
  params = trees.mixed_params()
  specs = orthax.routing.Router(
      extra_rules=orthax.recipes.robust.SPECTRA_RULES).specs(params)
  by_path = {orthax._tree.path_str(p): s for p, s in
             jax.tree_util.tree_flatten_with_path(
                 specs, is_leaf=lambda s: s is None)[0]}
  assert by_path['embed/embedding'] == orthax.MatrixSpec.torch_linear()
  assert by_path['lm_head/kernel'] == orthax.MatrixSpec()
  assert by_path['layers/attn/kernel'] == orthax.MatrixSpec()
  assert by_path['layers/attn/bias'] is None  # a stacked vector: one vector
  grads = trees.random_like(params, 5)
  base = optax.adamw(0.1, b1=0.8, b2=0.999, weight_decay=0.1,
                     nesterov=True)  # the 'orthax' mode's base
  ub, _ = base.update(grads, base.init(params), params)
  for apply_to in ('all', '2d'):
    tx = orthax.spectra(0.1, c=0.01, apply_to=apply_to)
    u, _ = tx.update(grads, tx.init(params), params)
    for path, (a, b) in {k: (v, flat(ub)[k]) for k, v in flat(u).items()
                         }.items():
      clipped = not np.allclose(a, b, rtol=1e-4)
      assert clipped == (apply_to == 'all' or by_path[path] is not None), path


def test_bad_inputs_name_the_leaf():
  g = {'blocks': {'w': jnp.ones((4, 4, 4))}}
  bad = orthax.spectral_clip(1.0, matrix_specs={'blocks': {'w': orthax.MatrixSpec(
      (0,), (5,))}})
  with pytest.raises(ValueError, match='blocks/w'):
    bad.update(g, bad.init(g), g)
  for kw in (dict(step_rule='fast'), dict(apply_to='some'),
             dict(decay='step')):
    with pytest.raises(ValueError):
      orthax.spectral_clip(1.0, **kw)
  with pytest.raises(ValueError, match='reference'):
    orthax.spectra(reference='torch')


def test_spectra_base_must_be_a_transformation():
  with pytest.raises(TypeError, match=r'^spectra: base must be an optax '
                     r'transformation'):
    orthax.spectra(base=optax.adamw)
