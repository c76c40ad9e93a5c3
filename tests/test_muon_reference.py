"""orthax.muon in its reference modes vs independent transcriptions.

The NumPy references below are written from ``shared/ALGORITHMS.md`` §1 in
PyTorch layout (a weight is ``(out, in)``; a Flax kernel ``(in, out)`` is its
transpose), in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax import contrib

import orthax
from reference_helpers import flat, make_tree, ns, run_orthax, torch_mats


class KellerReference:
  """SingleDeviceMuonWithAuxAdam: Muon for kernels, Adam for the rest."""

  def __init__(self, params, lr, wd, adam_lr, beta=0.95, b1=0.9, b2=0.95,
               adam_eps=1e-10, moonlight=False):
    self.p = {k: v.copy() for k, v in flat(params).items()}
    self.lr, self.wd, self.adam_lr, self.beta = lr, wd, adam_lr, beta
    self.b1, self.b2, self.adam_eps, self.moon = b1, b2, adam_eps, moonlight
    self.buf = {k: np.zeros_like(v) for k, v in self.p.items()}
    self.v = {k: np.zeros_like(v) for k, v in self.p.items()}
    self.t = 0

  def step(self, grads):
    self.t += 1
    for k, g in flat(grads).items():
      w = self.p[k]
      if k.endswith('kernel'):
        shape = w.shape
        ws, gs, bs = torch_mats(w), torch_mats(g), torch_mats(self.buf[k])
        new_w, new_b = [], []
        for wi, gi, bi in zip(ws, gs, bs):
          if self.moon:  # sum form, nesterov
            bi = self.beta * bi + gi
            u = gi + self.beta * bi
            o = ns(u)
            adj = self.lr * 0.2 * np.sqrt(max(wi.shape))
            wi = wi * (1 - self.lr * self.wd) - adj * o
          else:  # lerp form, nesterov
            bi = bi + (1 - self.beta) * (gi - bi)
            u = gi + self.beta * (bi - gi)
            o = ns(u) * np.sqrt(max(1, wi.shape[0] / wi.shape[1]))
            wi = wi * (1 - self.lr * self.wd) - self.lr * o
          new_w.append(wi.T)
          new_b.append(bi.T)
        self.p[k] = np.stack(new_w).reshape(shape)
        self.buf[k] = np.stack(new_b).reshape(shape)
      else:
        m = self.buf[k] = self.b1 * self.buf[k] + (1 - self.b1) * g
        v = self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
        if self.moon:  # eps on sqrt(v) before bias correction, wd shared
          step = (self.lr * np.sqrt(1 - self.b2 ** self.t)
                  / (1 - self.b1 ** self.t) * m / (np.sqrt(v) + self.adam_eps))
          self.p[k] = w * (1 - self.lr * self.wd) - step
        else:
          mh = m / (1 - self.b1 ** self.t)
          vh = v / (1 - self.b2 ** self.t)
          self.p[k] = w - self.adam_lr * mh / (np.sqrt(vh) + self.adam_eps)


@pytest.mark.parametrize('reference', ['keller', 'moonlight'])
def test_reference_modes_match_float64_transcription(x64, reference):
  params = make_tree(0)
  grads = [make_tree(100 + t) for t in range(6)]
  lr, wd = 0.02, 0.1
  tx = orthax.muon(lr, reference=reference, weight_decay=wd,
                   adam_learning_rate=3e-3 if reference == 'keller' else None)
  got = run_orthax(tx, params, grads)
  ref = KellerReference(params, lr, wd, 3e-3, moonlight=reference == 'moonlight',
                        adam_eps=1e-10 if reference == 'keller' else 1e-8)
  for t, g in enumerate(grads):
    ref.step(g)
    for k, w in ref.p.items():
      np.testing.assert_allclose(got[t][k], w, rtol=1e-9, atol=1e-12,
                                 err_msg=f'{reference} step {t} {k}')


def test_keller_float32_close_to_float64_reference():
  params = make_tree(1, dtype=np.float32)
  grads = [make_tree(200 + t, dtype=np.float32) for t in range(5)]
  got = run_orthax(orthax.muon(0.02, weight_decay=0.01), params, grads)
  # The AdamW branch's default under Keller's scale: 3e-3 at the default
  # rate 0.05656, scaled with the rate.
  ref = KellerReference(make_tree(1), 0.02, 0.01, 0.02 * 3e-3 / 0.05656)
  for t in range(5):
    ref.step(make_tree(200 + t))
  for k, w in ref.p.items():
    np.testing.assert_allclose(got[-1][k], w, rtol=1e-4, atol=1e-5, err_msg=k)


OPTAX_CASES = [
    dict(),
    dict(weight_decay=0.1, adam_weight_decay=0.05),
    dict(nesterov=False, beta=0.9),
    dict(ns_steps=3, adam_learning_rate=1e-3),
]


@pytest.mark.parametrize('kw', OPTAX_CASES)
def test_optax_reference_equals_optax_contrib_muon(kw):
  """Same arguments, same updates as optax.contrib.muon (f32, 5 steps)."""
  params = make_tree(2, dtype=np.float32)
  params['stack'] = {'kernel': params['stack']['kernel'][0]}  # optax: 2-D only
  optax_kw = dict(kw)
  if 'beta' in kw:
    optax_kw['beta'] = kw['beta']
  # optax.contrib.muon runs its Adam branch at `learning_rate` unless told
  # otherwise; orthax's default is AdamW-sized, so it is passed explicitly.
  ours = orthax.muon(0.02, reference='optax',
                     **{'adam_learning_rate': 0.02, **kw})
  theirs = contrib.muon(0.02, **optax_kw)
  so, st = ours.init(params), theirs.init(params)
  po = pt = params
  for t in range(5):
    g = make_tree(300 + t, dtype=np.float32)
    g['stack'] = {'kernel': g['stack']['kernel'][0]}
    uo, so = jax.jit(ours.update)(g, so, po)
    ut, st = jax.jit(theirs.update)(g, st, pt)
    for (k, a), b in zip(flat(uo).items(), flat(ut).values()):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=f'{t} {k}')
    po, pt = optax.apply_updates(po, uo), optax.apply_updates(pt, ut)


def test_optax_reference_differs_from_keller_after_step_one():
  """Optax's bias-corrected Nesterov is not Keller's (ALGORITHMS.md §0)."""
  params = {'w': jnp.zeros((64, 32))}
  gs = [{'w': jax.random.normal(jax.random.key(t), (64, 32))} for t in range(2)]
  res = {}
  for ref in ('keller', 'optax'):
    tx = orthax.muon(1.0, reference=ref)
    s = tx.init(params)
    res[ref] = []
    for g in gs:
      u, s = tx.update(g, s, params)
      res[ref].append(u['w'])
  assert jnp.abs(res['keller'][0] - res['optax'][0]).max() < 1e-5
  assert jnp.abs(res['keller'][1] - res['optax'][1]).max() > 1e-3


def test_unknown_reference():
  with pytest.raises(ValueError, match='reference'):
    orthax.muon(0.1, reference='pytorch')
