"""LANTON (the labelled reconstruction of ALGORITHMS.md §12) vs a float64
transcription of that reconstruction, plus invariants."""

import importlib

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
from registered_rates import DEFAULT_LEARNING_RATES

LSHAPES = {**SHAPES, 'embed/embedding': (40, 16), 'lm_head/kernel': (16, 40)}


class LantonRef:
  """Hidden kernels: EMA momentum, D = c·NS(V) (torch m×n; V the
  Nesterov look-ahead βB + (1-β)G, or B without it; c = sqrt(max(1, m/n))
  for ``scale='keller'``, the library mode's, sqrt(m/n) for
  ``'spectral'``), noise H ← β2 H + (1-β2)(c‖X‖_*)², layer rates ∝
  (Ĥ + ε)^(-p/2) (the library mode's p = 0.25 unless given); embed/head:
  Signum with ``signum``, else with the rest: optax AdamW."""

  def __init__(self, params, lr, wd=0.0, beta=0.95, beta2=0.99, eps=1e-8,
               nuclear='svd', difference='previous', normalization='group_max',
               alpha=1.0, nesterov=True, noise_power=0.25, signum=False,
               scale='keller'):
    self.p = flat(params)
    self.shape_scale = {'keller': lambda m, n: np.sqrt(max(1.0, m / n)),
                        'spectral': lambda m, n: np.sqrt(m / n)}[scale]
    self.power = noise_power
    self.nesterov = nesterov
    self.lr, self.wd, self.b, self.b2, self.eps = lr, wd, beta, beta2, eps
    self.nuc, self.diff, self.norm, self.alpha = (nuclear, difference,
                                                  normalization, alpha)
    self.B, self.prev, self.H, self.sig, self.adam = {}, {}, {}, {}, {}
    for k, w in self.p.items():
      if signum and k in ('embed/embedding', 'lm_head/kernel'):
        self.sig[k] = np.zeros_like(w)
      elif k.endswith('kernel') and k != 'lm_head/kernel':
        self.B[k] = np.zeros_like(torch_mats(w))
        self.prev[k] = np.zeros_like(self.B[k])
        self.H[k] = np.zeros(len(self.B[k]))
      else:
        self.adam[k] = AdamRef(w, lr, 0.9, 0.95, 1e-8, 0.0, raw=False)
    self.t = 0

  def nuclear(self, x):
    if self.nuc == 'svd':
      return np.linalg.svd(x, compute_uv=False).sum()
    return np.sum(x * polar_express(x))

  def step(self, grads):
    self.t += 1
    t, gs = self.t, flat(grads)
    seen = t - 1 if self.diff == 'previous' else t
    dirs, hhat = {}, {}
    for k in self.B:
      g = torch_mats(gs[k])
      self.B[k] = self.b * self.B[k] + (1 - self.b) * g
      look = self.B[k]
      if self.nesterov:
        look = self.b * self.B[k] + (1 - self.b) * g
      # The momentum stage's output is the difference partner of 'momentum'.
      partner = self.prev[k] if self.diff == 'previous' else look
      c = self.shape_scale(*g.shape[1:])
      dirs[k] = np.stack([c * ns(b) for b in look])
      if seen > 0:
        dual = np.array([c * self.nuclear(x)
                         for x in g - partner])
        self.H[k] = self.b2 * self.H[k] + (1 - self.b2) * dual ** 2
        hhat[k] = self.H[k] / (1 - self.b2 ** seen)
      self.prev[k] = g
    if seen > 0:
      r = {k: (h + self.eps) ** (-self.power / 2) for k, h in hhat.items()}
      # The least noisy layer among those with noise (H > 0).
      top = max((v[hhat[k] > 0].max() for k, v in r.items()
                 if np.any(hhat[k] > 0)), default=None)
      if self.norm == 'group_max' and top is None:
        rates = {k: np.full(len(self.B[k]), self.lr) for k in self.B}
      elif self.norm == 'group_max':
        rates = {k: self.lr * np.minimum(v / top, 1.0) for k, v in r.items()}
      else:
        rates = {k: self.lr * self.alpha * v for k, v in r.items()}
    else:
      rates = {k: np.full(len(self.B[k]), self.lr) for k in self.B}
    for k in self.B:
      w = torch_mats(self.p[k])
      new = w - rates[k][:, None, None] * (dirs[k] + self.wd * w)
      self.p[k] = from_torch(new, self.p[k].shape)
    for k in self.sig:
      self.sig[k] = self.b * self.sig[k] + (1 - self.b) * gs[k]
      self.p[k] = self.p[k] - self.lr * np.sign(self.sig[k])
    for k in self.adam:
      self.p[k] = self.adam[k].step(self.p[k], gs[k], t)
    return dict(self.p)


