"""``orthax-compare``: train several optimizers on one config and compare
them.

    orthax-compare                                   # the table in docs/training.md
    orthax-compare --optimizers=adamw,muon --lr_scales=1 --steps=100

Same seed, data and schedule shape for every run; each optimizer at a small
learning-rate sweep (scales of its default peak learning rate). Prints a
markdown table (final validation loss, steps to reach AdamW's final loss,
tokens/s, optimizer-state bytes) and writes ``<out>/compare.md``,
``<out>/compare.json`` and ``<out>/loss_curves.png``.
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
          'Base config, by packaged name or file (its optimizer is '
          'replaced).'),
      optimizers=flags.DEFINE_list(
          'optimizers', ['adamw', 'muon', 'normuon', 'namo'],
          'adamw and/or registered recipe names.'),
      lr_scales=flags.DEFINE_list(
          'lr_scales', ['0.5', '1', '2', '4'],
          'Multiples of each default peak learning rate.'),
      steps=flags.DEFINE_integer('steps', None, 'Override train.steps.'),
      eval_every=flags.DEFINE_integer(
          'eval_every', 25, 'Validation interval (the table compares '
          'validation losses: at least 1).', lower_bound=1),
      out=flags.DEFINE_string('out', 'compare_out', 'Output directory.'))


def main(f: types.SimpleNamespace) -> None:
  # pylint: disable=g-import-not-at-top
  from orthax.train import compare
  from orthax.train import metrics
  cli.quiet_library_logs()
  out = cli.output_dir('out', f.out.value)  # before the runs, not after
  results = compare.run(f.config.value, f.optimizers.value,
                        cli.parse_list('lr_scales', f.lr_scales.value, float),
                        steps=f.steps.value, eval_every=f.eval_every.value)
  md = compare.table(results)
  print(md)
  with open(os.path.join(out, 'compare.md'), 'w') as fh:
    fh.write(md + '\n')
  with open(os.path.join(out, 'compare.json'), 'w') as fh:
    fh.write(metrics.json_text(results, indent=1))
  png = os.path.join(out, 'loss_curves.png')
  compare.plot(results, png)
  print(f'wrote {png}')


def run(argv: Sequence[str] | None = None) -> None:
  cli.run_app('orthax-compare', __doc__, define_flags, main, argv)
