"""Train several optimizers on the embedded default config and compare them.

    python scripts/compare.py                       # the README table
    python scripts/compare.py --optimizers=adamw,muon --lr_scales=1 --steps=100

Same seed, data and schedule shape for every run; each optimizer at a small
learning-rate sweep (scales of its default peak learning rate). Prints a
markdown table (final validation loss, steps to reach AdamW's final loss,
tokens/s, optimizer-state bytes) and writes ``<out>/compare.md``,
``<out>/compare.json`` and ``<out>/loss_curves.png``.
"""

import json
import os

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/lm_cpu.py',
                                          'Base config (its optimizer is '
                                          'replaced).')
_OPTIMIZERS = flags.DEFINE_list('optimizers', ['adamw', 'muon', 'normuon',
                                               'namo'],
                                'adamw and/or registered recipe names.')
_SCALES = flags.DEFINE_list('lr_scales', ['0.5', '1', '2', '4'],
                            'Multiples of each default peak learning rate.')
_STEPS = flags.DEFINE_integer('steps', None, 'Override train.steps.')
_EVAL_EVERY = flags.DEFINE_integer('eval_every', 25, 'Validation interval.')
_OUT = flags.DEFINE_string('out', 'compare_out', 'Output directory.')


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  from orthax.train import cli
  from orthax.train import compare
  cli.quiet_library_logs()
  results = compare.run(_CONFIG.value, _OPTIMIZERS.value,
                        [float(s) for s in _SCALES.value], steps=_STEPS.value,
                        eval_every=_EVAL_EVERY.value)
  os.makedirs(_OUT.value, exist_ok=True)
  md = compare.table(results)
  print(md)
  with open(os.path.join(_OUT.value, 'compare.md'), 'w') as f:
    f.write(md + '\n')
  with open(os.path.join(_OUT.value, 'compare.json'), 'w') as f:
    json.dump(results, f, indent=1)
  png = os.path.join(_OUT.value, 'loss_curves.png')
  compare.plot(results, png)
  print(f'wrote {png}')


if __name__ == '__main__':
  app.run(main)
