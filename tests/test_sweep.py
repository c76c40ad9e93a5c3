"""orthax.train.sweep and scripts/sweep.py: runs recorded as they finish, a
stopped sweep resumed without repeating runs, a sweep of another setup
refused, and the summary's arithmetic on records written out by hand."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import subprocess
import sys

import pytest

from orthax.recipes import registry
from orthax.train import configs
from orthax.train import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_base(steps=6):
  c = configs.base_config('muon')
  c.model.update(num_layers=1, num_heads=2, seq_len=16)
  c.data.batch_size = 4
  c.schedule.warmup_steps = 1
  c.train.update(steps=steps, log_every=1, eval_every=3, eval_batches=1)
  return c


SPEC = sweep.SweepSpec(optimizers=('adamw', 'muon'), scales=(1.0, 2.0),
                       widths=(16, 32), seeds=(0,), eval_every=3)


def test_runs_resume_and_summarize(tmp_path):
  out = str(tmp_path)
  first = sweep.run(tiny_base(), SPEC, out, progress=False, max_runs=3)
  assert [sweep.run_key(r) for r in first] == SPEC.run_keys()[:3]
  assert first[0]['width'] == 16 and first[2]['width'] == 32
  assert all(r['seconds'] > 0 for r in first)
  runs = sweep.run(tiny_base(), SPEC, out, progress=False)
  assert sorted(map(sweep.run_key, runs)) == sorted(SPEC.run_keys())
  # The first three were not trained again: their records are unchanged.
  assert runs[:3] == first
  lines = (tmp_path / 'runs.jsonl').read_text().splitlines()
  assert len(lines) == len(SPEC.keys())
  # A crash mid-write leaves a cut line: it is dropped and that run redone.
  (tmp_path / 'runs.jsonl').write_text('\n'.join(lines[:-1]) + '\n'
                                       + lines[-1][:40])
  again = sweep.run(tiny_base(), SPEC, out, progress=False)
  assert sorted(map(sweep.run_key, again)) == sorted(SPEC.run_keys())
  assert again[:-1] == runs[:-1]
  assert len((tmp_path / 'runs.jsonl').read_text().splitlines()) == len(lines)
  # The width reached the model: the wider one keeps more optimizer state.
  state = {(r['optimizer'], r['width']): r['opt_state_bytes'] for r in runs}
  assert state[('muon', 32)] > 2 * state[('muon', 16)]
  rows = sweep.summarize(runs)
  assert {(r['optimizer'], r['width']) for r in rows} == {
      (o, w) for o in ('adamw', 'muon') for w in (16, 32)}
  md = sweep.table(rows)
  assert md.count('\n') == 3 and '| muon |' in md
  assert len(sweep.plot(rows, out)) == 2
  grid = sweep.plot_grid(rows, str(tmp_path / 'grid.png'), columns=1)
  from matplotlib import image  # pylint: disable=g-import-not-at-top
  # Two panels stacked (adamw, muon): taller than wide.
  height, width = image.imread(grid).shape[:2]
  assert height > 1.5 * width


def test_a_changed_default_keeps_the_runs_made(tmp_path, monkeypatch):
  """Runs are known by their absolute peak learning rate: after muon's
  default doubles, its old ×1 and ×2 runs are the new ×½ and ×1 (not
  trained again), and the summary's scales are multiples of the new
  default."""
  trained = []

  def train_one(cfg, name, lr_scale, **kw):  # no training: a made-up loss
    del cfg, kw
    lr = sweep.default_learning_rate(name) * lr_scale
    trained.append(lr)
    return {'optimizer': name, 'lr_scale': lr_scale, 'learning_rate': lr,
            'final_val_loss': 1.0 + lr, 'eval_steps': [3],
            'val_loss': [1.0 + lr]}

  monkeypatch.setattr(sweep.compare, 'train_one', train_one)
  spec = sweep.SweepSpec(optimizers=('muon',), scales=(1.0, 2.0),
                         widths=(16,), seeds=(0,), eval_every=3)
  old = sweep.run(tiny_base(), spec, str(tmp_path), progress=False)
  lr = sweep.default_learning_rate('muon')
  assert trained == [lr, 2 * lr]
  entry = registry.recipe_entry('muon')
  monkeypatch.setitem(registry._REGISTRY, 'muon',  # pylint: disable=protected-access
                      dataclasses.replace(entry, learning_rate=2 * lr))
  assert sweep.default_learning_rate('muon') == 2 * lr
  new_spec = dataclasses.replace(spec, scales=(0.5, 1.0, 2.0))
  runs = sweep.run(tiny_base(), new_spec, str(tmp_path), progress=False)
  assert trained == [lr, 2 * lr, 4 * lr]  # only the new ×2
  assert runs[:2] == old
  assert len((tmp_path / 'runs.jsonl').read_text().splitlines()) == 3
  row, = sweep.summarize(runs, defaults={'muon': 2 * lr})
  assert sorted(row['loss_by_scale']) == [0.5, 1.0, 2.0]
  assert row['default_lr'] == pytest.approx(2 * lr)
  assert row['loss_default'] == pytest.approx(1.0 + 2 * lr)
  assert row['best_scale'] == 0.5 and row['best_lr'] == pytest.approx(lr)


def test_another_setup_is_refused(tmp_path):
  sweep.check_same_sweep(tiny_base(), SPEC, str(tmp_path))
  sweep.check_same_sweep(tiny_base(), SPEC, str(tmp_path))  # same: fine
  with pytest.raises(ValueError, match=r'train\.steps'):
    sweep.check_same_sweep(tiny_base(steps=9), SPEC, str(tmp_path))
  other = sweep.SweepSpec(optimizers=('muon',), eval_every=5)
  with pytest.raises(ValueError, match='eval_every'):
    sweep.check_same_sweep(tiny_base(), other, str(tmp_path))
  # A config key the recorded setup does not have (even one set to None)
  # is named, with the side that has it.
  newer = tiny_base()
  with newer.unlocked():
    newer.train.new_option = None
  with pytest.raises(ValueError,
                     match=r'train\.new_option \(only in this run\)'):
    sweep.check_same_sweep(newer, SPEC, str(tmp_path))


def test_width_must_fit_the_heads():
  with pytest.raises(ValueError, match='num_heads=2'):
    sweep.config_for(tiny_base(), 33, 0)


def record(name, width, seed, scale, final, curve, lr=0.01):
  return {'optimizer': name, 'width': width, 'seed': seed,
          'lr_scale': scale, 'learning_rate': lr * scale,
          'final_val_loss': final, 'eval_steps': [10, 20, 30],
          'val_loss': curve, 'seconds': 1.0}


def test_summary_means_over_seeds_and_finds_the_crossing():
  recs = [
      record('adamw', 64, 0, 1.0, 2.0, [3, 2.5, 2.0]),
      record('adamw', 64, 1, 1.0, 2.2, [3, 2.5, 2.2]),
      record('adamw', 64, 0, 2.0, 1.9, [3, 2.4, 1.9]),
      record('adamw', 64, 1, 2.0, 2.1, [3, 2.4, 2.1]),  # mean 2.0: best
      # Lower, but at one seed of two: not comparable, so not the best.
      record('adamw', 64, 0, 4.0, 1.0, [3, 2.0, 1.0]),
      record('muon', 64, 0, 1.0, 1.5, [2.5, 1.9, 1.5]),
      record('muon', 64, 1, 1.0, 1.7, [2.7, 2.05, 1.7]),  # mean curve 1.975
      record('muon', 64, 0, 4.0, math.nan, [9, 9, math.nan]),
      record('sgd', 64, 0, 1.0, 1.5, [2.5, 1.9, 1.5]),
      dict(record('sgd', 64, 1, 1.0, math.nan, []), eval_steps=[]),
  ]
  rows = {r['optimizer']: r for r in sweep.summarize(recs)}
  assert rows['adamw']['best_scale'] == 2.0
  assert rows['adamw']['loss_best'] == pytest.approx(2.0)
  assert rows['adamw']['loss_default'] == pytest.approx(2.1)
  assert rows['adamw']['loss_by_scale'][4.0] == pytest.approx(1.0)
  assert rows['muon']['best_scale'] == 1.0  # the diverged scale loses
  assert rows['muon']['loss_by_scale'][4.0] == math.inf
  assert rows['muon']['best_lr'] == pytest.approx(0.01)
  assert rows['muon']['baseline_loss'] == pytest.approx(2.0)
  # The seed-mean curve (2.6, 1.975, 1.6) crosses 2.0 between evaluations
  # 10 and 20: 10 + 10·(2.6 − 2.0)/(2.6 − 1.975).
  assert rows['muon']['steps_to_baseline'] == pytest.approx(19.6)
  # Each seed's own curve against the same 2.0: 10 + 10·0.5/0.6 and
  # 20 + 10·0.05/0.35.
  by_seed = rows['muon']['steps_to_baseline_by_seed']
  assert by_seed == {0: pytest.approx(18.333, abs=1e-3),
                     1: pytest.approx(21.429, abs=1e-3)}
  assert rows['muon']['baseline_steps'] == 30
  assert rows['adamw']['steps_to_baseline'] is None  # 2.1 at default
  assert rows['muon']['seeds'] == [0, 1]
  # One diverged seed at the default: the mean is inf, AdamW never reached.
  assert rows['sgd']['loss_default'] == math.inf
  assert rows['sgd']['steps_to_baseline'] is None
  # A width without a run at the default: '—' in the table, not 'nan'.
  recs.append(record('muon', 128, 0, 2.0, 1.4, [2.5, 1.8, 1.4]))
  line = [l for l in sweep.table(sweep.summarize(recs)).splitlines()
          if l.startswith('| muon |')][0]
  assert 'nan' not in line and '1.6000 / —' in line, line
  assert '| 20 (0.65×; 0.61–0.71) / — |' in line, line
  assert line.endswith('| 0,1 / 0 |'), line  # the seeds of each width


def test_summary_without_a_finite_baseline_reaches_nothing():
  """Every AdamW scale with a diverged seed: the target was inf, and a
  Muon that never came near AdamW's loss was "reached" at its first
  evaluation. Every AdamW run diverged, or no scale of a group run at every
  seed: summarize crashed on an empty max()/min()."""
  nan = math.nan
  recs = [record('adamw', 64, 0, 1.0, 2.0, [3, 2.5, 2.0]),
          dict(record('adamw', 64, 1, 1.0, nan, []), eval_steps=[]),
          record('muon', 64, 0, 1.0, 2.5, [3.5, 3.0, 2.5]),
          record('muon', 64, 1, 1.0, 2.6, [3.6, 3.1, 2.6])]
  rows = {r['optimizer']: r for r in sweep.summarize(recs)}
  assert rows['muon']['baseline_loss'] is None
  assert rows['muon']['steps_to_baseline'] is None
  assert rows['muon']['steps_to_baseline_by_seed'] == {}
  only_diverged = [dict(record('adamw', 64, 0, 1.0, nan, []), eval_steps=[]),
                   record('muon', 64, 0, 1.0, 2.5, [3.5, 3.0, 2.5])]
  rows = {r['optimizer']: r for r in sweep.summarize(only_diverged)}
  assert rows['muon']['steps_to_baseline'] is None
  # Seed 0 at ×1, seed 1 at ×2 only: every scale is compared.
  mixed = [record('muon', 64, 0, 1.0, 2.5, [3.5, 3.0, 2.5]),
           record('muon', 64, 1, 2.0, 2.4, [3.5, 3.0, 2.4])]
  row = sweep.summarize(mixed)[0]
  assert row['compared_scales'] == [1.0, 2.0] and row['best_scale'] == 2.0
  assert '| muon |' in sweep.table([row])


def test_a_negative_max_runs_is_refused(tmp_path):
  """``todo[:max_runs]`` with -1 ran every run but the last."""
  spec = sweep.SweepSpec(optimizers=('adamw',), widths=(32,), seeds=(0,),
                         scales=(1.0,), steps=2)
  with pytest.raises(ValueError, match='max_runs must be an int >= 0'):
    sweep.run({}, spec, str(tmp_path), max_runs=-1)


def test_script_summarizes_what_is_there(tmp_path):
  # At today's defaults: the script's scales are multiples of them.
  lr = sweep.default_learning_rate
  runs = [record('adamw', 128, 0, 1.0, 2.0, [3, 2.5, 2.0], lr('adamw')),
          record('muon', 128, 0, 1.0, 1.8, [2.6, 1.9, 1.8], lr('muon'))]
  (tmp_path / 'runs.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in runs))
  proc = subprocess.run(
      [sys.executable, 'scripts/sweep.py', '--summarize_only',
       '--optimizers=adamw,muon', '--widths=128', '--seeds=0', '--scales=1',
       f'--out={tmp_path}'],
      capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '2 of 2 runs done' in proc.stdout
  # Muon crosses AdamW's 2.0 at 10 + 10·0.6/0.7 = 18.6 of AdamW's 30 steps.
  assert (f"| muon | {lr('muon'):.3g} | {lr('muon'):.3g} | 1.8000 | 1.8000 | "
          "19 (0.62×) | 0 |" in proc.stdout), proc.stdout
  assert (tmp_path / 'summary.md').exists()
  assert (tmp_path / 'lr_muon.png').exists()
  assert (tmp_path / 'lr_all.png').exists()
  # Without --scales: every recorded rate (here one at 0.37× muon's default,
  # the best; and a seed that is not asked for).
  runs += [record('muon', 128, 0, 0.37, 1.7, [2.6, 1.9, 1.7], lr('muon')),
           record('muon', 128, 1, 1.0, 1.0, [2.6, 1.9, 1.0], lr('muon'))]
  (tmp_path / 'runs.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in runs))
  proc = subprocess.run(
      [sys.executable, 'scripts/sweep.py', '--summarize_only',
       '--optimizers=adamw,muon', '--widths=128', '--seeds=0',
       f'--out={tmp_path}'],
      capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '3 runs recorded at any rate' in proc.stdout, proc.stdout
  best = f'{0.37 * lr("muon"):.3g}'
  assert (f"| muon | {lr('muon'):.3g} | {best} | 1.8000 | 1.7000 | "
          "19 (0.62×) | 0 |" in proc.stdout), proc.stdout


def test_summarizing_an_empty_directory_says_so(tmp_path):
  with pytest.raises(ValueError, match='holds no sweep: no runs.jsonl'):
    sweep.recorded(tiny_base(), SPEC, str(tmp_path / 'nothing'))


def test_a_diverged_run_is_recorded_not_fatal(tmp_path, monkeypatch):
  from orthax.train import compare  # pylint: disable=g-import-not-at-top
  real = compare.trainer.train

  def train(cfg, workdir, **kw):
    if cfg['optimizer']['learning_rate'] > 0.03:
      raise FloatingPointError('loss is nan at step 3.')
    return real(cfg, workdir, **kw)

  monkeypatch.setattr(compare.trainer, 'train', train)
  spec = sweep.SweepSpec(optimizers=('muon',), scales=(1.0, 2.0),
                         widths=(16,), seeds=(0,), eval_every=3)
  runs = sweep.run(tiny_base(), spec, str(tmp_path), progress=False)
  bad = [r for r in runs if r['lr_scale'] == 2.0][0]
  assert bad['diverged'] == 'loss is nan at step 3.'
  assert math.isnan(bad['final_val_loss']) and bad['val_loss'] == []
  row, = sweep.summarize(runs)
  assert row['best_scale'] == 1.0 and row['loss_by_scale'][2.0] == math.inf
  assert '| muon |' in compare.table(runs).replace('muon*', 'muon')


def test_a_run_whose_gradients_turn_nan_is_recorded_as_diverged(
    tmp_path, monkeypatch):
  """The real path of a divergence: the loss and its gradients turn NaN
  together, and the trainer's guard (train.nonfinite='raise') stops the run
  with a NonFiniteGradientError before any NaN loss is logged. That
  escaped train_one, so the sweep stopped there, and, the run never being
  recorded, stopped there again on every rerun."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from orthax.train import compare  # pylint: disable=g-import-not-at-top
  from orthax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  real = step_lib.loss_fn

  def loss_fn(*args, **kw):  # NaN once the loss is below 5.4
    loss = real(*args, **kw)
    return loss * jnp.where(loss < 5.4, jnp.nan, 1.0)

  monkeypatch.setattr(step_lib, 'loss_fn', loss_fn)
  spec = sweep.SweepSpec(optimizers=('muon',), scales=(1.0,), widths=(16,),
                         seeds=(0,), eval_every=3)
  runs = sweep.run(tiny_base(steps=12), spec, str(tmp_path), progress=False)
  (bad,) = runs
  assert bad['diverged'].startswith('non-finite gradient'), bad['diverged']
  assert math.isnan(bad['final_val_loss'])
  # Recorded: a rerun reads it back and has nothing left to train.
  monkeypatch.setattr(compare.trainer, 'train', lambda *a, **k: pytest.fail(
      'the recorded run was trained again'))
  (again,) = sweep.run(tiny_base(steps=12), spec, str(tmp_path),
                       progress=False)
  assert again['diverged'] == bad['diverged']


