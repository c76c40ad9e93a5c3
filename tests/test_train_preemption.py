"""Preemption: SIGTERM checkpoints and exits, the resume is bit exact;
Ctrl-C checkpoints and raises, a second one stops at once; SIGKILL leaves a
verified checkpoint; a finished run is not redone."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip('ml_collections')
pytest.importorskip('orbax.checkpoint')

from orthax.train import checkpoint  # noqa: E402
from orthax.train import data as data_lib  # noqa: E402
from orthax.train import faults  # noqa: E402
from orthax.train import metrics  # noqa: E402
from orthax.train import trainer  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_train import tiny  # noqa: E402  pylint: disable=g-import-not-at-top
from train_faults import ROOT, assert_same_run  # noqa: E402  pylint: disable=g-import-not-at-top


# scripts/train.py in a child with slow batches (so that the signal lands
# mid-run) and a SIGTERM handler of its own, which train() must restore.
CHILD = """
import runpy, signal, sys, time
from orthax.train import data
batch = data.TokenLoader.batch
data.TokenLoader.batch = lambda self, i: (time.sleep(0.3), batch(self, i))[1]
def mine(signum, frame):
  pass
signal.signal(signal.SIGTERM, mine)
sys.argv = ['scripts/train.py'] + sys.argv[1:]
try:
  runpy.run_path('scripts/train.py', run_name='__main__')
  code = 0
except SystemExit as e:
  code = e.code
