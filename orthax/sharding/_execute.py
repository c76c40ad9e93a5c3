"""Running a plan: one ``jax.shard_map`` per group of same-shape matrices.

Inside the body every array is the device's local block, seen in the leaf's
own ``PartitionSpec``, so no resharding happens on the way in or out:

* ``local``: the matrices are whole on the device → Newton–Schulz on the local
  stack, no collective.
* ``a2a``: the local stack ``[N, m/gr, n/gc]`` (``gr·gc = G`` shards of each
  matrix) is zero-padded to ``N' = ⌈N/G⌉·G`` (Newton–Schulz maps zero to zero,
  so padding is exact), cast to the wire dtype and sent through ONE
  ``all_to_all`` over all the matrix's sharding axes; each device receives
  the ``G`` pieces of ``N'/G`` whole matrices, re-tiles them, runs
  Newton–Schulz, and the inverse ``all_to_all`` sends the pieces home.
* ``replicated``: every device holds the whole stack; it orthogonalizes its
  ``1/G`` slice (``G`` = the mesh axes the leaf is not sharded over) and an
  ``all_gather`` in the wire dtype rebuilds the stack.
* ``gram``: every device keeps its column block ``[N, m, n/G]`` of the long
  dimension; Newton–Schulz runs on the blocks with
  ``col_reduce = psum`` over the column axes (the ``m×m`` Gram matrix and the
  Frobenius norm are summed in float32, the polynomial is applied
  blockwise), so nothing is padded or moved.

``ns_fn(stack)`` must accept the keywords ``col_reduce`` and ``col_shards``
for ``gram`` (as :func:`orthax.polar.orthogonalize_stack` does).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from orthax import _tree
from orthax import matrices
from orthax.sharding._inspect import record
from orthax.sharding._plan import Distributed
from orthax.sharding._plan import GroupPlan
from orthax.sharding._plan import LeafInfo
from orthax.sharding._plan import Plan
from orthax.sharding._plan import plan_orthogonalize

NSFn = Callable[[jax.Array], jax.Array]


# Reading specs -------------------------------------------------------------


def _is_spec_leaf(s) -> bool:
  return s is None or isinstance(s, (P, NamedSharding))


def _as_spec(s) -> P:
  if s is None:
    return P()
  if isinstance(s, NamedSharding):
    return s.spec
  return s


def array_spec(x: Any, path: str = '') -> P:
  """The ``PartitionSpec`` an array carries: a concrete ``jax.Array`` or
  ``ShapeDtypeStruct`` with a ``NamedSharding``, or a tracer under ``jit`` on
  a mesh with ``Explicit`` axes. Raises when the sharding is not known."""
  sh = None
  if not isinstance(x, jax.core.Tracer):
    sh = getattr(x, 'sharding', None)
  if isinstance(sh, NamedSharding):
    return sh.spec
  try:
    aval_sh = jax.typeof(x).sharding
  except Exception:  # pylint: disable=broad-except
    aval_sh = None
  mesh = getattr(aval_sh, 'mesh', None)
  if mesh is not None and not mesh.empty and any(
      t == AxisType.Explicit for t in mesh.axis_types):
    return aval_sh.spec
  raise ValueError(
      f'leaf {path!r}: its sharding is not known here (an Auto mesh under '
      'jit, or an unsharded array); pass Distributed(param_specs=...) with '
      'the parameters\' PartitionSpec tree.')


def specs_for(tree: Any, dist: Distributed) -> list[P]:
  """One ``PartitionSpec`` per leaf of ``tree`` (flatten order), from
  ``dist.param_specs`` matched by path, or read from the arrays."""
  paths, leaves, _ = _tree.leaves_with_paths(tree)
  if dist.param_specs is None:
    return [array_spec(x, p) for p, x in zip(paths, leaves)]
  flat = jax.tree_util.tree_flatten_with_path(dist.param_specs,
                                              is_leaf=_is_spec_leaf)[0]
  by_path = {_tree.path_str(p): _as_spec(s) for p, s in flat}
  out = []
  for p in paths:
    if p not in by_path:
      raise ValueError(
          f'leaf {p!r} has no entry in Distributed.param_specs (paths there '
          f'include {sorted(by_path)[:5]}...).')
    out.append(by_path[p])
  return out


# Executing ----------------------------------------------------------------


def _a2a_body(g: GroupPlan, ns_fn: NSFn, ns_dtype) -> NSFn:
  axes = g.split_axes
  gr, gc = g.row_shards, g.col_shards
  m, n, k = g.m, g.n, g.padded // g.shards
  a_, b_ = m // gr, n // gc

  def run(stack):  # [N, a_, b_] local pieces
    N, dt = stack.shape[0], stack.dtype
    x = stack.astype(g.wire_dtype)
    if g.padded > N:
      x = jnp.concatenate(
          [x, jnp.zeros((g.padded - N, a_, b_), x.dtype)], axis=0)
      # Keeps XLA from splitting the padded stack into per-destination
      # operands (XLA:CPU then fails its verifier on mixed layouts).
      x = jax.lax.optimization_barrier(x)
    r = jax.lax.all_to_all(x, axes, 0, 0, tiled=True)
    # r[s·k + i] = piece s (s = row-shard·gc + col-shard) of my i-th matrix.
    full = (r.reshape(gr, gc, k, a_, b_).transpose(2, 0, 3, 1, 4)
            .reshape(k, m, n))
    y = ns_fn(full.astype(ns_dtype or dt)).astype(g.wire_dtype)
    back = (y.reshape(k, gr, a_, gc, b_).transpose(1, 3, 0, 2, 4)
            .reshape(g.padded, a_, b_))
    out = jax.lax.all_to_all(back, axes, 0, 0, tiled=True)
    return out[:N].astype(dt)

  return run


def _replicated_body(g: GroupPlan, ns_fn: NSFn, ns_dtype) -> NSFn:
  axes, k = g.split_axes, g.padded // g.shards

  def run(stack):  # [N, m, n], the whole stack on every device
    N, dt = stack.shape[0], stack.dtype
    x = stack
    if g.padded > N:
      x = jnp.concatenate(
          [x, jnp.zeros((g.padded - N,) + x.shape[1:], x.dtype)], axis=0)
    idx = jax.lax.axis_index(axes)
    mine = jax.lax.dynamic_slice_in_dim(x, idx * k, k, axis=0)
    y = ns_fn(mine.astype(ns_dtype or dt)).astype(g.wire_dtype)
    full = jax.lax.all_gather(y, axes, axis=0, tiled=True)
    return full[:N].astype(dt)

  return run


def _local_body(g: GroupPlan, ns_fn: NSFn, ns_dtype) -> NSFn:
  del g
  return lambda stack: ns_fn(stack.astype(ns_dtype or stack.dtype)).astype(
      stack.dtype)


def _gram_body(g: GroupPlan, ns_fn: NSFn, ns_dtype) -> NSFn:
  axes = g.split_axes

  def run(stack):  # [N, m, n/G]: this device's column block of each matrix
    y = ns_fn(stack.astype(ns_dtype or stack.dtype),
              col_reduce=lambda a: jax.lax.psum(a, axes),
              col_shards=g.shards)
    return y.astype(stack.dtype)

  return run


_BODIES = {'a2a': _a2a_body, 'replicated': _replicated_body,
           'local': _local_body, 'gram': _gram_body}


def run_group(g: GroupPlan, xs: Sequence[jax.Array],
              mspecs: Sequence[matrices.MatrixSpec], pspecs: Sequence[P],
              mesh, ns_fn: NSFn, ns_dtype=None) -> list[jax.Array]:
  """Orthogonalizes the group's leaves ``xs`` (global arrays); returns them
  in the same shardings."""
  stack_fn = _BODIES[g.strategy](g, ns_fn, ns_dtype)

  def body(*locs):
    mats = []
    for x, ms, t in zip(locs, mspecs, g.transposed):
      mt = matrices.to_matrices(x, ms)
      mats.append(jnp.swapaxes(mt, -1, -2) if t else mt)
    stack = mats[0] if len(mats) == 1 else jnp.concatenate(mats, axis=0)
    y = stack_fn(stack)
    outs, start = [], 0
    for x, ms, t, mt in zip(locs, mspecs, g.transposed, mats):
      part = y[start:start + mt.shape[0]] if len(mats) > 1 else y
      start += mt.shape[0]
      part = jnp.swapaxes(part, -1, -2) if t else part
      outs.append(matrices.from_matrices(part, ms, x.shape).astype(x.dtype))
    return tuple(outs)

  specs = tuple(pspecs)
  out = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=specs,
                      check_vma=False)(*xs)
  return list(out)


def plan_leaves(paths: Sequence[str], leaves: Sequence[Any],
                matrix_specs: Sequence[matrices.MatrixSpec],
                pspecs: Sequence[P], dist: Distributed, **plan_kw) -> Plan:
  """The :class:`Plan` for arrays (or abstract arrays) ``leaves``."""
  infos = [LeafInfo(p, tuple(x.shape), x.dtype, ms, ps)
           for p, x, ms, ps in zip(paths, leaves, matrix_specs, pspecs)]
  return plan_orthogonalize(
      infos, dist.mesh, dist.strategy, overrides=dist.overrides,
      comm_dtype=dist.comm_dtype, ns_dtype=dist.ns_dtype,
      max_local_matrix_bytes=dist.max_local_matrix_bytes, **plan_kw)


def distributed_orthogonalize(
    leaves: Sequence[jax.Array],
    matrix_specs: Sequence[matrices.MatrixSpec],
    dist: Distributed,
    ns_fn: NSFn,
    *,
    paths: Sequence[str] | None = None,
    param_specs: Sequence[P] | None = None,
    plan: Plan | None = None,
    plan_kw: dict[str, Any] | None = None,
) -> list[jax.Array]:
  """Orthogonalizes every matrix of ``leaves`` on ``dist.mesh``.

  Args:
    leaves: update leaves (global arrays, typically inside ``jit``).
    matrix_specs: one :class:`~orthax.MatrixSpec` per leaf.
    dist: the :class:`Distributed` configuration.
    ns_fn: ``stack[k, m, n] -> stack`` (wide, ``m ≤ n``), e.g.
      ``functools.partial(orthax.polar.orthogonalize_stack, preset='jordan')``.
    paths: leaf paths (for overrides and error messages); default ``'0'``, …
    param_specs: one ``PartitionSpec`` per leaf; default: read from the
      arrays (see :func:`array_spec`).
    plan: a precomputed plan for exactly these leaves.
    plan_kw: the FLOP model of the plan built when ``plan`` is ``None``:
      ``steps``, ``method``, ``restart_every`` (or ``matrix_flops``) as
      :func:`plan_orthogonalize` takes them, and ``ns_dtype``, the iteration
      dtype of ``ns_fn`` when it sets one (default ``dist.ns_dtype``). The
      plan is passed to :func:`orthax.sharding._inspect.record`.

  Returns:
    The orthogonalized leaves, in the order and sharding of ``leaves``.
  """
  leaves = list(leaves)
  if paths is None:
    paths = [str(i) for i in range(len(leaves))]
  if param_specs is None:
    param_specs = [array_spec(x, p) for p, x in zip(paths, leaves)]
  param_specs = [_as_spec(s) for s in param_specs]
  if plan is None:
    kw = dict(plan_kw or {})
    # The transform's own iteration dtype, if any, wins over dist.ns_dtype.
    ns_dtype = kw.pop('ns_dtype', None)
    d = dist if ns_dtype is None else dataclasses.replace(dist,
                                                          ns_dtype=ns_dtype)
    plan = plan_leaves(paths, leaves, matrix_specs, param_specs, d, **kw)
  record(plan)
  out: list[Any] = [None] * len(leaves)
  for g in plan.groups:
    ys = run_group(g, [leaves[i] for i in g.leaves],
                   [matrix_specs[i] for i in g.leaves],
                   [param_specs[i] for i in g.leaves], dist.mesh, ns_fn,
                   dist.ns_dtype)
    for i, y in zip(g.leaves, ys):
      out[i] = y
  return out


def orthogonalize_tree(updates: Any, dist: Distributed, ns_fn: NSFn,
                       matrix_specs: _tree.SpecsLike = None, *,
                       plan_kw: dict[str, Any] | None = None) -> Any:
  """Tree version of :func:`distributed_orthogonalize`: ``matrix_specs`` as
  :func:`orthax.orthogonalize` takes them, specs from ``dist``, ``plan_kw``
  the plan's FLOP model."""
  ms = _tree.resolve_specs(matrix_specs, updates, 'orthogonalize')
  paths, leaves, treedef = _tree.leaves_with_paths(updates)
  ps = specs_for(updates, dist)
  out = distributed_orthogonalize(leaves, ms, dist, ns_fn, paths=paths,
                                  param_specs=ps, plan_kw=plan_kw)
  return jax.tree.unflatten(treedef, out)
