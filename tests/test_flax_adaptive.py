"""A jitted Flax NNX training step with each adaptive recipe (NorMuon, NAMO,
NAMO-D, LANTON) on the vmap-stacked model of ``test_flax.py``."""

import numpy as np
import optax
import pytest

import orthax

nnx = pytest.importorskip('flax.nnx')
from test_flax import NNXModel, NNX_ROUTES, _by_path, train_nnx  # noqa: E402

RECIPES = [('normuon', {}), ('normuon', dict(reference='paper')),
           ('normuon', dict(reference='modded')), ('namo', {}),
           ('namo_d', {}), ('lanton', {})]


@pytest.mark.parametrize('name,kw', RECIPES,
                         ids=[n + ''.join(f'-{v}' for v in k.values())
                              for n, k in RECIPES])
def test_nnx_optimizer_step(name, kw):
  model = NNXModel(nnx.Rngs(1))
  tx = orthax.recipe(name, learning_rate=0.02, **kw)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = _by_path(nnx.state(model, nnx.Param))
  losses, traces = train_nnx(model, optimizer, 4)
  assert traces == 1, f'train step traced {traces} times'
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses
  after = _by_path(nnx.state(model, nnx.Param))
  for path in NNX_ROUTES:
    assert np.all(np.isfinite(np.asarray(after[path]))), path
    assert not np.allclose(np.asarray(after[path]),
                           np.asarray(before[path])), path
  mu = _by_path(optax.tree.get(optimizer.opt_state, 'momentum').mu)
  assert mu['blocks/fc1/kernel'].shape == (3, 16, 32)
