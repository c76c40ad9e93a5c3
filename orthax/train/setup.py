"""Building a run from its config: the config checked, the mesh, the
model, the optimizer and the jitted steps (:func:`build`, a
:class:`Setup`), the data (:func:`loaders`) and the start-up line
(:func:`startup_summary`); :mod:`~orthax.train.trainer` runs the loop."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

import orthax
from orthax.train import configs
from orthax.train import data as data_lib
from orthax.train import flops as flops_lib
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
