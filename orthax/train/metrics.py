"""Metrics: one JSON object per line, an optional TensorBoard mirror, and a
progress line on a terminal."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, TextIO


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """All records of a metrics file (empty list if it does not exist). A
  last line cut short by a crash mid-write is dropped."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  out = []
  for i, line in enumerate(lines):
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      if i < len(lines) - 1:
        raise
  return out


class MetricWriter:
  """Appends records to ``<workdir>/metrics.jsonl``.

  On resume from step ``resume_step`` the records after it are dropped
  (they were computed after the checkpoint the run continues from), so
  the file always describes one consistent run with no step twice; with
  ``resume_step=0`` the file starts empty (:mod:`orthax.train.rundir`
  refuses that unless forced). The rewrite is atomic. ``tensorboard=True``
  also writes scalars with ``tensorboardX`` (an optional dependency).
  """

  def __init__(self, workdir: str | None, resume_step: int = 0,
               tensorboard: bool = False):
    self.path = None if workdir is None else os.path.join(workdir,
                                                          'metrics.jsonl')
    self.records: list[dict[str, Any]] = []
    if self.path is not None:
      os.makedirs(workdir, exist_ok=True)
      old = read_jsonl(self.path)
      kept = [r for r in old if r.get('step', 0) <= resume_step
              ] if resume_step else []
      if kept != old or not os.path.exists(self.path):
        with open(self.path + '.tmp', 'w') as f:
          for r in kept:
            f.write(json.dumps(r) + '\n')
        os.replace(self.path + '.tmp', self.path)
      self.records = kept
    self._tb = None
    if tensorboard:
      if workdir is None:
        raise ValueError('train.tensorboard needs a workdir.')
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ValueError('train.tensorboard=True needs the tensorboardX '
                         'package (pip install tensorboardX).') from e
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, record: dict[str, Any]) -> None:
    record = {k: (float(v) if not isinstance(v, (str, int)) else v)
              for k, v in record.items()}
    self.records.append(record)
    if self.path is not None:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for k, v in record.items():
        if k != 'step' and isinstance(v, float) and math.isfinite(v):
          self._tb.add_scalar(k, v, record['step'])

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class Progress:
  """``step/total  loss  tok/s`` redrawn in place on a terminal; on a
  non-terminal stream one line per call to :meth:`update` with
  ``force=True`` (the log points)."""

  def __init__(self, total: int, stream: TextIO | None = None,
               enabled: bool = True, label: str = ''):
    self.total, self.label = total, label
    self.stream = sys.stderr if stream is None else stream
    self.enabled = enabled
    self.tty = enabled and hasattr(self.stream, 'isatty') and \
        self.stream.isatty()
    self._t0 = time.perf_counter()

  def update(self, step: int, info: dict[str, float], force: bool = False):
    if not self.enabled or not (self.tty or force):
      return
    width = 24
    done = int(width * step / max(self.total, 1))
    bar = '#' * done + '.' * (width - done)
    fields = '  '.join(f'{k} {v:.4g}' for k, v in info.items())
    line = f'{self.label}[{bar}] {step}/{self.total}  {fields}'
    if self.tty:
      self.stream.write('\r' + line[:160].ljust(100))
    else:
      self.stream.write(line + '\n')
    self.stream.flush()

  def close(self):
    if self.tty:
      self.stream.write('\n')
      self.stream.flush()
