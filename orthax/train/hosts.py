"""Training on several processes: one JAX process per host of a TPU slice
(a v5e-16 is four) or per GPU node, every process running the same loop
on its share of the mesh.

What changes with more than one process, and where it is handled:

- **Starting.** :func:`initialize` joins the processes
  (``jax.distributed.initialize``; ``orthax-train --multihost``), before
  anything else touches JAX.
- **Failures.** A process that fails alone leaves the others waiting at
  their next collective. Before the first step, where one process may
  fail alone (a data file missing on one host, process 0's first writes),
  :func:`together` stops them all. Later (process 0's disk filling up
  mid-run) the others wait until JAX's distributed runtime gives up on
  the failed process (its shutdown timeout, 5 minutes by default) and
  ends them.
- **Files.** Process 0 alone writes the run directory (``metrics.jsonl``,
  TensorBoard, ``config.json``, checkpoint checksum records, damaged steps
  moved aside); :func:`is_main` says which process that is. Every process
  reads the same files and so makes the same decisions (resume or refuse,
  which checkpoint is intact); :func:`barrier` keeps process 0's writes
  from overlapping the other processes' reads.
- **Stop signals.** A preemption notice may reach one host only, and a
  checkpoint needs all of them: the processes agree on the step to save
  through JAX's preemption sync service (:func:`reached_stop_point`;
  :func:`orthax.train.faults.stop_signals`).
- **Arrays.** Orbax saves and restores each process's shards; a value
  wanted whole on the host (a slot state moved to another mesh) is
  gathered from every process (``orthax._slot_layout``).
"""

from __future__ import annotations

import contextlib
import logging

import jax
import numpy as np

log = logging.getLogger('orthax.train')


def count() -> int:
  """The number of JAX processes (1 unless :func:`initialize` joined
  several)."""
  return jax.process_count()


def is_main() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier ``name`` (the same
  name, in the same order, on all of them); nothing with one process."""
  if count() > 1:
    # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f'orthax:{name}')


@contextlib.contextmanager
def together(what: str):
  """Runs the block on every process and then agrees on its outcome: where
  it raised on some process (a Ctrl-C's ``KeyboardInterrupt`` included),
  that process raises its error and every other one a ``RuntimeError``
  naming it (one process stopping alone would leave the others waiting at
  the next collective). With one process, the block as it is. The block
  must not run collectives itself: a process that failed before one
  would leave the others waiting in it."""
  error = None
  try:
    yield
  except BaseException as e:  # pylint: disable=broad-except
    if count() == 1:
      raise
    error = e
  if count() == 1:
    return
  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils
  failed = np.flatnonzero(np.asarray(multihost_utils.process_allgather(
      np.int32(error is not None))).reshape(-1))
  if error is not None:
    raise error
  if failed.size:
    raise RuntimeError(f'{what}: process(es) {failed.tolist()} failed (their '
                       'logs say why); this one stops with them.')


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins this process to the others of the run
  (``jax.distributed.initialize``). On Cloud TPU, Slurm and Open MPI every
  argument may be left out (JAX finds them); elsewhere give all three, the
  same ``coordinator_address`` (``host:port`` of process 0) everywhere.

  Args:
    coordinator_address: ``host:port`` where process 0 serves the others.
    num_processes: how many processes the job has.
    process_id: this process's number, ``0 .. num_processes - 1``.

  Raises:
    ValueError: only some of the three are given, or ``process_id`` is
      not in ``[0, num_processes)``.
  """
  given = [a is not None for a in (coordinator_address, num_processes,
                                   process_id)]
  if any(given) and not all(given):
    raise ValueError(
        '--coordinator_address, --num_processes and --process_id go '
        'together: give all three (or none, where JAX finds them: Cloud TPU, '
        'Slurm, Open MPI).')
  if all(given) and not 0 <= process_id < num_processes:
    raise ValueError(f'--process_id={process_id} must be in [0, '
                     f'--num_processes={num_processes}).')
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  log.info('process %d of %d; %d of %d devices here.', jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


def stop_point_available() -> bool:
  """Whether the processes can agree on a step to stop at: JAX's
  preemption service is on (``jax_enable_preemption_service``, the
  default), and with it its SIGTERM handler."""
  return bool(getattr(jax.config, 'jax_enable_preemption_service', True))


def reached_stop_point(step: int) -> bool:
  """Whether the processes agreed to stop after ``step``: some process got
  a preemption notice (SIGTERM, which JAX's preemption service catches),
  and every process has reached the step they agreed on (the furthest any
  had reached, plus one). Call it after every step, from the same first
  step on every process. Raises ``RuntimeError`` where the service is off
  (``jax_enable_preemption_service``)."""
  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils
  return multihost_utils.reached_preemption_sync_point(step)
