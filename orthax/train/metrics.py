"""Metrics: one JSON object per line, an optional TensorBoard mirror, and a
progress line on a terminal."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterator, TextIO

import jax


def strict_json(obj: Any) -> Any:
  """``obj`` with every non-finite float (NaN, ±Inf) replaced by ``None``:
  JSON has no such numbers, and ``jq``, JavaScript and most JSON readers
  refuse Python's bare ``NaN``. The files this package writes hold
  records, so ``null`` always stands for a non-finite number in them
  (:func:`read_jsonl` turns it back into NaN)."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: strict_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [strict_json(v) for v in obj]
  return obj


def json_text(obj: Any, indent: int | None = None) -> str:
  """``obj`` as strict JSON text (:func:`strict_json`): what every file and
  summary this package writes uses."""
  return json.dumps(strict_json(obj), indent=indent, allow_nan=False)


def json_line(record: dict[str, Any]) -> str:
  """One line of a JSONL file: strict JSON (:func:`json_text`)."""
  return json_text(record) + '\n'


def _nan_for_null(obj: Any) -> Any:
  if obj is None:
    return float('nan')
  if isinstance(obj, dict):
    return {k: _nan_for_null(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_nan_for_null(v) for v in obj]
  return obj


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """All records of a JSONL file written by :func:`json_line` (empty list
  if it does not exist), with ``null`` read as NaN. A last line cut short
  by a crash mid-write is dropped."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  out = []
  for i, line in enumerate(lines):
    try:
      out.append(_nan_for_null(json.loads(line)))
    except json.JSONDecodeError as e:
      if i < len(lines) - 1:
        raise ValueError(
            f'{path}: line {i + 1} is not a JSON record ({e}); only a last '
            'line cut short by a crash is dropped: fix or remove the '
            'line.') from e
  return out


def drop_cut_line(path: str, records: list[dict[str, Any]]) -> None:
  """Rewrites ``path`` (atomically) as ``records`` when its last line was
  cut short by a crash mid-write (:func:`read_jsonl` dropped it), so that
  what is appended next starts on a line of its own."""
  if not os.path.exists(path):
    return
  with open(path, 'rb') as f:
    f.seek(0, os.SEEK_END)
    if f.tell() == 0:
      return
    f.seek(-1, os.SEEK_END)
    if f.read(1) == b'\n':
      return
  with open(path + '.tmp', 'w') as f:
    f.write(''.join(json_line(r) for r in records))
  os.replace(path + '.tmp', path)


class MetricWriter:
  """Appends records to ``<workdir>/metrics.jsonl``.

  On resume from step ``resume_step`` the records after it are dropped
  (they were computed after the checkpoint the run continues from), so
  the file always describes one consistent run with no step twice; with
  ``resume_step=0`` the file starts empty (:mod:`orthax.train.rundir`
  refuses that unless forced). The rewrite is atomic. ``tensorboard=True``
  also writes scalars with ``tensorboardX`` (the ``scripts`` extra) under
  ``<workdir>/tensorboard``; ``wandb_project`` also logs every record to
  Weights & Biases (``wandb``, when installed) with ``config``.
  """

  def __init__(self, workdir: str | None, resume_step: int = 0,
               tensorboard: bool = False, wandb_project: str | None = None,
               config: dict[str, Any] | None = None, writes: bool = True):
    """``writes=False`` (the processes but the first of a multi-host run)
    checks the same settings and packages, writes nothing and keeps only
    this run's records."""
    # Every missing package or setting is reported before anything is
    # written: a failed start leaves the workdir as it was. Every process
    # checks (one failing alone would leave the others waiting).
    summary_writer = wandb = None
    if tensorboard:
      if workdir is None:
        raise ValueError('train.tensorboard needs a workdir.')
      try:
        from tensorboardX import SummaryWriter as summary_writer  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ValueError('train.tensorboard=True needs the tensorboardX '
                         'package (pip install tensorboardX).') from e
    if wandb_project:
      try:
        import wandb  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ValueError(f'train.wandb_project={wandb_project!r} needs the '
                         'wandb package (pip install wandb).') from e
    if not writes:
      workdir = summary_writer = wandb = None
    self.path = None if workdir is None else os.path.join(workdir,
                                                          'metrics.jsonl')
    self.records: list[dict[str, Any]] = []
    if self.path is not None:
      os.makedirs(workdir, exist_ok=True)
      # A fresh start rewrites the file whatever it holds (rundir.check
      # refused to overwrite records unless forced).
      old = read_jsonl(self.path) if resume_step else None
      kept = [r for r in old if r.get('step', 0) <= resume_step
              ] if resume_step else []
      if kept != old or not os.path.exists(self.path):
        with open(self.path + '.tmp', 'w') as f:
          for r in kept:
            f.write(json_line(r))
        os.replace(self.path + '.tmp', self.path)
      else:
        drop_cut_line(self.path, kept)
      self.records = kept
    # On resume, TensorBoard drops the earlier files' points after the
    # checkpoint (a START event at resume_step + 1), as this file does.
    self._tb = self._wandb = None
    if summary_writer is not None:
      self._tb = summary_writer(os.path.join(workdir, 'tensorboard'),
                                purge_step=resume_step + 1 if resume_step
                                else None)
    if wandb is not None:
      self._wandb = wandb.init(project=wandb_project, config=config,
                               dir=workdir, resume='allow')

  def write(self, record: dict[str, Any]) -> None:
    record = {k: (float(v) if not isinstance(v, (str, int)) else v)
              for k, v in record.items()}
    self.records.append(record)
    if self.path is not None:
      with open(self.path, 'a') as f:
        f.write(json_line(record))
    if self._tb is not None:
      for k, v in record.items():
        if k != 'step' and isinstance(v, float) and math.isfinite(v):
          self._tb.add_scalar(k, v, record['step'])
    if self._wandb is not None:
      self._wandb.log({k: v for k, v in record.items() if k != 'step'},
                      step=record['step'])

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


class Throughput:
  """Tokens per second of training: counted from the end of the first
  (compiling) step on, over wall time less the time spent in
  :meth:`paused` blocks (evaluation, host-side bookkeeping that compiles
  on first use)."""

  def __init__(self, tokens_per_batch: int,
               clock: Callable[[], float] = time.perf_counter):
    self.tokens_per_batch = tokens_per_batch
    self.tokens = 0
    self.start: float | None = None
    self.excluded_s = 0.0
    self._clock = clock

  def tick(self, metrics: Any) -> None:
    """After each step, with that step's (device) metrics."""
    if self.start is None:  # the first step compiles: time from its end
      jax.block_until_ready(metrics)
      self.start = self._clock()
    else:
      self.tokens += self.tokens_per_batch

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """Time spent inside is left out of the rate."""
    t0 = self._clock()
    try:
      yield
    finally:
      self.excluded_s += self._clock() - t0

  def rate(self) -> float:
    """Tokens per second so far (NaN before the second step ends)."""
    if self.start is None or not self.tokens:  # was 0.0 after the first
      return float('nan')
    elapsed = self._clock() - self.start - self.excluded_s
    return self.tokens / elapsed if elapsed > 0 else float('nan')


class Smoothed:
  """The loss shown on the progress line: an exponential moving average
  ``s ← βs + (1-β)x``, divided by ``1 - β^n`` so that the first values are
  not pulled towards 0 (Adam's bias correction)."""

  def __init__(self, beta: float = 0.9):
    self.beta, self.n, self.ema = beta, 0, 0.0

  def add(self, x: float) -> None:
    if math.isfinite(x):  # a skipped step's NaN does not poison the line
      self.n += 1
      self.ema = self.beta * self.ema + (1 - self.beta) * x

  def value(self) -> float:
    return self.ema / (1 - self.beta ** self.n) if self.n else float('nan')

  def info(self) -> dict[str, float]:
    """``{'loss': smoothed}``, or ``{}`` before the first value."""
    return {'loss': self.value()} if self.n else {}


def _redraws_in_place(stream: Any) -> bool:
  """A terminal, or Jupyter's output stream (not a tty, but it renders a
  carriage return as a redraw of the line)."""
  if hasattr(stream, 'isatty') and stream.isatty():
    return True
  return type(stream).__module__.split('.')[0] == 'ipykernel'


def _clock(seconds: float) -> str:
  m, s = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


class Progress:
  """``[bar] step/total  loss …  tok/s …  eta m:ss`` redrawn in place on a
  terminal or in Jupyter; elsewhere (a log file) one line per call to
  :meth:`update` with ``force=True`` (the log points).

  Between log points the line keeps the last logged value of each field
  (an update with no ``info`` only moves the bar and the ETA; ``val`` stays
  until the next evaluation). The ETA extrapolates the
  time per step measured since the first update (so the first step's
  compilation is left out).
  """

  def __init__(self, total: int, stream: TextIO | None = None,
               enabled: bool = True, label: str = '',
               clock: Any = time.perf_counter):
    self.total, self.label = total, label
    self.stream = sys.stderr if stream is None else stream
    self.enabled = enabled
    self.tty = enabled and _redraws_in_place(self.stream)
    self._clock = clock
    self._first: tuple[int, float] | None = None
    self._info: dict[str, float] = {}
    self._order: list[str] = []  # the fields' places on the line

  def eta(self, step: int) -> float | None:
    """Seconds left, from the pace since the first update (``None`` until
    a step after it)."""
    if self._first is None or step <= self._first[0]:
      return None
    first_step, t0 = self._first
    per_step = (self._clock() - t0) / (step - first_step)
    return per_step * max(self.total - step, 0)

  def _place(self, info: dict[str, float]) -> None:
    """Gives each new field of ``info`` its place on the line: right after
    the field before it in ``info``, so the caller's order holds whichever
    field comes first (a skipped first step has no loss yet)."""
    before = None
    for k in info:
      if k not in self._order:
        self._order.insert(
            0 if before is None else self._order.index(before) + 1, k)
      before = k

  def update(self, step: int, info: dict[str, float], force: bool = False):
    if not self.enabled:
      return
    if self._first is None:
      self._first = (step, self._clock())
    self._place(info)
    # Not yet known (NaN: tok/s before a second step) leaves the field out.
    self._info.update({k: v for k, v in info.items() if math.isfinite(v)})
    if not (self.tty or force):
      return
    width = 24
    done = int(width * step / max(self.total, 1))
    bar = '#' * done + '.' * (width - done)
    fields = '  '.join(
        f'{k} {v:.0f}' if abs(v) >= 1000 else f'{k} {v:.4g}'
        for k, v in ((k, self._info[k]) for k in self._order
                     if k in self._info))
    eta = self.eta(step)
    if eta is not None and step < self.total:
      fields += f'  eta {_clock(eta)}'
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
