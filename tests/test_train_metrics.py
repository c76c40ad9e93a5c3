"""What a training run reports besides the loss: a smoothed loss on the
progress line at every step, step time and MFU in the records, TensorBoard
event files and Weights & Biases logging."""

from __future__ import annotations

import glob
import json
import math
import os
import struct
import sys
import time
import types

import pytest

from orthax.train import configs
from orthax.train import flops
from orthax.train import metrics
from orthax.train import model as model_lib
from orthax.train import trainer


def tiny_config(**train):
  cfg = configs.base_config('muon')
  cfg.model.d_model, cfg.model.num_layers = 32, 1
  cfg.train.steps, cfg.train.eval_every, cfg.train.log_every = 6, 0, 3
  cfg.schedule.warmup_steps = 0
  cfg.train.update(train)
  return cfg


def test_smoothed_is_a_debiased_ema_that_skips_nan():
  s = metrics.Smoothed(0.9)
  assert s.info() == {}
  s.add(4.0)
  assert s.value() == pytest.approx(4.0)  # debiased: not 0.4
  s.add(float('nan'))
  s.add(2.0)
  ema = 0.9 * 0.1 * 4.0 + 0.1 * 2.0
  assert s.value() == pytest.approx(ema / (1 - 0.81))


class Tty:
  """A terminal stream: records every frame drawn."""

  def __init__(self):
    self.text = ''

  def isatty(self):
    return True

  def write(self, s):
    self.text += s

  def flush(self):
    pass


def test_terminal_line_shows_a_smoothed_loss_between_log_points(monkeypatch):
  out = Tty()
  monkeypatch.setattr(sys, 'stderr', out)
  res = trainer.train(tiny_config(log_every=5), progress=True)
  frames = [f for f in out.text.split('\r') if f.strip()]
  assert len(frames) == 6
  # Steps 2..4 are not log points, yet each frame has a loss: the smoothed
  # loss of the steps before it (read one step late, so step 1 has none).
  losses = [float(f.split('loss ')[1].split()[0]) if 'loss ' in f else None
            for f in frames]
  assert losses[0] is None and all(x is not None for x in losses[1:])
  raw = [r['loss'] for r in res['train']]  # steps 5 and 6
  assert len(raw) == 2 and all(math.isfinite(x) for x in losses[1:])
  assert len(set(losses[1:4])) == 3  # it moves at every step


def test_records_have_step_time_and_mfu_when_the_peak_is_known():
  res = trainer.train(tiny_config(peak_flops=1e11), progress=False)
  rec = res['train'][-1]
  assert rec['step_time_s'] == pytest.approx(2048 / rec['tokens_per_s'])
  setup = trainer.build(trainer.as_dict(tiny_config()), 256, abstract=True)
  n = model_lib.num_params(setup.abstract_params)
  # 6N (N without the 256×32 input embedding) + 12·L·d·T.
  per_token = 6 * (n - 256 * 32) + 12 * 1 * 32 * 128
  assert setup.flops_per_token == per_token
  assert rec['mfu'] == pytest.approx(per_token * rec['tokens_per_s'] / 1e11)
  # A CPU has no known peak: no MFU unless train.peak_flops is set.
  assert 'mfu' not in trainer.train(tiny_config(), progress=False)['train'][-1]


def test_peak_flops_by_device_kind():
  assert flops.peak_flops('NVIDIA H100 80GB HBM3') == 989e12
  assert flops.peak_flops('TPU v5 lite') == 197e12
  assert flops.peak_flops('TPU v5p') == 459e12  # longest prefix wins
  assert flops.peak_flops('cpu') is None


def _scalars(event_file):
  """The (tag, step, value) scalars of a TensorBoard event file, read by
  its record framing (length, crc, payload, crc) and event proto."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out, data = [], open(event_file, 'rb').read()
  i = 0
  while i < len(data):
    (n,) = struct.unpack('<Q', data[i:i + 8])
    ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
    i += 12 + n + 4
    for v in ev.summary.value:
      out.append((v.tag, ev.step, v.simple_value))
  return out


def test_tensorboard_event_files_hold_the_records(tmp_path):
  res = trainer.train(tiny_config(tensorboard=True), str(tmp_path),
                      progress=False)
  files = glob.glob(os.path.join(tmp_path, 'tensorboard', 'events.*'))
  assert len(files) == 1
  got = {(t, s): v for t, s, v in _scalars(files[0])}
  for rec in res['train']:
    assert got[('loss', rec['step'])] == pytest.approx(rec['loss'])
    assert got[('step_time_s', rec['step'])] == pytest.approx(
        rec['step_time_s'])


def test_tensorboard_resume_purges_the_steps_after_the_checkpoint(tmp_path):
  """A rerun resuming from step 4 tells TensorBoard to drop the earlier
  files' points after it (before: steps 5.. twice, as the crash left
  them), with tensorboardX's START event at step 5."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  writer = metrics.MetricWriter(str(tmp_path), tensorboard=True)
  for step in range(1, 8):
    writer.write({'step': step, 'loss': float(step)})
  writer.close()
  time.sleep(1.1)  # event files are named by the second they start in
  writer = metrics.MetricWriter(str(tmp_path), resume_step=4,
                                tensorboard=True)
  writer.write({'step': 5, 'loss': 0.5})
  writer.close()
  files = sorted(glob.glob(os.path.join(tmp_path, 'tensorboard', 'events.*')),
                 key=os.path.getmtime)
  assert len(files) == 2
  data, i, starts = open(files[-1], 'rb').read(), 0, []
  while i < len(data):
    (n,) = struct.unpack('<Q', data[i:i + 8])
    ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
    i += 12 + n + 4
    if ev.HasField('session_log'):
      starts.append((ev.session_log.status, ev.step))
  assert starts == [(event_pb2.SessionLog.START, 5)], starts
  assert [r['step'] for r in metrics.read_jsonl(
      os.path.join(tmp_path, 'metrics.jsonl'))] == [1, 2, 3, 4, 5]


