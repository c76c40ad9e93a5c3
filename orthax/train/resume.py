"""Where a run starts: a fresh state, or the newest intact checkpoint's,
its per-matrix slot states moved to this mesh
(:mod:`~orthax.train.checkpoint_slots`)."""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import jax

from orthax.train import checkpoint as ckpt_lib
from orthax.train import checkpoint_slots as ckpt_slots

log = logging.getLogger('orthax.train')


def checkpointer(workdir: str | None, tr: dict[str, Any]
                  ) -> ckpt_lib.Checkpointer | None:
  """The run's checkpointer: one whenever there is a workdir (with
  ``train.checkpoint_every=0`` it saves only on preemption)."""
  if workdir is None:
    return None
  return ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                               int(tr.get('checkpoint_every') or 0),
                               int(tr.get('max_to_keep', 2)))


def initial_state(setup: Any, ckpt: ckpt_lib.Checkpointer | None,
                   mesh_changes: Sequence[str] = ()):
  """A fresh state, or the newest intact checkpoint's, for ``setup`` (an
  :class:`orthax.train.setup.Setup`); ``mesh_changes``: the ``mesh.*``
  keys a forced resume changes."""
  if ckpt is None or not ckpt.all_steps():
    return setup.init(setup.initial_params)
  abstract = jax.eval_shape(setup.init, setup.abstract_params)
  layout = None
  if ckpt_slots.slot_state_paths(abstract):
    # Where each matrix's state sits on this mesh (only the slot states
    # are computed), for the saved states to be moved there.
    layout = jax.jit(lambda p: ckpt_slots.slot_states(setup.init(p)))(
        setup.initial_params)
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, setup.shardings)
  try:
    state, step = ckpt.restore_intact(abstract, layout, mesh_changes)
  except ckpt_slots.UnknownLayoutError:
    raise
  except ValueError as e:  # verified files that do not fit this config
    raise ValueError(
        f'the checkpoints in {ckpt.directory} do not fit this config\'s '
        f'train state ({e}): they were saved by a run of another model or '
        'optimizer. Use another workdir, or the config they were saved '
        'with.') from e
  log.info('resumed from checkpoint step %d in %s', step, ckpt.directory)
  return state
