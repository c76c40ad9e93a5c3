"""The training loop, readable end to end: config check → data → run
directory → model, optimizer, steps (:mod:`~orthax.train.setup`) →
(restore: :mod:`~orthax.train.resume`) → loop with logging, evaluation,
checkpoints, the non-finite policy and preemption.

A config is a nested mapping (an ``ml_collections.ConfigDict`` from
``orthax/configs/*.py`` or a plain dict) with the sections ``model``, ``data``,
``optimizer``, ``schedule``, ``mesh`` and ``train`` and a ``seed``; see
:func:`orthax.train.configs.base_config` for every key.

When things go wrong: a step with a NaN/Inf gradient is skipped on device
by the optimizer's guard and then, per ``train.nonfinite``, raises
:class:`orthax.NonFiniteGradientError` (``'raise'``) or is logged and
counted (``'skip'``); SIGTERM finishes the current step, checkpoints it and
returns with ``summary['preempted']`` (Ctrl-C does the same and then raises
:class:`~orthax.train.faults.Interrupted`); damaged checkpoints are skipped
(:mod:`~orthax.train.checkpoint`); a resume with a changed config is
refused (:mod:`~orthax.train.rundir`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax
import numpy as np

import orthax
from orthax.train import checkpoint as ckpt_lib
from orthax.train import configs
from orthax.train import data as data_lib
from orthax.train import faults
from orthax.train import hosts
from orthax.train import metrics as metrics_lib
from orthax.train import model as model_lib
from orthax.train import partitioning
from orthax.train import resume
from orthax.train import rundir
# Building a run (also reached as trainer.build, trainer.Setup, ...).
from orthax.train.setup import Setup
from orthax.train.setup import as_dict
from orthax.train.setup import build
from orthax.train.setup import loaders
from orthax.train.setup import model_config  # noqa: F401
from orthax.train.setup import startup_summary

log = logging.getLogger('orthax.train')


def evaluate(setup: Setup, params: Any, val: data_lib.TokenLoader,
             max_batches: int | None) -> float:
  """Mean validation loss over the first ``max_batches`` eval batches."""
  sh = partitioning.batch_sharding(setup.mesh)
  losses = [setup.eval_step(params, jax.device_put(b, sh))
            for b in val.eval_batches(max_batches)]
  return float(np.mean(jax.device_get(losses)))



@dataclasses.dataclass
class Loop:
  """The step loop, and what it carries from step to step besides the
  train state."""
  setup: Setup
  train_data: data_lib.TokenLoader
  val_data: data_lib.TokenLoader
  ckpt: ckpt_lib.Checkpointer | None
  writer: metrics_lib.MetricWriter
  bar: metrics_lib.Progress
  clock: metrics_lib.Throughput
  watch: faults.SkipWatch
  smooth: metrics_lib.Smoothed = dataclasses.field(
      default_factory=metrics_lib.Smoothed)

  def run(self, state: Any, start: int, end: int,
          stop: faults.StopRequest) -> tuple[Any, bool]:
    """Steps ``start + 1 .. end`` (1-based) from ``state``; returns the
    state and whether a stop signal ended the run early (after
    checkpointing the step it was in)."""
    tr, ckpt = self.setup.config['train'], self.ckpt
    total = int(tr['steps'])
    log_every, eval_every = int(tr['log_every']), int(tr['eval_every'] or 0)
    batch_sh = partitioning.batch_sharding(self.setup.mesh)
    lagged = None  # the previous step's loss, read once this one is queued
    for step in range(start, end):
      state, m = self.setup.train_step(
          state, jax.device_put(self.train_data.batch(step), batch_sh))
      if self.bar.tty and lagged is not None:
        self.smooth.add(float(lagged))
      lagged = m['loss']
      done = step + 1
      self.clock.tick(m)
      preempted = stop.stops_after(done, end)
      is_log = done % log_every == 0 or done == end
      is_eval = eval_every and (done % eval_every == 0 or done == total)
      is_save = ckpt is not None and (preempted or (ckpt.every and (
          done % ckpt.every == 0 or done == end)) or (
              # A run resumed from a preemption save ends with a save of its
              # own, or a rerun would redo it from that save.
              done == total and bool(ckpt.all_steps())))
      self.watch.after(done, m, now=bool(is_log or is_eval or is_save))
      if is_log or is_eval:
        self.log(done, m, state.params, bool(is_eval))
      else:
        self.bar.update(done, self.smooth.info())
      if is_save:
        ckpt.save(done, state, force=True)
      elif ckpt is not None:  # checksums the last save once it is written
        ckpt.seal_if_written()
      if preempted:
        log.warning('%s', stop.message(
            done, total, None if ckpt is None else ckpt.directory))
        return state, True
    self.watch.flush()
    return state, False

  def log(self, step: int, metrics: dict[str, Any], params: Any,
          is_eval: bool) -> None:
    """Writes the record of ``step`` (1-based), with the validation loss
    when ``is_eval``; raises ``FloatingPointError`` on a non-finite loss
    (unless the guard skipped the step:
    :class:`~orthax.train.faults.SkipWatch`)."""
    m = jax.device_get({k: v for k, v in metrics.items()
                        if k != 'nonfinite'})  # waits for the step
    # The rate of this step: the schedules run on the optimizer's count,
    # which a skipped step (train.nonfinite='skip') does not advance.
    count = step - 1 - (int(m.get('skipped_total', 0))
                        - int(m.get('skipped', 0)))
    with self.clock.paused():  # the first call compiles the schedules
      rates = {f'lr/{b}': float(s(count))
               for b, s in self.setup.schedules.items()}
    rec = {'step': step,
           **{k: int(v) if np.asarray(v).dtype.kind in 'biu' else float(v)
              for k, v in m.items()},
           **rates,
           'tokens': step * self.train_data.tokens_per_batch,
           'tokens_per_s': self.clock.rate()}
    # Seconds per step, evaluation left out (none yet after the first).
    rate = rec['tokens_per_s']
    rec['step_time_s'] = (self.clock.tokens_per_batch / rate if rate > 0
                          else float('nan'))
    peak = self.setup.peak_flops
    if peak:
      rec['mfu'] = self.setup.flops_per_token * rec['tokens_per_s'] / peak
    if is_eval:
      with self.clock.paused():
        rec['val_loss'] = evaluate(self.setup, params, self.val_data,
                                   self.setup.config['train'].get(
                                       'eval_batches'))
    self.writer.write(rec)
    if not math.isfinite(rec['loss']) and not rec.get('skipped'):
      raise FloatingPointError(f'loss is {rec["loss"]} at step {step}.')
    if not self.bar.tty:  # the smoothed loss is read step by step on a tty
      self.smooth.add(rec['loss'])
    self.bar.update(step, {**self.smooth.info(),
                           **({'val': rec['val_loss']} if is_eval else {}),
                           'tok/s': rec['tokens_per_s'],
                           **({'mfu': rec['mfu']} if 'mfu' in rec else {})},
                    force=True)

  def close(self) -> None:
    """Ends the progress line, the metric writer and pending saves."""
    self.bar.close()
    self.writer.close()
    if self.ckpt is not None:
      self.ckpt.close()


def train(config: Any, workdir: str | None = None, *, progress: bool = True,
          stop_at: int | None = None, label: str = '',
          force: bool = False) -> dict[str, Any]:
  """Trains per ``config``; returns ``{'train': [...], 'eval': [...],
  'summary': {...}, 'state': TrainState}`` (the records also go to
  ``<workdir>/metrics.jsonl``).

  With a ``workdir``: ``config.json`` records the config; checkpoints go
  to ``<workdir>/checkpoints`` every ``train.checkpoint_every`` steps and
  a rerun resumes from the newest intact one (refused when the config
  changes the run, or when there are metrics but no checkpoint, unless
  ``force``); SIGTERM ends the run after the current step with a
  checkpoint of it and ``summary['preempted'] = True``; a first Ctrl-C
  does the same and then raises :class:`~orthax.train.faults.Interrupted`
  (a ``KeyboardInterrupt``), a second one stops at once.

  Args:
    config: as :func:`build` takes it (``train.log_every`` defaults to 10,
      ``train.eval_every`` to 0: no evaluation).
    workdir: the run directory; ``None``: no files, checkpoints or resume.
    progress: draw the progress line (on stderr).
    stop_at: end after this step (for tests; saved when
      ``train.checkpoint_every`` is set; ``summary['preempted']`` is False).
    label: text in front of the progress line (e.g. the optimizer's name).
    force: resume or start over where the run directory would refuse
      (:mod:`~orthax.train.rundir`), with a warning.

  On several processes (:mod:`~orthax.train.hosts`) process 0 writes the
  files and returns every record of the run; the others return this
  call's records only.
  """
  cfg = as_dict(config)
  configs.validate(cfg)
  tr = cfg['train']
  tr.setdefault('log_every', 10)
  tr.setdefault('eval_every', 0)
  with hosts.together('the data'):  # (a file missing on one host)
    train_data, val_data, vocab = loaders(cfg)
  ckpt = resume.checkpointer(workdir, tr)
  try:
    if workdir is not None:
      changes = rundir.check(workdir, cfg, resuming=bool(ckpt.all_steps()),
                             force=force)
      hosts.barrier('run directory checked')  # before process 0 writes
    else:
      changes = []
    setup = build(cfg, vocab)
    log.info('%s', startup_summary(setup))
    state = resume.initial_state(setup, ckpt, [
        f'{k}: {a!r} -> {b!r}' for k, a, b in changes
        if k.startswith('mesh.') and k != 'mesh.comm_dtype'])
    # Process 0 writes the files and draws the progress line; the others
    # keep their records in memory. A failure on one process stops all.
    main = hosts.is_main()
    start, total = int(state.step), int(tr['steps'])
    with hosts.together('the run directory'):
      if workdir is not None and main:
        rundir.save_config(workdir, cfg)
      loop = Loop(setup, train_data, val_data, ckpt,
                  metrics_lib.MetricWriter(
                      workdir, resume_step=start,
                      tensorboard=bool(tr.get('tensorboard')),
                      wandb_project=tr.get('wandb_project'), config=cfg,
                      writes=main),
                  metrics_lib.Progress(total, enabled=progress and main,
                                       label=label),
                  metrics_lib.Throughput(train_data.tokens_per_batch),
                  faults.SkipWatch(tr.get('nonfinite', 'raise'),
                                   tr.get('max_consecutive_skips', 10),
                                   setup.shardings.opt_state))
  except BaseException:
    if ckpt is not None:  # orbax's threads, before the interpreter exits
      ckpt.close()
    raise
  end = total if stop_at is None else min(total, int(stop_at))
  # Stop signals are handled only with a workdir: without one there is
  # nothing to save, and the defaults (exit at once) are right (on several
  # processes JAX's own handler keeps SIGTERM: they stop at an agreed step).
  with faults.stop_signals(workdir is not None) as stop:
    try:
      state, preempted = loop.run(state, start, end, stop)
    finally:
      loop.close()
  if stop.name == 'SIGINT':  # after the save: Ctrl-C still stops the caller
    raise faults.Interrupted(stop.message(
        int(state.step), total,
        ckpt.directory if preempted and ckpt is not None else None))
  return _result(setup, state, loop.writer.records, preempted, start)


def _result(setup: Setup, state: Any, recs: list[dict[str, Any]],
            preempted: bool, start: int) -> dict[str, Any]:
  evals = [r for r in recs if 'val_loss' in r]
  status = orthax.nonfinite_status(state.opt_state)
  summary = {
      'steps': int(state.step),
      'resumed_from': start,
      'preempted': preempted,
      'skipped_total': None if status is None else int(status.total),
      'final_loss': recs[-1]['loss'] if recs else float('nan'),
      'final_val_loss': evals[-1]['val_loss'] if evals else float('nan'),
      'tokens_per_s': recs[-1]['tokens_per_s'] if recs else float('nan'),
      'params': model_lib.num_params(setup.abstract_params),
      'opt_state_bytes': sum(x.size * x.dtype.itemsize
                             for x in jax.tree.leaves(state.opt_state)),
  }
  return {'train': recs, 'eval': evals, 'summary': summary, 'state': state}
