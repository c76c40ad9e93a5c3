"""Learning-rate sweep of every recipe at two widths and two seeds (resumable).

    python scripts/sweep.py                                  # everything
    python scripts/sweep.py --optimizers=adamw,muon --max_runs=10
    python scripts/sweep.py --summarize_only                 # table and plots

Each optimizer at its default peak learning rate × {1/4, 1/2, 1, 2, 4, 8} on
the embedded corpus (configs/lm_cpu.py) at d_model 128 and 256, seeds 0 and
1. Runs are appended to ``<out>/runs.jsonl`` as they finish; rerunning the
same command continues the sweep. Writes ``<out>/summary.md`` (best learning
rate per width, loss at the default and at the best, steps to AdamW's best
loss) and ``<out>/lr_<optimizer>.png``.
"""

import json
import os

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/lm_cpu.py',
                                          'Base config (its optimizer, '
                                          'width and seed are replaced).')
_OPTIMIZERS = flags.DEFINE_list('optimizers', None,
                                'adamw and/or recipe names (default: adamw '
                                'and every registered recipe).')
_SCALES = flags.DEFINE_list('scales', ['0.25', '0.5', '1', '2', '4', '8'],
                            'Multiples of each default peak learning rate.')
_WIDTHS = flags.DEFINE_list('widths', ['128', '256'], 'Model widths.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1'], 'Seeds.')
_STEPS = flags.DEFINE_integer('steps', None, 'Override train.steps.')
_EVAL_EVERY = flags.DEFINE_integer('eval_every', 25, 'Validation interval.')
_MAX_RUNS = flags.DEFINE_integer('max_runs', None,
                                 'Stop after this many new runs.')
_SUMMARIZE_ONLY = flags.DEFINE_bool('summarize_only', False,
                                    'Train nothing; summarize what is there.')
_OUT = flags.DEFINE_string('out', 'sweep_out', 'Output directory.')


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  from orthax.train import cli
  from orthax.train import configs
  from orthax.train import sweep
  cli.quiet_library_logs()
  spec = sweep.SweepSpec(
      optimizers=tuple(_OPTIMIZERS.value or configs.optimizer_names()),
      scales=tuple(float(s) for s in _SCALES.value),
      widths=tuple(int(w) for w in _WIDTHS.value),
      seeds=tuple(int(s) for s in _SEEDS.value),
      steps=_STEPS.value, eval_every=_EVAL_EVERY.value)
  runs = sweep.run(_CONFIG.value, spec, _OUT.value,
                   max_runs=0 if _SUMMARIZE_ONLY.value else _MAX_RUNS.value)
  print(f'{len(runs)} of {len(spec.keys())} runs done '
        f'({sum(r["seconds"] for r in runs) / 3600:.2f} h of training)')
  rows = sweep.summarize(runs)
  md = sweep.table(rows)
  print(md)
  with open(os.path.join(_OUT.value, 'summary.md'), 'w') as f:
    f.write(md + '\n')
  with open(os.path.join(_OUT.value, 'summary.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  for path in sweep.plot(rows, _OUT.value):
    print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
