"""Matrix stages inside the shard_map body, on 8 fake CPU devices.

Run as a script (``tests/test_sharding_stages.py`` does, in a subprocess with
``--xla_force_host_platform_device_count=8``). Per case: two steps of
``orthax.orthogonalize(then=stages, distributed=...)`` — or, for the NAMO
cases, of ``orthax.noise_adapt`` wrapping it (NAMO's step runs in the same
body, its norms summed from each device's pieces) — against the same
transform on one device (updates and stage states), with f32 on the wire
(and bf16 for the cases in ``BF16_STEPS``); the collectives and wire bytes of the compiled step against the plan.
Prints one JSON object on the last line.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

if __name__ == '__main__':
  flag = '--xla_force_host_platform_device_count=8'
  if flag not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' ' + flag

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import NamedSharding

import fake_devices
import orthax
from orthax import matrix_stages as MS
from orthax import sharding
from orthax.sharding import hlo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sharding_cases import FSDP8_A2A  # pylint: disable=g-import-not-at-top
from sharding_cases import FSDP8_LOCAL
from sharding_cases import FSDP8_REPL
from sharding_cases import GRAM
from sharding_cases import TP_A2A

STAGES = {
    'normuon': lambda: [MS.NeuronNormalize(0.9), MS.ScaleByShape('keller')],
    'normuon_longer': lambda: [
        MS.NeuronNormalize(0.9, axis='longer', eps_placement='clamp'),
        MS.ScaleByShape('moonlight')],
    'normuon_paper': lambda: [MS.NeuronNormalize(0.9, restore_norm=False),
                              MS.ScaleToRms(0.2)],
}

# NAMO: noise_adapt(momentum, orthogonalize(then=...)) with this mode.
NAMO = {
    'namo': ('scalar', lambda: []),
    'namo_d': ('diagonal', lambda: []),
    'namo_d_normuon': ('diagonal', lambda: [MS.NeuronNormalize(0.9)]),
}

# name -> (mesh shape, axis names, axis type, leaves, stages, Distributed kw)
CASES = {
    'fsdp8': ((8,), ('fsdp',), 'auto',
              {**FSDP8_A2A, **FSDP8_LOCAL, **FSDP8_REPL}, 'normuon', {}),
    'fsdp8_longer': ((8,), ('fsdp',), 'auto', FSDP8_A2A, 'normuon_longer',
                     {}),
    'fsdp4tp2': ((4, 2), ('fsdp', 'tp'), 'auto', TP_A2A, 'normuon', {}),
    'fsdp4tp2_paper': ((4, 2), ('fsdp', 'tp'), 'auto', TP_A2A,
                       'normuon_paper', {}),
    'explicit_fsdp8': ((8,), ('fsdp',), 'explicit', FSDP8_A2A, 'normuon',
                       {}),
    # Stacks sharded on their layer axis (local groups): the stages' state
    # stays sharded like the layers, from init on; it was made replicated
    # and gathered back at every step.
    'explicit_fsdp8_local': ((8,), ('fsdp',), 'explicit',
                             {**FSDP8_A2A, **FSDP8_LOCAL}, 'normuon', {}),
    'fsdp4tp2_gram': ((4, 2), ('fsdp', 'tp'), 'auto', GRAM, 'normuon',
                      dict(strategy='gram')),
    'fsdp4tp2_gram_longer': ((4, 2), ('fsdp', 'tp'), 'auto', GRAM,
                             'normuon_longer', dict(strategy='gram')),
    'fsdp8_namo': ((8,), ('fsdp',), 'auto',
                   {**FSDP8_A2A, **FSDP8_LOCAL, **FSDP8_REPL}, 'namo', {}),
    'fsdp8_namo_d': ((8,), ('fsdp',), 'auto',
                     {**FSDP8_A2A, **FSDP8_LOCAL, **FSDP8_REPL}, 'namo_d',
                     {}),
    'fsdp4tp2_namo_d': ((4, 2), ('fsdp', 'tp'), 'auto', TP_A2A,
                        'namo_d_normuon', {}),
    'explicit_fsdp8_namo': ((8,), ('fsdp',), 'explicit', FSDP8_A2A, 'namo',
                            {}),
    'explicit_fsdp8_namo_d_local': ((8,), ('fsdp',), 'explicit',
                                    {**FSDP8_A2A, **FSDP8_LOCAL}, 'namo_d',
                                    {}),
    'fsdp4tp2_gram_namo': ((4, 2), ('fsdp', 'tp'), 'auto', GRAM, 'namo',
                           dict(strategy='gram')),
    'fsdp4tp2_gram_namo_d': ((4, 2), ('fsdp', 'tp'), 'auto', GRAM,
                             'namo_d_normuon', dict(strategy='gram')),
}


# Cases whose two steps also run with bf16 on the wire (every case reads its
# bf16 collectives from the lowered program): the wire dtype is the
# executor's; the variants of a stage's options (``_longer``, ``_paper``)
# and of the mesh's axis type (``explicit_``) run f32 only.
BF16_STEPS = frozenset(n for n in CASES if not any(
    v in n for v in ('_longer', '_paper', 'explicit_', 'gram_namo_d')))


def make_tx(stages: str, mspecs, dist=None, steps=None):
  """The case's transform (``dist=None``: one device)."""
  if stages not in NAMO:
    return orthax.orthogonalize(steps=steps, matrix_specs=mspecs,
                                then=STAGES[stages](), distributed=dist)
  mode, then = NAMO[stages]
  return orthax.noise_adapt(
      orthax.momentum(0.9, form='ema', nesterov=True),
      orthax.orthogonalize(steps=steps, matrix_specs=mspecs, then=then(),
                           distributed=dist),
      learning_rate=0.05, b1=0.9, mode=mode, weight_decay=0.1, clamp_c=0.5,
      matrix_specs=mspecs)


