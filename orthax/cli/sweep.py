"""``orthax-sweep``: learning-rate sweep of every recipe at two widths and
two seeds (resumable).

    orthax-sweep                                     # everything
    orthax-sweep --optimizers=adamw,muon --max_runs=10
    orthax-sweep --summarize_only                    # table and plots of every run

Each optimizer at its default peak learning rate × {1/4, 1/2, 1, 2, 4, 8} on
the embedded corpus (the ``lm_cpu`` config) at d_model 128 and 256, seeds 0
and 1. Runs are appended to ``<out>/runs.jsonl`` as they finish; rerunning
the same command continues the sweep. Writes ``<out>/summary.md`` (best
learning rate per width, loss at the default and at the best, steps to
AdamW's best loss), ``<out>/lr_<optimizer>.png`` and ``<out>/lr_all.png``
(every optimizer, a panel each).

``--reference_modes`` trains instead every ``reference=`` mode that has its
reference's own learning rates (of ``--optimizers``, where given), at those
rates, at each width and seed (``--max_runs``, ``--summarize_only`` as
above; ``--scales`` does not apply), and prints them beside the library
mode's runs at its default
(:mod:`orthax.train.reference_modes`; README, "Reference modes"):

    orthax-sweep --reference_modes --out=results/reference_modes \
        --widths=128 --seeds=0
"""

from __future__ import annotations

import os
import types
from typing import Sequence

from orthax import cli
from orthax import configs


def define_flags() -> types.SimpleNamespace:
  # pylint: disable=g-import-not-at-top
  from absl import flags
  from ml_collections import config_flags
  return types.SimpleNamespace(
      config=config_flags.DEFINE_config_file(
          'config', configs.path('lm_cpu'),
          'Base config, by packaged name or file (its optimizer, width and '
          'seed are replaced).'),
      optimizers=flags.DEFINE_list(
          'optimizers', None, 'adamw and/or recipe names (default: adamw '
          'and every registered recipe).'),
      scales=flags.DEFINE_list(
          'scales', ['0.25', '0.5', '1', '2', '4', '8'],
          'Multiples of each default peak learning rate (with '
          '--summarize_only and no --scales: every rate recorded).'),
      widths=flags.DEFINE_list('widths', ['128', '256'], 'Model widths.'),
      seeds=flags.DEFINE_list('seeds', ['0', '1'], 'Seeds.'),
      steps=flags.DEFINE_integer('steps', None, 'Override train.steps.'),
      eval_every=flags.DEFINE_integer('eval_every', 25,
                                      'Validation interval.'),
      max_runs=flags.DEFINE_integer('max_runs', None,
                                    'Stop after this many new runs.',
                                    lower_bound=0),
      reference_modes=flags.DEFINE_bool(
          'reference_modes', False, 'Train the reference modes at their '
          "references' rates instead (see the module docstring)."),
      sweep_runs=flags.DEFINE_string(
          'sweep_runs', 'results/sweep/runs.jsonl', 'With '
          "--reference_modes: the sweep whose library-mode runs to compare."),
      summarize_only=flags.DEFINE_bool(
          'summarize_only', False, 'Train nothing; summarize what is there.'),
      out=flags.DEFINE_string('out', 'sweep_out', 'Output directory.'))


def main(f: types.SimpleNamespace) -> None:
  # pylint: disable=g-import-not-at-top
  from orthax.train import configs as train_configs
  from orthax.train import metrics
  from orthax.train import sweep
  cli.quiet_library_logs()
  spec = sweep.SweepSpec(
      optimizers=tuple(f.optimizers.value or train_configs.optimizer_names()),
      scales=tuple(cli.parse_list('scales', f.scales.value, float)),
      widths=tuple(cli.parse_list('widths', f.widths.value, int)),
      seeds=tuple(cli.parse_list('seeds', f.seeds.value, int)),
      steps=f.steps.value, eval_every=f.eval_every.value)
  out = cli.output_dir('out', f.out.value)
  if f.reference_modes.value:
    _reference_modes(f, spec)
    return
  if f.summarize_only.value and not f.scales.present:
    runs = sweep.recorded(f.config.value, spec, out)
    print(f'{len(runs)} runs recorded at any rate '
          f'({sum(r["seconds"] for r in runs) / 3600:.2f} h of training)')
  else:
    runs = sweep.run(f.config.value, spec, out, max_runs=(
        0 if f.summarize_only.value else f.max_runs.value))
    print(f'{len(runs)} of {len(spec.keys())} runs done '
          f'({sum(r["seconds"] for r in runs) / 3600:.2f} h of training)')
  if not runs:  # an empty table, then a plotting error
    raise ValueError(f'--out={out} holds no run of this sweep to summarize '
                     '(train some first: leave out --summarize_only).')
  rows = sweep.summarize(runs, defaults={
      name: sweep.default_learning_rate(name) for name in spec.optimizers})
  md = sweep.table(rows)
  print(md)
  with open(os.path.join(out, 'summary.md'), 'w') as fh:
    fh.write(md + '\n')
  with open(os.path.join(out, 'summary.json'), 'w') as fh:
    fh.write(metrics.json_text(rows, indent=1))
  for path in sweep.plot(rows, out):
    print(f'wrote {path}')
  print(f"wrote {sweep.plot_grid(rows, os.path.join(out, 'lr_all.png'))}")


def _reference_modes(f: types.SimpleNamespace, spec) -> None:
  # pylint: disable=g-import-not-at-top
  from orthax.train import reference_modes
  from orthax.train import sweep
  # Before any run (it was checked after them: hours of training first).
  if not os.path.exists(f.sweep_runs.value):
    raise ValueError(f'--sweep_runs={f.sweep_runs.value}: no such file (the '
                     'sweep whose library-mode runs the table compares; a '
                     'path relative to this directory).')
  runs = reference_modes.run(
      f.config.value, f.out.value, widths=spec.widths, seeds=spec.seeds,
      optimizers=[o for o in f.optimizers.value or () if o != 'adamw'],
      steps=spec.steps, eval_every=spec.eval_every,
      max_runs=0 if f.summarize_only.value else f.max_runs.value)
  md = reference_modes.table(runs, sweep.load(f.sweep_runs.value))
  print(md)
  with open(os.path.join(f.out.value, 'summary.md'), 'w') as fh:
    fh.write(md + '\n')


def run(argv: Sequence[str] | None = None) -> None:
  cli.run_app('orthax-sweep', __doc__, define_flags, main, argv)