CASES = [dict(nuclear='svd'),
         dict(nuclear='ns', difference='momentum', normalization='absolute',
              alpha=0.5, weight_decay=0.1),
         dict(nuclear='svd', nesterov=False),
         dict(nuclear='svd', difference='momentum', normalization='absolute',
              nesterov=False),
         dict(nuclear='svd', noise_power=1.0),
         dict(nuclear='svd', difference='momentum', normalization='absolute',
              alpha=0.5, noise_power=1.0),
         dict(nuclear='svd',
              signum_pattern=orthax.recipes.signum_group.SIGNUM_PATTERN),
         dict(nuclear='svd', scale='spectral'),
         dict(nuclear='svd', reference='paper'),
         dict(nuclear='ns', difference='momentum', reference='paper',
              nesterov=True, weight_decay=0.1, scale='keller')]
# What reference='paper' sets: the Signum group, the spectral LMO of the
# momentum itself, the inverse noise level and no decay.
PAPER = dict(signum=True, nesterov=False, noise_power=1.0, weight_decay=0.0,
             scale='spectral')


def _transcription_kwargs(kw):
  """``lanton``'s keywords as :class:`LantonRef`'s (``wd`` last)."""
  kw = dict(kw)
  mode = PAPER if kw.pop('reference', 'orthax') == 'paper' else {}
  kw = {**mode, **kw}
  kw['signum'] = kw.get('signum', False) or 'signum_pattern' in kw
  kw.pop('signum_pattern', None)
  # λ: the case's, else the mode's (the library mode's 0.4).
  return kw, kw.pop('weight_decay', 0.4)


@pytest.mark.parametrize('kw', CASES, ids=['svd-previous-groupmax',
                                           'ns-momentum-absolute',
                                           'no-nesterov',
                                           'no-nesterov-momentum-absolute',
                                           'inverse-noise-groupmax',
                                           'inverse-noise-absolute',
                                           'signum-group', 'spectral',
                                           'paper', 'paper-overridden'])
def test_matches_float64_transcription(x64, kw):
  params = make_tree(0, LSHAPES)
  grads = [make_tree(100 + t, LSHAPES) for t in range(6)]
  # The transcription's Adam branch runs at the matrices' rate.
  tx = orthax.lanton(0.02, adam_learning_rate=0.02, **kw)
  got = run_orthax(tx, params, grads)
  kw, wd = _transcription_kwargs(kw)
  ref = LantonRef(params, 0.02, wd=wd, **kw)
  assert_match(got, [ref.step(g) for g in grads], 1e-9, 1e-12, str(kw))


def test_noise_power_zero_is_the_group_rate():
  """``noise_power=0``: every layer at the group rate η, whatever its noise
  (D-Muon's/Scion's fixed rate within a group)."""
  params = make_tree(0, LSHAPES)
  grads = [make_tree(100 + t, LSHAPES) for t in range(4)]
  got = run_orthax(orthax.lanton(0.02, noise_power=0.0), params, grads)
  flat_rates = run_orthax(orthax.lanton(0.02, eps=1e30), params, grads)
  adaptive = run_orthax(orthax.lanton(0.02), params, grads)
  assert_match(got, flat_rates, 1e-6, 1e-7, 'noise_power=0 vs eps=1e30')
  # ... which the default's noise-adapted rates are not.
  assert max(np.abs(got[-1][k] - adaptive[-1][k]).max()
             for k in got[-1]) > 1e-4


