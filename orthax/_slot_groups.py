"""The groups a slot stage's state was laid out by (each group's dtype and
leaf paths, :attr:`orthax.engine.SlotState.members`), and the check that an
update is grouped the same way."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from orthax import sharding


def members(plan: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """``((dtype name, leaf paths), ...)``, one entry per group of ``plan``."""
  return tuple((jnp.dtype(g.dtype).name, tuple(g.paths))
               for g in plan.groups)


def check(stages, at_init, plan) -> None:
  """Raises ``ValueError`` where a slot stage's groups at ``init``
  (``at_init[j]``, empty for other stages) are not the update's
  (``plan``'s)."""
  now = members(plan)
  for st, was in zip(stages, at_init):
    # The same leaves in the same groups: the dtypes may differ (a bfloat16
    # update of float32 parameters is fine).
    if not was or [p for _, p in was] == [p for _, p in now]:
      continue
    dtype_was = {p: d for d, paths in was for p in paths}
    dtype_now = {p: d for d, paths in now for p in paths}
    if set(dtype_was) != set(dtype_now):
      raise ValueError(
          f'{st.name}: its slot state was made at init for the leaves '
          f'{sorted(dtype_was)}; this update has {sorted(dtype_now)}: init '
          'the state from parameters shaped like the updates.')
    moved = [p for p in dtype_now if dtype_was[p] != dtype_now[p]]
    why = (f'{moved[0]!r} is {dtype_now[moved[0]]} here, '
           f'{dtype_was[moved[0]]} at init' if moved
           else f'groups {[p for _, p in now]}, at init {[p for _, p in was]}')
    raise ValueError(
        f'{st.name}: its slot state was laid out at init by the leaves\' '
        f'shapes and dtypes, and this update groups them otherwise ({why}); '
        'each leaf would read another leaf\'s state. Give the update the '
        "parameters' dtypes (cast the gradients), or init from leaves like "
        'the updates.')


def check_layout(stages, states, plan) -> None:
  """Raises ``ValueError`` where a slot stage's arrays (``states[j]``, its
  slots by group key) are not laid out as ``plan`` needs, ``[D, k, …]``:
  a state made, or restored from a checkpoint saved, on another mesh (the
  slots of a matrix sit where its owner device is, so their layout is the
  mesh's). Without this the step failed deep in the executor, or blamed
  the stage."""
  for st, per in zip(stages, states):
    if not st.slot_state:
      continue
    for gi, g in enumerate(plan.groups):
      key = sharding.group_key(gi)
      want = (plan.num_devices, sharding.slot_count(g))
      for a in jax.tree.leaves(per.get(key)):
        if tuple(a.shape[:2]) != want:
          raise ValueError(
              f'{st.name}: its slot state {key!r} (leaves {list(g.paths)}) '
              f'is laid out for {a.shape[0]} device(s) × {a.shape[1]} '
              f'matrices each; this step runs on {want[0]} × {want[1]}. '
              'A slot state belongs to the mesh and sharding it was made '
              'on (each matrix\'s state sits on its owner device): it was '
              'made, or saved, on another mesh. Move it here with '
              'orthax.transforms.relayout_state(state, tx.init(params)) '
              '(its slot arrays restored in their saved shapes).')
