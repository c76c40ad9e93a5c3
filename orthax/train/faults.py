"""What the loop does when a step goes wrong or the job is told to stop:
non-finite gradients (:class:`SkipWatch`, per ``train.nonfinite``) and
stop signals (:func:`stop_signals`: SIGTERM preempts, Ctrl-C interrupts;
on several processes they stop together, :mod:`~orthax.train.hosts`). Damaged checkpoints are
:mod:`~orthax.train.checkpoint`'s concern, refused reruns
:mod:`~orthax.train.rundir`'s."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any

import orthax
from orthax.train import hosts

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


class Interrupted(KeyboardInterrupt):
  """Ctrl-C (SIGINT) ended a training run after its current step, which
  was checkpointed first (where the run has a checkpoint directory): rerun
  the same command to resume. A ``KeyboardInterrupt``, so that code that
  stops on Ctrl-C still stops."""


class StopRequest:
  """The stop signal the run received first (``name``: ``'SIGTERM'`` or
  ``'SIGINT'``; ``None`` while none has arrived). With ``agreed`` (several
  processes) the run stops where the processes agree
  (:func:`orthax.train.hosts.reached_stop_point`), whichever received the
  signal."""

  def __init__(self, agreed: bool = False):
    self.name: str | None = None
    self.agreed = agreed
    self._steps = 0  # steps of this run so far (the sync's step ids)

  def is_set(self) -> bool:
    return self.name is not None

  def set(self, name: str) -> None:
    self.name = self.name or name

  def stops_after(self, step: int, end: int) -> bool:
    """Whether the loop checkpoints ``step`` and stops, in a run that ends
    after step ``end`` anyway: a signal arrived (SIGTERM in the last step:
    the run ends as it would; Ctrl-C there: it is saved too). With
    ``agreed``, at the step the processes agreed on, every process alike,
    the last one included (call it after every step). The sync counts this run's steps from 1,
    not ``step``: a notice before a resumed run's first step sets the
    point at 1, which a count from the checkpoint's step never meets."""
    if self.agreed:
      self._steps += 1
      if not hosts.reached_stop_point(self._steps):
        return False
      self.set('SIGTERM')  # a notice reached some process
      return True  # (the last step too: a Ctrl-C on one process saves it)
    return self.is_set() and (step < end or self.name == 'SIGINT')

  def message(self, step: int, total: int, directory: str | None) -> str:
    """What the run did on this signal, ending after ``step`` of
    ``total`` with (``directory``) or without a checkpoint of it."""
    what = ('preempted (SIGTERM)' if self.name == 'SIGTERM'
            else 'interrupted (Ctrl-C)')
    if directory is None:
      return f'{what} after step {step} of {total}.'
    return (f'{what} after step {step} of {total}: saved checkpoint {step} '
            f'in {directory}; rerun the same command to resume.')


@contextlib.contextmanager
def stop_signals(enabled: bool = True):
  """Yields a :class:`StopRequest` that SIGTERM or a first Ctrl-C (SIGINT)
  sets inside the block, instead of ending the process: the loop then
  checkpoints the step it is in and stops. A second Ctrl-C meets the
  previous handler (``KeyboardInterrupt`` at once); a SIGINT the process
  ignores (a background job's) stays ignored. Both handlers are restored
  after the block. Inert off the main thread, where Python cannot install
  handlers.

  On several processes SIGTERM is left to JAX's preemption service, which
  tells every process, and a first Ctrl-C is passed on to it as a SIGTERM
  of this process: all of them checkpoint the step they agree on and stop
  (one process saving alone would wait for the others forever); not
  ``enabled`` (no workdir), they stop there with nothing to save, as the
  service's handler keeps SIGTERM from ending them. Where the service is
  off, no handler is installed (a signal ends the process)."""
  several = hosts.count() > 1
  stop = StopRequest(agreed=several and hosts.stop_point_available())
  if several and not stop.agreed:
    log.warning('jax_enable_preemption_service is off: on %d processes a '
                'SIGTERM or Ctrl-C ends the run without a checkpoint.',
                hosts.count())
  if (not enabled or (several and not stop.agreed)
      or threading.current_thread() is not threading.main_thread()):
    yield stop  # (several processes: SIGTERM is still agreed on)
    return
  # (Several processes: SIGTERM stays the preemption service's.)
  mine = (signal.SIGINT,) if several else (signal.SIGTERM, signal.SIGINT)
  previous = {s: signal.getsignal(s) for s in mine}

  def on_sigint(signum, frame):
    del signum, frame
    # The previous handler first: a second Ctrl-C in between is not lost.
    signal.signal(signal.SIGINT, _handler(previous[signal.SIGINT]))
    stop.set('SIGINT')
    if several:  # the preemption service's handler tells the others
      os.kill(os.getpid(), signal.SIGTERM)
    log.warning('Ctrl-C: the run stops after the current step, once it is '
                'checkpointed; press Ctrl-C again to stop at once.')

  if not several:
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set('SIGTERM'))
  if previous[signal.SIGINT] is not signal.SIG_IGN:
    signal.signal(signal.SIGINT, on_sigint)
  try:
    yield stop
  finally:
    for s, handler in previous.items():
      signal.signal(s, _handler(handler))


def _handler(previous: Any) -> Any:
  """A handler that ``signal.getsignal`` returned, to reinstall (``None``,
  one installed outside Python, becomes the default)."""
  return signal.SIG_DFL if previous is None else previous