def test_noise_power_zero_under_absolute_is_alpha_times_the_rate():
  """(``difference='momentum'``: a difference from the first step, where
  ``'previous'`` runs step 1 at η itself.)"""
  params = make_tree(0, LSHAPES)
  grads = [make_tree(100 + t, LSHAPES) for t in range(4)]
  got = run_orthax(orthax.lanton(0.02, normalization='absolute', alpha=0.5,
                                 noise_power=0.0, difference='momentum',
                                 adam_learning_rate=3e-3), params, grads)
  want = run_orthax(orthax.lanton(0.01, noise_power=0.0,
                                  difference='momentum',
                                  adam_learning_rate=3e-3), params, grads)
  assert_match(got, want, 1e-6, 1e-7, 'absolute at p=0 vs the rate')


def test_noise_power_can_be_injected():
  """``optax.inject_hyperparams``: an injected ``noise_power`` of 0 steps
  as flat rates, an injected 1 as the inverse map."""
  params = make_tree(0, LSHAPES)
  grads = [make_tree(100 + t, LSHAPES) for t in range(3)]
  for p, same in ((0.0, dict(eps=1e30)), (1.0, dict(noise_power=1.0))):
    tx = optax.inject_hyperparams(orthax.lanton)(0.02, noise_power=p)
    got = run_orthax(tx, params, grads)
    want = run_orthax(orthax.lanton(0.02, **same), params, grads)
    assert_match(got, want, 1e-6, 1e-7, f'injected noise_power={p}')


def test_float32_close_to_float64_reference():
  params = make_tree(1, LSHAPES, np.float32)
  grads = [make_tree(200 + t, LSHAPES, np.float32) for t in range(5)]
  got = run_orthax(orthax.lanton(0.02, nuclear='svd', adam_learning_rate=0.02),
                   params, grads)
  ref = LantonRef(make_tree(1, LSHAPES), 0.02, wd=0.4)  # the default λ
  for t in range(5):
    want = ref.step(make_tree(200 + t, LSHAPES))
  for k, w in want.items():
    np.testing.assert_allclose(got[-1][k], w, rtol=1e-4, atol=1e-5, err_msg=k)


def test_noisier_layer_gets_smaller_rate():
  """Two layers with the same mean gradient; one gets 10× the noise."""
  shape = (32, 32)
  rng = np.random.default_rng(0)
  mean = rng.standard_normal(shape).astype(np.float32)
  params = {'quiet': jnp.zeros(shape), 'noisy': jnp.zeros(shape)}
  tx = orthax.layerwise_noise_adapt(
      orthax.momentum(0.9, nesterov=False), orthax.orthogonalize(),
      learning_rate=1.0, nuclear='svd')
  state = tx.init(params)
  for _ in range(20):
    g = {'quiet': mean + 0.1 * rng.standard_normal(shape, np.float32),
         'noisy': mean + 1.0 * rng.standard_normal(shape, np.float32)}
    u, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
  o, _ = orthax.orthogonalize().update(
      optax.tree.get(state, 'momentum').mu, None)
  rate = {k: float(-jnp.sum(u[k] * o[k]) / jnp.sum(o[k] * o[k])) for k in u}
  np.testing.assert_allclose(rate['quiet'], 1.0, rtol=1e-4)  # the group max
  assert rate['noisy'] < 0.2 * rate['quiet'], rate


def test_nuclear_evaluators_agree():
  x = {'w': jax.random.normal(jax.random.key(0), (48, 32))}
  vals = {}
  for nuc in ('svd', 'ns', 'frobenius'):
    tx = orthax.layerwise_noise_adapt(
        orthax.momentum(nesterov=False), orthax.orthogonalize(),
        learning_rate=1.0, nuclear=nuc, difference='momentum', beta2=0.0)
    _, st = tx.update(x, tx.init(x), x)
    vals[nuc] = float(jnp.sqrt(st.noise['w']))  # the dual norm
  np.testing.assert_allclose(vals['ns'], vals['svd'], rtol=0.05)
  assert vals['frobenius'] >= vals['svd'] * (1 - 1e-6)