def _steps(wire, tx, put, grads, p, mesh, refs, ref_state, shard, leaves):
  """Two steps of ``tx`` on the mesh against one device's."""
  step, st = fake_devices.pinned_step(tx, tx.init(p), mesh)
  ups = []
  for g in grads:
    u, st = step(put(g), st, p)
    ups.append(u)
  return {
      f'{wire}_max_abs_err': max(_max_abs(u, r) for u, r in zip(ups, refs)),
      f'{wire}_max_rel_err': max(_max_rel(u, r) for u, r in zip(ups, refs)),
      f'{wire}_state_max_rel_err': (_max_rel(st, ref_state)
                                    if jax.tree.leaves(st) else 0.0),
      f'{wire}_out_specs_ok': all(
          ups[-1][k].sharding.is_equivalent_to(shard[k], len(leaves[k][0]))
          for k in leaves)}


def _max_abs(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64)
                                 - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _max_rel(a, b):
  return max(float(np.linalg.norm(np.asarray(x, np.float64)
                                  - np.asarray(y, np.float64))
                   / max(np.linalg.norm(np.asarray(y, np.float64)), 1e-30))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def run_case(name: str) -> dict:
  mesh_shape, axes, kind, _, _, _ = CASES[name]
  at = AxisType.Explicit if kind == 'explicit' else AxisType.Auto
  mesh = jax.make_mesh(mesh_shape, axes, axis_types=(at,) * len(axes))
  with (jax.set_mesh(mesh) if kind == 'explicit'
        else contextlib.nullcontext()):
    return _run(name, mesh)


def _run(name: str, mesh) -> dict:
  _, _, kind, leaves, stages, dist_kw = CASES[name]
  explicit = kind == 'explicit'
  names = list(leaves)
  specs = {k: leaves[k][1] for k in names}
  mspecs = {k: leaves[k][2] for k in names}
  rng = np.random.default_rng(0)
  grads = [{k: rng.standard_normal(leaves[k][0]).astype(np.float32)
            for k in names} for _ in range(2)]
  shard = {k: NamedSharding(mesh, specs[k]) for k in names}
  put = lambda t: {k: jax.device_put(t[k], shard[k]) for k in names}

  params = {k: rng.standard_normal(leaves[k][0]).astype(np.float32)
            for k in names}
  ref_tx = make_tx(stages, mspecs)
  ref_state = ref_tx.init(params)
  refs = []
  ref_step = jax.jit(ref_tx.update)  # one jit: a new one per step recompiles
  for g in grads:
    u, ref_state = ref_step(g, ref_state, params)
    refs.append(u)

  def make(comm, steps=None):
    dist = sharding.Distributed(mesh, None if explicit else specs,
                                comm_dtype=comm, **dist_kw)
    return make_tx(stages, mspecs, dist, steps)

  p = put(params)
  out: dict = {}
  for wire, comm in (('f32', jnp.float32), ('bf16', jnp.bfloat16)):
    if wire == 'f32' or name in BF16_STEPS:
      out.update(_steps(wire, make(comm), put, grads, p, mesh, refs,
                        ref_state, shard, leaves))
    # HLO contract with one Newton–Schulz step (a loop body's collectives
    # appear once in the text). XLA:CPU widens bf16 collectives when it
    # compiles, so bf16 is read from the lowered program.
    tx1 = make(comm, steps=1)
    lowered = jax.jit(tx1.update).lower(put(grads[0]), tx1.init(p), p)
    if wire == 'f32':
      ops = hlo.collectives(lowered.compile().as_text())
    else:
      ops = hlo.lowered_collectives(lowered.as_text(), mesh.devices.size)
    out[f'{wire}_collectives'] = {
        k: v['count'] for k, v in hlo.summarize(ops).items()}
    out[f'{wire}_wire_bytes'] = sum(o['wire_bytes'] for o in ops)
    plan = sharding.plan(tx1, put(grads[0]))
    out[f'{wire}_plan_bytes'] = plan.bytes_per_device
    out[f'{wire}_plan_collectives'] = plan.collectives
    out['groups'] = [dict(strategy=g.strategy, paths=list(g.paths),
                          transposed=list(g.transposed),
                          collectives=g.collectives)
                     for g in plan.groups]
  return out


def main(argv):
  res = {}
  for n in argv or list(CASES):
    res[n] = fake_devices.guarded(lambda n=n: run_case(n))
  print(json.dumps(res))


if __name__ == '__main__':
  main(sys.argv[1:])