def test_wandb_gets_every_record_and_the_config(tmp_path, monkeypatch):
  calls = []

  class Run:
    def log(self, data, step):
      calls.append(('log', step, data))

    def finish(self):
      calls.append(('finish',))

  fake = types.ModuleType('wandb')
  fake.init = lambda **kw: calls.append(('init', kw)) or Run()
  monkeypatch.setitem(sys.modules, 'wandb', fake)
  res = trainer.train(tiny_config(wandb_project='orthax-test'),
                      str(tmp_path), progress=False)
  assert calls[0][0] == 'init' and calls[0][1]['project'] == 'orthax-test'
  assert calls[0][1]['config']['optimizer']['name'] == 'muon'
  logs = [c for c in calls if c[0] == 'log']
  assert [c[1] for c in logs] == [r['step'] for r in res['train']]
  assert logs[-1][2]['loss'] == res['train'][-1]['loss']
  assert calls[-1] == ('finish',)


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)  # import fails
  with pytest.raises(ValueError, match="wandb_project='p' needs the wandb"):
    trainer.train(tiny_config(wandb_project='p'), str(tmp_path),
                  progress=False)
  # Refused before anything is written (it left an empty metrics.jsonl).
  assert not (tmp_path / 'metrics.jsonl').exists()
  monkeypatch.setitem(sys.modules, 'tensorboardX', None)
  with pytest.raises(ValueError, match='tensorboard=True needs the '
                     'tensorboardX'):
    metrics.MetricWriter(str(tmp_path / 'tb'), tensorboard=True)
  assert not (tmp_path / 'tb').exists()


def test_jsonl_files_are_strict_json_with_null_for_non_finite(tmp_path):
  """JSON has no NaN: a record's non-finite values are written as null
  (``jq`` and JavaScript refuse a bare NaN) and read back as NaN."""
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write({'step': 1, 'loss': float('nan'), 'step_time_s': float('inf'),
                'tokens': 4})
  writer.close()
  line = (tmp_path / 'metrics.jsonl').read_text()
  assert json.loads(line, parse_constant=lambda c: pytest.fail(c)) == {
      'step': 1, 'loss': None, 'step_time_s': None, 'tokens': 4}
  (rec,) = metrics.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert math.isnan(rec['loss']) and math.isnan(rec['step_time_s'])
  assert rec['step'] == 1
  nested = {'val_loss': [1.5, float('nan')], 'diverged': 'loss is nan'}
  assert json.loads(metrics.json_line(nested)) == {
      'val_loss': [1.5, None], 'diverged': 'loss is nan'}


def _cut(path, records):
  """``path`` holding ``records`` and then a line cut short mid-write."""
  with open(path, 'w') as f:
    f.write(''.join(metrics.json_line(r) for r in records))
    f.write('{"step": 3, "lo')


@pytest.mark.parametrize('resume_step', [2, 0])
def test_a_line_cut_by_a_crash_is_dropped_before_appending(tmp_path,
                                                            resume_step):
  """A kill mid-write leaves an unterminated last line; the resumed run's
  first record was appended to it, and the file was unreadable for good."""
  path = tmp_path / 'metrics.jsonl'
  _cut(path, [{'step': 1, 'loss': 5.0}, {'step': 2, 'loss': 4.0}])
  writer = metrics.MetricWriter(str(tmp_path), resume_step=resume_step)
  writer.write({'step': 3, 'loss': 3.0})
  writer.close()
  steps = [r['step'] for r in metrics.read_jsonl(str(path))]
  assert steps == ([1, 2, 3] if resume_step else [3])


def test_a_damaged_line_inside_names_the_file_and_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl: line 2 is not a '
                     r'JSON record'):
    metrics.read_jsonl(str(path))


def test_reference_mode_runs_drop_a_cut_line(tmp_path, monkeypatch):
  """``orthax-sweep --reference_modes`` appended a finished run to a cut
  line and then lost it (the joined line was the last, and dropped)."""
  from orthax.train import compare  # pylint: disable=g-import-not-at-top
  from orthax.train import reference_modes  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(compare, 'train_one',
                      lambda *a, **k: {'final_val_loss': 1.5})
  path = tmp_path / 'runs.jsonl'
  _cut(path, [])
  out = reference_modes.run(configs.base_config('muon'), str(tmp_path),
                            widths=[32], seeds=[0], optimizers=['muon'],
                            progress=False)
  assert out and len(out) == len(reference_modes.cases(['muon']))
  assert len(metrics.read_jsonl(str(path))) == len(out)
