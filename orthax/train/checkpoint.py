"""Verified orbax checkpoints of the whole
:class:`~orthax.train.step.TrainState`.

Together with batches that are a pure function of ``(seed, step)``
(:class:`orthax.train.data.TokenLoader`), restoring the latest checkpoint
and training on reproduces the uninterrupted run bit for bit.

**Verification.** Orbax saves asynchronously: :meth:`Checkpointer.save`
returns while a background thread writes the files. Once orbax reports
the step committed (polled every step, waited for before the next save and
at :meth:`~Checkpointer.close`), every file of the step directory is
hashed and ``<step>/orthax_checksums.json`` records its size and SHA-256
(:mod:`~orthax.train.checkpoint_digests`; about one second per GB on one
core, on a background thread: training goes on meanwhile, and the next
save, a restore and ``close`` wait for it). Hashing the committed files rather
than the arrays catches damage to any byte on disk — data chunks,
manifests, metadata — needs no extra device-to-host copy, and lets a
restore check a checkpoint before reading it. The record lives in the step
directory, so orbax's ``max_to_keep`` deletes it with its step.

:meth:`~Checkpointer.restore_intact` walks the steps newest first: a step
whose files do not match their record (changed bytes, truncated, missing),
or that has no record and fails to restore, is logged as damaged and moved
to ``<directory>.damaged/<step>``; the newest intact step is restored. On
several processes (:mod:`~orthax.train.hosts`) a step without a record is
restored only where no older step is verified: a read that fails on one
process alone leaves the others waiting inside orbax's restore. When
none is intact, :class:`DamagedCheckpointError` names every step and what
is wrong with it. A step whose saved leaves (read from its metadata, before
any array) do not fit the state being restored — another model or
optimizer — is not damage: :class:`CheckpointMismatchError` names the
leaves, and no file is moved. A step with the same arrays in an older
layout of the optimizer state is read in that layout
(:mod:`~orthax.train.checkpoint_formats`), or, where only childless nodes
differ (a stage that kept nothing, since dropped), by path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from typing import Any, Sequence

import jax

from orthax import _tree
from orthax.train import checkpoint_formats
from orthax.train import checkpoint_slots
from orthax.train import hosts
from orthax.train.checkpoint_digests import CHECKSUMS
from orthax.train.checkpoint_digests import check_files
from orthax.train.checkpoint_digests import file_digests
from orthax.train.checkpoint_digests import sha256  # noqa: F401  (public)

log = logging.getLogger('orthax.train')


def _brief(error: Exception, limit: int = 300) -> str:
  """``Type: first line`` of ``error``, cut at ``limit`` characters: a
  TensorStore read error carries its whole ~70-line spec."""
  lines = str(error).strip().splitlines() or ['']
  text = f'{type(error).__name__}: {lines[0]}'
  more = len(lines) > 1 or len(text) > limit
  return text[:limit] + (' ...' if more else '')


class DamagedCheckpointError(RuntimeError):
  """Every checkpoint of a run is damaged; nothing to resume from."""


class CheckpointMismatchError(ValueError):
  """A checkpoint's leaves do not fit the state it is restored into."""


def mismatches(saved: dict[str, tuple], wanted: dict[str, tuple],
               limit: int = 3) -> list[str]:
  """What differs between two ``{path: shape}`` maps, as phrases (at most
  ``limit`` leaves of each kind, then a count)."""
  def first(items, what):  # the parameters' own leaves first
    items = sorted(items, key=lambda k: (not k.startswith('params/'), k))
    more = f' and {len(items) - limit} more' if len(items) > limit else ''
    return [what(items[:limit]) + more] if items else []
  wrong = [k for k in saved.keys() & wanted.keys() if saved[k] != wanted[k]]
  return (first(wrong, lambda ks: '; '.join(
      f'{k!r} saved {saved[k]}, here {wanted[k]}' for k in ks))
          + first(saved.keys() - wanted.keys(),
                  lambda ks: f'saved only: {", ".join(map(repr, ks))}')
          + first(wanted.keys() - saved.keys(),
                  lambda ks: f'here only: {", ".join(map(repr, ks))}'))


