"""``orthax-train``: train a GPT with an orthax recipe, or dry-run a config
on a fake mesh.

    orthax-train --config=lm_cpu:normuon --workdir=/tmp/run
    orthax-train --config=gpt2_124m --dry_run

``--config.<key>=<value>`` overrides any config entry (an unknown key is an
error naming it). Metrics go to ``<workdir>/metrics.jsonl``, the resolved
config to ``<workdir>/config.json``; with
``--config.train.checkpoint_every=N`` orbax checkpoints go to
``<workdir>/checkpoints`` and rerunning the same command resumes from the
newest intact one. A rerun whose config changes the run, or that would
overwrite metrics of a run without checkpoints, is refused unless
``--force``. On SIGTERM the run checkpoints its current step and exits
with status 75 (``EX_TEMPFAIL``: rerun to resume); a first Ctrl-C does the
same and exits with 130 (a second stops at once); a finished run exits 0.
``--dry_run`` compiles the full train step on fake CPU devices shaped like
the config's mesh and prints per-device memory, FLOPs and collective bytes.

On several hosts (a multi-host TPU slice, GPU nodes) run the same command
on each with ``--multihost`` (and, where JAX cannot find them,
``--coordinator_address=host:port --num_processes=N --process_id=i``):
the mesh spans every process's devices, process 0 writes the workdir (a
directory all hosts share), and a SIGTERM on any host checkpoints the
step all of them agree on.
"""

from __future__ import annotations

import math
import os
import sys
import types
from typing import Sequence

from orthax import cli
from orthax import configs

EXIT_PREEMPTED = 75  # os.EX_TEMPFAIL: interrupted, rerun to resume


def define_flags() -> types.SimpleNamespace:
  # pylint: disable=g-import-not-at-top
  from absl import flags
  from ml_collections import config_flags
  return types.SimpleNamespace(
      # Unlocked and open to new keys, so that a mistyped key reaches the
      # trainer's config check (a ValueError naming it and what is
      # accepted) instead of failing inside the flag parser.
      config=config_flags.DEFINE_config_file(
          'config', configs.path('lm_cpu'),
          'Training config: a packaged name (lm_cpu, gpt2_124m, ...) or a '
          'file, optionally :<optimizer>.',
          lock_config=False, accept_new_attributes=True),
      workdir=flags.DEFINE_string('workdir', None,
                                  'Metrics and checkpoints.'),
      dry_run=flags.DEFINE_bool(
          'dry_run', False, 'Compile on a fake mesh and report; no training.'),
      force=flags.DEFINE_bool(
          'force', False, 'Resume even though the config changes the run, '
          'or start over in a workdir that has metrics but no checkpoint.'),
      multihost=flags.DEFINE_bool(
          'multihost', False, 'One process of several (a multi-host TPU '
          'slice, GPU nodes): run the same command on every host; '
          'jax.distributed.initialize joins them.'),
      coordinator_address=flags.DEFINE_string(
          'coordinator_address', None, 'With --multihost where JAX cannot '
          'find it (not Cloud TPU, Slurm or Open MPI): host:port of '
          'process 0.'),
      num_processes=flags.DEFINE_integer(
          'num_processes', None, 'With --multihost and '
          '--coordinator_address: the number of processes.'),
      process_id=flags.DEFINE_integer(
          'process_id', None, 'With --multihost and --coordinator_address: '
          'this process, 0 .. num_processes - 1.'))


def main(f: types.SimpleNamespace) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from orthax.train import configs as train_configs  # pylint: disable=g-import-not-at-top
  config = f.config.value
  train_configs.follow_optimizer_name(
      config, flags.FLAGS['config'].override_values)
  joining = [n for n in ('coordinator_address', 'num_processes',
                         'process_id')
             if getattr(f, n).value is not None]
  if joining and not f.multihost.value:
    raise ValueError(f'--{joining[0]} goes with --multihost.')
  if f.multihost.value and f.dry_run.value:
    raise ValueError('--dry_run compiles on fake devices in one process: '
                     'drop --multihost.')
  if f.dry_run.value:
    # Before JAX's backend starts: one fake CPU device per mesh position.
    n = math.prod(int(config.mesh.get(a, 1)) for a in
                  ('data', 'fsdp', 'tensor'))
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={n}')
    # pylint: disable=g-import-not-at-top
    import jax  # imported with orthax, but its backend has not started
    from orthax.train import dry_run
    jax.config.update('jax_platforms', 'cpu')
    cli.quiet_library_logs()
    print(dry_run.format_report(dry_run.dry_run(config)))
    return
  # pylint: disable=g-import-not-at-top
  from orthax.train import hosts
  from orthax.train import metrics
  from orthax.train import trainer
  cli.quiet_library_logs()
  if f.multihost.value:  # before anything starts JAX's backend
    hosts.initialize(f.coordinator_address.value, f.num_processes.value,
                     f.process_id.value)
  out = trainer.train(
      config, cli.output_dir('workdir', f.workdir.value, create=False),
      force=f.force.value)
  print(metrics.json_text(out['summary'], indent=1))
  if out['summary']['preempted']:
    sys.exit(EXIT_PREEMPTED)


def run(argv: Sequence[str] | None = None) -> None:
  cli.run_app('orthax-train', __doc__, define_flags, main, argv)
