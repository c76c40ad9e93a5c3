"""What a sharding plan is: :class:`LeafInfo` (one update leaf, as the
planner sees it), :class:`GroupPlan` (same-shape matrices under one
strategy) and :class:`Plan` (all groups, with the per-device totals and a
printable table). :func:`~orthax.sharding.plan_orthogonalize` builds them."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp

from orthax.matrices import MatrixSpec


class LeafInfo(NamedTuple):
  """What the planner needs to know about one update leaf."""
  path: str
  shape: tuple[int, ...]
  dtype: Any
  matrix_spec: MatrixSpec
  partition_spec: Any  # PartitionSpec


@dataclasses.dataclass(frozen=True)
class GroupPlan:
  """Same-shape wide matrices ``[count, m, n]`` handled by one strategy.

  Attributes:
    strategy: ``'local'``, ``'a2a'``, ``'replicated'`` or ``'gram'``.
    m, n, dtype: the wide matrix shape (``m ≤ n``) and the leaves' dtype.
    leaves, paths: the members' indices into the planned leaves, in order,
      and their paths.
    transposed: per member, whether its ``[fan_in, fan_out]`` matrices run
      transposed (to be wide; a square one under ``gram``: to shard columns).
    count: the group's matrices on the whole mesh.
    local_count: the matrices in one device's stack before any
      communication (``count`` divided by the batch-axis sharding).
    padded: ``local_count`` padded with zero matrices to a multiple of
      ``shards`` (``a2a``, ``replicated``; else equal); ``padding``: the excess.
    row_axes, col_axes: the mesh axes (of size > 1) sharding ``m``, ``n``.
    split_axes: the axes the group is split over: ``a2a``: ``row_axes`` then
      ``col_axes``; ``replicated``: the axes the leaves are not sharded
      over; ``gram``: ``col_axes`` (each device keeps an ``m × n/shards``
      block of every matrix, no padding); ``local``: none.
    shards, row_shards, col_shards: the devices ``split_axes``,
      ``row_axes`` and ``col_axes`` span.
    wire_dtype: the matrices' dtype on the wire: ``comm_dtype`` unless wider
      than ``dtype`` (``gram``: its all-reduces', float32 or wider).
    matrix_flops: one device's FLOPs per matrix (``gram``: on its column
      block), the matrix stages' included.
    flops_per_device: ``matrix_flops`` times the matrices a device runs
      (``padded / shards`` under ``a2a`` and ``replicated``).
    bytes_per_device, collectives: the predicted bytes per device and the
      collectives per update (``gram``: one all-reduce, float32 or wider,
      per Gram product, plus one for the norm unless the normalizer is
      ``'none'``), the matrix stages' included.
    stages: the names of the matrix stages run in the body, in order.
  """
  strategy: str
  m: int
  n: int
  dtype: Any
  leaves: tuple[int, ...]
  paths: tuple[str, ...]
  transposed: tuple[bool, ...]
  count: int
  local_count: int
  padded: int
  row_axes: tuple[str, ...]
  col_axes: tuple[str, ...]
  split_axes: tuple[str, ...]
  shards: int
  row_shards: int
  col_shards: int
  wire_dtype: Any
  matrix_flops: int
  flops_per_device: int
  bytes_per_device: float
  collectives: int
  stages: tuple[str, ...] = ()  # matrix stages run in the body, in order

  @property
  def padding(self) -> int:
    return self.padded - self.local_count


@dataclasses.dataclass(frozen=True)
class Plan:
  """A static plan; ``print(plan)`` shows one row per group, ``describe()``
  adds their paths; ``group_of(path)``: a leaf's group. ``flops_per_device``,
  ``bytes_per_device`` and ``collectives`` sum the groups'.

  Attributes:
    groups: the :class:`GroupPlan`\\ s.
    num_devices: the mesh's device count (1 for :func:`local_plan`).
    mesh_shape: ``((axis name, size), ...)`` in mesh order.
  """
  groups: tuple[GroupPlan, ...]
  num_devices: int
  mesh_shape: tuple[tuple[str, int], ...]

  @property
  def flops_per_device(self) -> int:
    return sum(g.flops_per_device for g in self.groups)

  @property
  def bytes_per_device(self) -> float:
    return sum(g.bytes_per_device for g in self.groups)

  @property
  def collectives(self) -> int:
    return sum(g.collectives for g in self.groups)

  def group_of(self, path: str) -> GroupPlan:
    for g in self.groups:
      if path in g.paths:
        return g
    raise KeyError(path)

  def __str__(self) -> str:
    mesh = '×'.join(f'{n}={s}' for n, s in self.mesh_shape)
    head = ('group', 'matrix', 'leaves', 'count', 'local', 'padded',
            'strategy', 'split axes', 'GFLOP/dev', 'MiB/dev', 'coll.')
    rows = []
    for i, g in enumerate(self.groups):
      ax = '·'.join(g.split_axes) or '-'
      if g.strategy == 'a2a':
        ax = f"{'·'.join(g.row_axes) or '-'}|{'·'.join(g.col_axes) or '-'}"
      rows.append((str(i), f'{g.m}×{g.n} {jnp.dtype(g.dtype).name}',
                   str(len(g.paths)), str(g.count), str(g.local_count),
                   str(g.padded), g.strategy, ax,
                   f'{g.flops_per_device / 1e9:.3f}',
                   f'{g.bytes_per_device / 2**20:.2f}', str(g.collectives)))
    rows.append(('total', '', str(sum(len(g.paths) for g in self.groups)),
                 str(sum(g.count for g in self.groups)), '', '', '', '',
                 f'{self.flops_per_device / 1e9:.3f}',
                 f'{self.bytes_per_device / 2**20:.2f}',
                 str(self.collectives)))
    w = [max(len(r[j]) for r in rows + [head]) for j in range(len(head))]
    fmt = lambda r: '  '.join(c.rjust(w[j]) if j in (0, 2, 3, 4, 5, 8, 9, 10)
                              else c.ljust(w[j]) for j, c in enumerate(r))
    lines = [f'orthax sharding plan: {len(self.groups)} groups on mesh '
             f'{mesh} ({self.num_devices} devices)', fmt(head),
             fmt(tuple('-' * x for x in w))]
    lines += [fmt(r) for r in rows]
    staged = {}
    for i, g in enumerate(self.groups):
      if g.stages:
        staged.setdefault(' → '.join(g.stages), []).append(str(i))
    for names, idx in staged.items():
      lines.append(f"matrix stages in the body of group{'s' * (len(idx) > 1)}"
                   f" {', '.join(idx)}: {names}")
    return '\n'.join(lines)

  def describe(self) -> str:
    """The table plus each group's leaf paths."""
    out = [str(self)]
    for i, g in enumerate(self.groups):
      out.append(f'group {i} ({g.strategy}, padding {g.padding}): '
                 + ', '.join(g.paths))
    return '\n'.join(out)


# Spec helpers -------------------------------------------------------------
