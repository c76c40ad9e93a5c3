"""Helpers of the trainer's fault tests: a NaN injected at chosen steps, the
bit-exact comparison of a resumed run with a whole one, the small config."""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from orthax.train import data as data_lib
from orthax.train import step as step_lib

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_train import tiny  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = pathlib.Path(__file__).parent.parent
MARK = 255  # token id of a poisoned batch (UTF-8 text never has byte 0xFF)


def inject_nan(steps, setattr_fn=setattr):
  """Makes the gradient NaN at the given 1-based ``steps``: their batches
  are all ``MARK`` and ``step_lib.loss_fn`` multiplies the loss of such a
  batch by NaN (test-only; ``setattr_fn`` is ``monkeypatch.setattr``)."""
  batch, loss_fn = data_lib.TokenLoader.batch, step_lib.loss_fn

  def marked(self, i):
    b = batch(self, i)
    if i + 1 in steps:
      b = {**b, 'inputs': np.full_like(b['inputs'], MARK)}
    return b

  def poisoned(graphdef, abstract_state, params, b, mesh=None):
    loss = loss_fn(graphdef, abstract_state, params, b, mesh)
    return loss * jnp.where(jnp.all(b['inputs'] == MARK), jnp.nan, 1.0)

  setattr_fn(data_lib.TokenLoader, 'batch', marked)
  setattr_fn(step_lib, 'loss_fn', poisoned)


def assert_same_run(whole, logged, state):
  """Logged records and final state equal the uninterrupted run's, bit for
  bit."""
  assert [r['step'] for r in logged] == [r['step'] for r in whole['train']]
  for a, b in zip(whole['train'], logged):
    assert (a['loss'], a['grad_norm']) == (b['loss'], b['grad_norm']), (a, b)
  for a, b in zip(jax.tree.leaves(whole['state']), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def config(steps=12):
  c = tiny('muon', steps=steps)
  c.train.checkpoint_every = 4
  return c
