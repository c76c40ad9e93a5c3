"""Distributed Newton–Schulz on 8 fake CPU devices: compile-time figures.

GPT-2 small's 48 hidden matrices; scenarios ``fsdp8`` (first dim over 8),
``fsdp4x2`` (first dim over fsdp=4, second over tp=2), ``scan`` (4 leaves
``(12, m, n)``, matrix rows over fsdp=8: a2a), ``scan_local`` (same leaves,
layer axis over fsdp=4 of a 4×2 mesh: local) and ``tp8`` (Megatron layout
over tp=8: the long dimension of every matrix sharded, c_fc/qkv by columns,
c_proj/attn proj by rows; strategies ``a2a`` and ``gram``) and
``dp8`` (every matrix replicated on 8 devices: strategies ``replicated`` and
``local``), ``fsdp8_normuon`` (fsdp8 with NorMuon's neuron statistics,
Frobenius restore and shape scale run as matrix stages in the same body; no
optax row) and ``fsdp8_namo`` (fsdp8, NAMO's momentum, Newton–Schulz and
noise-adaptive step jitted whole, the step in the body or after it). Rows:
optax.contrib scale_by_muon left to GSPMD, and orthax's strategies with f32
and bf16 on the wire. Columns are per device, read from the compiled program
: GFLOP (orthax's Newton–Schulz runs in a ``fori_loop``
whose body XLA counts once, so orthax rows compile one step and report
``5×`` that; optax unrolls), collectives and MiB sent (from the 5-step
program, collectives inside the loop counted once per step; bf16 read from
the lowered program, XLA:CPU upcasts), temp MiB, and the plan's prediction.
Then the analytic scaling of the plan to 16/64/256 devices for GPT-2 small
and a 7B-class model.

    python scripts/bench_sharding.py [scenario ...] [--no-optax] [--no-scaling]
                                     [--scaling-only]

No timings: on a CPU host they say nothing about accelerators.
"""

from __future__ import annotations

import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')

import functools  # pylint: disable=g-import-not-at-top

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AbstractMesh
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orthax
from orthax import matrix_stages as MS
from orthax import sharding
from orthax.engine import leaf_state_shape
from orthax.benchmarking import gpt2_hidden_kernels
from orthax.matrices import MatrixSpec
from orthax.polar import orthogonalize_stack
from orthax.sharding import hlo

MiB = 2.0**20
STEPS = 5


def _flat(tree):
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, tuple))[0]
  return {jax.tree_util.keystr(p): s for p, s in flat}


# Scenarios that add matrix stages to another one's layout.
STAGED = {'fsdp8_normuon': ('fsdp8', lambda: [
    MS.NeuronNormalize(0.95), MS.ScaleByShape('keller')])}
# Scenarios that run NAMO's whole matrix branch (momentum, Newton–Schulz and
# the adaptive step) on another one's layout, its step in the body or after.
NAMO = {'fsdp8_namo': 'fsdp8'}


def scenario(name):
  """(mesh, {path: shape}, {path: spec}, {path: MatrixSpec}, strategies)."""
  if name in STAGED:
    return scenario(STAGED[name][0])
  if name in NAMO:
    return scenario(NAMO[name])
  kernels = _flat(gpt2_hidden_kernels())
  if name == 'tp8':
    mesh = jax.make_mesh((8,), ('tp',), axis_types=(AxisType.Auto,))
    long = lambda s: P(None, 'tp') if s[1] >= s[0] else P('tp', None)
    return (mesh, kernels, {k: long(s) for k, s in kernels.items()},
            {k: MatrixSpec() for k in kernels}, ('a2a', 'gram'))
  if name == 'dp8':
    # Pure data parallelism: every parameter replicated on the 8 devices.
    mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
    return (mesh, kernels, {k: P() for k in kernels},
            {k: MatrixSpec() for k in kernels}, ('replicated', 'local'))
  if name in ('fsdp8', 'fsdp4x2'):
    if name == 'fsdp8':
      mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(AxisType.Auto,))
      spec = P('fsdp', None)
    else:
      mesh = jax.make_mesh((4, 2), ('fsdp', 'tp'),
                           axis_types=(AxisType.Auto,) * 2)
      spec = P('fsdp', 'tp')
    return (mesh, kernels, {k: spec for k in kernels},
            {k: MatrixSpec() for k in kernels}, ('auto',))
  shapes = {'attn_qkv': (12, 768, 2304), 'attn_proj': (12, 768, 768),
            'mlp_fc': (12, 768, 3072), 'mlp_proj': (12, 3072, 768)}
  if name == 'scan':
    mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(AxisType.Auto,))
    spec = P(None, 'fsdp', None)
  else:  # scan_local
    mesh = jax.make_mesh((4, 2), ('fsdp', 'tp'),
                         axis_types=(AxisType.Auto,) * 2)
    spec = P('fsdp', None, None)
  return (mesh, shapes, {k: spec for k in shapes},
          {k: MatrixSpec.stacked(0) for k in shapes}, ('auto',))


