"""Orbax checkpoints of the whole :class:`~orthax.train.step.TrainState`.

Together with batches that are a pure function of ``(seed, step)``
(:class:`orthax.train.data.TokenLoader`), restoring the latest checkpoint
and training on reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

import os
from typing import Any

import jax


class Checkpointer:
  """Saves every ``every`` steps (keeping ``max_to_keep``) under
  ``directory``; restores the latest into given shardings."""

  def __init__(self, directory: str, every: int, max_to_keep: int = 2):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    if every < 1:
      raise ValueError(f'train.checkpoint_every must be >= 1, got {every}.')
    self._ocp = ocp
    self.directory = os.path.abspath(directory)
    self.every = int(every)
    self._mgr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=self.every, max_to_keep=max_to_keep,
            create=True))

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def save(self, step: int, state: Any, force: bool = False) -> bool:
    """Saves ``state`` as ``step`` when due (or ``force``)."""
    return self._mgr.save(step, args=self._ocp.args.StandardSave(state),
                          force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    """The checkpoint ``step`` (default: latest) restored with the
    shardings and dtypes of ``abstract_state`` (``ShapeDtypeStruct`` tree
    or arrays)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise ValueError(f'no checkpoint in {self.directory!r}.')
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=getattr(x, 'sharding', None)),
        abstract_state)
    return self._mgr.restore(step,
                             args=self._ocp.args.StandardRestore(target))

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()
