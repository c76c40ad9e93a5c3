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
from orthax.train import checkpoint_formats  # noqa: E402
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


def test_a_state_saved_with_optax_named_chain_restores(tmp_path):
  """Checkpoints written before the recipes chained their stages with
  ``orthax.transforms.named_chain`` hold an ``OrderedDict`` where the state
  now has a ``dict``: orbax matches the stages by name, so they restore."""
  import collections  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import orthax  # pylint: disable=g-import-not-at-top
  params = {'w': jnp.arange(128.).reshape(8, 16) / 128, 'b': jnp.zeros(16)}
  tx = orthax.muon()
  _, state = tx.update(jax.tree.map(jnp.cos, params), tx.init(params), params)
  chain = lambda x: isinstance(x, dict) and 'orthogonalize' in x
  old = jax.tree.map(
      lambda x: collections.OrderedDict(x) if chain(x) else x, state,
      is_leaf=chain)
  assert jax.tree.structure(old) != jax.tree.structure(state)
  saver = ocp.StandardCheckpointer()
  saver.save(tmp_path / 'old', old)
  saver.wait_until_finished()
  restored = saver.restore(
      tmp_path / 'old', jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_brief_error_text():
  long = ValueError('read failed\n' + 'spec line\n' * 70)
  assert checkpoint._brief(long) == 'ValueError: read failed ...'  # pylint: disable=protected-access
  assert checkpoint._brief(OSError('x' * 1000)).endswith('x ...')  # pylint: disable=protected-access
  assert checkpoint._brief(KeyError('k')) == "KeyError: 'k'"  # pylint: disable=protected-access


def _save_and_restore_intact(tmp_path, saved, like, step=3):
  """Saves ``saved`` (sealed) as ``step`` and restores it with
  ``restore_intact`` into ``like``'s shapes and dtypes: ``(state, step)``."""
  import jax  # pylint: disable=g-import-not-at-top
  ck = checkpoint.Checkpointer(str(tmp_path / 'ck'), 1)
  ck.save(step, saved, force=True)
  ck.seal_if_written()
  ck.close()
  ck = checkpoint.Checkpointer(str(tmp_path / 'ck'), 1)
  try:
    return ck.restore_intact(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like))
  finally:
    ck.close()


def test_a_stage_under_its_former_name_restores(tmp_path):
  """Checkpoints written before the matrix chains' ``'weight_decay'`` stage
  became ``'decoupled_weight_decay'`` (under ``inject_hyperparams`` the old
  name clashed with the hyperparameter) hold it under the old name: it is
  read there, and the hyperparameter of that name stays where it is."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import orthax  # pylint: disable=g-import-not-at-top
  params = {'w': jnp.arange(128.).reshape(8, 16) / 128, 'b': jnp.zeros(16)}
  tx = optax.inject_hyperparams(orthax.muon)(learning_rate=0.02,
                                             weight_decay=0.125)
  state = tx.init(params)
  for k in range(3):
    _, state = tx.update(jax.tree.map(lambda x: jnp.cos(x + k), params),
                         state, params)
  old = checkpoint_formats.under_former_names(state)
  paths = lambda t: {orthax._tree.path_str(p) for p, _ in  # pylint: disable=protected-access
                     jax.tree_util.tree_flatten_with_path(t)[0]}
  gone = paths(state) - paths(old)
  assert gone and all('matrix/inner_state/decoupled_weight_decay/' in p
                      for p in gone), gone
  assert 'hyperparams/weight_decay' in paths(old)
  restored, step = _save_and_restore_intact(tmp_path, old, state)
  assert step == 3
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Another run's state is still refused, by its paths.
  ck = checkpoint.Checkpointer(str(tmp_path / 'ck'), 1)
  with pytest.raises(checkpoint.CheckpointMismatchError, match='here only'):
    ck.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            {**state._asdict(), 'extra': jnp.zeros(2)}))
  ck.close()


def test_a_guard_state_without_the_result_flags_restores(tmp_path):
  """Checkpoints written before the non-finite guard also flagged its
  step's result (``nonfinite_updates``, ``nonfinite_state``) hold its four
  older fields: they are read, and the new flags start False. Together
  with a stage under its former name, as such a checkpoint has both."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import orthax  # pylint: disable=g-import-not-at-top
  params = {'w': jnp.arange(128.).reshape(8, 16) / 128, 'b': jnp.zeros(16)}
  tx = optax.inject_hyperparams(orthax.muon)(learning_rate=0.02)
  state = tx.init(params)
  for k in range(2):
    _, state = tx.update(jax.tree.map(lambda x: jnp.cos(x + k), params),
                         state, params)
  _, skipped = tx.update({'w': params['w'], 'b': params['b'].at[0].set(1e30)},
                         state, params)  # overflows AdamW's v: flags set
  assert orthax.nonfinite_leaves(skipped, result=True)
  old = checkpoint_formats.under_former_names(
      checkpoint_formats.without_added_fields(skipped))
  guard = orthax.nonfinite_status(skipped)
  assert not any('nonfinite_state' in orthax._tree.path_str(p) for p, _ in  # pylint: disable=protected-access
                 jax.tree_util.tree_flatten_with_path(old)[0])
  restored, step = _save_and_restore_intact(tmp_path, old, skipped)
  assert step == 3
  assert jax.tree.structure(restored) == jax.tree.structure(skipped)
  got = orthax.nonfinite_status(restored)
  for a, b in zip(jax.tree.leaves(got.inner_state),
                  jax.tree.leaves(guard.inner_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(got.total) == int(guard.total) == 1
  assert orthax.nonfinite_leaves(restored, result=True) == []
  # The restored state steps on like the saved one.
  g = jax.tree.map(jnp.sin, params)
  for a, b in zip(jax.tree.leaves(tx.update(g, restored, params)[0]),
                  jax.tree.leaves(tx.update(g, skipped, params)[0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nested_guard_states_without_the_result_flags_restore(tmp_path):
  """``orthax.skip_if_nonfinite(orthax.muon())``: a guard around a recipe's
  own guard. Written by hand in the older four-field layout (not by the
  migration's own function), both levels restore."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import orthax  # pylint: disable=g-import-not-at-top
  params = {'w': jnp.arange(128.).reshape(8, 16) / 128, 'b': jnp.zeros(16)}
  tx = orthax.skip_if_nonfinite(orthax.muon(0.02))
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(jnp.cos, params), state, params)
  old = checkpoint_formats.GuardStateBefore20261206
  inner = state.inner_state
  by_hand = old(old(inner.inner_state, inner.nonfinite, inner.consecutive,
                    inner.total), state.nonfinite, state.consecutive,
                state.total)
  restored, _ = _save_and_restore_intact(tmp_path, by_hand, state, step=1)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
