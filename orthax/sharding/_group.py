"""Running one group of a plan: the body a ``jax.shard_map`` runs per group
(on one device, without a mesh, the same body runs directly).

Inside the body every array is the device's local block, seen in the leaf's
own ``PartitionSpec``. The body turns the group's leaves into one wide stack,
hands it to the strategy's body (:mod:`orthax.sharding._bodies`), which moves
the matrices, runs the stack function and calls back :func:`_post` on the
whole matrices a device ends up with, and turns the stack back into leaves.

Stage states come in two layouts:

* **per leaf** (``batch + per-matrix``, the leaf's batch sharding): sliced
  to the device's matrices in the body and gathered back in one
  ``all_gather`` per group (``a2a``, ``replicated``);
* **slots** (a stage whose :class:`~orthax.matrix_stages.StageShapes` says
  ``slots=True``): one ``[D, k, *state]`` array per group, ``D`` the mesh's
  devices and ``k`` the matrices a device owns after the move, sharded over
  every mesh axis, so each device holds exactly its own matrices' state: it
  enters the body as it is and leaves it as it is, never gathered.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from orthax import matrices
from orthax import matrix_stages as MS
from orthax.sharding._bodies import BODIES
from orthax.sharding._bodies import piece_norms
from orthax.sharding._bodies import NSFn
from orthax.sharding._plan_types import GroupPlan


@dataclasses.dataclass(frozen=True)
class Roles:
  """What each stage of a group does (indices into the stages)."""
  fi: int
  fo: int
  t0: bool                 # the group's matrices are transposed to be wide
  blocks: MS.Blocks
  live: tuple[int, ...]    # stateful, per-leaf layout
  slots: tuple[int, ...]   # stateful, slot layout
  emit: tuple[int, ...]    # with an output
  scaling: tuple[int, ...]
  moving: tuple[int, ...]  # per-leaf states that go through the body
  norms: tuple[tuple[int, str, tuple[int, ...]], ...]  # (j, source, axes)

  @property
  def with_aux(self) -> bool:
    return any(src == 'aux' for _, src, _ in self.norms)

  def swap(self, a):
    return jnp.swapaxes(a, -1, -2) if self.t0 else a


def slot_count(g: GroupPlan) -> int:
  """``k``: the matrices of group ``g`` one device owns after the move.

  Args:
    g: a :class:`GroupPlan`: ``padded / shards`` under ``a2a`` and
      ``replicated``, ``local_count`` under ``local`` and ``gram``.
  """
  if g.strategy in ('a2a', 'replicated'):
    return g.padded // g.shards
  return g.local_count


def check_slot_stage(st: MS.MatrixStage, fi: int, fo: int) -> None:
  sh = st.shapes(fi, fo)
  if sh.slots and (sh.state is None or sh.output is not None
                   or isinstance(st, MS.ScalingStage)):
    raise ValueError(
        f'matrix stage {st.name!r}: slots=True is for a stateful stage '
        'without an output, not a ScalingStage.')
  if isinstance(sh.state, Mapping) and not sh.slots:
    raise ValueError(f'matrix stage {st.name!r}: a state of several arrays '
                     '(a dict of shapes) needs slots=True.')


def roles(g: GroupPlan, stages: Sequence[MS.MatrixStage]) -> Roles:
  """The :class:`Roles` of ``stages`` on group ``g``."""
  if stages and len(set(g.transposed)) > 1:
    raise ValueError(f'group of {g.paths}: matrix stages need one '
                     'orientation per group (plan with the same stages=).')
  t0 = g.transposed[0]
  fi, fo = (g.n, g.m) if t0 else (g.m, g.n)
  blocks = MS.Blocks(fi, fo)
  if g.strategy == 'gram':
    blocks = MS.Blocks(fi, fo, -2 if t0 else -1,
                       lambda a: jax.lax.psum(a, g.split_axes))
  for st in stages:
    check_slot_stage(st, fi, fo)
  slots = tuple(j for j, st in enumerate(stages) if st.shapes(fi, fo).slots)
  if slots and g.strategy == 'gram':
    raise ValueError(
        f'group of {g.paths}: matrix stage {stages[slots[0]].name!r} keeps '
        "its state in slots, which needs whole matrices per device; 'gram' "
        "holds column blocks (use 'a2a' for these leaves: "
        "Distributed(overrides=...)).")
  live = tuple(j for j, st in enumerate(stages)
               if st.stateful and j not in slots)
  scaling = tuple(j for j, st in enumerate(stages)
                  if isinstance(st, MS.ScalingStage))
  flip = {-2: -1, -1: -2}
  norms = tuple((j, nm.source, tuple(sorted(flip[a] if t0 else a
                                            for a in nm.axes)))
                for j, st in enumerate(stages)
                for nm in MS.check_norms(st, fi, fo))
  return Roles(fi, fo, t0, blocks, live, slots,
               tuple(j for j, st in enumerate(stages) if st.has_output),
               scaling, tuple(j for j in live if j not in scaling), norms)


def lift_arrays(stages):
  """The JAX arrays among the stages' pytree children (traced
  hyperparameters: NAMO's learning rate and step count, values under
  ``optax.inject_hyperparams``), which enter the ``shard_map`` body as
  replicated arguments (closing over them fails on Explicit meshes), and
  ``rebuild(values)``: the stages holding ``values`` in their place."""
  leaves, treedef = jax.tree.flatten(tuple(stages))
  at = [i for i, v in enumerate(leaves) if isinstance(v, jax.Array)]

  def rebuild(values):
    new = list(leaves)
    for i, v in zip(at, values):
      new[i] = v
    return jax.tree.unflatten(treedef, new)

  return [leaves[i] for i in at], rebuild


def _post(r: Roles, stages, y, mine, owned):
  """The stages on whole matrices ``y`` (wide): ``mine`` holds the device's
  rows of the moving states, then of the scaling factors, ``owned`` the
  slot states; returns ``y``, the rows to gather back (moving states, their
  outputs) and the new slot states."""
  if not stages:
    return y, mine, owned
  full, factors = [None] * len(stages), [None] * len(stages)
  for j, s in zip(r.moving + r.scaling, mine):
    (full if j in r.moving else factors)[j] = s
  for j, s in zip(r.slots, owned):
    full[j] = s
  o, new, outs = MS.apply_stages(stages, r.swap(y), full, r.blocks,
                                 factors=factors)
  gathered = ([new[j] for j in r.moving]
              + [outs[j] for j in r.emit if j not in r.scaling])
  return r.swap(o), gathered, [new[j] for j in r.slots]


def _scale_all(r: Roles, stages, sstacks, whole):
  """Each scaling stage's factor, new state and output for the whole local
  stack, from the whole matrices' norms (stage orientation)."""
  per = [[] for _ in stages]
  for (j, _, _), v in zip(r.norms, whole):
    per[j].append(r.swap(v))
  return {j: stages[j].scale(sstacks[r.live.index(j)] if j in r.live
                             else None, per[j], r.blocks)
          for j in r.scaling}


