"""Train a GPT with an orthax recipe, or dry-run a config on a fake mesh.

    python scripts/train.py --config=configs/lm_cpu.py:normuon --workdir=/tmp/run
    python scripts/train.py --config=configs/gpt2_124m.py --dry_run

``--config.<key>=<value>`` overrides any config entry (an unknown key is an
error naming it). Metrics go to ``<workdir>/metrics.jsonl``, the resolved
config to ``<workdir>/config.json``; with
``--config.train.checkpoint_every=N`` orbax checkpoints go to
``<workdir>/checkpoints`` and rerunning the same command resumes from the
newest intact one. A rerun whose config changes the run, or that would
overwrite metrics of a run without checkpoints, is refused unless
``--force``. On SIGTERM the run checkpoints its current step and exits
with status 75 (``EX_TEMPFAIL``: rerun to resume); a finished run exits 0.
``--dry_run`` compiles the full train step on fake CPU devices shaped like
the config's mesh and prints per-device memory, FLOPs and collective bytes.
"""

import json
import math
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

EXIT_PREEMPTED = 75  # os.EX_TEMPFAIL: interrupted, rerun to resume

# Unlocked and open to new keys, so that a mistyped key reaches the
# trainer's config check (a ValueError naming it and what is accepted)
# instead of failing inside the flag parser.
_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/lm_cpu.py', 'Training config file.',
    lock_config=False, accept_new_attributes=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Metrics and checkpoints.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False,
                             'Compile on a fake mesh and report; no training.')
_FORCE = flags.DEFINE_bool(
    'force', False, 'Resume even though the config changes the run, or '
    'start over in a workdir that has metrics but no checkpoint.')


def main(argv):
  del argv
  config = _CONFIG.value
  if _DRY_RUN.value:
    # Before JAX's backend starts: one fake CPU device per mesh position.
    n = math.prod(int(config.mesh.get(a, 1)) for a in
                  ('data', 'fsdp', 'tensor'))
    os.environ['JAX_PLATFORMS'] = 'cpu'
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={n}')
    # pylint: disable=g-import-not-at-top
    from orthax.train import cli
    from orthax.train import dry_run
    cli.quiet_library_logs()
    print(dry_run.format_report(dry_run.dry_run(config)))
    return
  # pylint: disable=g-import-not-at-top
  from orthax.train import cli
  from orthax.train import trainer
  cli.quiet_library_logs()
  out = trainer.train(config, _WORKDIR.value, force=_FORCE.value)
  print(json.dumps(out['summary'], indent=1))
  if out['summary']['preempted']:
    sys.exit(EXIT_PREEMPTED)


if __name__ == '__main__':
  app.run(main)
