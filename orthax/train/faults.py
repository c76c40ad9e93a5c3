"""What the loop does when a step goes wrong or the job is told to stop:
non-finite gradients (:class:`SkipWatch`, per ``train.nonfinite``) and
preemption (:func:`sigterm_flag`). Damaged checkpoints are
:mod:`~orthax.train.checkpoint`'s concern, refused reruns
:mod:`~orthax.train.rundir`'s."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any

import orthax

log = logging.getLogger('orthax.train')


class SkipWatch:
  """Acts on the non-finite guard's outcome of each step, per
  ``train.nonfinite``: ``'raise'`` raises
  :class:`orthax.NonFiniteGradientError` (or its subclass
  :class:`orthax.NonFiniteUpdateError`, for a finite gradient whose update or
  optimizer state overflowed) naming the step and the leaves;
  ``'skip'`` logs and counts, and raises once ``max_consecutive`` steps in
  a row were skipped.

  Reading a flag back waits for its step to finish, so step ``t``'s flag
  is read after step ``t + 1`` has been dispatched (the device runs
  ``t + 1`` while the host waits for ``t``; one int32 comes back, the
  per-leaf flags only after a skip) — except where ``now`` is set (steps
  that are logged or checkpointed), so no record or checkpoint ever
  follows an unchecked step. The decision itself stays on device: no host
  callback in the jitted step (one would hang or abort a mesh).
  """

  def __init__(self, policy: str = 'raise', max_consecutive: int = 10,
               opt_state_like: Any = None):
    """``opt_state_like``: any tree shaped like the optimizer state (its
    shardings will do), whose paths name the state leaves a step's result
    overflowed (the step's metrics carry the flags, not the state)."""
    self.policy, self.max_consecutive = policy, int(max_consecutive)
    self._pending = None
    guard = orthax.nonfinite_status(opt_state_like)
    self._inner_like = None if guard is None else guard.inner_state

  def after(self, step: int, metrics: dict[str, Any], now: bool) -> None:
    """Checks the step held back last time, then ``step`` (at once when
    ``now``, else at the next call or :meth:`flush`)."""
    self.flush()
    if 'skipped' in metrics:
      self._pending = (step, metrics)
      if now:
        self.flush()

  def flush(self) -> None:
    pending, self._pending = self._pending, None
    if pending is None or not int(pending[1]['skipped']):
      return
    step, status = pending[0], pending[1]['nonfinite']
    if self._inner_like is not None:
      status = status._replace(inner_state=self._inner_like)
    if self.policy == 'raise':
      orthax.raise_if_nonfinite(status, step)
    consecutive, total = int(status.consecutive), int(status.total)
    what, leaves = orthax.skip_cause(status) or ('non-finite values', [])
    if consecutive >= self.max_consecutive:
      raise orthax.NonFiniteGradientError(
          f'{consecutive} steps in a row skipped '
          f'(train.max_consecutive_skips={self.max_consecutive}), the last '
          f'at step {step} for a {what} in {leaves}: the run is not '
          'recovering; lower the learning rate, check the data, or resume '
          'from an earlier checkpoint.')
    log.warning("step %d skipped: %s in %s (%d in a row, %d in total; "
                "train.nonfinite='skip').", step, what, leaves, consecutive,
                total)


@contextlib.contextmanager
def sigterm_flag(enabled: bool = True):
  """Yields a ``threading.Event`` that SIGTERM sets (instead of killing the
  process) inside the block; the previous handler is restored after.
  Inert off the main thread, where Python cannot install handlers."""
  flag = threading.Event()
  if not enabled or threading.current_thread() is not threading.main_thread():
    yield flag
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM,
                  signal.SIG_DFL if previous is None else previous)
