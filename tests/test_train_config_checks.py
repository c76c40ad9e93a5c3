"""The trainer's config checks: each bad value named by its key, before
the model is built; what counts as a change of the run."""

from __future__ import annotations

import copy
import subprocess
import sys
import pathlib

import pytest

pytest.importorskip('ml_collections')
pytest.importorskip('orbax.checkpoint')

from orthax.train import rundir  # noqa: E402
from orthax.train import trainer  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from train_faults import ROOT, config  # noqa: E402  pylint: disable=g-import-not-at-top


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
              'max_to_keep', 'tensorboard', 'nonfinite', 'peak_flops',
              'wandb_project'):  # the last two: the MFU metric, reporting
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


@pytest.mark.parametrize('key,value,match', [
    ('train.steps', 0, 'train.steps must be an integer >= 1, got 0'),
    ('train.steps', -1, 'train.steps must be an integer >= 1, got -1'),
    ('train.steps', 2.5, 'train.steps must be an integer >= 1, got 2.5'),
    ('train.log_every', 0, 'train.log_every must be an integer >= 1'),
    ('train.eval_every', -1, 'train.eval_every must be an integer >= 0 or '
     'None'),
    ('train.checkpoint_every', -2, 'train.checkpoint_every must be'),
    ('data.batch_size', 0, 'data.batch_size must be an integer >= 1'),
    # 0 compiled the full depth without a word.
    ('dry_run.num_layers', 0, 'dry_run.num_layers must be an integer >= 1 '
     'or None, got 0'),
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
    # These ended in a traceback ('data type ... not understood'), a NaN
    # gradient at step 1 or a negative MFU.
    ('model.dtype', 'bogus', r"model.dtype must be a floating-point dtype "
     r"name \(e.g. bfloat16\), got 'bogus'"),
    ('model.param_dtype', 'int32', 'model.param_dtype must be a floating'),
    ('data.token_dtype', 'float32', r'data.token_dtype must be an integer '
     r'dtype name \(e.g. uint16\) or None'),
    ('model.rope_base', -1.0, 'model.rope_base must be a positive number'),
    ('train.peak_flops', -1.0,
     'train.peak_flops must be a positive number or None, got -1.0'),
    ('model.vocab_size', 100, r"model.vocab_size=100 is below the data's "
     r'vocabulary \(256'),
    ('data.val_fraction', 1.0,
     r'data.val_fraction must be in \(0, 1\), got 1.0'),
    # A ZeroDivisionError traceback; a traceback after the model was
    # built; silently run as 1; a dict() error naming no key.
    ('model.num_heads', 0, 'model.num_heads must be an integer >= 1, got 0'),
    ('model.seq_len', 0, 'model.seq_len must be an integer >= 1, got 0'),
    ('mesh.comm_dtype', 'foo', r"mesh.comm_dtype must be bfloat16, float32 "
     r"\(or wider\) or None, got 'foo'"),
    # Zeros on the wire; Inf past 6.5e4 (the dry run passed both).
    ('mesh.comm_dtype', 'int8', r"mesh.comm_dtype must be bfloat16, float32 "
     r"\(or wider\) or None, got int8"),
    ('mesh.comm_dtype', 'float16', r'mesh.comm_dtype must be bfloat16, '
     r'float32 \(or wider\) or None, got float16: float16 overflows'),
    ('mesh.data', 0, 'mesh.data must be an int >= 1, got 0'),
    ('mesh.rules', 'abc', 'mesh.rules must map logical axis names to mesh '
     "axes .*got 'abc'"),
    ('mesh.rules', {'embed': 'model'}, r"mesh.rules\['embed'\] = 'model': a "
     "rule maps a logical axis name to one of the mesh axes"),
    # Without the guard a NaN step was applied and checkpointed over the
    # good checkpoints; train.nonfinite did nothing.
    ('optimizer.kwargs.check_finite', False,
     'optimizer.kwargs.check_finite=False: the trainer needs'),
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


def test_a_damaged_saved_config_is_named_and_force_goes_on(tmp_path):
  """A damaged ``config.json`` ended in a bare JSONDecodeError naming no
  file, with or without --force."""
  from orthax.train import rundir  # pylint: disable=g-import-not-at-top
  (tmp_path / 'config.json').write_text('{"train": {"steps": ')
  cfg = trainer.as_dict(config())
  with pytest.raises(ValueError, match=r'config.json is damaged \(.*\): it '
                     r'records the config .* --force'):
    rundir.check(str(tmp_path), cfg, resuming=True)
  rundir.check(str(tmp_path), cfg, resuming=True, force=True)


@pytest.mark.parametrize('content', [b'\xff\xfe not utf-8', b'[1, 2]'])
def test_a_saved_config_that_is_not_a_json_object_is_named(tmp_path,
                                                           content):
  """Invalid UTF-8 raised a bare UnicodeDecodeError; a JSON list crashed
  later, comparing configs."""
  from orthax.train import rundir  # pylint: disable=g-import-not-at-top
  (tmp_path / 'config.json').write_bytes(content)
  with pytest.raises(ValueError, match=r'config.json is damaged'):
    rundir.check(str(tmp_path), trainer.as_dict(config()), resuming=True)


def test_force_starts_over_past_a_damaged_metrics_line(tmp_path):
  """A damaged line inside metrics.jsonl blocked even a forced fresh
  start (both the start check and the writer read the old records)."""
  from orthax.train import metrics  # pylint: disable=g-import-not-at-top
  from orthax.train import rundir  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n')
  cfg = trainer.as_dict(config())
  with pytest.raises(ValueError, match=r'line 2 is not a JSON record.*'
                     r'--force'):
    rundir.check(str(tmp_path), cfg, resuming=False)
  rundir.check(str(tmp_path), cfg, resuming=False, force=True)
  writer = metrics.MetricWriter(str(tmp_path), resume_step=0)
  writer.write({'step': 1, 'loss': 2.0})
  writer.close()
  assert [r['step'] for r in metrics.read_jsonl(str(path))] == [1]


def test_a_forced_resume_on_another_mesh_keeps_the_slot_state(tmp_path):
  """ARO keeps each matrix's rotation on its owner device (a slot state),
  whose layout the checkpoint saves with it: a forced resume after a
  ``mesh.*`` change (the saved config edited to record another mesh: this
  process has one device; tests/test_train_mesh.py resumes on real ones)
  moves the state into this mesh's layout and trains on."""
  import json  # pylint: disable=g-import-not-at-top
  c = config(steps=4)
  c.optimizer = trainer.as_dict(c)['optimizer'] | {'name': 'aro'}
  c.train.checkpoint_every = 2
  trainer.train(c, str(tmp_path), progress=False, stop_at=2)
  saved = json.loads((tmp_path / rundir.CONFIG).read_text())
  saved['mesh']['fsdp'], saved['mesh']['tensor'] = 4, 2
  (tmp_path / rundir.CONFIG).write_text(json.dumps(saved))
  out = trainer.train(c, str(tmp_path), progress=False, force=True)
  assert out['summary']['steps'] == 4
