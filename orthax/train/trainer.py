"""The training loop, readable end to end: data → model → optimizer → steps
→ (restore) → loop with logging, evaluation and checkpoints.

A config is a nested mapping (an ``ml_collections.ConfigDict`` from
``configs/*.py`` or a plain dict) with the sections ``model``, ``data``,
``optimizer``, ``schedule``, ``mesh`` and ``train`` and a ``seed``; see
``configs/lm_cpu.py`` for every key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import orthax
from orthax.train import checkpoint as ckpt_lib
from orthax.train import data as data_lib
from orthax.train import metrics as metrics_lib
from orthax.train import model as model_lib
from orthax.train import optim
from orthax.train import partitioning
from orthax.train import step as step_lib


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


def build(config: Any, vocab_size: int, *, devices=None,
          abstract: bool = False) -> Setup:
  """Mesh, model, optimizer and jitted steps for ``config``.

  ``abstract=True`` builds the model with ``nnx.eval_shape`` (no parameter
  memory), for dry runs.
  """
  cfg = as_dict(config)
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
  return Setup(cfg, mesh, mcfg, graphdef, abstract_state, abstract_params,
               specs, tx, schedules, shardings, init, train_step, eval_step,
               None if abstract else params)


def loaders(cfg: dict[str, Any]):
  """``(train, val, vocab_size)`` for the ``data`` section."""
  d = dict(cfg['data'])
  return data_lib.make_loaders(
      d.get('source', 'embedded'), batch_size=int(d['batch_size']),
      seq_len=int(cfg['model']['seq_len']), seed=int(cfg['seed']),
      val_fraction=float(d.get('val_fraction', 0.1)),
      train_path=d.get('train_path'), val_path=d.get('val_path'),
      eval_batch_size=d.get('eval_batch_size'),
      token_dtype=d.get('token_dtype'), vocab_size=d.get('vocab_size'))


def evaluate(setup: Setup, params: Any, val: data_lib.TokenLoader,
             max_batches: int | None) -> float:
  """Mean validation loss over the first ``max_batches`` eval batches."""
  sh = partitioning.batch_sharding(setup.mesh)
  losses = [setup.eval_step(params, jax.device_put(b, sh))
            for b in val.eval_batches(max_batches)]
  return float(np.mean(jax.device_get(losses)))


def train(config: Any, workdir: str | None = None, *, progress: bool = True,
          stop_at: int | None = None, label: str = '') -> dict[str, Any]:
  """Trains per ``config``; returns ``{'train': [...], 'eval': [...],
  'summary': {...}}`` (the records also go to ``<workdir>/metrics.jsonl``).

  With ``workdir`` and ``train.checkpoint_every``, checkpoints go to
  ``<workdir>/checkpoints`` and a rerun resumes from the latest one.
  ``stop_at`` ends the run early after that step (as an interruption
  would; used to test resumption).
  """
  cfg = as_dict(config)
  tr = cfg['train']
  total = int(tr['steps'])
  train_data, val_data, vocab = loaders(cfg)
  setup = build(cfg, vocab)

  ckpt = None
  if workdir is not None and tr.get('checkpoint_every'):
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                 int(tr['checkpoint_every']),
                                 int(tr.get('max_to_keep', 2)))
  if ckpt is not None and ckpt.latest_step() is not None:
    abstract = jax.eval_shape(setup.init, setup.abstract_params)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, setup.shardings)
    state = ckpt.restore(abstract)
  else:
    state = setup.init(setup.initial_params)
  start = int(state.step)

  writer = metrics_lib.MetricWriter(workdir, resume_step=start,
                                    tensorboard=bool(tr.get('tensorboard')))
  bar = metrics_lib.Progress(total, enabled=progress, label=label)
  batch_sh = partitioning.batch_sharding(setup.mesh)
  log_every = int(tr.get('log_every', 10))
  eval_every = int(tr.get('eval_every', 0) or 0)
  eval_batches = tr.get('eval_batches')
  end = total if stop_at is None else min(total, int(stop_at))
  # Throughput clock: from the end of the first (compiling) step, minus the
  # time spent evaluating.
  timed_tokens, t_start, t_eval = 0, None, 0.0

  for step in range(start, end):
    batch = jax.device_put(train_data.batch(step), batch_sh)
    state, m = setup.train_step(state, batch)
    done = step + 1
    if t_start is None:  # first step compiles: time from the second on
      jax.block_until_ready(m)
      t_start = time.perf_counter()
    else:
      timed_tokens += train_data.tokens_per_batch
    is_log = done % log_every == 0 or done == end
    is_eval = eval_every and (done % eval_every == 0 or done == total)
    if is_log or is_eval:
      m = jax.device_get(m)
      elapsed = time.perf_counter() - t_start - t_eval
      rec = {'step': done, **{k: float(v) for k, v in m.items()},
             **{f'lr/{b}': float(s(step)) for b, s in
                setup.schedules.items()},
             'tokens': done * train_data.tokens_per_batch,
             'tokens_per_s': timed_tokens / elapsed if elapsed > 0 else
                             float('nan')}
      if is_eval:
        t0 = time.perf_counter()
        rec['val_loss'] = evaluate(setup, state.params, val_data,
                                   eval_batches)
        t_eval += time.perf_counter() - t0
      if not math.isfinite(rec['loss']):
        writer.write(rec)
        raise FloatingPointError(f'loss is {rec["loss"]} at step {done}.')
      writer.write(rec)
      bar.update(done, {'loss': rec['loss'],
                        **({'val': rec['val_loss']} if is_eval else {}),
                        'tok/s': rec['tokens_per_s']}, force=True)
    else:
      bar.update(done, {})
    if ckpt is not None:
      ckpt.save(done, state, force=(done == end))
  bar.close()
  writer.close()
  if ckpt is not None:
    ckpt.close()
  recs = writer.records
  evals = [r for r in recs if 'val_loss' in r]
  summary = {
      'steps': int(state.step),
      'final_loss': recs[-1]['loss'] if recs else float('nan'),
      'final_val_loss': evals[-1]['val_loss'] if evals else float('nan'),
      'tokens_per_s': recs[-1]['tokens_per_s'] if recs else float('nan'),
      'params': model_lib.num_params(setup.abstract_params),
      'opt_state_bytes': sum(x.size * x.dtype.itemsize
                             for x in jax.tree.leaves(state.opt_state)),
  }
  return {'train': recs, 'eval': evals, 'summary': summary, 'state': state}
