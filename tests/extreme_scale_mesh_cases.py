"""One step with a 1e19-scale gradient on 8 fake CPU devices (run as a
script by ``tests/test_extreme_scale_mesh.py``, in a subprocess): muon and
namo_d with ``distributed=``, on fsdp8 (``a2a``: NAMO-D's norms summed from
each device's pieces) and on fsdp4×tp2 with ``c/kernel`` forced to ``gram``
(column blocks: Newton–Schulz's Frobenius norm summed across devices too).
Prints one JSON object on the last line: per case, the largest relative
difference of a kernel's update from the unscaled one, whether everything
is finite, and the plan's strategies."""

from __future__ import annotations

import json
import os

if __name__ == '__main__':
  flag = '--xla_force_host_platform_device_count=8'
  if flag not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' ' + flag

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fake_devices
import orthax

SCALE = 1e19
# (shape, sharding): a and b FSDP-sharded (a2a), c's long side over tp.
SHAPES = {'a': ((64, 128), ('fsdp', None)), 'b': ((128, 64), ('fsdp', None)),
          'c': ((64, 128), (None, 'tp'))}
MESHES = {
    'fsdp8': ((8,), ('fsdp',), {}),
    'fsdp4tp2_gram': ((4, 2), ('fsdp', 'tp'),
                      dict(overrides=(('c/kernel', 'gram'),))),
}
CASES = {f'{r}/{m}': (r, m) for r in ('muon', 'namo_d') for m in MESHES}


def _tree(seed):
  rng = np.random.default_rng(seed)
  return {k: {'kernel': jnp.asarray(rng.standard_normal(s), jnp.float32)}
          for k, (s, _) in SHAPES.items()}


def _specs(names):
  return {k: {'kernel': P(*[a if a in names else None for a in axes])}
          for k, (_, axes) in SHAPES.items()}


def run(recipe, mname):
  shape, names, kw = MESHES[mname]
  mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))
  pspecs = _specs(names)
  # f32 on the wire: bf16 would round x·1e19 and x differently.
  dist = orthax.Distributed(mesh, pspecs, comm_dtype=jnp.float32, **kw)
  tx = orthax.recipe(recipe, learning_rate=0.02, distributed=dist)
  shard = lambda t: jax.tree.map(
      lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, pspecs)
  params, grads = shard(_tree(0)), _tree(1)
  step = jax.jit(tx.update)

  def updates(scale):  # one step: one compile (the state's layout changes)
    g = shard(jax.tree.map(lambda x: x * scale, grads))
    return step(g, tx.init(params), params)[0]

  ref, big = updates(1.0), updates(SCALE)
  get = lambda t, k: np.asarray(t[k]['kernel'], np.float64)
  errs = {k: float(np.linalg.norm(get(big, k) - get(ref, k))
                   / np.linalg.norm(get(ref, k))) for k in SHAPES}
  return {'rel_err': max(errs.values()), 'errs': errs,
          'finite': all(bool(np.all(np.isfinite(np.asarray(x))))
                        for x in jax.tree.leaves(big)),
          'strategies': sorted({g.strategy for g in
                                orthax.sharding.plan(tx, params).groups})}


def main():
  out = {key: fake_devices.guarded(lambda a=args: run(*a))
         for key, args in CASES.items()}
  print(json.dumps(out))


if __name__ == '__main__':
  main()