def _abstract(mesh, shapes, specs):
  sh = {k: NamedSharding(mesh, specs[k]) for k in shapes}
  return {k: jax.ShapeDtypeStruct(shapes[k], jnp.float32, sharding=sh[k])
          for k in shapes}, sh


def optax_row(mesh, shapes, specs, mspecs):
  """optax.contrib.scale_by_muon (momentum + NS), GSPMD partitioned."""
  dn = {k: optax.contrib.MuonDimensionNumbers(
      reduction_axis=ms.resolve(shapes[k])[1],
      output_axis=ms.resolve(shapes[k])[2]) for k, ms in mspecs.items()}
  tx = optax.contrib.scale_by_muon(weight_dimension_numbers=dn)
  params, sh = _abstract(mesh, shapes, specs)
  st = jax.eval_shape(tx.init, params)
  st_sh = jax.tree.map(
      lambda a: NamedSharding(mesh, _match(a, shapes, specs)), st)
  st = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                      sharding=s), st, st_sh)
  f = jax.jit(lambda g, s: tx.update(g, s)[0], out_shardings=sh)
  m = hlo.measure(f, params, st)
  return dict(flops=m['flops'], m=m, bf16=None)


def _match(a, shapes, specs):
  """State leaves that mirror a parameter get its spec; others replicate."""
  for k, s in shapes.items():
    if tuple(s) == tuple(a.shape):
      return specs[k]
  return P()


def _stage_states(stages, params, mspecs):
  """Zero stage states (replicated), per stage, per leaf (flatten order)."""
  out = []
  for st in stages:
    out.append([None if not st.stateful else jax.ShapeDtypeStruct(
        leaf_state_shape(st, x.shape, mspecs[k]), jnp.float32)
                for k, x in sorted(params.items())])
  return out


def orthax_rows(mesh, shapes, specs, mspecs, strategy='auto', stages=()):
  params, sh = _abstract(mesh, shapes, specs)
  states = _stage_states(stages, params, mspecs)
  rows = {}
  for comm in (jnp.float32, jnp.bfloat16):
    dist = sharding.Distributed(mesh, param_specs=specs, comm_dtype=comm,
                                strategy=strategy)
    plan = sharding.plan(dist, params, mspecs, steps=STEPS, stages=stages)

    def jitted(steps, dist=dist):
      ns = functools.partial(orthogonalize_stack, preset='jordan',
                             steps=steps, method='standard')
      if not stages:
        return jax.jit(lambda u, s: sharding.orthogonalize_tree(
            u, dist, ns, mspecs), out_shardings=sh)
      # The new stage states are returned too (else their all-gather is
      # dead code); they come back replicated.
      return jax.jit(lambda u, s: sharding.orthogonalize_tree(
          u, dist, ns, mspecs, stages=stages, stage_states=s)[:2],
                     out_shardings=(sh, jax.tree.map(
                         lambda _: NamedSharding(mesh, P()), states)))

    f, f5 = jitted(1), jitted(STEPS)
    if comm == jnp.float32:
      m = hlo.measure(f, params, states)
      text = f5.lower(params, states).compile().as_text()
      ops = hlo.per_step(hlo.collectives(text), text)
      m['summary'] = hlo.summarize(ops)
      m['wire_bytes'] = sum(o['wire_bytes'] for o in ops)
      strategies = sorted({g.strategy for g in plan.groups})
      rows['f32'] = dict(flops=STEPS * m['flops'], m=m, plan=plan,
                         label='orthax ' + '+'.join(strategies) + ' (f32)')
    else:
      # The lowered program shows a loop body once; only gram has
      # collectives in the loop, and it sends float32 whatever comm_dtype.
      low = hlo.lowered_collectives(f.lower(params, states).as_text(),
                                    mesh.devices.size)
      wire = sum(o['wire_bytes'] for o in low if o['op'] != 'all-reduce')
      if any(g.strategy == 'gram' for g in plan.groups):
        wire += rows['f32']['m']['wire_bytes']
      rows['bf16'] = dict(wire=wire, plan=plan, count=len(low))
  return rows