def _lanton_updates(params, grads, **kw):
  tx = orthax.lanton(**kw)
  state, update = tx.init(params), jax.jit(tx.update)
  for g in grads:
    u, state = update(g, state, params)
  return u


@pytest.mark.parametrize('extra', ['empty', 'unchanging'])
def test_a_layer_without_noise_leaves_the_others_rates(extra):
  """A matrix with no entries, or one whose gradient never changes (a
  frozen or unused layer), has no noise: it set the group's floor at √ε and
  cut every other matrix's step ~33× (0.75 → 0.022); now it is left out of
  the floor, and its own rate is the group's."""
  key = jax.random.key(0)
  rnd = lambda i, s: jax.random.normal(jax.random.fold_in(key, i), s)
  params = {'w1': rnd(0, (16, 32)), 'w2': rnd(1, (32, 16))}
  grads = [{'w1': rnd(10 + t, (16, 32)), 'w2': rnd(20 + t, (32, 16))}
           for t in range(3)]
  shape = (0, 16) if extra == 'empty' else (16, 32)
  ones = jnp.ones(shape)
  with_extra = _lanton_updates({**params, 'x': ones},
                               [{**g, 'x': ones} for g in grads])
  alone = _lanton_updates(params, grads)
  for k in params:
    np.testing.assert_allclose(with_extra[k], alone[k], rtol=1e-6,
                               atol=1e-7)
  if extra == 'unchanging':  # its own step is the group rate's
    at_group_rate = _lanton_updates({**params, 'x': ones},
                                    [{**g, 'x': ones} for g in grads],
                                    noise_power=0.0)
    np.testing.assert_allclose(with_extra['x'], at_group_rate['x'],
                               rtol=1e-5)


def test_zero_gradients_give_zero_updates():
  params = jax.tree.map(jnp.asarray, make_tree(4, LSHAPES, np.float32))
  tx = orthax.lanton(weight_decay=0.0)  # a decay steps zero gradients
  assert_zero_updates(tx, params, steps=3)


def test_routes_embeddings_and_head_to_signum():
  params = jax.tree.map(jnp.asarray, make_tree(5, LSHAPES, np.float32))
  group = orthax.recipes.signum_group
  router = group.signum_labels(orthax.Router())
  assert isinstance(router, orthax.Router)  # so describe() reads it
  # Around a labels callable: a labels callable with the same labels.
  wrapped = group.signum_labels(lambda p: orthax.Router().labels(p))
  for labels in (flat(router.labels(params)), flat(wrapped(params))):
    assert labels['embed/embedding'] == labels['lm_head/kernel'] == 'signum'
    assert labels['a/kernel'] == labels['stack/kernel'] == 'matrix'
    assert labels['b/bias'] == labels['ln/scale'] == 'adam'
  # A base router's own limits hold underneath (here: max_side).
  limited = flat(group.signum_labels(orthax.Router(max_side=2)).labels(
      params))
  assert limited['a/kernel'] == 'adam'
  # A limit set on the wrapper (orthax.recipes.dct_adamw.limit_matrix_size
  # does) goes to its base, and the wrapper keeps relabelling.
  capped = router.with_max_side(2)
  assert isinstance(capped, group.SignumRouter) and capped.max_side == 2
  assert router.max_side is None  # a copy: the original keeps no limit
  assert flat(capped.labels(params)) == limited
  dct = importlib.import_module('orthax.recipes.dct_adamw')  # the module
  assert dct.limit_matrix_size(router, 2).max_side == 2


def test_bad_inputs():
  for kw in (dict(dual_norm='l2'), dict(difference='batch'),
             dict(normalization='mean'), dict(nuclear='lanczos')):
    with pytest.raises(ValueError, match=next(iter(kw))):
      orthax.layerwise_noise_adapt(orthax.momentum(), orthax.orthogonalize(),
                                   learning_rate=0.1, **kw)
  tx = orthax.layerwise_noise_adapt(orthax.momentum(), orthax.orthogonalize(),
                                    learning_rate=0.1)
  with pytest.raises(ValueError, match="'x/w'"):
    tx.init({'x': {'w': jnp.zeros((2, 3, 4))}})


