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

Matrix stages (:mod:`orthax.matrix_stages`: NorMuon's statistics and
Frobenius restore, shape and RMS scales, NAMO's step) run in the same body,
right after Newton–Schulz, on the whole matrices the device holds (``gram``:
on its column blocks, summing through ``Blocks.sum``). A stateful stage's
per-leaf state enters replicated, is sliced to the device's matrices and
leaves by one ``all_gather`` for the group (``a2a``, ``replicated``); under
``local`` and ``gram`` every device already updates its own part. A slot
stage's state (``StageShapes(slots=True)``) lives on the device that works
on the matrix and never travels (:mod:`orthax.sharding._group`).

A :class:`~orthax.matrix_stages.ScalingStage` (NAMO, NAMO-D) needs norms of
the matrices before Newton–Schulz, not the orthogonalized matrix: each device
sums squares over its pieces, one float32 ``psum`` per group (``a2a``; under
``gram`` only for norms across the column blocks) gives every device the
whole matrices' norms, and every device computes the factors, states and
outputs of its whole local stack. Only the factors go into the body, sliced
like states; nothing of the stage is gathered. One group's body is built
in :mod:`orthax.sharding._group`; the per-strategy bodies and the norm
exchanges are in :mod:`orthax.sharding._bodies`. On one device without
``shard_map`` the same body runs on the trivial plan (:func:`local_plan`,
``mesh=None`` in :func:`execute_plan`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from orthax import _tree
from orthax import _validate
from orthax import matrices
from orthax import matrix_stages
from orthax.sharding import _group
from orthax.sharding._bodies import NSFn
from orthax.sharding._inspect import record
from orthax.sharding._distributed import Distributed
from orthax.sharding._plan_types import GroupPlan
from orthax.sharding._plan_types import LeafInfo
from orthax.sharding._plan_types import Plan
from orthax.sharding._plan import plan_orthogonalize
from orthax.sharding._specs import spec_entries
from orthax.sharding._specs import array_spec
from orthax.sharding._specs import as_spec
from orthax.sharding._specs import check_meshes
from orthax.sharding._specs import check_specs
from orthax.sharding._specs import specs_for
from orthax.sharding._state_specs import stage_state_spec
from orthax.sharding._state_specs import takes_column_blocks

# Executing ----------------------------------------------------------------


def place(x, mesh, spec: P):
  """``x`` with sharding ``NamedSharding(mesh, spec)`` (``reshard`` on a
  mesh with Explicit axes, else a sharding constraint; eagerly, a move).

  Args:
    x: an array (concrete or traced).
    mesh: the ``jax.sharding.Mesh`` to place it on.
    spec: its ``PartitionSpec`` on ``mesh``.
  """
  return _constrain(x, mesh, spec)


def _constrain(x, mesh, spec: P):
  sh = NamedSharding(mesh, spec)
  if any(t == AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.reshard(x, sh)
  return jax.lax.with_sharding_constraint(x, sh)


class _NoMesh:
  """The mesh of one device without ``shard_map``: no axes."""
  axis_names: tuple[str, ...] = ()
  shape: dict[str, int] = {}


def local_plan(paths: Sequence[str], leaves: Sequence[Any],
               matrix_specs: Sequence[matrices.MatrixSpec],
               stages: Sequence[matrix_stages.MatrixStage] = (),
               **plan_kw) -> Plan:
  """The trivial plan of one device: every group ``local``, grouped by
  shape (and, with ``stages``, orientation) as on a mesh.

  Args:
    paths: the leaves' paths (the plan's rows, error messages).
    leaves: arrays or abstract arrays (only shapes and dtypes are read).
    matrix_specs: one :class:`~orthax.MatrixSpec` per leaf.
    stages: the :class:`~orthax.matrix_stages.MatrixStage`\\ s run in the
      body (their FLOPs are counted).
    **plan_kw: the FLOP model, as :func:`plan_orthogonalize` takes it
      (``steps``, ``method``, ``restart_every``, ``ns_dtype``...).
  """
  infos = [LeafInfo(p, tuple(x.shape), x.dtype, ms, P())
           for p, x, ms in zip(paths, leaves, matrix_specs)]
  return plan_orthogonalize(infos, _NoMesh(), 'local', stages=stages,
                            **plan_kw)


def plan_leaves(paths: Sequence[str], leaves: Sequence[Any],
                matrix_specs: Sequence[matrices.MatrixSpec],
                pspecs: Sequence[P], dist: Distributed, **plan_kw) -> Plan:
  """The :class:`Plan` for arrays (or abstract arrays) ``leaves``.

  Args:
    paths: the leaves' paths (for ``dist.overrides`` and error messages).
    leaves: arrays or abstract arrays (only shapes and dtypes are read).
    matrix_specs: one :class:`~orthax.MatrixSpec` per leaf.
    pspecs: one ``PartitionSpec`` per leaf (e.g. :func:`leaf_specs`).
    dist: the :class:`Distributed`: its ``mesh``, ``strategy``,
      ``overrides``, ``comm_dtype`` and ``max_local_matrix_bytes`` (not its
      ``param_specs``: ``pspecs`` are used).
    **plan_kw: the other keywords of :func:`plan_orthogonalize`
      (``stages``, ``column_blocks``, the FLOP model).
  """
  infos = [LeafInfo(p, tuple(x.shape), x.dtype, ms, ps)
           for p, x, ms, ps in zip(paths, leaves, matrix_specs, pspecs)]
  return plan_orthogonalize(
      infos, dist.mesh, dist.strategy, overrides=dist.overrides,
      comm_dtype=dist.comm_dtype,
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
    stages: Sequence[matrix_stages.MatrixStage] = (),
    stage_states: Sequence[Sequence[Any]] | None = None,
    aux: Sequence[jax.Array] | None = None,
    fn_args: Sequence[jax.Array] = (),
    return_triple: bool = False,
    inputs: Sequence[jax.Array] | None = None,
) -> Any:
  """Orthogonalizes every matrix of ``leaves`` on ``dist.mesh``, then runs
  the matrix ``stages`` on the whole matrices in the same ``shard_map`` body.

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
      dtype ``ns_fn`` casts to (the transform's ``ns_dtype``, the one knob
      for it; default the update's). Also ``normalizer``, the one ``ns_fn``
      uses: under ``'aol'``, whose row scaling is one-sided, the plan never
      runs a square matrix as its transpose (``ns_fn`` is opaque to it;
      :func:`orthax.orthogonalize` passes its own). The plan is passed to
      :func:`orthax.sharding._inspect.record`.
    stages: :class:`orthax.matrix_stages.MatrixStage`\\ s run, in order, on
      each device's whole orthogonalized matrices (for ``gram``, on its column
      blocks, sums through :class:`~orthax.matrix_stages.Blocks`). Groups
      then hold one orientation each. A stateful stage's state is sliced to
      the device's matrices; states and outputs come back in one small
      ``all_gather`` per group under ``a2a`` and ``replicated``. A
      :class:`~orthax.matrix_stages.ScalingStage`'s
      :class:`~orthax.matrix_stages.Norm`\\ s are summed on each device's
      pieces and all-reduced in float32 (one ``psum`` per group under
      ``a2a``, and under ``gram`` for norms across the column blocks;
      nothing under ``local`` and ``replicated``); its factor, state and
      output are computed on every device and do not travel.
    stage_states: ``stage_states[j][i]``: stage ``j``'s state for leaf ``i``
      (its ``batch + per-matrix`` array; ``None`` when stateless).
    aux: the auxiliary leaves (shapes and shardings of ``leaves``) whose
      norms a stage asks for (``Norm('aux', ...)``); they do not move.
    fn_args: arrays ``ns_fn`` takes after the stack (``ns_fn(stack,
      *fn_args)``), e.g. a traced clipping bound; they enter each body as
      replicated arguments (closing over them fails on ``Explicit`` meshes).
    return_triple: return the triple below even without ``stages``.
    inputs: the leaves whose norms ``Norm('input', ...)`` takes, when not
      ``leaves`` (shapes and shardings of ``leaves``).

  Returns:
    The orthogonalized leaves, in the order and sharding of ``leaves``; with
    ``stages`` (or ``return_triple``), the triple ``(leaves, new
    stage_states, outputs)`` (``outputs[j][i]``: stage ``j``'s output for
    leaf ``i``, ``batch + per-matrix``, replicated per matrix; ``None`` where
    it has none). Raises ``ValueError`` naming the leaf when it lives on
    another mesh than ``dist.mesh``.
  """
  _validate.flag('distributed_orthogonalize', 'return_triple', return_triple)
  stages = tuple(stages)
  leaves = list(leaves)
  if paths is None:
    paths = [str(i) for i in range(len(leaves))]
  check_meshes(leaves, paths, dist.mesh)
  if ns_fn is None:  # the stages only
    ns_fn = lambda x, *a, **kw: x
  if param_specs is None:
    param_specs = [array_spec(x, p) for p, x in zip(paths, leaves)]
  param_specs = [as_spec(s) for s in param_specs]
  check_specs(leaves, paths, param_specs, dist.mesh)
  if plan is None:
    plan = stack_plan(paths, leaves, matrix_specs, param_specs, dist, ns_fn,
                      stages=stages, plan_kw=plan_kw)
  record(plan)
  return execute_plan(plan, leaves, matrix_specs, param_specs, dist.mesh,
                      ns_fn, stages=stages, stage_states=stage_states,
                      aux=aux, fn_args=fn_args, inputs=inputs,
                      triple=bool(stages) or return_triple)


def stack_plan(paths: Sequence[str], leaves: Sequence[Any],
               matrix_specs: Sequence[matrices.MatrixSpec],
               param_specs: Sequence[Any], dist: Distributed, ns_fn: Any,
               *, stages: Sequence[matrix_stages.MatrixStage] = (),
               plan_kw: dict[str, Any] | None = None) -> Plan:
  """The plan :func:`distributed_orthogonalize` runs ``leaves`` by when it
  is given none: :func:`plan_leaves` with ``plan_kw``, column blocks
  allowed where ``ns_fn`` takes them (``None``: the stages alone, which
  do).

  Args:
    paths, leaves, matrix_specs, param_specs: as
      :func:`distributed_orthogonalize` takes them.
    dist: the :class:`Distributed`.
    ns_fn: the stack function, or ``None``.
    stages: the stages run after it.
    plan_kw: the plan's FLOP model and ``ns_fn``'s normalizer, as
      :func:`distributed_orthogonalize` takes them.
  """
  kw = dict(plan_kw or {})
  kw.setdefault('column_blocks',
                ns_fn is None or takes_column_blocks(ns_fn))
  return plan_leaves(paths, leaves, matrix_specs, param_specs, dist,
                     stages=stages, **kw)


def group_key(i: int) -> str:
  """The key of a plan's ``i``-th group in a slot stage's state.

  Args:
    i: the group's index in ``plan.groups``.

  Example:
    >>> import orthax
    >>> orthax.sharding.group_key(3)
    'group3'
  """
  return f'group{i}'


def execute_plan(plan: Plan, leaves, matrix_specs, param_specs, mesh, ns_fn,
                 *, stages=(), stage_states=None, aux=None, fn_args=(),
                 triple=True, inputs=None):
  """Runs every group of ``plan`` (:func:`run_group`).

  Args:
    plan: the :class:`Plan` of exactly these leaves (its groups' ``leaves``
      index them).
    leaves: the update leaves (global arrays).
    matrix_specs: one :class:`~orthax.MatrixSpec` per leaf.
    param_specs: one ``PartitionSpec`` per leaf: each body sees the leaf's
      local block in it.
    mesh: the mesh; ``None``: on one device, without ``shard_map`` (the
      plan of :func:`local_plan`).
    ns_fn: the stack function, as :func:`distributed_orthogonalize` takes it.
    stages: the :class:`~orthax.matrix_stages.MatrixStage`\\ s run after
      ``ns_fn`` in each body (the stages the plan was built with).
    stage_states: ``stage_states[j]``: stage ``j``'s state, per leaf (a
      list), or for a slot stage a dict of its groups' ``[D, k, *state]``
      arrays (keys :func:`group_key`); ``None``: no stage has a state.
    aux: the auxiliary leaves, per leaf, whose norms a stage takes
      (``Norm('aux', ...)``).
    fn_args: arrays ``ns_fn`` takes after the stack, passed replicated.
    triple: return ``(leaves, new stage_states, outputs)`` (default
      ``True``); ``False``: the leaves only.
    inputs: the leaves ``Norm('input', ...)`` is taken of, when not
      ``leaves``.

  Returns:
    With ``triple`` (the default), ``(leaves, new stage_states, outputs)``
    (``outputs[j][i]``: stage ``j``'s output for leaf ``i``, ``None`` where
    it has none); else the leaves. The leaves come in the order and
    sharding of ``leaves``.
  """
  _validate.flag('execute_plan', 'triple', triple)
  n = len(leaves)
  out: list[Any] = [None] * n
  slot = [st.slot_state for st in stages]
  new_states = [{} if sl else [None] * n for sl in slot]
  outputs = [[None] * n for _ in stages]
  for gi, g in enumerate(plan.groups):
    idx = g.leaves
    pick = lambda seq: [seq[i] for i in idx]
    ys, sts, outs = _group.run_group(
        g, pick(leaves), pick(matrix_specs), pick(param_specs), mesh, ns_fn,
        stages=stages,
        states=[per[group_key(gi)] if sl else pick(per) for sl, per in
                zip(slot, stage_states or [[None] * n] * len(stages))],
        aux=None if aux is None else pick(aux), fn_args=fn_args,
        inputs=None if inputs is None else pick(inputs),
        state_spec=lambda j, c, shape: stage_state_spec(
            g, stages[j], leaves[idx[c]], matrix_specs[idx[c]],
            param_specs[idx[c]], shape),
        constrain=lambda x, spec: _constrain(x, mesh, spec))
    for j in range(len(stages)):
      if slot[j]:
        new_states[j][group_key(gi)] = sts[j]
        continue
      for c, i in enumerate(idx):
        new_states[j][i], outputs[j][i] = sts[j][c], outs[j][c]
    for i, y in zip(idx, ys):
      out[i] = y
  return (out, new_states, outputs) if triple else out


def orthogonalize_tree(updates: Any, dist: Distributed, ns_fn: NSFn,
                       matrix_specs: _tree.SpecsLike = None, *,
                       plan_kw: dict[str, Any] | None = None,
                       stages: Sequence[matrix_stages.MatrixStage] = (),
                       stage_states: Sequence[Sequence[Any]] | None = None,
                       aux: Any = None) -> Any:
  """Tree version of :func:`distributed_orthogonalize`.

  Args:
    updates: the update tree (global arrays).
    dist: the :class:`Distributed`; the leaves' specs come from it
      (:func:`specs_for`).
    ns_fn: the stack function, as :func:`distributed_orthogonalize` takes it.
    matrix_specs: as :func:`orthax.orthogonalize` takes them (``None``:
      2-D leaves are ``(in, out)`` kernels).
    plan_kw: the plan's FLOP model and ``ns_fn``'s normalizer, as
      :func:`distributed_orthogonalize` takes them.
    stages, stage_states: as :func:`distributed_orthogonalize` takes them
      (``stage_states``: per stage, per leaf in flatten order).
    aux: the auxiliary tree, like ``updates``.

  Returns:
    The tree, or with ``stages`` the triple ``(tree, new stage_states,
    outputs)``.
  """
  ms = _tree.resolve_specs(matrix_specs, updates, 'orthogonalize')
  paths, leaves, treedef = _tree.leaves_with_paths(updates)
  ps = specs_for(updates, dist)
  res = distributed_orthogonalize(
      leaves, ms, dist, ns_fn, paths=paths, param_specs=ps, plan_kw=plan_kw,
      stages=stages, stage_states=stage_states,
      aux=None if aux is None else treedef.flatten_up_to(aux))
  if stages:
    return (jax.tree.unflatten(treedef, res[0]),) + tuple(res[1:])
  return jax.tree.unflatten(treedef, res)