def test_reference_modes_train_at_their_rates_and_resume(tmp_path):
  """``orthax-sweep --reference_modes``: each of Muon's modes with rates of
  its own trains at them (the trainer takes the mode through
  ``optimizer.kwargs`` and both rates), once; the table sets each beside
  the library mode's sweep run at the same width and seed."""
  from orthax.train import reference_modes  # pylint: disable=g-import-not-at-top
  out = str(tmp_path)
  assert reference_modes.run(tiny_base(), out, widths=(16,), seeds=(0,),
                             optimizers=['muon'], max_runs=0,
                             progress=False) == []
  runs = reference_modes.run(tiny_base(), out, widths=(16,), seeds=(0,),
                             optimizers=['muon'], progress=False)
  got = {r['reference']: (r['learning_rate'], r['adam_learning_rate'])
         for r in runs}
  assert got == {'keller': (0.02, pytest.approx(3e-4)),
                 'moonlight': (1e-3, 1e-3)}
  assert all(math.isfinite(r['final_val_loss']) for r in runs)
  # Resumed: nothing trained again, the same records.
  assert reference_modes.run(tiny_base(), out, widths=(16,), seeds=(0,),
                             optimizers=['muon'], progress=False) == runs
  assert len((tmp_path / 'runs.jsonl').read_text().splitlines()) == 2
  library = [{'optimizer': 'muon', 'width': 16, 'seed': 0,
              'learning_rate': sweep.default_learning_rate('muon'),
              'final_val_loss': 9.5}]
  table = reference_modes.table(runs, library).splitlines()
  assert len(table) == 4 and table[2].startswith('| muon | keller | 0.02 / ')
  assert all(line.endswith('| 9.5000 (0.05656) |') for line in table[2:])