@pytest.mark.parametrize('kwargs, expected', [
    (dict(), 0.05 * 3e-3 / DEFAULT_LEARNING_RATES['lanton'][0]),
    (dict(adam_learning_rate=1e-3), 1e-3),
    (dict(signum_learning_rate=2e-2), 2e-2)])
def test_signum_runs_at_the_adamw_branch_rate(kwargs, expected):
  """The paper's mode steps embeddings and head by ±η_s: the AdamW branch's
  rate unless ``signum_learning_rate`` is given (3e-3 at the default η)."""
  params = {'embed': {'embedding': jnp.zeros((40, 8))},
            'w': jnp.zeros((8, 8))}
  grads = {'embed': {'embedding': jnp.linspace(-1.0, 1.0, 320).reshape(40, 8)
                     + 0.01}, 'w': jnp.ones((8, 8))}
  tx = orthax.lanton(0.05, reference='paper', **kwargs)
  updates, _ = tx.update(grads, tx.init(params), params)
  step = np.abs(np.asarray(updates['embed']['embedding']))
  np.testing.assert_allclose(step, expected, rtol=1e-6)


def test_signum_settings_without_a_signum_group_are_refused():
  """The library mode has no Signum group: a Signum rate or β would do
  nothing; an empty pattern would send every 2-D AdamW leaf to Signum."""
  for kw in (dict(signum_learning_rate=1e-3), dict(signum_beta=0.9)):
    with pytest.raises(ValueError, match=f"{next(iter(kw))}.*'orthax'.*"
                       'signum_pattern'):
      orthax.lanton(**kw)
    orthax.lanton(reference='paper', **kw)
    orthax.lanton(
        signum_pattern=orthax.recipes.signum_group.SIGNUM_PATTERN, **kw)
  with pytest.raises(ValueError, match="signum_pattern '' matches every"):
    orthax.lanton(signum_pattern='', reference='paper')
  # '^$' matches no path: the paper's mode without its Signum group.
  params = {'embed': {'embedding': jnp.zeros((40, 8))}}
  labels = orthax.recipes.recipe_routing(orthax.lanton(
      reference='paper', signum_pattern='^$')).router.labels(params)
  assert flat(labels) == {'embed/embedding': 'adam'}


def test_the_group_max_program_grows_linearly_with_the_layers():
  """The minimum over all layers is computed once (a lax.cond): as a value
  its scalar min-chain was copied into every layer's rate, and the
  compiled program grew as N² (97 s of compile at 200 layers)."""
  def hlo_size(n):
    params = {f'layer{i:03d}': {'kernel': jax.ShapeDtypeStruct(
        (8, 8), jnp.float32)} for i in range(n)}
    tx = orthax.lanton(check_finite=False)
    state = jax.eval_shape(tx.init, params)
    return len(jax.jit(tx.update).lower(params, state, params).compile()
               .as_text())
  small, large = hlo_size(10), hlo_size(40)
  assert large / small < 6, (small, large)  # 4 when linear, 16 if N²


def test_under_absolute_a_layer_without_noise_steps_at_the_group_rate():
  """``normalization='absolute'`` gave a layer whose gradient never changes
  ``α/√ε^p`` (10⁴ at ``p = 1``) times the rate, which its weight decay then
  applied; it steps at the group rate, as before any difference is seen."""
  params = {'w': jnp.ones((16, 32)), 'x': jnp.ones((16, 32))}
  key = jax.random.key(1)
  grads = [{'w': jax.random.normal(jax.random.fold_in(key, t), (16, 32)),
            'x': jnp.ones((16, 32))} for t in range(3)]
  tx = orthax.transforms.layerwise_noise_adapt(
      orthax.momentum(0.9), optax.identity(), learning_rate=0.01,
      normalization='absolute', weight_decay=0.1, dual_norm='nuclear',
      nuclear='frobenius')
  state = tx.init(params)
  for g in grads:
    u, state = tx.update(g, state, params)
  # -η(B + λW), B the momentum of the constant gradient 1: at most 2η.
  assert float(jnp.max(jnp.abs(u['x']))) <= 2 * 0.01
