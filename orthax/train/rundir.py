"""The run directory: which config a run was started with, and which
reruns may continue it.

``<workdir>/config.json`` holds the resolved config of the run (written
at every start, once its state is initialized or restored). A rerun that resumes from a checkpoint must change
nothing that changes the run — model, data, optimizer, schedule, mesh,
step count, seed: every key except :data:`COSMETIC` — or it is refused
with a ``ValueError`` naming each differing key with both values; a
rerun in a workdir with metrics but no checkpoint would overwrite them and
is refused too. ``force=True`` (``--force``) does it anyway, with a
warning.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from orthax.train import metrics as metrics_lib

CONFIG = 'config.json'
# Keys (or whole sections) a resumed run may change: how often it logs,
# evaluates and checkpoints, how it reports, what it does on a non-finite
# gradient — never what it computes. Evaluation settings change reported
# validation losses, not the trained parameters.
COSMETIC = ('hardware', 'dry_run', 'train.log_every', 'train.eval_every',
            'train.eval_batches', 'train.checkpoint_every',
            'train.max_to_keep', 'train.tensorboard', 'train.nonfinite',
            'train.max_consecutive_skips', 'data.eval_batch_size',
            'train.peak_flops', 'train.wandb_project')
log = logging.getLogger('orthax.train')


def flatten(cfg: Any, prefix: str = '') -> dict[str, Any]:
  """``{'section.key': value}`` of a nested dict, as JSON would store it
  (an empty section has no keys)."""
  out = {}
  for k, v in cfg.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = json.loads(json.dumps(v, default=repr))
  return out


def _cosmetic(key: str) -> bool:
  return any(key == c or key.startswith(c + '.') for c in COSMETIC)


def run_changes(old: dict[str, Any], new: dict[str, Any]
                ) -> list[tuple[str, Any, Any]]:
  """``[(key, old value, new value)]`` for every run-changing key that
  differs (a missing key reads as ``'<absent>'``)."""
  a, b = flatten(old), flatten(new)
  return [(k, a.get(k, '<absent>'), b.get(k, '<absent>'))
          for k in sorted(set(a) | set(b))
          if not _cosmetic(k) and a.get(k, '<absent>') != b.get(k, '<absent>')]


def load_config(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      cfg = json.load(f)
    if not isinstance(cfg, dict):
      raise ValueError(f'a JSON {type(cfg).__name__}, not an object')
    return cfg
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, the above
    raise ValueError(
        f'{path} is damaged ({e}): it records the config the run in '
        f'{workdir} was started with; restore it, or go on without it '
        'with --force (train(..., force=True)).') from e


def save_config(workdir: str, cfg: dict[str, Any]) -> None:
  """Writes ``cfg`` to ``<workdir>/config.json`` (atomically)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG)
  with open(path + '.tmp', 'w') as f:
    json.dump(cfg, f, indent=1, sort_keys=True, default=repr)
  os.replace(path + '.tmp', path)


def check(workdir: str, cfg: dict[str, Any], *, resuming: bool,
          force: bool = False) -> list[tuple[str, Any, Any]]:
  """Checks that this start may use ``workdir`` (see the module
  docstring); :func:`save_config` records ``cfg`` once the run has its
  state (a start that fails before, e.g. a forced resume whose checkpoint
  does not fit the config, leaves the saved config as it was). Returns
  the run-changing keys a forced resume lets through (:func:`run_changes`;
  ``[]`` otherwise)."""
  try:
    old = load_config(workdir)
  except ValueError as e:
    if not force:
      raise
    log.warning('%s forced: going on without it.', e)
    old = None
  if resuming and old is not None:
    changes = run_changes(old, cfg)
    if changes:
      lines = '\n'.join(f'  {k}: {a!r} -> {b!r}' for k, a, b in changes)
      msg = (f'{workdir} holds a run whose config differs from this one in '
             f'keys that change the run (saved -> given):\n{lines}')
      if not force:
        raise ValueError(
            msg + '\nResuming would silently mix two runs. Use the saved '
            f'config ({os.path.join(workdir, CONFIG)}), another workdir, '
            'or force it (train(..., force=True), --force).')
      log.warning('%s\nforced: resuming anyway.', msg)
      return changes
  if not resuming:
    try:
      recs = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
    except ValueError as e:  # a damaged line: the file is there all the same
      if not force:
        raise ValueError(f'{e} (or start over with --force, which rewrites '
                         'it).') from e
      recs = []
    if recs:
      msg = (f'{workdir} has metrics.jsonl with {len(recs)} records (up to '
             f'step {recs[-1].get("step")}) but no checkpoint to resume '
             'from; starting over would overwrite them')
      if not force:
        if (cfg.get('train') or {}).get('checkpoint_every'):
          msg += (' (none is complete, though train.checkpoint_every is '
                  'set). Use another workdir')
        else:
          msg += ('. Use another workdir, set train.checkpoint_every to make '
                  'runs resumable,')
        raise ValueError(
            f'{msg} or start over with --force (train(..., force=True)), '
            "e.g. to rerun with train.nonfinite='skip' after a non-finite "
            'gradient.')
      log.warning('%s; forced: starting over.', msg)
  return []