def namo_rows(mesh, shapes, specs, mspecs):
  """NAMO's matrix branch, jitted whole (update, state and params sharded
  as the trainer shards them): its step as a scaling stage in the
  Newton–Schulz body (``noise_adapt`` wrapping ``orthogonalize``: the norms
  of the gradient's and the momentum's pieces are summed in one small
  float32 all-reduce per group, and every device computes the step) and
  after it (wrapping a chain: GSPMD sums the norms over the
  parameter-sharded arrays)."""
  params, sh = _abstract(mesh, shapes, specs)
  rows = {}
  for label, in_body in (('step in the body', True),
                         ('step after the body (GSPMD norms)', False)):
    row = {}
    for comm in (jnp.float32, jnp.bfloat16):
      dist = sharding.Distributed(mesh, param_specs=specs, comm_dtype=comm)

      def jitted(steps, dist=dist, in_body=in_body):
        orth = orthax.orthogonalize('jordan', steps=steps, method='standard',
                                    matrix_specs=mspecs, distributed=dist)
        tx = orthax.noise_adapt(
            orthax.momentum(0.95, form='ema', nesterov=True),
            orth if in_body else optax.named_chain(('orthogonalize', orth)),
            learning_rate=0.01, matrix_specs=mspecs)
        st = jax.eval_shape(tx.init, params)
        st_sh = jax.tree.map(
            lambda a: NamedSharding(mesh, _match(a, shapes, specs)), st)
        st = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=s), st, st_sh)
        return tx, st, jax.jit(tx.update, out_shardings=(sh, st_sh))

      tx, st, f = jitted(1)
      plan = sharding.plan(jitted(STEPS)[0], params)
      if comm == jnp.float32:
        m = hlo.measure(f, params, st, params)
        _, _, f5 = jitted(STEPS)
        text = f5.lower(params, st, params).compile().as_text()
        ops = hlo.per_step(hlo.collectives(text), text)
        m['summary'] = hlo.summarize(ops)
        m['wire_bytes'] = sum(o['wire_bytes'] for o in ops)
        row['f32'] = dict(flops=STEPS * m['flops'], m=m, plan=plan,
                          label=f'orthax a2a, NAMO {label} (f32)')
      else:
        # GSPMD's all-reduces are not in the lowered program; they carry
        # float32 norms whatever comm_dtype (compiled figures).
        low = hlo.lowered_collectives(f.lower(params, st, params).as_text(),
                                      mesh.devices.size)
        wire = sum(o['wire_bytes'] for o in low if o['op'] != 'all-reduce')
        wire += row['f32']['m']['summary'].get(
            'all-reduce', {}).get('wire_bytes', 0.0)
        row['bf16'] = dict(wire=wire, plan=plan)
    rows[label] = row
  return rows


def fmt_coll(summary):
  return ', '.join(f"{k}×{v['count']}" for k, v in sorted(summary.items())) \
      or 'none'


def run(names, with_optax=True):
  print('| scenario | strategy | GFLOP/device | plan GFLOP | collectives | '
        'MiB sent/device (f32) | MiB sent (bf16) | plan MiB f32/bf16 | '
        'temp MiB |')
  print('|---|---|---|---|---|---|---|---|---|')
  for name in names:
    mesh, shapes, specs, mspecs, strategies = scenario(name)
    stages = STAGED[name][1]() if name in STAGED else ()
    if name in NAMO:
      for row in namo_rows(mesh, shapes, specs, mspecs).values():
        _print_row(name, row)
      continue
    if with_optax and not stages:
      r = optax_row(mesh, shapes, specs, mspecs)
      m = r['m']
      print(f"| {name} | optax.contrib scale_by_muon (GSPMD) | "
            f"{r['flops'] / 1e9:.1f} | - | {fmt_coll(m['summary'])} "
            f"({sum(v['count'] for v in m['summary'].values())}) | "
            f"{m['wire_bytes'] / MiB:.1f} | - | - | "
            f"{(m['temp_bytes'] or 0) / MiB:.0f} |", flush=True)
    for strategy in strategies:
      rows = orthax_rows(mesh, shapes, specs, mspecs, strategy, stages)
      if stages:
        rows['f32']['label'] += ' + ' + '+'.join(st.name for st in stages)
      _print_row(name, rows)


