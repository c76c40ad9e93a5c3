"""The engine: one executor for every per-matrix step.

:func:`map_matrices` applies a stack function (Newton–Schulz, SPECTRA's soft
clip, ROOT's outlier clip, or nothing) and then a list of
:class:`~orthax.matrix_stages.MatrixStage`\\ s to every matrix of a list of
leaves, each leaf seen as ``[batch, fan_in, fan_out]`` through its
:class:`~orthax.MatrixSpec`:

* on one device (``distributed=None``) the trivial ``local`` plan runs
  the same group bodies as a mesh does, without ``shard_map``: the matrices
  are grouped by shape (either orientation; with stages, one orientation per
  group) and the stack function and the stages run once per group;
* on a mesh (``distributed=`` an :class:`orthax.sharding.Distributed`) the
  static plan of :mod:`orthax.sharding` picks a strategy per group and the
  stack function and the stages run inside one ``shard_map`` body per group,
  on whole matrices.

Either way the result has one structure, :class:`MatrixMap`. A stage's
state is per leaf (``batch + per-matrix``, like the parameter) or, for a
slot stage, a :class:`SlotState`: per group, on the device that works on
the matrices, never gathered. The engine
also carries the edge cases every transform would otherwise meet one by one:
a leaf with no elements (e.g. ``(0, 8)``, or a stack of zero experts) passes
through unchanged, with its stage states unchanged, and an empty list of
leaves is an empty result.

Layering: the engine knows matrix functions, matrix views, matrix stages and
the sharding executor; it knows nothing of optax or of recipes. Transforms
(:mod:`orthax.transforms`) are built on it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from orthax import _slot_groups as slot_groups
from orthax import _slot_layout as slot_layout
from orthax._slot_layout import SlotState
from orthax import matrices
from orthax import matrix_stages as ms
from orthax import sharding
from orthax._reshard import replicated
from orthax._reshard import reshard_like

StackFn = Callable[..., jax.Array]


class MatrixMap(NamedTuple):
  """What :func:`map_matrices` returns.

  Attributes:
    leaves: the mapped leaves, in order, shapes and dtypes of the inputs.
    states: ``states[j][i]``: stage ``j``'s new state for leaf ``i`` (its
      ``batch + per-matrix`` array; ``None`` for a stateless stage).
    outputs: ``outputs[j][i]``: stage ``j``'s per-matrix output for leaf
      ``i`` (``batch + per-matrix``; ``None`` for a stage without one).
  """
  leaves: list[Any]
  states: list[list[Any]]
  outputs: list[list[Any]]


def leaf_batch_shape(shape: Sequence[int],
                     spec: matrices.MatrixSpec) -> tuple[int, ...]:
  """The sizes of the leaf's batch axes (the matrices' stack shape)."""
  return tuple(shape[a] for a in spec.resolve(shape)[0])


def leaf_state_shape(stage: ms.MatrixStage, shape: Sequence[int],
                     spec: matrices.MatrixSpec) -> tuple[int, ...] | None:
  """Batch shape of the leaf + the stage's per-matrix state shape
  (``None``: the stage is stateless)."""
  _, fi, fo = spec.matrix_shape(shape)
  sh = stage.shapes(fi, fo)
  if isinstance(sh.state, Mapping) and not sh.slots:
    raise ValueError(f'matrix stage {stage.name!r}: a state of several '
                     'arrays (a dict of shapes) needs slots=True.')
  return (None if sh.state is None
          else leaf_batch_shape(shape, spec) + tuple(sh.state))


def initial_state(stage: ms.MatrixStage, fan_in: int, fan_out: int,
                  dtype: Any) -> Any:
  """``stage.initial_state`` of one ``fan_in × fan_out`` matrix in the
  :func:`~orthax.matrix_stages.wide` of ``dtype``, broadcast to the
  declared state; a ``ValueError`` naming the stage where it does not
  broadcast (it failed in a broadcast that named nothing, and a slot
  state kept the wrong shape)."""
  init = stage.initial_state(fan_in, fan_out, ms.wide(dtype))
  want = stage.shapes(fan_in, fan_out).state
  want = ({k: tuple(v) for k, v in want.items()} if isinstance(want, Mapping)
          else tuple(want))
  try:
    return jax.tree.map(jnp.broadcast_to, init, want)
  except (ValueError, TypeError):
    got = jax.tree.map(lambda a: tuple(jnp.shape(a)), init)
    raise ValueError(
        f'matrix stage {stage.name!r}: initial_state({fan_in}, {fan_out}) '
        f'returned shapes {got}; shapes() declares {want} (a smaller shape '
        'that broadcasts to it is taken).') from None


def _sharding_known(x: Any) -> bool:
  try:
    sharding.array_spec(x)
  except ValueError:
    return False
  return True


def init_stage_states(stage: ms.MatrixStage, leaves: Sequence[Any],
                      specs: Sequence[matrices.MatrixSpec], *,
                      fn: StackFn | None = None,
                      stages: Sequence[ms.MatrixStage] | None = None,
                      distributed: sharding.Distributed | None = None,
                      paths: Sequence[str] | None = None,
                      plan_kw: dict[str, Any] | None = None) -> list[Any]:
  """The stage's :meth:`~orthax.matrix_stages.MatrixStage.initial_state`
  for every matrix of each leaf (:func:`leaf_state_shape`), in the leaf's
  :func:`~orthax.matrix_stages.wide` dtype (``None`` when stateless). On a
  mesh (``distributed``) each is placed where :func:`map_matrices` (with
  ``fn``, ``stages`` — the whole list ``stage`` runs in, default
  ``(stage,)`` — ``paths`` and ``plan_kw``) returns it
  (:func:`orthax.sharding.stage_state_spec`: sharded like its leaf's
  batch axes), so that no step gathers it or changes its sharding."""
  if not stage.stateful:
    return [None] * len(leaves)
  out = []
  for x, spec in zip(leaves, specs):
    _, fi, fo = spec.matrix_shape(x.shape)
    out.append(jnp.broadcast_to(initial_state(stage, fi, fo, x.dtype),
                                leaf_state_shape(stage, x.shape, spec)))
  if distributed is None:
    return out
  paths = [str(i) for i in range(len(leaves))] if paths is None else paths
  live = [i for i, x in enumerate(leaves) if x.size]
  pick = lambda seq: [seq[i] for i in live]
  if distributed.param_specs is None and not all(
      _sharding_known(x) for x in pick(leaves)):
    # (numpy parameters, or an abstract tree without shardings, to build
    # a state to restore into): left unplaced; the step places it.
    return out
  pspecs = _leaf_pspecs(pick(leaves), distributed, pick(paths))
  plan = sharding.stack_plan(
      pick(paths), pick(leaves), pick(specs), pspecs, distributed, fn,
      stages=(stage,) if stages is None else tuple(stages), plan_kw=plan_kw)
  for g in plan.groups:
    for c in g.leaves:
      i = live[c]
      _, fi, fo = specs[i].matrix_shape(leaves[i].shape)
      spec = sharding.stage_state_spec(g, stage, leaves[i], specs[i],
                                       pspecs[c],
                                       tuple(stage.shapes(fi, fo).state))
      out[i] = sharding.place(out[i], distributed.mesh, spec)
  return out


def _empty_outputs(stages, x, spec):
  """Zero outputs for a leaf with no elements."""
  _, fi, fo = spec.matrix_shape(x.shape)
  return [None if not st.has_output else
          jnp.zeros(leaf_batch_shape(x.shape, spec)
                    + tuple(st.shapes(fi, fo).output), ms.wide(x.dtype))
          for st in stages]


def _on_one_device(fn, leaves, specs, stages, states, aux, inputs, group,
                   fn_args, paths, plan_kw) -> MatrixMap:
  """The trivial ``local`` plan, run without ``shard_map``: with ``group``
  one plan for all leaves (same-shape matrices stacked into one ``fn``
  call), else (and for stages without ``fn``) one per leaf."""
  run = lambda idx, sts: MatrixMap(*sharding.execute_plan(
      sharding.local_plan([paths[i] for i in idx], [leaves[i] for i in idx],
                          [specs[i] for i in idx], stages,
                          **dict(plan_kw or {})),
      [leaves[i] for i in idx], [specs[i] for i in idx],
      [jax.sharding.PartitionSpec()] * len(idx), None,
      _identity if fn is None else fn, stages=stages, stage_states=sts,
      aux=None if aux is None else [aux[i] for i in idx], fn_args=fn_args,
      inputs=None if inputs is None else [inputs[i] for i in idx]))
  # Stages alone are per matrix: kept per leaf (no stacking), so that on a
  # mesh without distributed= each leaf keeps its sharding under GSPMD.
  slots = any(st.slot_state for st in stages)
  if group and (fn is not None or slots):
    return run(range(len(leaves)), states)
  if slots:
    raise ValueError('map_matrices: slot stages need group=True (their '
                     'state is kept per group).')
  parts = [run([i], [[per[i]] for per in states]) for i in range(len(leaves))]
  return MatrixMap([p.leaves[0] for p in parts],
                   [[p.states[j][0] for p in parts] for j in range(len(stages))],
                   [[p.outputs[j][0] for p in parts]
                    for j in range(len(stages))])


def _leaf_pspecs(leaves, distributed, paths):
  """Each leaf's ``PartitionSpec`` on ``distributed``'s mesh (``None``
  on one device)."""
  if distributed is None:
    return [None] * len(leaves)
  return sharding.leaf_specs(paths, leaves, distributed)


def _plan(leaves, specs, stages, distributed, paths, plan_kw, pspecs=None):
  """The plan the leaves (and slot states) are run by: the distributed
  plan, or one device's trivial plan; ``pspecs``: the leaves'
  :func:`_leaf_pspecs`, when already known."""
  kw = dict(plan_kw or {})
  if distributed is None:
    return sharding.local_plan(paths, leaves, specs, stages, **kw)
  if pspecs is None:
    pspecs = _leaf_pspecs(leaves, distributed, paths)
  return sharding.plan_leaves(paths, leaves, specs, pspecs, distributed,
                              stages=stages, **kw)


def init_slot_state(stage: ms.MatrixStage, leaves: Sequence[Any],
                    specs: Sequence[matrices.MatrixSpec], *,
                    distributed: sharding.Distributed | None = None,
                    paths: Sequence[str] | None = None,
                    plan_kw: dict[str, Any] | None = None) -> SlotState:
  """A slot stage's initial state: one ``[D, k, *state]`` array per group
  of the plan that :func:`map_matrices` runs ``leaves`` by (leaves with no
  elements take no slot), each slot at the stage's ``initial_state``,
  placed on the mesh's devices, with the layout's ``ids``
  (:class:`SlotState`)."""
  paths = [str(i) for i in range(len(leaves))] if paths is None else paths
  live = [i for i, x in enumerate(leaves) if x.size]
  pick = lambda seq: [seq[i] for i in live]
  pspecs = _leaf_pspecs(pick(leaves), distributed, pick(paths))
  plan = _plan(pick(leaves), pick(specs), (stage,), distributed,
               pick(paths), plan_kw, pspecs)
  mesh = None if distributed is None else distributed.mesh
  axes = () if mesh is None else tuple(mesh.axis_names)
  place = lambda a: a if mesh is None else sharding.place(
      a, mesh, jax.sharding.PartitionSpec(axes))
  ids = {key: place(jnp.asarray(t)) for key, t in slot_layout.slot_ids(
      plan, pick(leaves), pick(specs), pspecs, mesh).items()}
  slots = {}
  for gi, g in enumerate(plan.groups):
    fi, fo = (g.n, g.m) if g.transposed[0] else (g.m, g.n)
    lead = (plan.num_devices, sharding.slot_count(g))
    x = jax.tree.map(lambda a: jnp.broadcast_to(a, lead + a.shape),
                     initial_state(stage, fi, fo, g.dtype))
    slots[sharding.group_key(gi)] = jax.tree.map(place, x)
  return SlotState(slots, axes, slot_groups.members(plan), ids)


def relayout_slot_state(state: SlotState, like: SlotState,
                        where: str = 'slot state') -> SlotState:
  """``state`` (made on another mesh or device count, or restored from a
  checkpoint saved there, its arrays in their saved shapes) in the layout
  of ``like`` (the same stage's state from ``init`` here, concrete): each
  matrix's state moved to the slot this mesh gives it, padding slots as
  in ``like``, every array placed with ``like``'s sharding (only placed,
  when it already has ``like``'s layout). Raises ``ValueError``
  naming ``where`` when a matrix has no state in ``state`` or its state
  has another shape. For a whole optimizer state:
  :func:`orthax.transforms.relayout_state`."""
  return slot_layout.relayout(state, like, where)


def _identity(x, *args, **kwargs):
  del args, kwargs
  return x


def _pass_through(leaves, specs, stages, states):
  """The result for leaves with no elements (the others ``None``): the
  leaf itself, its states unchanged, zero outputs."""
  res = MatrixMap([None if x.size else x for x in leaves],
                  [per if st.slot_state else
                   [None if x.size else s for x, s in zip(leaves, per)]
                   for st, per in zip(stages, states)],
                  [[None] * len(leaves) for _ in stages])
  for i, x in enumerate(leaves):
    if not x.size:
      for j, o in enumerate(_empty_outputs(stages, x, specs[i])):
        res.outputs[j][i] = o
  return res


def map_matrices(
    fn: StackFn | None,
    leaves: Sequence[jax.Array],
    specs: Sequence[matrices.MatrixSpec],
    *,
    stages: Sequence[ms.MatrixStage] = (),
    states: Sequence[Any] | None = None,
    aux: Sequence[jax.Array] | None = None,
    inputs: Sequence[jax.Array] | None = None,
    group: bool = True,
    fn_args: Sequence[jax.Array] = (),
    distributed: sharding.Distributed | None = None,
    paths: Sequence[str] | None = None,
    plan_kw: dict[str, Any] | None = None,
) -> MatrixMap:
  """Applies ``fn`` and then ``stages`` to every matrix of ``leaves``.

  Args:
    fn: ``(stack[k, m, n], *fn_args) -> stack`` on wide stacks (``m ≤ n``),
      e.g. a Newton–Schulz function; ``None``: the stages only. On a mesh it
      must accept the keywords ``col_reduce`` and ``col_shards`` for groups
      planned ``gram`` (as :func:`orthax.polar.orthogonalize_stack` does).
    leaves: the arrays (global arrays under ``jit`` on a mesh).
    specs: one :class:`~orthax.MatrixSpec` per leaf.
    stages: :class:`~orthax.matrix_stages.MatrixStage`\\ s run, in order, on
      each matrix after ``fn``.
    states: ``states[j]``: stage ``j``'s state: per leaf (a list of ``batch
      + per-matrix`` arrays, ``None`` entries when stateless) or, for a slot
      stage, its :class:`SlotState`'s ``slots``; default: none.
    aux: leaves of an auxiliary tree (shapes of ``leaves``) whose norms a
      stage asks for (``Norm('aux', ...)``).
    inputs: the leaves whose norms ``Norm('input', ...)`` takes (default:
      ``leaves``, the matrices entering ``fn``).
    group: on one device, stack same-shape matrices of all leaves into one
      ``fn`` call (exact for any per-matrix ``fn``); else one call per leaf
      (not with slot stages).
    fn_args: arrays ``fn`` takes after the stack (traced values such as a
      clipping bound); on a mesh they enter the ``shard_map`` body as
      replicated arguments, never closed over.
    distributed: an :class:`orthax.sharding.Distributed`: run on its mesh.
    paths: leaf paths, for the plan's overrides and error messages.
    plan_kw: the plan's FLOP model (see
      :func:`orthax.sharding.distributed_orthogonalize`).

  Returns:
    A :class:`MatrixMap`. Leaves with no elements come back unchanged, their
    states unchanged and their outputs zero.
  """
  stages = tuple(stages)
  n = len(leaves)
  states = ([{} if st.slot_state else [None] * n for st in stages]
            if states is None else list(states))
  members = [per.members if isinstance(per, SlotState) else ()
             for per in states]
  states = [dict(per.slots) if isinstance(per, SlotState) else per
            for per in states]
  paths = [str(i) for i in range(n)] if paths is None else list(paths)
  result = _pass_through(leaves, specs, stages, states)
  live = [i for i, x in enumerate(leaves) if x.size]
  if not live:
    return result
  pick = lambda seq: None if seq is None else [seq[i] for i in live]
  if any(members) or any(st.slot_state for st in stages):
    plan = _plan(pick(leaves), pick(specs), stages, distributed, pick(paths),
                 plan_kw)
    slot_groups.check(stages, members, plan)
    slot_groups.check_layout(stages, states, plan)
  sts = [per if st.slot_state else pick(per)
         for st, per in zip(stages, states)]
  if distributed is None:
    # Explicit mesh axes: each device computes whole matrices (as GSPMD
    # would gather them on Auto axes); the results go back to each leaf's
    # and each state's sharding.
    args = (pick(leaves), sts, pick(aux), pick(inputs), tuple(fn_args))
    ll, sts_, aux_, inputs_, fn_args_ = replicated(args)
    done = _on_one_device(fn, ll, pick(specs), stages, sts_, aux_, inputs_,
                          group, fn_args_, pick(paths), plan_kw)
    done = done._replace(leaves=reshard_like(done.leaves, args[0]),
                         states=reshard_like(done.states, args[1]))
  else:
    lp, ll = pick(paths), pick(leaves)
    done = MatrixMap(*sharding.distributed_orthogonalize(
        ll, pick(specs), distributed, fn, paths=lp, plan_kw=plan_kw,
        param_specs=sharding.leaf_specs(lp, ll, distributed),
        stages=stages, stage_states=sts, aux=pick(aux),
        inputs=pick(inputs), fn_args=tuple(fn_args), return_triple=True))
    # On Explicit axes a per-leaf state comes out of the body sharded like
    # its leaf's batch axes: back to the sharding it came in with (init's),
    # or the state's type would change from step to step.
    done = done._replace(states=reshard_like(done.states, sts))
  return _merge(result, done, live, stages)


def _merge(result: MatrixMap, done: MatrixMap, live, stages) -> MatrixMap:
  """``done`` (for the ``live`` leaves) written into ``result``."""
  for c, i in enumerate(live):
    result.leaves[i] = done.leaves[c]
    for j, st in enumerate(stages):
      result.outputs[j][i] = done.outputs[j][c]
      if not st.slot_state:
        result.states[j][i] = done.states[j][c]
  for j, st in enumerate(stages):
    if st.slot_state:
      result.states[j] = done.states[j]
  return result
