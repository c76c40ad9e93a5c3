"""The trainer's checkpoints and run directory: checksums, damaged files
falling back, a changed config refused on resume, metrics kept."""

from __future__ import annotations

import glob
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip('ml_collections')
pytest.importorskip('orbax.checkpoint')

from orthax.train import checkpoint  # noqa: E402
from orthax.train import metrics  # noqa: E402
from orthax.train import rundir  # noqa: E402
from orthax.train import trainer  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from train_faults import ROOT, assert_same_run, config  # noqa: E402  pylint: disable=g-import-not-at-top


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
  damaged = [r.getMessage() for r in caplog.records
             if 'unreadable' in r.getMessage()]
  # One line, not the read error's whole TensorStore spec.
  assert all('\n' not in m and len(m) < 500 for m in damaged), damaged
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


def test_another_models_checkpoint_is_named_and_not_moved_aside(
    runs, tmp_path):
  """Checked against the step's metadata before any array is read: the
  error names the parameter leaves and both shapes, and a step without a
  checksum record (an older run) is not taken for damage and moved."""
  _, part = runs
  work = copy_run(part, tmp_path)
  for step in ('4', '8'):
    os.remove(work / 'checkpoints' / step / checkpoint.CHECKSUMS)
  c = config()
  c.model.d_model = 48
  with pytest.raises(ValueError, match=(
      r"checkpoint step 8 does not fit: 'params/blocks/attn/\w+/kernel' "
      r'saved \(2, 32, 32\), here \(2, 48, 48\)')):
    trainer.train(c, str(work), progress=False, force=True)
  assert sorted(os.listdir(work / 'checkpoints')) == ['4', '8']
  assert not os.path.exists(str(work / 'checkpoints') + '.damaged')


def test_the_script_refuses_another_models_checkpoint_in_one_line(tmp_path):
  """No orbax reads left in flight: before, their errors ('Event loop is
  closed', one traceback each) followed the error line at exit."""
  flags = ['--config=lm_cpu:muon', f'--workdir={tmp_path}',
           '--config.model.num_layers=1', '--config.train.steps=2',
           '--config.train.eval_every=0', '--config.train.checkpoint_every=2',
           '--config.schedule.warmup_steps=0']
  run = lambda *extra: subprocess.run(  # noqa: E731
      [sys.executable, 'scripts/train.py', *flags, *extra],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  first = run('--config.model.d_model=32')
  assert first.returncode == 0, first.stderr[-3000:]
  proc = run('--config.model.d_model=48', '--force')
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  err = proc.stderr.strip().splitlines()
  assert err[-2].startswith('orthax-train: error: the checkpoints in '), err
  assert 'does not fit' in err[-2]


def test_metrics_without_checkpoint_are_not_overwritten(runs, tmp_path):
  _, part = runs
  work = copy_run(part, tmp_path)
  shutil.rmtree(work / 'checkpoints')
  with pytest.raises(ValueError, match='has metrics.jsonl with 8 records '
                     r'\(up to step 8\) but no checkpoint.*none is complete, '
                     'though train.checkpoint_every is set.*--force'):
    trainer.train(config(), str(work), progress=False)
  cfg = config()
  cfg.train.checkpoint_every = 0  # not resumable: the advice says so
  with pytest.raises(ValueError, match='set train.checkpoint_every to make '
                     "runs resumable, or start over with --force.*nonfinite="):
    trainer.train(cfg, str(work), progress=False)
  assert len(metrics.read_jsonl(str(work / 'metrics.jsonl'))) == 8


def test_brief_error_text():
  long = ValueError('read failed\n' + 'spec line\n' * 70)
  assert checkpoint._brief(long) == 'ValueError: read failed ...'  # pylint: disable=protected-access
  assert checkpoint._brief(OSError('x' * 1000)).endswith('x ...')  # pylint: disable=protected-access
  assert checkpoint._brief(KeyError('k')) == "KeyError: 'k'"  # pylint: disable=protected-access
