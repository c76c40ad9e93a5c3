"""Matrix stages (:mod:`orthax.matrix_stages`) as optax transforms, and the
per-leaf state bookkeeping :func:`orthax.orthogonalize` shares with them."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from orthax import _tree
from orthax import matrices
from orthax import matrix_stages as ms


class NeuronNormalizeState(NamedTuple):
  nu: Any  # per leaf: batch shape + (neurons,), float32 or wider


class StageState(NamedTuple):
  """State of a stateful matrix stage other than NorMuon's."""
  state: Any  # per leaf: batch shape + the stage's per-matrix shape


def leaf_batch_shape(shape: Sequence[int],
                     spec: matrices.MatrixSpec) -> tuple[int, ...]:
  """The sizes of the leaf's batch axes (the matrices' stack shape)."""
  return tuple(shape[a] for a in spec.resolve(shape)[0])


def leaf_state_shape(stage: ms.MatrixStage, shape: Sequence[int],
                     spec: matrices.MatrixSpec) -> tuple[int, ...] | None:
  """Batch shape of the leaf + the stage's per-matrix state shape."""
  _, fi, fo = spec.matrix_shape(shape)
  s = stage.state_shape(fi, fo)
  return None if s is None else leaf_batch_shape(shape, spec) + tuple(s)


def init_state(stage: ms.MatrixStage, params: Any,
               specs: Sequence[matrices.MatrixSpec]) -> Any:
  """The stage's state for ``params``: zeros per leaf, wrapped."""
  if not stage.stateful:
    return optax.EmptyState()
  leaves, treedef = jax.tree.flatten(params)
  tree = jax.tree.unflatten(treedef, [
      jnp.zeros(leaf_state_shape(stage, x.shape, s), ms.wide(x.dtype))
      for x, s in zip(leaves, specs)])
  if isinstance(stage, ms.NeuronNormalize):
    return NeuronNormalizeState(nu=tree)
  return StageState(tree)


def leaf_states(stage: ms.MatrixStage, state: Any, treedef) -> list[Any]:
  """Per leaf (flatten order): the stage's state array, or ``None``."""
  if not stage.stateful:
    return [None] * treedef.num_leaves
  return treedef.flatten_up_to(state[0])


def with_leaf_states(stage: ms.MatrixStage, state: Any, treedef,
                     new: Sequence[Any]) -> Any:
  if not stage.stateful:
    return state
  return type(state)(jax.tree.unflatten(treedef, list(new)))


def apply_to_matrices(stages: Sequence[ms.MatrixStage], o: jax.Array,
                      states: Sequence[Any], fan_in: int, fan_out: int, *,
                      sources: dict[str, jax.Array | None] | None = None,
                      batch_shape: Sequence[int] | None = None
                      ) -> tuple[jax.Array, list[Any], list[Any]]:
  """Runs ``stages`` on one leaf's ``[b, fan_in, fan_out]`` view; each state
  is the leaf's ``batch + per-matrix`` array (or ``None``) and comes back in
  that shape. ``sources``: the ``[b, fan_in, fan_out]`` matrices the stages'
  norms are taken of (``'input'``, ``'aux'``; see
  :func:`orthax.matrix_stages.stage_norms`), needed when a stage has any.
  Returns the stack, the states and the stages' outputs (``batch_shape +
  per-matrix``, default ``(b,) + per-matrix``; ``None`` where a stage has
  none)."""
  flat = [None if s is None else
          s.reshape((o.shape[0],) + tuple(st.state_shape(fan_in, fan_out)))
          for st, s in zip(stages, states)]
  norms = ms.stage_norms(stages, sources or {}, fan_in, fan_out)
  o, new, outs = ms.apply_stages(stages, o, flat, ms.Blocks(fan_in, fan_out),
                                 norms)
  batch = (o.shape[0],) if batch_shape is None else tuple(batch_shape)
  return (o,
          [None if s is None else n.reshape(s.shape)
           for s, n in zip(states, new)],
          [None if x is None else
           x.reshape(batch + tuple(st.output_shape(fan_in, fan_out)))
           for st, x in zip(stages, outs)])


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
    outs, news = [], []
    for x, s, spec in zip(leaves, leaf_states(stage, state, treedef), specs):
      _, fi, fo = spec.matrix_shape(x.shape)
      o, (n,), _ = apply_to_matrices(
          [stage], matrices.to_matrices(x, spec), [s], fi, fo)
      outs.append(matrices.from_matrices(o, spec, x.shape).astype(x.dtype))
      news.append(n)
    return (jax.tree.unflatten(treedef, outs),
            with_leaf_states(stage, state, treedef, news))

  return optax.GradientTransformation(init_fn, update_fn)
