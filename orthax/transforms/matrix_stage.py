"""Matrix stages (:mod:`orthax.matrix_stages`) as optax transforms, the
per-leaf state bookkeeping :func:`orthax.orthogonalize` shares with them, and
:func:`slot_step`: a slot stage run *instead of* Newton–Schulz (ARO's
rotation, FISMO's Fisher step, DCT-AdamW's and Trion's low-rank steps)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from orthax import _tree
from orthax import engine
from orthax import matrices
from orthax import matrix_stages as ms


class NeuronNormalizeState(NamedTuple):
  nu: Any  # per leaf: batch shape + (neurons,), float32 or wider


class StageState(NamedTuple):
  """State of a stateful matrix stage other than NorMuon's."""
  state: Any  # per leaf: batch shape + the stage's per-matrix shape


def init_state(stage: ms.MatrixStage, params: Any,
               specs: Sequence[matrices.MatrixSpec], *, fn: Any = None,
               stages: Sequence[ms.MatrixStage] | None = None,
               **mesh_kw) -> Any:
  """The stage's state for ``params``: zeros per leaf, wrapped; for a slot
  stage an :class:`orthax.engine.SlotState`. ``mesh_kw``: ``distributed``,
  ``plan_kw``, as :func:`orthax.engine.init_slot_state` takes them; a
  per-leaf state is placed where the step returns it when ``stage`` runs
  after ``fn`` in ``stages`` (:func:`orthax.engine.init_stage_states`)."""
  if not stage.stateful:
    return optax.EmptyState()
  paths, leaves, _ = _tree.leaves_with_paths(params)
  if stage.slot_state:
    return engine.init_slot_state(stage, leaves, specs, paths=paths,
                                  **mesh_kw)
  # Per-matrix shapes, not the parameters': no Flax box around them.
  tree = _tree.plain_structure(params).unflatten(engine.init_stage_states(
      stage, leaves, specs, fn=fn, stages=stages, paths=paths, **mesh_kw))
  if isinstance(stage, ms.NeuronNormalize):
    return NeuronNormalizeState(nu=tree)
  return StageState(tree)


def leaf_states(stage: ms.MatrixStage, state: Any, updates: Any) -> Any:
  """Per leaf of ``updates`` (flatten order): the stage's state array, or
  ``None``; for a slot stage, its :class:`~orthax.engine.SlotState` (the
  engine checks its groups)."""
  if not stage.stateful:
    return [None] * len(jax.tree.leaves(updates))
  if stage.slot_state:
    return state
  return _tree.plain_structure(updates).flatten_up_to(state[0])


def with_leaf_states(stage: ms.MatrixStage, state: Any, updates: Any,
                     new: Any) -> Any:
  """``state`` holding ``new`` (as :func:`leaf_states` gives it)."""
  if not stage.stateful:
    return state
  if stage.slot_state:
    return engine.SlotState(dict(new), state.axes, state.members,
                            state.ids)
  return type(state)(_tree.plain_structure(updates).unflatten(list(new)))


def stage_transform(stage: ms.MatrixStage, matrix_specs: _tree.SpecsLike,
                    where: str) -> optax.GradientTransformation:
  """``stage`` applied to every matrix of the update, as a transform."""
  ms.check_stage(stage, where)

  def init_fn(params):
    return init_state(stage, params,
                      _tree.resolve_specs(matrix_specs, params, where))

  def update_fn(updates, state, params=None):
    del params
    specs = _tree.resolve_specs(matrix_specs, updates, where)
    paths, leaves, treedef = _tree.leaves_with_paths(updates)
    res = engine.map_matrices(
        None, leaves, specs, stages=[stage],
        states=[leaf_states(stage, state, updates)], paths=paths)
    return (jax.tree.unflatten(treedef, res.leaves),
            with_leaf_states(stage, state, updates, res.states[0]))

  return optax.GradientTransformation(init_fn, update_fn)


class SlotStepState(NamedTuple):
  """State of :func:`slot_step`: the number of steps done and the stage's
  :class:`orthax.engine.SlotState` (on a mesh: on the owner devices)."""
  count: jax.Array
  slots: Any


def _no_newton_schulz(m, n, dtype):
  """The plan's Newton–Schulz FLOPs when none runs outside the stage: 0 (the
  stage declares its own, :meth:`~orthax.matrix_stages.MatrixStage.flops`)."""
  del m, n, dtype
  return 0


SLOT_STEP_PLAN = {'matrix_flops': _no_newton_schulz}


def slot_step(make_stage: Callable[[Any], ms.MatrixStage],
              matrix_specs: _tree.SpecsLike, distributed: Any, where: str,
              then: Sequence[ms.MatrixStage] = ()
              ) -> optax.GradientTransformation:
  """``make_stage(t)`` (``t``: this step, from 1; a traced count) run on
  every matrix of the update in place of Newton–Schulz
  (``engine.map_matrices(None, ...)``), its state in slots: per group of
  same-shape matrices, on the device that owns them when ``distributed``
  is given; then the stateless stages ``then`` (a shape scale) in the same
  pass. The update is the stages' stack; ``where`` names the owner in
  errors.

  Args:
    make_stage: ``t -> MatrixStage``, the slot stage of step ``t`` (``init``
      calls it with 0 for the state's shapes, which must not depend on
      ``t``).
    matrix_specs: as :func:`orthax.orthogonalize` takes them.
    distributed: an :class:`orthax.sharding.Distributed` (slots on the
      devices that own their matrices), or ``None``.
    where: the owner's name in errors (e.g. ``'aro_rotate'``).
    then: stateless stages run after it in the same pass (a stateful one
      raises ``ValueError``); default none.

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> from orthax import matrix_stages as ms
    >>> tx = orthax.transforms.slot_step(
    ...     lambda t: ms.AroRotate(), None, None, 'example',
    ...     then=[ms.ScaleByShape('keller')])
    >>> params = {'w': jnp.ones((4, 8))}
    >>> u, state = tx.update({'w': jnp.eye(4, 8)}, tx.init(params))
    >>> u['w'].shape, int(state.count)
    ((4, 8), 1)
  """
  then = tuple(then)
  for st in (make_stage(0),) + then:
    ms.check_stage(st, where)
  for st in then:
    if st.stateful:
      raise ValueError(f'{where}: the stages after the slot step must be '
                       f'stateless; {st.name!r} keeps a state.')

  def init_fn(params):
    if not jax.tree.leaves(params):
      # No matrices (or optax.tree.map_params' placeholder): one array
      # leaf, a prefix of any state it is matched against.
      return SlotStepState(jnp.zeros([], jnp.int32), jnp.zeros((0,)))
    specs = _tree.resolve_specs(matrix_specs, params, where)
    return SlotStepState(
        jnp.zeros([], jnp.int32),
        init_state(make_stage(0), params, specs, distributed=distributed,
                   plan_kw=SLOT_STEP_PLAN))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    if not jax.tree.leaves(updates):
      return updates, SlotStepState(count, state.slots)
    specs = _tree.resolve_specs(matrix_specs, updates, where)
    st = make_stage(count)
    paths, leaves, treedef = _tree.leaves_with_paths(updates)
    res = engine.map_matrices(
        None, leaves, specs, stages=(st, *then),
        states=[leaf_states(st, state.slots, updates)]
        + [[None] * len(leaves) for _ in then],
        distributed=distributed, paths=paths, plan_kw=SLOT_STEP_PLAN)
    return (jax.tree.unflatten(treedef, res.leaves),
            SlotStepState(count, with_leaf_states(st, state.slots, updates,
                                                  res.states[0])))

  return optax.GradientTransformation(init_fn, update_fn)