def _is_empty(x: Any) -> bool:
  """A node without children: as orbax's metadata shows a saved ``None`` or
  empty state, or as a target holds it (``None``, ``optax.EmptyState()``,
  ``optax.MaskedNode()``, an empty container)."""
  if getattr(x, 'skip_deserialize', False) and not hasattr(x, 'shape'):
    return True
  if hasattr(x, 'shape'):
    return False
  t = jax.tree.structure(x)
  return t.num_leaves == 0 and t.num_nodes == 1


def _saved_shapes(meta: Any) -> dict[str, tuple] | None:
  """``{path: shape}`` of the saved leaves, from a step's metadata, read
  before any array is (orbax would fail on the first leaf that does not
  fit while its reads of the others were still in flight, and print their
  errors at exit); ``None`` when unreadable (the restore then says what
  is wrong)."""
  if meta is None:
    return None
  return {_tree.path_str(p): tuple(m.shape) for p, m in
          jax.tree_util.tree_flatten_with_path(meta)[0]}


def _shapes(tree: Any) -> dict[str, tuple]:
  return {_tree.path_str(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _ocp():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp


class Checkpointer:
  """Saves every ``every`` steps (``0``: only forced saves), keeping
  ``max_to_keep``, under ``directory``; restores the newest intact step
  into given shardings. The orbax manager is created on first use, so a
  run that never saves leaves no directory."""

  def __init__(self, directory: str, every: int, max_to_keep: int = 2):
    if every < 0:
      raise ValueError(f'train.checkpoint_every must be >= 0, got {every}.')
    self.directory = os.path.abspath(directory)
    self.every = int(every)
    self.max_to_keep = max_to_keep
    self._mgr_obj = None
    self._unsealed: int | None = None  # saved, checksums not yet written
    self._sealer: threading.Thread | None = None  # writing a record
    self._seal_error: BaseException | None = None

  @property
  def _mgr(self):
    if self._mgr_obj is None:
      self._mgr_obj = _ocp().CheckpointManager(
          self.directory,
          options=_ocp().CheckpointManagerOptions(
              max_to_keep=self.max_to_keep, create=True),
          item_handlers=_ocp().StandardCheckpointHandler())
    return self._mgr_obj

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def all_steps(self) -> list[int]:
    if self._mgr_obj is None and not os.path.isdir(self.directory):
      return []
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, force: bool = False) -> bool:
    """Saves ``state`` as ``step`` when due (``step % every == 0``) or
    ``force``; returns whether it saved."""
    if not force and not (self.every and step % self.every == 0):
      self.seal_if_written()
      return False
    self._seal()
    saved = self._mgr.save(step, args=_ocp().args.StandardSave(state),
                           force=True)
    if saved:
      self._unsealed = step
    return saved

  def seal_if_written(self) -> None:
    """Once orbax has committed the last save, hashes its files and writes
    the checksum record on a background thread (the trainer asks every
    step and does not wait: hashing runs at about 1 GB/s), so that a run
    killed afterwards leaves a verified checkpoint. The next save, a
    restore and :meth:`close` wait for it."""
    if (self._unsealed is not None and self._sealer is None
        and not self._mgr.is_saving_in_progress()):
      # Returns at once (orbax has finished), raising a failed save's
      # error here, before a record is written for it.
      self._mgr.wait_until_finished()
      step, self._unsealed = self._unsealed, None
      self._sealer = threading.Thread(
          target=self._record_in_background, args=(step,), daemon=True,
          name=f'orthax-checksums-{step}')
      self._sealer.start()

  def _record_in_background(self, step: int) -> None:
    try:
      self._write_record(step)
    except BaseException as e:  # pylint: disable=broad-except
      self._seal_error = e  # raised where the thread is joined

  def _join_sealer(self) -> None:
    """Waits for a background record; raises what it raised."""
    sealer, self._sealer = self._sealer, None
    if sealer is not None:
      sealer.join()
      error, self._seal_error = self._seal_error, None
      if error is not None:
        raise error

  def _seal(self) -> None:
    """Waits for the pending save and its checksum record (written here
    if it was not begun in the background)."""
    self._join_sealer()
    if self._unsealed is None:
      return
    step, self._unsealed = self._unsealed, None
    self._mgr.wait_until_finished()
    self._write_record(step)

  def _write_record(self, step: int) -> None:
    d = self.step_dir(step)
    if not hosts.is_main() or not os.path.isdir(d):
      return
    record = {'step': step, 'algorithm': 'sha256', 'files': file_digests(d)}
    tmp = os.path.join(d, CHECKSUMS + '.tmp')
    with open(tmp, 'w') as f:
      json.dump(record, f, indent=0)
    os.replace(tmp, os.path.join(d, CHECKSUMS))

  def restore(self, abstract_state: Any, step: int | None = None,
              layout: Any = None, mesh_changes: Sequence[str] = ()) -> Any:
    """The checkpoint ``step`` (default: latest), unverified, restored with
    the shardings and dtypes of ``abstract_state`` (``ShapeDtypeStruct``
    tree or arrays). A checkpoint in an older orthax's layout of the
    optimizer state is read in that layout
    (:mod:`~orthax.train.checkpoint_formats`). ``layout``: the slot states
    of a fresh ``init`` on this mesh (:func:`checkpoint_slots.slot_states
    <orthax.train.checkpoint_slots.slot_states>`); the saved slot states,
    from any mesh, are moved into it (:mod:`~orthax.train.checkpoint_slots`),
    except ones saved without their layout when ``mesh_changes`` (``'key:
    old -> new'`` of a forced resume) is not empty:
    :class:`~orthax.train.checkpoint_slots.UnknownLayoutError`.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise ValueError(f'no checkpoint in {self.directory!r}.')
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=getattr(x, 'sharding', None)),
        abstract_state)
    to_here = lambda restored: restored
    meta = self.metadata(step)  # read once: the steps below all need it
    if (layout is not None and checkpoint_slots.slot_state_paths(layout)
        and meta is not None):
      target, to_here = checkpoint_slots.as_saved(
          target, meta, layout, mesh_changes,
          f'checkpoint step {step} in {self.directory}')
    return to_here(self._restore_fitting(step, target, meta))

  def metadata(self, step: int) -> Any:
    """The step's orbax metadata tree (shapes and dtypes, no arrays);
    ``None`` when unreadable."""
    try:
      return self._mgr.item_metadata(step)
    except Exception:  # pylint: disable=broad-except
      return None  # unreadable: the restore says what is wrong

  def _restore_fitting(self, step: int, target: Any, meta: Any) -> Any:
    """The step restored into ``target``, or into the older layout of it
    that fits the saved leaves' shapes (``meta``: the step's
    :meth:`metadata`)."""
    saved = _saved_shapes(meta)
    if saved and mismatches(saved, _shapes(target)):
      for older, to_today in checkpoint_formats.older_layouts(target):
        if not mismatches(saved, _shapes(older)):
          return to_today(self._read(step, older, meta))
      raise CheckpointMismatchError(
          f'checkpoint step {step} does not fit: '
          + '; '.join(mismatches(saved, _shapes(target))))
    return (self._read(step, target, meta) if saved
            else self._restore(step, target))

  def _read(self, step: int, target: Any, meta: Any) -> Any:
    """The step's arrays, which fit ``target`` by path and shape, into
    ``target``. Where the saved tree holds them in another arrangement of
    empty nodes (an older orthax's optimizer state with a stage that keeps
    nothing, since dropped: 2026-12-06, ROOT's ``clip_outliers``, now
    inside ``orthogonalize``), which orbax refuses as another tree
    structure, they are read in the saved structure and placed by path."""
    if (_tree.empty_paths(meta, _is_empty)
        == _tree.empty_paths(target, _is_empty)):
      return self._restore(step, target)
    by_path = {_tree.path_str(p): x for p, x in
               jax.tree_util.tree_flatten_with_path(target)[0]}
    saved = jax.tree_util.tree_map_with_path(
        lambda p, m: None if _is_empty(m) else by_path[_tree.path_str(p)],
        meta, is_leaf=_is_empty)
    read = {_tree.path_str(p): x for p, x in
            jax.tree_util.tree_flatten_with_path(self._restore(step, saved))[0]}
    paths, treedef = jax.tree_util.tree_flatten_with_path(target)
    return jax.tree.unflatten(treedef,
                              [read[_tree.path_str(p)] for p, _ in paths])

  def _restore(self, step: int, target: Any) -> Any:
    return self._mgr.restore(step,
                             args=_ocp().args.StandardRestore(target))

  def restore_intact(self, abstract_state: Any, layout: Any = None,
                     mesh_changes: Sequence[str] = ()) -> tuple[Any, int]:
    """``(state, step)`` of the newest intact checkpoint (``layout`` and
    ``mesh_changes`` as :meth:`restore` takes them); damaged newer ones are
    logged and moved aside (see the module docstring)."""
    self._join_sealer()
    damaged = []

    def note(step, why):
      damaged.append((step, why))
      log.warning('checkpoint step %d in %s is damaged: %s', step,
                  self.directory, why)

    steps = self.all_steps()
    verdicts = {}  # step -> check_files's (hashing each step once)

    def verdict(s):
      if s not in verdicts:
        verdicts[s] = check_files(self.step_dir(s))
      return verdicts[s]

    for i in reversed(range(len(steps))):
      step = steps[i]
      problems = verdict(step)
      if problems:
        note(step, '; '.join(problems))
        continue
      if (problems is None and hosts.count() > 1
          and any(verdict(s) == [] for s in steps[:i])):
        # Orbax reads each process's own shards: a read failing on one
        # process alone would leave the others waiting in the restore.
        note(step, 'no checksum record; on several processes an older '
             'verified step is restored instead')
        continue
      try:
        state = self.restore(abstract_state, step, layout, mesh_changes)
      except (CheckpointMismatchError,  # another run's state: not damage
              checkpoint_slots.UnknownLayoutError):
        raise
      except Exception as e:  # pylint: disable=broad-except
        if problems is not None:  # verified files: not damage, a real error
          raise
        note(step, f'no checksum record, and unreadable: {_brief(e)}')
        continue
      if problems is None:
        log.warning('checkpoint step %d in %s has no checksum record '
                    '(saved by an older orthax, or interrupted before the '
                    'record was written); restored unverified.', step,
                    self.directory)
      if damaged:
        self._move_aside([s for s, _ in damaged])
        log.warning('resuming from checkpoint step %d instead of damaged '
                    'step(s) %s (moved to %s).', step,
                    [s for s, _ in damaged], self.directory + '.damaged')
      return state, step
    raise DamagedCheckpointError(
        f'every checkpoint in {self.directory} is damaged: '
        + '; '.join(f'step {s}: {why}' for s, why in damaged)
        + '. Restore the files, or move the checkpoints away to start over.')

  def _move_aside(self, steps: list[int]) -> None:
    """Moves ``steps`` to ``<directory>.damaged`` (process 0, once every
    process has read them; :mod:`~orthax.train.hosts`)."""
    hosts.barrier('checkpoints checked')
    if hosts.is_main():
      dest_root = self.directory + '.damaged'
      os.makedirs(dest_root, exist_ok=True)
      for step in steps:
        dest, n = os.path.join(dest_root, str(step)), 0
        while os.path.exists(dest):
          n += 1
          dest = os.path.join(dest_root, f'{step}.{n}')
        shutil.move(self.step_dir(step), dest)
    hosts.barrier('damaged checkpoints moved')
    self._mgr.reload()

  def close(self) -> None:
    if self._mgr_obj is not None:
      try:
        self._seal()
      finally:
        self._mgr.wait_until_finished()
        self._mgr.close()
