"""Where a matrix stage's per-leaf state lives on the mesh
(:func:`stage_state_spec`), and whether a stack function can run on column
blocks (:func:`takes_column_blocks`): what both the executor and a
transform's ``init`` need to agree on, so that the state a step returns has
the sharding ``init`` gave it and no step gathers it."""

from __future__ import annotations

import inspect
from typing import Any, Sequence

from jax.sharding import PartitionSpec as P

from orthax import matrices
from orthax import matrix_stages
from orthax.sharding._plan_types import GroupPlan
from orthax.sharding._specs import spec_entries


def _entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def stage_state_spec(group: GroupPlan, stage: matrix_stages.MatrixStage,
                     leaf: Any, matrix_spec: matrices.MatrixSpec,
                     param_spec: Any, shape: Sequence[int]) -> P:
  """``PartitionSpec`` of one leaf's ``batch + shape`` stage state (or
  output), as the group's ``shard_map`` body returns it: the leaf's batch
  sharding; the per-matrix part whole, except under ``gram``, where a
  vector along a matrix axis keeps that axis's (column-block) sharding.

  Args:
    group: the plan's group that runs the leaf.
    stage: the stage whose state (or output) it is.
    leaf: the leaf (an array or anything with its ``shape`` and ``ndim``).
    matrix_spec: the leaf's :class:`~orthax.MatrixSpec`.
    param_spec: the leaf's ``PartitionSpec`` on the mesh.
    shape: the per-matrix shape of the state (or output).
  """
  entries = spec_entries(param_spec, leaf.ndim)
  batch, fi, fo = matrix_spec.resolve(leaf.shape)
  _, n_in, n_out = matrix_spec.matrix_shape(leaf.shape)
  tail = [None] * len(shape)
  ax = stage.shapes(n_in, n_out).axis
  if group.strategy == 'gram' and ax is not None:
    tail[-1] = _entry(entries[(fi if ax == -2 else fo)[0]])
  return P(*([_entry(entries[d]) for d in batch] + tail))


def takes_column_blocks(fn: Any) -> bool:
  """Whether ``fn`` runs on column blocks: it takes ``col_reduce`` (or
  any keyword).

  Args:
    fn: the stack function (Newton–Schulz, a clip, ...).
  """
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.name == 'col_reduce' or p.kind == p.VAR_KEYWORD
             for p in params)