def _mats_of(g: GroupPlan, locs, mspecs):
  out = []
  for x, ms, t in zip(locs, mspecs, g.transposed):
    mt = matrices.to_matrices(x, ms)
    out.append(jnp.swapaxes(mt, -1, -2) if t else mt)
  return out


def _cat(parts):
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def _leaves_back(g: GroupPlan, y, new, locs, mspecs, mats):
  """The stack ``y`` and the ``[N, ...]`` slot stacks ``new`` split back
  into leaves (``batch + per-matrix`` for the slots)."""
  outs, snew, start = [], [[] for _ in new], 0
  for x, ms, t, mt in zip(locs, mspecs, g.transposed, mats):
    cnt = mt.shape[0]
    part = y[start:start + cnt] if len(locs) > 1 else y
    part = jnp.swapaxes(part, -1, -2) if t else part
    outs.append(matrices.from_matrices(part, ms, x.shape).astype(x.dtype))
    bshape = tuple(x.shape[d] for d in ms.resolve(x.shape)[0])
    for c, stack in enumerate(new):
      piece = stack[start:start + cnt]
      snew[c].append(piece.reshape(bshape + piece.shape[1:]))
    start += cnt
  return outs, snew


@dataclasses.dataclass(frozen=True)
class _Args:
  """How the body's flat argument list is laid out."""
  nx: int
  naux: int
  ninputs: int
  nlive: int
  nslots: int
  nscalars: int
  nfn: int

  def split(self, args):
    """``(leaves, aux, inputs, per-leaf states, slot states, scalars,
    fn_args)``."""
    cuts = [self.nx, self.naux, self.ninputs, self.nlive * self.nx,
            self.nslots, self.nscalars, self.nfn]
    out, start = [], 0
    for c in cuts:
      out.append(tuple(args[start:start + c]))
      start += c
    return out


