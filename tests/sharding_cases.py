"""Multi-device cases for tests/test_sharding.py (8 fake CPU devices).

Run as a script: ``python tests/sharding_cases.py [case ...]``; XLA_FLAGS
must already hold ``--xla_force_host_platform_device_count=8`` (the test sets
it in the subprocess environment; so does ``__main__`` below if it is
missing). Prints one JSON object ``{case: result}`` on the last line.

Per case: the plan's groups, the numerics of the distributed result against
single-device ``orthogonalize_stack`` per leaf (f32 and bf16 on the wire),
the collectives of the compiled program, per-device FLOPs (Newton–Schulz
with one step, so the ``while`` body counted once is exact) and wire bytes
against the plan (f32 from the compiled program, bf16 from the lowered one).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

if __name__ == '__main__':
  flag = '--xla_force_host_platform_device_count=8'
  if flag not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flag)

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fake_devices
from orthax import matrices
from orthax import sharding
from orthax.matrices import MatrixSpec
from orthax.polar import orthogonalize_stack
from orthax.sharding import hlo

K = MatrixSpec()
S0 = MatrixSpec.stacked(0)

# name -> (mesh shape, axis names, axis type, {leaf: (shape, spec, mspec)})
FSDP8_A2A = {
    'a1': ((64, 128), P('fsdp', None), K),
    'a2': ((64, 128), P('fsdp', None), K),
    'a3': ((64, 128), P('fsdp', None), K),
    'tall': ((128, 64), P('fsdp', None), K),
    'sq': ((64, 64), P(None, 'fsdp'), K),
    'scan': ((3, 64, 128), P(None, 'fsdp', None), S0),
}
FSDP8_LOCAL = {
    'scan_l': ((8, 64, 128), P('fsdp', None, None), S0),
    'scan_l2': ((16, 64, 64), P('fsdp', None, None), S0),
}
FSDP8_REPL = {  # auto splits replicated groups of >= 8 matrices
    'r1': ((8, 64, 128), P(), S0),
    'r2': ((64, 128), P(), K),
    'r3': ((8, 64, 64), P(), S0),
}
TP_A2A = {
    'a1': ((64, 128), P('fsdp', 'tp'), K),
    'a2': ((64, 128), P('fsdp', 'tp'), K),
    'tall': ((128, 64), P('fsdp', 'tp'), K),
    'scan': ((3, 64, 128), P(None, 'fsdp', 'tp'), S0),
    'mixed': ((2, 64, 128), P('tp', 'fsdp', None), S0),
}
TP_LOCAL = {
    'scan_l': ((4, 64, 128), P('fsdp', None, None), S0),
    'scan_l2': ((8, 64, 64), P(('fsdp', 'tp'), None, None), S0),
}

GRAM = {  # tensor-parallel NS: long dimension sharded, short one whole
    'w': ((64, 256), P(None, ('fsdp', 'tp')), K),
    'tall': ((256, 64), P('tp', None), K),
    'scan': ((4, 64, 256), P('fsdp', None, 'tp'), S0),
    'sq': ((64, 64), P('fsdp', None), K),  # runs as its transpose
}
# AOL scales rows, so a square matrix must not run as its transpose: its
# columns are the sharded ones here.
GRAM_AOL = {**GRAM, 'sq': ((64, 64), P(None, 'fsdp'), K)}
GRAM_AUTO = {  # 64×256 f32 = 64 KiB > 32 KiB: gram; 64×64: a2a
    'w': ((64, 256), P(None, ('fsdp', 'tp')), K),
    'sq': ((64, 64), P('fsdp', None), K),
}

CASES = {
    'fsdp8_a2a': ((8,), ('fsdp',), 'auto', FSDP8_A2A),
    'fsdp8_local': ((8,), ('fsdp',), 'auto', FSDP8_LOCAL),
    'fsdp8_replicated': ((8,), ('fsdp',), 'auto', FSDP8_REPL),
    'fsdp4tp2_a2a': ((4, 2), ('fsdp', 'tp'), 'auto', TP_A2A),
    'fsdp4tp2_local': ((4, 2), ('fsdp', 'tp'), 'auto', TP_LOCAL),
    'explicit_fsdp8': ((8,), ('fsdp',), 'explicit',
                       {**FSDP8_A2A, **FSDP8_LOCAL}),
    'explicit_fsdp4tp2': ((4, 2), ('fsdp', 'tp'), 'explicit', TP_A2A),
    'fsdp4tp2_gram': ((4, 2), ('fsdp', 'tp'), 'auto', GRAM,
                      dict(strategy='gram')),
    # Newton–Schulz without a normalizer (inputs of unit Frobenius norm, so
    # that it converges): no norm to all-reduce.
    'fsdp4tp2_gram_no_norm': ((4, 2), ('fsdp', 'tp'), 'auto', GRAM,
                              dict(strategy='gram', normalizer='none')),
    # The normalizers that form the Gram matrix themselves (its element-wise
    # work was not in the plan's FLOPs, 6–7% of them here).
    'fsdp4tp2_gram_aol': ((4, 2), ('fsdp', 'tp'), 'auto', GRAM_AOL,
                          dict(strategy='gram', normalizer='aol')),
    'fsdp4tp2_gram_schatten4': ((4, 2), ('fsdp', 'tp'), 'auto', GRAM,
                                dict(strategy='gram', normalizer='schatten4')),
    'explicit_fsdp4tp2_gram_auto': ((4, 2), ('fsdp', 'tp'), 'explicit',
                                    GRAM_AUTO,
                                    dict(max_local_matrix_bytes=32 * 1024)),
}


def _ns(steps=None, normalizer='frobenius'):
  return functools.partial(orthogonalize_stack, preset='jordan', steps=steps,
                           method='standard', normalizer=normalizer)


def _reference(x, ms, ns):
  x = jax.device_put(np.asarray(x), jax.devices()[0])
  return np.asarray(matrices.from_matrices(ns(matrices.to_matrices(x, ms)),
                                           ms, x.shape))


def run_case(name: str) -> dict:
  mesh_shape, axes, kind, leaves, *dist_kw = CASES[name]
  dist_kw = dict(dist_kw[0]) if dist_kw else {}
  normalizer = dist_kw.pop('normalizer', 'frobenius')
  explicit = kind == 'explicit'
  at = AxisType.Explicit if explicit else AxisType.Auto
  mesh = jax.make_mesh(mesh_shape, axes, axis_types=(at,) * len(axes))
  names = list(leaves)
  specs = {k: leaves[k][1] for k in names}
  mspecs = {k: leaves[k][2] for k in names}
  keys = jax.random.split(jax.random.key(0), len(names))
  host = {k: np.asarray(jax.random.normal(kk, leaves[k][0], jnp.float32))
          for k, kk in zip(names, keys)}
  if normalizer == 'none':
    host = {k: (x / np.linalg.norm(x, axis=(-2, -1), keepdims=True)
                ).astype(np.float32) for k, x in host.items()}
  shard = {k: NamedSharding(mesh, specs[k]) for k in names}
  arrays = {k: jax.device_put(host[k], shard[k]) for k in names}
  abstract = {k: jax.ShapeDtypeStruct(leaves[k][0], jnp.float32,
                                      sharding=shard[k]) for k in names}

  def make(comm, steps):
    dist = sharding.Distributed(mesh, param_specs=None if explicit else specs,
                                comm_dtype=comm, **dist_kw)
    ns = _ns(steps, normalizer)
    f = lambda u: sharding.orthogonalize_tree(
        u, dist, ns, matrix_specs=mspecs, plan_kw=dict(normalizer=normalizer))
    return dist, jax.jit(f, out_shardings=shard)

  out: dict = {}
  # Plans (f32 and bf16 wire, 1 NS step for the FLOPs contract).
  dist32, f32 = make(jnp.float32, None)
  plan32 = sharding.plan(dist32, abstract, mspecs, steps=1,
                         normalizer=normalizer)
  plan16 = sharding.plan(make(jnp.bfloat16, None)[0], abstract, mspecs,
                         steps=1, normalizer=normalizer)
  out['plan'] = str(plan32)
  out['groups'] = [dict(strategy=g.strategy, paths=list(g.paths),
                        count=g.count, local=g.local_count, padded=g.padded,
                        shards=g.shards) for g in plan32.groups]
  # Numerics, 5 steps.
  ns5 = _ns(normalizer=normalizer)
  refs = {k: _reference(host[k], mspecs[k], ns5) for k in names}
  y32 = f32(arrays)
  out['f32_max_abs_err'] = max(
      float(np.max(np.abs(np.asarray(y32[k]) - refs[k]))) for k in names)
  out['out_specs_ok'] = all(
      y32[k].sharding.is_equivalent_to(shard[k], len(leaves[k][0]))
      for k in names)
  if plan16.collectives:  # bf16 only changes anything on the wire
    _, f16 = make(jnp.bfloat16, None)
    y16 = f16(arrays)
    out['bf16_max_rel_err'] = max(
        float(np.linalg.norm(np.asarray(y16[k]) - refs[k])
              / np.linalg.norm(refs[k])) for k in names)
    # What the wire alone costs: the input and the output rounded to
    # bfloat16, Newton–Schulz in float32 between (it ran in bfloat16, 4×
    # the error).
    bf16 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16)
                                .astype(jnp.float32))
    wire = {k: bf16(_reference(bf16(host[k]), mspecs[k], ns5))
            for k in names}
    out['bf16_vs_wire_model_rel_err'] = max(
        float(np.linalg.norm(np.asarray(y16[k]) - wire[k])
              / np.linalg.norm(wire[k])) for k in names)
  # HLO contract, 1 step.
  _, g32 = make(jnp.float32, 1)
  m = hlo.measure(g32, abstract)
  out['collectives'] = {k: v['count'] for k, v in m['summary'].items()}
  out['collectives_outside_entry'] = sum(
      1 for o in m['collectives']
      if not str(o['computation']).startswith('ENTRY'))
  out['flops'] = m['flops']
  out['plan_flops'] = plan32.flops_per_device
  out['wire_bytes_f32'] = m['wire_bytes']
  out['plan_bytes_f32'] = plan32.bytes_per_device
  out['plan_collectives'] = plan32.collectives
  _, g16 = make(jnp.bfloat16, 1)
  low = hlo.lowered_collectives(g16.lower(abstract).as_text(),
                                mesh.devices.size)
  out['lowered_bf16'] = {k: v['count'] for k, v in hlo.summarize(low).items()}
  out['wire_bytes_bf16'] = sum(o['wire_bytes'] for o in low)
  out['plan_bytes_bf16'] = plan16.bytes_per_device
  return out


def optax_explicit_baseline() -> dict:
  """optax.contrib.muon on an Explicit mesh: does it compile?"""
  import optax  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(AxisType.Explicit,))
  sh = NamedSharding(mesh, P('fsdp', None))
  p = {'w': jax.device_put(np.ones((64, 128), np.float32), sh)}
  tx = optax.contrib.muon(1e-3)
  try:
    with jax.set_mesh(mesh):
      st = tx.init(p)
      jax.jit(tx.update)(p, st, p)
    return dict(ok=True, baseline_error=None)
  except Exception as e:  # pylint: disable=broad-except
    return dict(ok=False, baseline_error=f'{type(e).__name__}: {str(e)[:200]}')


def main(argv):
  names = argv or list(CASES) + ['optax_explicit']
  res = {}
  for n in names:
    t0 = time.perf_counter()
    res[n] = fake_devices.guarded(
        optax_explicit_baseline if n == 'optax_explicit'
        else lambda n=n: run_case(n))
    print(f'{n}: {time.perf_counter() - t0:.1f}s', file=sys.stderr)
  print(json.dumps(res))


if __name__ == '__main__':
  main(sys.argv[1:])
