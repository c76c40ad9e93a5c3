"""A jitted Flax NNX train step with each clipping/robust recipe (SPECTRA,
ROOT, AuON, Hybrid-AuON) on the stacked-block model of ``test_flax.py``."""

import numpy as np
import optax
import pytest

import orthax

nnx = pytest.importorskip('flax.nnx')
import test_flax as F  # noqa: E402  (tests/ is on sys.path)

RECIPES = [('spectra', {}), ('spectra', {'reference': 'repo'}),
           ('root', {}), ('auon', {}), ('auon', {'reference': 'repo'}),
           # Hybrid-AuON's default is 'repo''s five-step form; 'paper' takes one.
           ('hybrid_auon', {}), ('hybrid_auon', {'reference': 'paper'})]


@pytest.mark.parametrize('name,kw', RECIPES,
                         ids=[f'{n}-{k.get("reference", "default")}'
                              for n, k in RECIPES])
def test_nnx_jitted_step(name, kw):
  model = F.NNXModel(nnx.Rngs(1))
  lr = {'root': 3e-3, 'spectra': 3e-3}.get(name, 0.02)
  optimizer = nnx.Optimizer(model, orthax.recipe(name, learning_rate=lr, **kw),
                            wrt=nnx.Param)
  before = F._by_path(nnx.state(model, nnx.Param))
  losses, traces = F.train_nnx(model, optimizer, 4)
  assert traces == 1, f'train step traced {traces} times'
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses
  after = F._by_path(nnx.state(model, nnx.Param))
  for path in F.NNX_ROUTES:
    assert np.all(np.isfinite(np.asarray(after[path]))), path
    assert not np.allclose(np.asarray(after[path]), np.asarray(before[path])), (
        path)
  if name != 'spectra':
    mu = F._by_path(optax.tree.get(optimizer.opt_state, 'momentum').mu)
    assert mu['blocks/fc1/kernel'].shape == (F.L, F.D, 2 * F.D)