def make_body(g: GroupPlan, r: Roles, stages, mspecs, ns_fn: NSFn,
              layout: _Args, rebuild):
  """The body: the group's local leaves (and states) in, the mapped leaves,
  the per-leaf states and outputs and the slot states out."""
  def body(*args):
    locs, alocs, ilocs, slocs, owned, scalars, fargs = layout.split(args)
    here = rebuild(scalars)
    stack_fn = BODIES[g.strategy](g, lambda x, **kw: ns_fn(x, *fargs, **kw))
    mats = _mats_of(g, locs, mspecs)
    srcs = {'input': _mats_of(g, ilocs, mspecs) if ilocs else mats,
            'aux': _mats_of(g, alocs, mspecs)}
    # Norms, leaf by leaf (the auxiliary matrices are never stacked), taken
    # scale-safely: of whole matrices directly; of pieces, sums of squares
    # made whole per strategy, then the root (piece_norms).
    if g.strategy in ('local', 'replicated'):
      whole = [_cat([MS.root_norm(m, wax) for m in srcs[src]])
               for _, src, wax in r.norms]
    else:
      whole = piece_norms(g, [(srcs[src], wax) for _, src, wax in r.norms])
    sstacks = []
    for c, j in enumerate(r.live):
      nd = len(stages[j].shapes(r.fi, r.fo).state)
      sstacks.append(_cat([s.reshape((mt.shape[0],) + s.shape[s.ndim - nd:])
                           for s, mt in zip(slocs[c * layout.nx:
                                                  (c + 1) * layout.nx],
                                            mats)]))
    scaled = _scale_all(r, here, sstacks, whole)
    y, moved, owned_new = stack_fn(
        _cat(mats), [sstacks[r.live.index(j)] for j in r.moving]
        + [scaled[j][0] for j in r.scaling],
        [jax.tree.map(lambda a: a[0], o) for o in owned],
        lambda y_, mine, own: _post(r, here, y_, mine, own))
    states = dict(zip(r.moving, moved))
    outs = dict(zip([j for j in r.emit if j not in r.scaling],
                    moved[len(r.moving):]))
    new = ([scaled[j][1] if j in r.scaling else states[j] for j in r.live]
           + [scaled[j][2] if j in r.scaling else outs[j] for j in r.emit])
    leaves, snew = _leaves_back(g, y, new, locs, mspecs, mats)
    return (tuple(leaves) + tuple(s for per in snew for s in per)
            + tuple(jax.tree.map(lambda a: a[None], o) for o in owned_new))

  return body


