"""The trainer when things go wrong: damaged checkpoints, preemption, run
directories and config checks, non-finite gradients."""

from __future__ import annotations

import copy
import glob
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('ml_collections')
pytest.importorskip('orbax.checkpoint')

import orthax  # noqa: E402
from orthax.train import checkpoint  # noqa: E402
from orthax.train import data as data_lib  # noqa: E402
from orthax.train import metrics  # noqa: E402
from orthax.train import rundir  # noqa: E402
from orthax.train import step as step_lib  # noqa: E402
from orthax.train import trainer  # noqa: E402

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


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """An uninterrupted run and a workdir stopped after step 8 (checkpoints
  4 and 8, metrics of steps 1-8)."""
  whole = trainer.train(config(), None, progress=False)
  part = tmp_path_factory.mktemp('part')
  trainer.train(config(), str(part), progress=False, stop_at=8)
  return whole, part


def copy_run(part, tmp_path):
  work = tmp_path / 'run'
  shutil.copytree(part, work)
  return work


def damage(step_dir: pathlib.Path, how: str) -> str:
  """Writes 4 KiB of random bytes into, or truncates, the largest data file
  of a checkpoint; returns its path relative to the step directory."""
  files = glob.glob(str(step_dir / 'default' / '**' / 'd' / '*'),
                    recursive=True)
  path = max(files, key=os.path.getsize)
  size = os.path.getsize(path)
  assert size > 8192, size
  if how == 'corrupt':
    with open(path, 'r+b') as f:
      f.seek(size // 2)
      f.write(np.random.default_rng(0).bytes(4096))
  else:
    os.truncate(path, size // 2)
  return os.path.relpath(path, step_dir)


# -- damaged checkpoints ------------------------------------------------------


def test_checkpoints_carry_checksums(runs):
  _, part = runs
  for step in (4, 8):
    d = part / 'checkpoints' / str(step)
    record = json.loads((d / checkpoint.CHECKSUMS).read_text())
    assert record['step'] == step and record['algorithm'] == 'sha256'
    assert any('/d/' in f for f in record['files'])
    assert checkpoint.check_files(str(d)) == []


@pytest.mark.parametrize('how', ['corrupt', 'truncate'])
def test_damaged_checkpoint_falls_back_and_continues_bit_exact(
    runs, tmp_path, caplog, how):
  whole, part = runs
  work = copy_run(part, tmp_path)
  name = damage(work / 'checkpoints' / '8', how)
  with caplog.at_level(logging.WARNING, logger='orthax.train'):
    out = trainer.train(config(), str(work), progress=False)
  why = 'SHA-256 mismatch' if how == 'corrupt' else 'truncated'
  assert f'checkpoint step 8 in {work}/checkpoints is damaged: {name}' in (
      caplog.text)
  assert why in caplog.text
  assert 'resuming from checkpoint step 4 instead of damaged step(s) [8]' in (
      caplog.text)
  assert out['summary']['resumed_from'] == 4
  assert (work / 'checkpoints.damaged' / '8').is_dir()
  # Records 5-8 of the first attempt were dropped and redone: no duplicates.
  assert_same_run(whole, metrics.read_jsonl(str(work / 'metrics.jsonl')),
                  out['state'])


def test_all_checkpoints_damaged_is_an_error(runs, tmp_path):
  _, part = runs
  work = copy_run(part, tmp_path)
  damage(work / 'checkpoints' / '8', 'corrupt')
  damage(work / 'checkpoints' / '4', 'truncate')
  with pytest.raises(checkpoint.DamagedCheckpointError,
                     match=r'every checkpoint in .* is damaged: step 8: .*'
                     r'SHA-256 mismatch.*; step 4: .*expected'):
    trainer.train(config(), str(work), progress=False)
  assert sorted(os.listdir(work / 'checkpoints')) == ['4', '8']  # untouched


def test_checkpoints_without_a_record(runs, tmp_path, caplog):
  """No checksum record (an older orthax, or killed before hashing): a
  readable step is restored with a warning, an unreadable one is damaged;
  with a record, a restore error that is not damage is raised as is."""
  whole, part = runs
  work = copy_run(part, tmp_path)
  ck = checkpoint.Checkpointer(str(work / 'checkpoints'), 4)
  (work / 'checkpoints' / '8' / checkpoint.CHECKSUMS).unlink()
  with caplog.at_level(logging.WARNING, logger='orthax.train'):
    _, step = ck.restore_intact(whole['state'])
  assert step == 8 and 'step 8 in' in caplog.text
  assert 'has no checksum record' in caplog.text
  damage(work / 'checkpoints' / '8', 'truncate')
  with caplog.at_level(logging.WARNING, logger='orthax.train'):
    _, step = ck.restore_intact(whole['state'])
  assert step == 4
  assert 'step 8 in' in caplog.text and 'no checksum record, and ' \
      'unreadable: ' in caplog.text
  wrong = whole['state']._replace(params={'w': np.zeros(3)})
  with pytest.raises(Exception) as e:
    ck.restore_intact(wrong)
  assert not isinstance(e.value, checkpoint.DamagedCheckpointError)
  ck.close()


# -- run directories and config checks -----------------------------------


def test_config_is_saved_and_a_changed_resume_is_refused(runs, tmp_path):
  _, part = runs
  saved = json.loads((part / rundir.CONFIG).read_text())
  assert saved['train']['steps'] == 12 and saved['optimizer']['name'] == 'muon'
  work = copy_run(part, tmp_path)
  c = config()
  lr = c.optimizer.learning_rate  # the default, as saved
  assert saved['optimizer']['learning_rate'] == lr != 0.5
  c.train.steps = 14
  c.optimizer.learning_rate = 0.5
  c.train.log_every = 3  # cosmetic: not reported
  with pytest.raises(ValueError, match=r'(?s)keys that change the run .*'
                     rf'optimizer.learning_rate: {lr} -> 0.5\n'
                     r'  train.steps: 12 -> 14\nResuming would'):
    trainer.train(c, str(work), progress=False)
  c = config()
  c.train.steps = 9
  out = trainer.train(c, str(work), progress=False, force=True)
  assert out['summary']['steps'] == 9
  assert json.loads((work / rundir.CONFIG).read_text())['train']['steps'] == 9


def test_forced_resume_that_cannot_restore_keeps_the_saved_config(
    runs, tmp_path):
  """``--force`` with another model: the checkpoints do not fit, which is
  said in one ValueError naming the directory; ``config.json`` still holds
  the config they were saved with, so the original command resumes."""
  _, part = runs
  work = copy_run(part, tmp_path)
  saved = (work / rundir.CONFIG).read_text()
  c = config()
  c.model.d_model = 48
  with pytest.raises(ValueError, match=(
      rf"the checkpoints in {work}/checkpoints do not fit this config's "
      r'train state \(.*\): they were saved by a run of another model or '
      'optimizer')):
    trainer.train(c, str(work), progress=False, force=True)
  assert (work / rundir.CONFIG).read_text() == saved
  assert sorted(os.listdir(work / 'checkpoints')) == ['4', '8']
  out = trainer.train(config(), str(work), progress=False)
  assert out['summary']['resumed_from'] == 8


def test_validation_split_too_small_for_one_batch_is_named_at_start():
  """Said before the model is built, in the config's keys (it was found at
  the first evaluation, with the loader's arguments)."""
  c = config()
  c.data.val_fraction = 3e-4  # 140 tokens of the embedded text: > seq_len
  with pytest.raises(ValueError, match=(
      r'the validation split has \d+ tokens, fewer than one evaluation batch '
      r'of data.eval_batch_size x model.seq_len = 8 x 32 needs \(257\): '
      r'lower data.eval_batch_size')):
    trainer.train(c, None, progress=False)
  c.train.eval_every = 0  # no evaluation: no need
  c.train.steps = 2
  c.schedule.warmup_steps = 0
  assert trainer.train(c, None, progress=False)['summary']['steps'] == 2


def test_run_changing_keys():
  a = trainer.as_dict(config())
  b = copy.deepcopy(a)
  for key in ('log_every', 'eval_every', 'eval_batches', 'checkpoint_every',
              'max_to_keep', 'tensorboard', 'nonfinite'):
    b['train'][key] = 'changed'
  b['hardware'] = 'tpu'
  b['data']['eval_batch_size'] = 4
  assert not rundir.run_changes(a, b)
  b['mesh']['fsdp'] = 2
  b['seed'] = 1
  b['data']['val_fraction'] = 0.2
  b['optimizer']['kwargs']['ns_steps'] = 3
  assert [k for k, _, _ in rundir.run_changes(a, b)] == [
      'data.val_fraction', 'mesh.fsdp', 'optimizer.kwargs.ns_steps', 'seed']
  assert ('optimizer.kwargs.ns_steps', '<absent>', 3) in rundir.run_changes(
      a, b)


def test_metrics_without_checkpoint_are_not_overwritten(runs, tmp_path):
  _, part = runs
  work = copy_run(part, tmp_path)
  shutil.rmtree(work / 'checkpoints')
  with pytest.raises(ValueError, match='has metrics.jsonl with 8 records '
                     r'\(up to step 8\) but no checkpoint'):
    trainer.train(config(), str(work), progress=False)
  assert len(metrics.read_jsonl(str(work / 'metrics.jsonl'))) == 8


@pytest.mark.parametrize('key,value,match', [
    ('train.steps', 0, 'train.steps must be an integer >= 1, got 0'),
    ('train.steps', -1, 'train.steps must be an integer >= 1, got -1'),
    ('train.steps', 2.5, 'train.steps must be an integer >= 1, got 2.5'),
    ('train.log_every', 0, 'train.log_every must be an integer >= 1'),
    ('train.eval_every', -1, 'train.eval_every must be an integer >= 0 or '
     'None'),
    ('train.checkpoint_every', -2, 'train.checkpoint_every must be'),
    ('data.batch_size', 0, 'data.batch_size must be an integer >= 1'),
    ('train.nonfinite', 'ignore', r"train.nonfinite must be one of \('raise', "
     r"'skip'\)"),
    ('train.log_evry', 1, r'unknown config key\(s\) train.log_evry \(did you '
     r'mean train.log_every\?\)'),
    ('model.bogus', 1, r'unknown config key\(s\) model.bogus'),
    ('bogus', 1, r'unknown config key\(s\) bogus'),
    ('optimizer.bogus', 1, r"optimizer.bogus. .*keywords of recipe 'muon' "
     r"\(orthax.muon\) go in optimizer.kwargs: \['reference', "),
    ('optimizer.nesterov', False, r"a keyword of recipe 'muon' "
     r'\(orthax.muon\); set it as optimizer.kwargs.nesterov'),
    ('optimizer.kwargs.learning_rate', 1.0, 'set by the trainer'),
    # A negative rate trained uphill: the trainer passes a schedule, which
    # the recipes cannot check.
    ('optimizer.learning_rate', -0.04,
     r'optimizer.learning_rate must be a finite number >= 0, got -0.04'),
    ('optimizer.learning_rate', None,
     r'optimizer.learning_rate must be a finite number >= 0, got None'),
    ('optimizer.adam_learning_rate', -3e-3,
     r'optimizer.adam_learning_rate must be a finite number >= 0 or None'),
    ('optimizer.weight_decay', float('nan'),
     r'optimizer.weight_decay must be a finite number >= 0 or None, got nan'),
])
def test_bad_config_values_name_the_key(key, value, match):
  cfg = trainer.as_dict(config())
  *path, last = key.split('.')
  holder = cfg
  for k in path:
    holder = holder[k]
  holder[last] = value
  with pytest.raises(ValueError, match=match):
    trainer.train(cfg, None, progress=False)


def test_script_names_an_unknown_optimizer_key():
  proc = subprocess.run(
      [sys.executable, 'scripts/train.py', '--config.optimizer.bogus=1'],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 2, proc.stderr[-3000:]
  err = proc.stderr.strip().splitlines()
  assert err[-2].startswith('orthax-train: error: unknown optimizer key(s) '
                            'optimizer.bogus.'), err
  assert "keywords of recipe 'muon'" in err[-2]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert err[-1] == ('orthax-train: (ORTHAX_TRACEBACK=1 shows where it was '
                     'raised)')


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


# -- preemption --------------------------------------------------------------

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


def test_sigterm_checkpoints_exits_and_resumes_bit_exact(tmp_path):
  work = tmp_path / 'run'
  # The child compiles as this process does (tests/conftest.py): its steps
  # are compared bit for bit with an uninterrupted run made here.
  env = dict(os.environ)
  if 'ORTHAX_TEST_XLA_FLAGS' in env:
    env['XLA_FLAGS'] = env['ORTHAX_TEST_XLA_FLAGS']
  proc = subprocess.Popen(
      [sys.executable, '-c', CHILD, f'--workdir={work}', *FLAGS],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=env)
  deadline = time.time() + 600
  while len(metrics.read_jsonl(str(work / 'metrics.jsonl'))) < 2:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.05)
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


def test_a_killed_run_leaves_its_last_checkpoint_verified(tmp_path, caplog):
  """SIGKILL (no handler, no close) a few steps after a save: the save's
  checksum record was written while the run went on (before: only at the
  next save or at close), so the resume verifies it."""
  work = tmp_path / 'run'
  proc = subprocess.Popen(
      [sys.executable, '-c', CHILD, f'--workdir={work}', *FLAGS],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while len(metrics.read_jsonl(str(work / 'metrics.jsonl'))) < 8:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.05)
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


# -- non-finite gradients ------------------------------------------------------


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
  assert ("step 5 skipped: non-finite gradient in ['blocks/" in caplog.text
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
                     match=r'3 steps in a row skipped for non-finite '
                     r'gradients \(train.max_consecutive_skips=3\), the last '
                     r"at step 5 in \['"):
    trainer.train(c, None, progress=False)