def _print_row(name, rows):
  r, b = rows['f32'], rows['bf16']
  m = r['m']
  print(f"| {name} | {r['label']} | {r['flops'] / 1e9:.1f} | "
        f"{r['plan'].flops_per_device / 1e9:.1f} | "
        f"{fmt_coll(m['summary'])} | {m['wire_bytes'] / MiB:.1f} | "
        f"{b['wire'] / MiB:.1f} | "
        f"{r['plan'].bytes_per_device / MiB:.1f}/"
        f"{b['plan'].bytes_per_device / MiB:.1f} | "
        f"{(m['temp_bytes'] or 0) / MiB:.0f} |", flush=True)


MODELS = {
    'gpt2-small': {
        f'h{i}/{k}': s for i in range(12)
        for k, s in (('qkv', (768, 2304)), ('proj', (768, 768)),
                     ('fc', (768, 3072)), ('out', (3072, 768)))},
    '7B-class (32L, d=4096, ffn=11008)': {
        f'h{i}/{k}': s for i in range(32)
        for k, s in (('q', (4096, 4096)), ('k', (4096, 4096)),
                     ('v', (4096, 4096)), ('o', (4096, 4096)),
                     ('gate', (4096, 11008)), ('up', (4096, 11008)),
                     ('down', (11008, 4096)))},
}


def scaling():
  """The plan at 8–256 devices, and what merging every group into one by
  zero-padding each matrix to the largest shape would give (not
  implemented; exact for Newton–Schulz, see docs/distributed.md)."""
  print('\nAnalytic scaling (plan only; FSDP on the first dim, a2a, 5 steps):')
  print('| model | devices | groups | padded/real matrices | GFLOP/device |'
        ' ideal GFLOP/device | MiB sent/device bf16 (f32) | collectives |'
        ' one merged group: GFLOP/device, MiB bf16, collectives |')
  print('|---|---|---|---|---|---|---|---|---|')
  for model, shapes in MODELS.items():
    for d in (8, 16, 64, 256):
      mesh = AbstractMesh((d,), ('fsdp',))
      leaves = [sharding.LeafInfo(k, s, jnp.float32, MatrixSpec(),
                                  P('fsdp', None)) for k, s in shapes.items()]
      p16 = sharding.plan_orthogonalize(leaves, mesh)
      p32 = sharding.plan_orthogonalize(leaves, mesh, comm_dtype=jnp.float32)
      ideal = sum(g.matrix_flops * g.count for g in p16.groups) / d
      pad = sum(g.padded for g in p16.groups)
      real = sum(g.count for g in p16.groups)
      big = max(shapes.values(), key=lambda s: s[0] * s[1])
      merged = sharding.plan_orthogonalize(
          [sharding.LeafInfo(k, (min(big), max(big)), jnp.float32,
                             MatrixSpec(), P('fsdp', None)) for k in shapes],
          mesh)
      print(f'| {model} | {d} | {len(p16.groups)} | {pad}/{real} | '
            f'{p16.flops_per_device / 1e9:.1f} | {ideal / 1e9:.1f} | '
            f'{p16.bytes_per_device / MiB:.1f} '
            f'({p32.bytes_per_device / MiB:.1f}) | {p16.collectives} | '
            f'{merged.flops_per_device / 1e9:.1f}, '
            f'{merged.bytes_per_device / MiB:.1f}, {merged.collectives} |')


SCENARIOS = ('fsdp8', 'fsdp8_normuon', 'fsdp8_namo', 'fsdp4x2', 'scan',
             'scan_local', 'tp8', 'dp8')
OPTIONS = ('--no-optax', '--no-scaling', '--scaling-only')


def main(argv):
  """Runs the named scenarios (default: all), then the scaling tables; an
  unknown scenario or option is an error (a typo ran ``scan_local``)."""
  names = [a for a in argv if not a.startswith('--')]
  bad = ([a for a in argv if a.startswith('--') and a not in OPTIONS]
         + [a for a in names if a not in SCENARIOS])
  if bad:
    sys.exit(f'bench_sharding.py: unknown {bad}; scenarios {SCENARIOS}, '
             f'options {OPTIONS}.')
  if '--scaling-only' not in argv:
    run(names or list(SCENARIOS), with_optax='--no-optax' not in argv)
  if '--no-scaling' not in argv:
    scaling()


if __name__ == '__main__':
  main(sys.argv[1:])