def run_group(g: GroupPlan, xs: Sequence[jax.Array],
              mspecs: Sequence[matrices.MatrixSpec], pspecs: Sequence[P],
              mesh, ns_fn: NSFn,
              stages: Sequence[MS.MatrixStage] = (),
              states: Sequence[Any] | None = None,
              aux: Sequence[jax.Array] | None = None,
              fn_args: Sequence[jax.Array] = (), *, state_spec=None,
              constrain=None, inputs: Sequence[jax.Array] | None = None):
  """Runs ``ns_fn`` and then the matrix ``stages`` on the group's leaves in
  one body: under ``jax.shard_map`` on ``mesh``, or directly when ``mesh``
  is ``None`` (one device: the trivial plan).

  Args:
    g: the :class:`GroupPlan`.
    xs: the group's leaves (global arrays), in ``g.leaves`` order.
    mspecs, pspecs: their :class:`~orthax.MatrixSpec`\\ s and
      ``PartitionSpec``\\ s.
    mesh: the mesh, or ``None``.
    ns_fn: ``stack[k, m, n] -> stack`` (wide); under ``gram`` it takes the
      keywords ``col_reduce`` and ``col_shards``.
    stages: the :class:`~orthax.matrix_stages.MatrixStage`\\ s, in order.
    states: ``states[j]``: stage ``j``'s state, per leaf (a list of ``batch
      + per-matrix`` arrays) or, for a slot stage, the group's ``[D, k,
      *state]`` array (or dict of them); ``None`` for a stateless stage.
    aux: the group's leaves of the auxiliary tree, when a stage needs
      ``'aux'`` norms (only their norms are taken, on each device's pieces).
    fn_args: arrays ``ns_fn`` takes after the stack, passed replicated.
    state_spec: ``(j, i, shape) -> PartitionSpec`` of stage ``j``'s
      per-leaf state (or output) of leaf ``i``; with a ``mesh`` only.
    constrain: ``(x, spec) -> x`` placed on the mesh (:func:`place`); with
      a ``mesh`` only.
    inputs: the leaves whose norms ``Norm('input', ...)`` takes, when not
      ``xs`` (shapes and shardings of ``xs``).

  Returns:
    The leaves (in their shardings), the new states (as ``states``) and the
    stages' outputs (per leaf; ``None`` for a stage without).
  """
  stages, fn_args, nx = tuple(stages), tuple(fn_args), len(xs)
  r = roles(g, stages)
  if r.with_aux and aux is None:
    raise ValueError(f'group of {g.paths}: a matrix stage needs norms of the '
                     "auxiliary tree ('aux'), but none was passed.")
  states = [None] * len(stages) if states is None else list(states)
  scalars, rebuild = lift_arrays(stages)
  by_input = inputs is not None and any(src == 'input'
                                        for _, src, _ in r.norms)
  layout = _Args(nx, nx if r.with_aux else 0, nx if by_input else 0,
                 len(r.live), len(r.slots), len(scalars), len(fn_args))
  body = make_body(g, r, stages, mspecs, ns_fn, layout, rebuild)
  leaf_args = (tuple(xs) + (tuple(aux) if r.with_aux else ())
               + (tuple(inputs) if by_input else ()))
  sargs = tuple(states[j][i] for j in r.live for i in range(nx))
  slot_args = tuple(states[j] for j in r.slots)
  rep_args = tuple(scalars) + fn_args
  if mesh is None:
    out = body(*leaf_args, *sargs, *slot_args, *rep_args)
  else:
    specs = tuple(pspecs)
    shape = lambda j: stages[j].shapes(r.fi, r.fo)
    sspecs = tuple(state_spec(j, i, shape(j).state)
                   for j in r.live for i in range(nx))
    ospecs = tuple(state_spec(j, i, shape(j).output)
                   for j in r.emit for i in range(nx))
    owner = (P(tuple(mesh.axis_names)),) * len(r.slots)
    # States travel in the layout the body expects (a no-op when they
    # already have it): replicated per-matrix parts, except gram's blocks;
    # slot states sharded over every mesh axis.
    out = jax.shard_map(
        body, mesh=mesh,
        in_specs=(specs + specs[:layout.naux] + specs[:layout.ninputs]
                  + sspecs + owner
                  + (P(),) * len(rep_args)),
        out_specs=specs + sspecs + ospecs + owner, check_vma=False)(
            *leaf_args, *[constrain(a, sp) for a, sp in zip(sargs, sspecs)],
            *[jax.tree.map(lambda a, sp=sp: constrain(a, sp), x)
              for x, sp in zip(slot_args, owner)],
            *[constrain(jnp.asarray(a), P()) for a in rep_args])
  return _unpack(r, stages, out, nx)


def _unpack(r: Roles, stages, out, nx):
  """The body's flat outputs as ``(leaves, states, outputs)``."""
  ys = list(out[:nx])
  per_slot = [list(out[nx + c * nx:nx + (c + 1) * nx])
              for c in range(len(r.live) + len(r.emit))]
  new_states = [None] * len(stages)
  outputs = [[None] * nx for _ in stages]
  for c, j in enumerate(r.live):
    new_states[j] = per_slot[c]
  for c, j in enumerate(r.emit):
    outputs[j] = per_slot[len(r.live) + c]
  owned = out[nx + nx * (len(r.live) + len(r.emit)):]
  for j, o in zip(r.slots, owned):
    new_states[j] = o
  for j, st in enumerate(stages):
    if new_states[j] is None and not st.stateful:
      new_states[j] = [None] * nx
  return ys, new_states, outputs
