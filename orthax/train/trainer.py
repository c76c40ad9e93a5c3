"""The training loop, readable end to end: config check → data → run
directory → model, optimizer, steps → (restore: :mod:`~orthax.train.resume`)
→ loop with logging, evaluation, checkpoints, the non-finite policy and
preemption.

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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import orthax
from orthax.train import checkpoint as ckpt_lib
from orthax.train import configs
from orthax.train import data as data_lib
from orthax.train import faults
from orthax.train import flops as flops_lib
from orthax.train import hosts
from orthax.train import metrics as metrics_lib
from orthax.train import model as model_lib
from orthax.train import optim
from orthax.train import partitioning
from orthax.train import resume
from orthax.train import rundir
from orthax.train import step as step_lib

log = logging.getLogger('orthax.train')


def as_dict(config: Any) -> dict[str, Any]:
  """A plain nested dict of a ``ConfigDict`` or mapping."""
  if hasattr(config, 'to_dict'):
    return config.to_dict()
  return {k: as_dict(v) if isinstance(v, dict) else v
          for k, v in dict(config).items()}


def model_config(cfg: dict[str, Any], vocab_size: int) -> model_lib.GPTConfig:
  """The :class:`GPTConfig` of ``cfg['model']`` (``vocab_size`` from the
  data when the config leaves it ``None``)."""
  m = dict(cfg['model'])
  if m.get('vocab_size') is None:
    m['vocab_size'] = vocab_size
  elif m['vocab_size'] < vocab_size:  # ids past the table: NaN at step 1
    raise ValueError(
        f'model.vocab_size={m["vocab_size"]} is below the data\'s vocabulary '
        f'({vocab_size}: data.vocab_size, the token files\' or the embedded '
        'corpus\'s): token ids at or above it would have no embedding row.')
  known = {f.name for f in dataclasses.fields(model_lib.GPTConfig)}
  unknown = set(m) - known
  if unknown:
    raise ValueError(f'model: unknown keys {sorted(unknown)}.')
  return model_lib.GPTConfig(**m)


@dataclasses.dataclass
class Setup:
  """Everything built from a config before the first step."""
  config: dict[str, Any]
  mesh: Any
  model: model_lib.GPTConfig
  graphdef: Any
  abstract_state: Any
  abstract_params: Any
  param_specs: Any
  tx: Any
  schedules: dict[str, Callable]
  shardings: step_lib.TrainState
  init: Callable
  train_step: Callable
  eval_step: Callable
  initial_params: Any = None  # None when built abstract
  flops_per_token: float = 0.0     # model FLOPs (orthax.train.flops)
  peak_flops: float | None = None  # all devices' peak FLOP/s, if known


def build(config: Any, vocab_size: int, *, devices=None,
          abstract: bool = False) -> Setup:
  """Mesh, model, optimizer and jitted steps for ``config``.

  Args:
    config: the run's config (``ConfigDict`` or nested mapping, checked by
      :func:`orthax.train.configs.validate`).
    vocab_size: the data's vocabulary, the model's when ``model.vocab_size``
      is ``None`` (a smaller ``model.vocab_size`` is a ``ValueError``).
    devices: the mesh's devices (default ``jax.devices()``; the first
      ``data·fsdp·tensor`` of them).
    abstract: build the model with ``nnx.eval_shape`` (no parameter memory,
      ``initial_params`` ``None``), for dry runs.
  """
  cfg = as_dict(config)
  configs.validate(cfg)
  mesh_cfg = dict(cfg['mesh'])
  rules = mesh_cfg.pop('rules', None)
  comm_dtype = mesh_cfg.pop('comm_dtype', 'bfloat16')
  sizes = dict(zip(partitioning.MESH_AXES,
                   partitioning.mesh_shape(mesh_cfg)))
  mcfg = model_config(cfg, vocab_size)
  partitioning.check_batch(int(cfg['data']['batch_size']), sizes)
  graphdef, abstract_state, params = model_lib.abstract(mcfg)
  specs = partitioning.param_specs(model_lib.logical_axes(params), rules)
  partitioning.check_divisible(params, specs, sizes)
  mesh = partitioning.make_mesh(mesh_cfg, devices)
  if not abstract:
    graphdef, abstract_state, params = model_lib.create(mcfg, cfg['seed'])
  shape = optim.schedule_shape(int(cfg['train']['steps']), **cfg['schedule'])
  dist = (orthax.sharding.Distributed(mesh, param_specs=specs,
                                      comm_dtype=jnp.dtype(comm_dtype))
          if mesh.size > 1 else None)
  tx, schedules = optim.build(cfg['optimizer'], shape, distributed=dist)
  abstract_params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  shardings = step_lib.state_shardings(tx, abstract_params, specs, mesh)
  init, train_step, eval_step = step_lib.make_steps(
      graphdef, abstract_state, tx, shardings, mesh)
  peak = (cfg['train'].get('peak_flops')
          or flops_lib.peak_flops(mesh.devices.flat[0].device_kind))
  return Setup(cfg, mesh, mcfg, graphdef, abstract_state, abstract_params,
               specs, tx, schedules, shardings, init, train_step, eval_step,
               None if abstract else params,
               flops_lib.flops_per_token(
                   mcfg, model_lib.num_params(abstract_params)),
               None if not peak else float(peak) * mesh.size)


def loaders(cfg: dict[str, Any]):
  """``(train, val, vocab_size)`` for the ``data`` section."""
  d = dict(cfg['data'])
  train, val, vocab = data_lib.make_loaders(
      d.get('source', 'embedded'), batch_size=int(d['batch_size']),
      seq_len=int(cfg['model']['seq_len']), seed=int(cfg['seed']),
      val_fraction=float(d.get('val_fraction', 0.1)),
      train_path=d.get('train_path'), val_path=d.get('val_path'),
      eval_batch_size=d.get('eval_batch_size'),
      token_dtype=d.get('token_dtype'), vocab_size=d.get('vocab_size'))
  if cfg['train'].get('eval_every') and not val.num_eval_batches:
    # Said now, not at the first evaluation, and in the config's keys.
    raise ValueError(
        f'the validation split has {val.num_tokens} tokens, fewer than one '
        f'evaluation batch of data.eval_batch_size x model.seq_len = '
        f'{val.batch_size} x {val.seq_len} needs ({val.tokens_per_batch + 1}'
        '): lower data.eval_batch_size, give more validation tokens '
        '(data.val_fraction, data.val_path), or set train.eval_every=0.')
  return train, val, vocab


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


def startup_summary(setup: Setup) -> str:
  """One line: the optimizer, each branch's peak learning rate and weight
  decay, the parameter count and the mesh."""
  peaks = ', '.join(f'{b} {getattr(s, "peak", float("nan")):.4g}'
                    for b, s in setup.schedules.items())
  decays = ', '.join(f'{b} {wd:.4g}' for b, wd in optim.weight_decays(
      setup.config['optimizer'], setup.tx, setup.schedules).items())
  mesh = 'x'.join(f'{n}{a}' for a, n in setup.mesh.shape.items() if n > 1)
  return (f'optimizer {setup.config["optimizer"]["name"]}: peak learning '
          f'rate {peaks}; weight decay {decays}; '
          f'{model_lib.num_params(setup.abstract_params):,} parameters; '
          f'mesh {mesh or "1 device"}')


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
