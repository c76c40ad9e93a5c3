"""A NaN gradient on 8 fake CPU devices (run as a script by
``tests/test_nonfinite_mesh.py``, in a subprocess): the step is skipped on
every device alike and the process lives on. Prints one JSON object on the
last line: per case, what the skipped step and the next one gave."""

from __future__ import annotations

import contextlib
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

import fake_devices
import orthax
import sharding_recipes_cases as R

BAD_LEAF = 'blocks/a/kernel'


def run(recipe, shape, names, axis_type, distributed):
  """One skipped step (NaN in ``BAD_LEAF``) then a finite one, jitted on
  the mesh; the finite step is compared with the same step taken without
  the skipped one."""
  mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))
  explicit = axis_type == AxisType.Explicit
  pspecs = R.specs(names)
  dist = (orthax.Distributed(mesh, None if explicit else pspecs)
          if distributed else None)
  tx = orthax.recipe(recipe, learning_rate=0.02, distributed=dist)
  shard = lambda t: jax.tree.map(
      lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, pspecs)
  params, grads = shard(R.tree(0)), shard(R.tree(1))
  poisoned = R.tree(1)
  poisoned['blocks']['a']['kernel'] = (
      poisoned['blocks']['a']['kernel'].at[3, 5].set(jnp.nan))
  bad = shard(poisoned)
  ctx = jax.set_mesh(mesh) if explicit else contextlib.nullcontext()
  with ctx:
    step = jax.jit(tx.update)
    state = tx.init(params)
    u_bad, s_bad = step(bad, state, params)
    u_bad = jax.block_until_ready(u_bad)
    u_next, _ = step(grads, s_bad, params)
    u_ref, _ = step(grads, state, params)
  try:
    orthax.raise_if_nonfinite(s_bad, step=1)
    message = None
  except orthax.NonFiniteGradientError as e:
    message = str(e)
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(u_next), jax.tree.leaves(u_ref)))
  return {
      'skipped_update_max': max(float(np.max(np.abs(np.asarray(x))))
                                for x in jax.tree.leaves(u_bad)),
      'leaves': orthax.nonfinite_leaves(s_bad),
      'consecutive': int(orthax.nonfinite_status(s_bad).consecutive),
      'message': message,
      'next_step_max_diff': diff,
      'next_step_finite': all(bool(np.all(np.isfinite(np.asarray(x))))
                              for x in jax.tree.leaves(u_next)),
  }


CASES = {
    'muon/fsdp8/distributed': ('muon', (8,), ('fsdp',), AxisType.Auto, True),
    'muon/fsdp8/plain': ('muon', (8,), ('fsdp',), AxisType.Auto, False),
    'muon/explicit_fsdp8/distributed': ('muon', (8,), ('fsdp',),
                                        AxisType.Explicit, True),
    'muon/explicit_fsdp8/plain': ('muon', (8,), ('fsdp',), AxisType.Explicit,
                                  False),
    'namo_d/fsdp4tp2/distributed': ('namo_d', (4, 2), ('fsdp', 'tp'),
                                    AxisType.Auto, True),
    'normuon/fsdp4tp2/plain': ('normuon', (4, 2), ('fsdp', 'tp'),
                               AxisType.Auto, False),
}


def main():
  out = {name: fake_devices.guarded(lambda a=args: run(*a))
         for name, args in CASES.items()}
  print(json.dumps(out))


if __name__ == '__main__':
  main()
