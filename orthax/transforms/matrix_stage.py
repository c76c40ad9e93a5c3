"""Matrix stages (:mod:`orthax.matrix_stages`) as optax transforms, and the
per-leaf state bookkeeping :func:`orthax.orthogonalize` shares with them."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
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
               specs: Sequence[matrices.MatrixSpec], **slot_kw) -> Any:
  """The stage's state for ``params``: zeros per leaf, wrapped; for a slot
  stage an :class:`orthax.engine.SlotState` (``slot_kw``: ``distributed``,
  ``plan_kw``, as :func:`orthax.engine.init_slot_state` takes them)."""
  if not stage.stateful:
    return optax.EmptyState()
  paths, leaves, treedef = _tree.leaves_with_paths(params)
  if stage.slot_state:
    return engine.init_slot_state(stage, leaves, specs, paths=paths,
                                  **slot_kw)
  tree = jax.tree.unflatten(treedef,
                            engine.init_stage_states(stage, leaves, specs))
  if isinstance(stage, ms.NeuronNormalize):
    return NeuronNormalizeState(nu=tree)
  return StageState(tree)


def leaf_states(stage: ms.MatrixStage, state: Any, treedef) -> Any:
  """Per leaf (flatten order): the stage's state array, or ``None``; for a
  slot stage, its groups' arrays (a dict)."""
  if not stage.stateful:
    return [None] * treedef.num_leaves
  if stage.slot_state:
    return dict(state.slots)
  return treedef.flatten_up_to(state[0])


def with_leaf_states(stage: ms.MatrixStage, state: Any, treedef,
                     new: Any) -> Any:
  """``state`` holding ``new`` (as :func:`leaf_states` gives it)."""
  if not stage.stateful:
    return state
  if stage.slot_state:
    return engine.SlotState(dict(new), state.axes)
  return type(state)(jax.tree.unflatten(treedef, list(new)))


def stage_transform(stage: ms.MatrixStage, matrix_specs: _tree.SpecsLike,
                    where: str) -> optax.GradientTransformation:
  """``stage`` applied to every matrix of the update, as a transform."""

  def init_fn(params):
    return init_state(stage, params,
                      _tree.resolve_specs(matrix_specs, params, where))

  def update_fn(updates, state, params=None):
    del params
    specs = _tree.resolve_specs(matrix_specs, updates, where)
    leaves, treedef = jax.tree.flatten(updates)
    res = engine.map_matrices(
        None, leaves, specs, stages=[stage],
        states=[leaf_states(stage, state, treedef)])
    return (jax.tree.unflatten(treedef, res.leaves),
            with_leaf_states(stage, state, treedef, res.states[0]))

  return optax.GradientTransformation(init_fn, update_fn)