print('handler restored:', signal.getsignal(signal.SIGTERM) is mine)
sys.exit(code)
"""
# tiny('muon', 16) with checkpoint_every=5, as flags.
FLAGS = ['--config.model.d_model=32', '--config.model.num_layers=2',
         '--config.model.num_heads=2', '--config.model.seq_len=32',
         '--config.data.batch_size=8', '--config.schedule.warmup_steps=2',
         '--config.train.steps=16', '--config.train.log_every=1',
         '--config.train.eval_every=8', '--config.train.eval_batches=2',
         '--config.train.checkpoint_every=5']


def _child_after(work, records: int) -> subprocess.Popen:
  """The CHILD training into ``work``, once it has written ``records``
  metric records. It compiles as this process does (tests/conftest.py), so
  its steps can be compared bit for bit with a run made here."""
  env = dict(os.environ)
  if 'ORTHAX_TEST_XLA_FLAGS' in env:
    env['XLA_FLAGS'] = env['ORTHAX_TEST_XLA_FLAGS']
  proc = subprocess.Popen(
      [sys.executable, '-c', CHILD, f'--workdir={work}', *FLAGS],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=env)
  deadline = time.time() + 600
  while len(metrics.read_jsonl(str(work / 'metrics.jsonl'))) < records:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.05)
  return proc


def test_sigterm_checkpoints_exits_and_resumes_bit_exact(tmp_path):
  work = tmp_path / 'run'
  proc = _child_after(work, 2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 75, err[-3000:]
  summary = json.loads(out[out.index('{'):out.rindex('}') + 1])
  step = summary['steps']
  assert summary['preempted'] and 2 <= step < 16, summary
  assert (f'preempted (SIGTERM) after step {step} of 16: saved checkpoint '
          f'{step} in {work}/checkpoints; rerun the same command to resume.'
          ) in err
  assert 'handler restored: True' in out
  # Library INFO lines (JAX's TPU probing, orbax's per-save notes) are off.
  # Only the trainer's own INFO note (its start-up line) is left.
  info = re.findall(r'^I\d{4} .*$', err, re.M)
  assert 'libtpu' not in err and len(info) == 1, err
  assert 'optimizer muon: peak learning rate matrix' in info[0]
  assert str(step) in os.listdir(work / 'checkpoints')
  c = tiny('muon', steps=16)
  c.train.checkpoint_every = 5
  resumed = trainer.train(c, str(work), progress=False)
  assert resumed['summary']['resumed_from'] == step
  assert not resumed['summary']['preempted']
  whole = trainer.train(c, None, progress=False)
  assert_same_run(whole, metrics.read_jsonl(str(work / 'metrics.jsonl')),
                  resumed['state'])


def test_ctrl_c_to_the_script_saves_and_exits_130(tmp_path):
  work = tmp_path / 'run'
  proc = _child_after(work, 2)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 130, err[-3000:]
  step = int(re.search(r'interrupted \(Ctrl-C\) after step (\d+) of 16',
                       err).group(1))
  assert 2 <= step < 16 and str(step) in os.listdir(work / 'checkpoints')
  assert (f'orthax-train: interrupted (Ctrl-C) after step {step} of 16: '
          f'saved checkpoint {step} in {work}/checkpoints; rerun the same '
          'command to resume.') in err
  assert 'Traceback' not in err and '{' not in out  # no summary printed


def test_a_killed_run_leaves_its_last_checkpoint_verified(tmp_path, caplog):
  """SIGKILL (no handler, no close) a few steps after a save: the save's
  checksum record was written while the run went on (before: only at the
  next save or at close), so the resume verifies it."""
  work = tmp_path / 'run'
  proc = _child_after(work, 8)
  proc.kill()
  proc.communicate(timeout=600)
  assert (work / 'checkpoints' / '5' / checkpoint.CHECKSUMS).exists()
  c = tiny('muon', steps=16)
  c.train.checkpoint_every = 5
  with caplog.at_level(logging.WARNING, logger='orthax.train'):
    out = trainer.train(c, str(work), progress=False)
  assert out['summary']['resumed_from'] == 5
  assert 'no checksum record' not in caplog.text, caplog.text


def test_a_finished_run_is_not_redone_from_its_preemption_save(
    tmp_path, monkeypatch):
  """``checkpoint_every=0``: SIGTERM at step 3 saves step 3; the resumed
  run then saves its last step, so rerunning the finished run trains
  nothing (it redid steps 4..8 from the preemption save before)."""
  c = tiny('muon', steps=8)
  c.train.update(checkpoint_every=0, eval_every=0)
  batch = data_lib.TokenLoader.batch

  def term_at_3(self, step):
    if step == 2 and self.batch_size == 8:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch(self, step)

  monkeypatch.setattr(data_lib.TokenLoader, 'batch', term_at_3)
  out = trainer.train(c, str(tmp_path), progress=False)
  assert out['summary']['preempted'] and out['summary']['steps'] == 3
  monkeypatch.setattr(data_lib.TokenLoader, 'batch', batch)
  out = trainer.train(c, str(tmp_path), progress=False)
  assert out['summary']['resumed_from'] == 3
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '8']
  again = trainer.train(c, str(tmp_path), progress=False)
  assert again['summary']['resumed_from'] == 8
  assert [r['step'] for r in metrics.read_jsonl(
      str(tmp_path / 'metrics.jsonl'))] == list(range(1, 9))


def _signal_at_step_3(monkeypatch, signum, times=1):
  """Sends ``signum`` (``times`` over) to this process as step 3's batch
  is read."""
  batch = data_lib.TokenLoader.batch

  def signal_at_3(self, step):
    if step == 2 and self.batch_size == 8:
      for _ in range(times):
        os.kill(os.getpid(), signum)
    return batch(self, step)

  monkeypatch.setattr(data_lib.TokenLoader, 'batch', signal_at_3)
  return batch


def test_ctrl_c_checkpoints_the_step_then_raises_and_the_rerun_resumes(
    tmp_path, monkeypatch, caplog):
  c = tiny('muon', steps=8)
  c.train.update(checkpoint_every=0, eval_every=0)
  batch = _signal_at_step_3(monkeypatch, signal.SIGINT)
  before = signal.getsignal(signal.SIGINT)
  with caplog.at_level(logging.WARNING, logger='orthax.train'), \
      pytest.raises(faults.Interrupted) as e:
    trainer.train(c, str(tmp_path), progress=False)
  assert str(e.value) == (
      f'interrupted (Ctrl-C) after step 3 of 8: saved checkpoint 3 in '
      f'{tmp_path}/checkpoints; rerun the same command to resume.')
  assert 'press Ctrl-C again to stop at once' in caplog.text
  assert signal.getsignal(signal.SIGINT) is before
  assert os.listdir(tmp_path / 'checkpoints') == ['3']
  monkeypatch.setattr(data_lib.TokenLoader, 'batch', batch)
  out = trainer.train(c, str(tmp_path), progress=False)
  assert out['summary']['resumed_from'] == 3
  assert out['summary']['steps'] == 8 and not out['summary']['preempted']
  assert [r['step'] for r in metrics.read_jsonl(
      str(tmp_path / 'metrics.jsonl'))] == list(range(1, 9))


def test_a_second_ctrl_c_stops_at_once(tmp_path, monkeypatch):
  """The second SIGINT meets Python's handler: a plain KeyboardInterrupt
  inside the step, no save of it (the one at step 2 is kept)."""
  c = tiny('muon', steps=8)
  c.train.update(checkpoint_every=2, eval_every=0)
  _signal_at_step_3(monkeypatch, signal.SIGINT, times=2)
  before = signal.getsignal(signal.SIGINT)
  with pytest.raises(KeyboardInterrupt) as e:
    trainer.train(c, str(tmp_path), progress=False)
  assert type(e.value) is KeyboardInterrupt  # pylint: disable=unidiomatic-typecheck
  assert signal.getsignal(signal.SIGINT) is before
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']


def test_an_ignored_sigint_stays_ignored(tmp_path, monkeypatch):
  c = tiny('muon', steps=5)
  c.train.update(checkpoint_every=0, eval_every=0)
  _signal_at_step_3(monkeypatch, signal.SIGINT)
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    out = trainer.train(c, str(tmp_path), progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, previous)
  assert out['summary']['steps'] == 5 and not out['summary']['preempted']


def test_ctrl_c_during_the_last_step_saves_it(tmp_path, monkeypatch):
  """It raised Interrupted after a run that saved nothing (the last step
  was left to the cadence, here none), and the rerun was refused: metrics
  but no checkpoint."""
  c = tiny('muon', steps=3)
  c.train.update(checkpoint_every=0, eval_every=0)
  batch = _signal_at_step_3(monkeypatch, signal.SIGINT)
  with pytest.raises(faults.Interrupted, match='after step 3 of 3: saved '
                     'checkpoint 3'):
    trainer.train(c, str(tmp_path), progress=False)
  assert os.listdir(tmp_path / 'checkpoints') == ['3']
  monkeypatch.setattr(data_lib.TokenLoader, 'batch', batch)
  again = trainer.train(c, str(tmp_path), progress=False)
  assert again['summary']['resumed_from'] == 3
