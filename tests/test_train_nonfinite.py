"""Non-finite gradients in the trainer: 'raise' names the step and leaves,
'skip' keeps the parameters and counts, the script exits with one line."""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

pytest.importorskip('ml_collections')
pytest.importorskip('orbax.checkpoint')

import orthax  # noqa: E402
from orthax.train import checkpoint  # noqa: E402
from orthax.train import trainer  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_train import tiny  # noqa: E402  pylint: disable=g-import-not-at-top
from train_faults import ROOT, inject_nan  # noqa: E402  pylint: disable=g-import-not-at-top


def test_script_ends_a_diverging_run_with_one_error_line():
  """A run whose gradient turns non-finite (``train.nonfinite='raise'``)
  exits 1 with the guard's message naming the step and the leaves; with
  ``ORTHAX_TRACEBACK=1`` the traceback is shown instead."""
  args = [sys.executable, 'scripts/train.py', '--config=lm_cpu:adamw',
          '--config.train.steps=3', '--config.train.eval_every=0',
          '--config.schedule.warmup_steps=0', '--config.model.d_model=32',
          '--config.model.num_layers=1',
          '--config.optimizer.learning_rate=1e30']
  proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT,
                        timeout=600)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  err = proc.stderr.strip().splitlines()
  assert err[-2].startswith('orthax-train: error: non-finite gradient (NaN '
                            'or Inf) at step 2 in leaf '), err[-2]
  env = dict(os.environ, ORTHAX_TRACEBACK='1')
  proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT,
                        timeout=600, env=env)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' in proc.stderr
  assert 'NonFiniteGradientError: non-finite gradient' in proc.stderr


def test_nonfinite_raise_names_step_and_leaves(monkeypatch):
  inject_nan({5}, monkeypatch.setattr)
  c = tiny('muon', steps=8)
  c.train.update(log_every=4, eval_every=0)  # step 5 is read one step late
  with pytest.raises(orthax.NonFiniteGradientError,
                     match=r"non-finite gradient \(NaN or Inf\) at step 5 in "
                     r"leaf '[\w/]+' and \d+ more: .*The step was skipped"):
    trainer.train(c, None, progress=False)


def test_nonfinite_skip_keeps_params_and_counts(monkeypatch, tmp_path,
                                                caplog):
  inject_nan({5}, monkeypatch.setattr)
  c = tiny('muon', steps=8)
  c.train.update(nonfinite='skip', eval_every=0, checkpoint_every=1,
                 max_to_keep=8)
  with caplog.at_level(logging.WARNING, logger='orthax.train'):
    out = trainer.train(c, str(tmp_path), progress=False)
  recs = out['train']
  assert [r['skipped'] for r in recs] == [0, 0, 0, 0, 1, 0, 0, 0]
  assert [r['skipped_total'] for r in recs] == [0] * 4 + [1] * 4
  assert out['summary']['skipped_total'] == 1
  assert out['summary']['steps'] == 8
  # The logged rate is the one each step ran at: the schedules follow the
  # optimizer's count, which the skipped step 5 did not advance (the log
  # read the trainer's step, one ahead of it from step 6 on).
  assert {int(v) for _, v in optax.tree.get_all_with_path(
      out['state'].opt_state, 'count')} == {7}
  from orthax.train import optim  # pylint: disable=g-import-not-at-top
  cfg = trainer.as_dict(c)
  shape = optim.schedule_shape(cfg['train']['steps'], **cfg['schedule'])
  counts = [0, 1, 2, 3, 4, 4, 5, 6]
  np.testing.assert_allclose(
      [r['lr/matrix'] for r in recs],
      [cfg['optimizer']['learning_rate'] * float(shape(k)) for k in counts],
      rtol=1e-6)
  assert ("step 5 skipped: non-finite gradient (NaN or Inf) in ['blocks/"
          in caplog.text
          and "(1 in a row, 1 in total; train.nonfinite='skip')"
          in caplog.text), caplog.text
  ck = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), 1, 8)
  before, after = (ck.restore(out['state'], s) for s in (4, 5))
  ck.close()
  for a, b in zip(jax.tree.leaves(before.params),
                  jax.tree.leaves(after.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(after.step) == 5


def test_nonfinite_skip_stops_after_max_consecutive(monkeypatch):
  inject_nan({3, 4, 5}, monkeypatch.setattr)
  c = tiny('muon', steps=8)
  c.train.update(nonfinite='skip', max_consecutive_skips=3, eval_every=0)
  with pytest.raises(orthax.NonFiniteGradientError,
                     match=r'3 steps in a row skipped '
                     r'\(train.max_consecutive_skips=3\), the last at step 5 '
                     r"for a non-finite gradient \(NaN or Inf\) in \['"):
    trainer.train(c, None, progress=False)
