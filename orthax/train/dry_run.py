"""Dry run: lower and compile the full train step of a config on its mesh
without allocating the model, and report per-device costs.

On a CPU host the mesh is made of fake devices: the caller sets
``XLA_FLAGS=--xla_force_host_platform_device_count=<mesh size>`` before JAX
starts (``scripts/train.py --dry_run`` does). Reported per device:
parameter and optimizer-state bytes (from the shardings), the compiled
program's argument/output/temp bytes, FLOPs (XLA's count, which sees a
``scan``/``fori_loop`` body once, next to the analytic count) and the
collectives with their wire bytes, scaled by loop trip counts; with a
distributed recipe, also the optimizer's printed :func:`orthax.sharding.plan`.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from orthax import sharding
from orthax.sharding import hlo
from orthax.train import configs
from orthax.train import data as data_lib
from orthax.train import partitioning
from orthax.train import setup as setup_lib

MiB = 2.0**20


def _shard_bytes(abstract: Any, shardings: Any) -> float:
  total = 0.0
  for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(
      shardings, is_leaf=lambda v: isinstance(v, NamedSharding))):
    total += math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
  return total


def model_flops_per_token(m) -> float:
  """Forward+backward FLOPs per token: ``6N`` over the matmul weights plus
  causal attention ``6·L·T·d`` (scores and values, halved by causality,
  ×3 for the backward)."""
  d, f, L, T, V = m.d_model, m.d_ff, m.num_layers, m.seq_len, m.vocab_size
  n_matmul = L * (4 * d * d + 2 * d * f) + d * V
  return 6.0 * n_matmul + 6.0 * L * T * d


def _orthogonalization_plan(setup) -> str | None:
  """The printed sharding plan of the optimizer, or ``None`` when it has no
  distributed orthogonalization (AdamW, a single device)."""
  try:
    return str(sharding.plan(setup.tx, setup.abstract_params))
  except sharding.NotDistributedError:
    return None


def dry_run(config: Any) -> dict[str, Any]:
  """Compiles the train step of ``config`` on ``jax.devices()`` (which must
  hold at least the mesh's devices) and returns the report."""
  cfg = copy.deepcopy(setup_lib.as_dict(config))
  configs.validate(cfg)  # dry_run.num_layers too, before it is used
  depth = (cfg.get('dry_run') or {}).get('num_layers')
  if depth is not None:
    cfg['model']['num_layers'] = int(depth)
  vocab = cfg['model'].get('vocab_size') or cfg['data'].get('vocab_size')
  if vocab is None:
    if cfg['data'].get('source', 'embedded') != 'embedded':
      raise ValueError('dry run of a token-file config needs '
                       'model.vocab_size or data.vocab_size.')
    vocab = data_lib.VOCAB_BYTES
  t0 = time.perf_counter()
  setup = setup_lib.build(cfg, int(vocab), abstract=True)
  state = jax.eval_shape(setup.init, setup.abstract_params)
  state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      state, setup.shardings)
  b, t = int(cfg['data']['batch_size']), setup.model.seq_len
  tok = jax.ShapeDtypeStruct((b, t), jnp.int32,
                             sharding=partitioning.batch_sharding(setup.mesh))
  lowered = setup.train_step.lower(state, {'inputs': tok, 'targets': tok})
  compiled = lowered.compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  text = compiled.as_text()
  ops = hlo.per_step(hlo.collectives(text), text)
  n = setup.mesh.size
  return {
      'hardware': cfg.get('hardware', ''),
      'mesh': dict(setup.mesh.shape),
      'devices': n,
      'num_layers': setup.model.num_layers,
      'params': sum(math.prod(x.shape) for x in
                    jax.tree.leaves(setup.abstract_params)),
      'param_bytes': _shard_bytes(setup.abstract_params,
                                  setup.shardings.params),
      'opt_state_bytes': _shard_bytes(state.opt_state,
                                      setup.shardings.opt_state),
      'argument_bytes': getattr(mem, 'argument_size_in_bytes', None),
      'output_bytes': getattr(mem, 'output_size_in_bytes', None),
      'temp_bytes': getattr(mem, 'temp_size_in_bytes', None),
      'xla_flops': float(cost.get('flops', float('nan'))),
      'model_flops': model_flops_per_token(setup.model) * b * t / n,
      'collectives': hlo.summarize(ops),
      'collective_bytes': sum(o['wire_bytes'] for o in ops),
      'compile_seconds': seconds,
      'plan': _orthogonalization_plan(setup),
  }


def format_report(r: dict[str, Any]) -> str:
  """The report as aligned text lines."""
  lines = [
      f"dry run: {r['hardware']}  mesh {r['mesh']}  ({r['devices']} devices)"
      f"  layers {r['num_layers']}  params {r['params'] / 1e6:.1f}M",
      'per device:',
      f"  parameters       {r['param_bytes'] / MiB:10.1f} MiB",
      f"  optimizer state  {r['opt_state_bytes'] / MiB:10.1f} MiB",
      f"  arguments        {(r['argument_bytes'] or 0) / MiB:10.1f} MiB",
      f"  temp             {(r['temp_bytes'] or 0) / MiB:10.1f} MiB",
      f"  model FLOPs      {r['model_flops'] / 1e9:10.1f} GFLOP/step "
      f"(XLA count {r['xla_flops'] / 1e9:.1f}: loop bodies once)",
      f"  collectives      {r['collective_bytes'] / MiB:10.1f} MiB/step",
  ]
  for kind, v in sorted(r['collectives'].items()):
    lines.append(f"    {kind:<20} {int(v['count']):6d} ops "
                 f"{v['wire_bytes'] / MiB:10.1f} MiB")
  lines.append(f"  compiled in {r['compile_seconds']:.1f} s")
  if r.get('plan'):
    lines.append('Newton–Schulz (predicted, orthax.sharding.plan):')
    lines += ['  ' + line for line in r['plan'].splitlines()]
  return '\n'.join(lines)
