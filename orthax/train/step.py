"""The jitted train and eval steps over a mesh.

State is a :class:`TrainState` of plain pytrees (step counter, parameters as
a nested dict, optax state). Parameters carry the shardings of their logical
axes; every optimizer-state leaf that mirrors a parameter (same path suffix,
same shape) carries that parameter's sharding, the rest is replicated — so
the optimizer state keeps the parameter layout
(:func:`orthax.flax.state_specs`).

.. math::
   \\mathcal{L}(θ) = \\frac{1}{BT}\\sum_{b,t} -\\log\\mathrm{softmax}(f_θ(x_b)_t)_{y_{b,t}}
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orthax
from orthax import flax as orthax_flax
from orthax.flax import state_specs  # re-export
from orthax.train import model as model_lib
from orthax.train import partitioning


class TrainState(NamedTuple):
  step: jax.Array
  params: Any
  opt_state: Any


def state_shardings(tx: optax.GradientTransformation, abstract_params: Any,
                    specs: Any, mesh) -> TrainState:
  """``NamedSharding``\\ s of the whole :class:`TrainState` (the optimizer
  state's from :func:`orthax.flax.state_shardings`)."""
  return TrainState(
      step=NamedSharding(mesh, P()),
      params=partitioning.shardings(specs, mesh),
      opt_state=orthax_flax.state_shardings(tx, abstract_params, specs, mesh))


def loss_fn(graphdef, abstract_state, params, batch, mesh=None
            ) -> jax.Array:
  """Mean next-token cross-entropy of one batch (traced under ``mesh`` so
  the model can pin its activations' batch sharding)."""
  with model_lib.activation_mesh(mesh):
    logits = model_lib.apply(graphdef, abstract_state, params,
                             batch['inputs'])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch['targets']).mean()


def _norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree.leaves(tree)))


def make_steps(graphdef, abstract_state, tx: optax.GradientTransformation,
               shardings: TrainState, mesh
               ) -> tuple[Callable, Callable, Callable]:
  """``(init, train_step, eval_step)``, jitted with the given shardings.

  ``init(params) -> TrainState``; ``train_step(state, batch) -> (state,
  metrics)`` (donates ``state``); ``eval_step(params, batch) -> loss``.

  When the optimizer has orthax's non-finite guard
  (:func:`orthax.skip_if_nonfinite`, in every recipe by default), the
  metrics also hold ``skipped`` (1 when this step was skipped),
  ``skipped_total`` and, under ``'nonfinite'``, the guard's state without
  its inner state (per-leaf flags for :func:`orthax.nonfinite_leaves`).
  """
  batch_sh = {'inputs': partitioning.batch_sharding(mesh),
              'targets': partitioning.batch_sharding(mesh)}
  scalar = NamedSharding(mesh, P())

  def init(params):
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

  def train_step(state: TrainState, batch):
    loss, grads = jax.value_and_grad(
        lambda p: loss_fn(graphdef, abstract_state, p, batch, mesh))(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, 'grad_norm': _norm(grads),
               'update_norm': _norm(updates)}
    status = orthax.nonfinite_status(opt_state)
    if status is not None:
      metrics.update(skipped=(status.consecutive > 0).astype(jnp.int32),
                     skipped_total=status.total,
                     nonfinite=status._replace(inner_state=None))
    return TrainState(state.step + 1, params, opt_state), metrics

  def eval_step(params, batch):
    return loss_fn(graphdef, abstract_state, params, batch, mesh)

  init_j = jax.jit(init, in_shardings=(shardings.params,),
                   out_shardings=shardings)
  train_j = jax.jit(train_step, in_shardings=(shardings, batch_sh),
                    out_shardings=(shardings, scalar), donate_argnums=(0,))
  eval_j = jax.jit(eval_step, in_shardings=(shardings.params, batch_sh),
                   out_shardings=scalar)
  return init_j, train_j, eval_j
