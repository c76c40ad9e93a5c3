"""The parts every recipe shares: routing, the AdamW branch, the partition
and the finiteness check.

Every recipe is ``optax.partition({'matrix': named_chain(...), 'adam':
adamw(...), 'frozen': set_to_zero()}, labels)``, optionally preceded by a
finiteness check, so ``opt_state`` entries are addressable by name
(``optax.tree.get(state, 'orthogonalize')``). A recipe writes its matrix
chain and its AdamW hyperparameters; :func:`route` and
:func:`assemble_with_adamw` write the rest.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from orthax import routing
from orthax import transforms as T
from orthax.transforms import precision

RouterLike = routing.Router | Callable[[Any], Any]


def ndim2_labels(params):
  """optax.contrib.muon's rule: 2-D leaves are matrices, the rest Adam."""
  return jax.tree.map(lambda x: 'matrix' if x.ndim == 2 else 'adam', params)


def matrix_specs(router: RouterLike) -> Any:
  """The matrix views of ``router``: ``router.specs`` for a
  :class:`orthax.Router`, ``None`` (the default views) for a labels
  callable."""
  return router.specs if isinstance(router, routing.Router) else None


def route(router: RouterLike | None,
          default: RouterLike | None = None) -> tuple[RouterLike, Any]:
  """``(router, matrix_specs)``: ``router``, or ``default`` when it is
  ``None`` (itself defaulting to ``orthax.Router()``), and its matrix views
  (:func:`matrix_specs`)."""
  if router is None:
    router = routing.Router() if default is None else default
  return router, matrix_specs(router)


def step_stages(learning_rate: optax.ScalarOrSchedule, weight_decay: Any,
                **kwargs) -> list[tuple[str, optax.GradientTransformation]]:
  """The closing stages of a matrix chain: ``('scale_by_learning_rate',
  ...)`` then ``('weight_decay', decoupled_weight_decay(weight_decay,
  learning_rate=learning_rate, **kwargs))``."""
  return [
      # Not named 'learning_rate': that name is optax.inject_hyperparams'
      # own, and optax.tree.get(state, 'learning_rate') must find it
      # unambiguously.
      ('scale_by_learning_rate', optax.scale_by_learning_rate(learning_rate)),
      ('weight_decay', T.decoupled_weight_decay(
          weight_decay, learning_rate=learning_rate, **kwargs)),
  ]


def adamw_branch(learning_rate: optax.ScalarOrSchedule,
                 adam_learning_rate: optax.ScalarOrSchedule | None,
                 **kwargs) -> optax.GradientTransformation:
  """The recipes' AdamW branch (:func:`orthax.transforms.adamw`) at
  ``adam_learning_rate``, or at the matrices' ``learning_rate`` when that is
  ``None``; ``kwargs`` go to :func:`orthax.transforms.adamw`."""
  return T.adamw(
      learning_rate if adam_learning_rate is None else adam_learning_rate,
      **kwargs)


def with_check_finite(tx: optax.GradientTransformation, check_finite: bool
                      ) -> optax.GradientTransformation:
  """``tx`` wrapped by :func:`orthax.transforms.skip_if_nonfinite` if
  ``check_finite``: a step whose gradient holds NaN/Inf is skipped on
  device and the state says which leaves (``orthax.nonfinite_leaves``)."""
  if not check_finite:
    return tx
  return T.skip_if_nonfinite(tx)


def with_shape_check(tx: optax.GradientTransformation
                     ) -> optax.GradientTransformationExtraArgs:
  """``tx`` whose ``update`` first checks the gradient against the
  parameters (:func:`orthax.transforms.check_shapes`: a ``ValueError``
  naming the leaf and both shapes), with ``tx``'s state unchanged."""
  check = T.check_shapes()

  def update_fn(updates, state, params=None, **extra_args):
    check.update(updates, optax.EmptyState(), params)
    return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def assemble(
    matrix_chain: optax.GradientTransformation,
    adam: optax.GradientTransformation,
    router: RouterLike,
    check_finite: bool,
    branches: dict[str, optax.GradientTransformation] | None = None,
) -> optax.GradientTransformation:
  """Partitions params by ``router`` into the matrix and AdamW branches
  (and any extra ``branches``, keyed by the labels ``router`` gives); the
  gradient's shapes are checked against the parameters' first
  (:func:`with_shape_check`), then its finiteness (``check_finite``)."""
  labels = router.labels if isinstance(router, routing.Router) else router
  tx = optax.partition(
      {'matrix': matrix_chain, 'adam': adam, 'frozen': optax.set_to_zero(),
       **(branches or {})},
      labels)
  return with_shape_check(with_check_finite(tx, check_finite))


def assemble_with_adamw(
    matrix_chain: optax.GradientTransformation,
    router: RouterLike,
    check_finite: bool,
    *,
    learning_rate: optax.ScalarOrSchedule,
    adam_learning_rate: optax.ScalarOrSchedule | None,
    branches: dict[str, optax.GradientTransformation] | None = None,
    **adam_kwargs,
) -> optax.GradientTransformation:
  """The shared tail of a recipe: :func:`assemble` with the AdamW branch
  :func:`adamw_branch` ``(learning_rate, adam_learning_rate,
  **adam_kwargs)``. Every branch computes in float32 for float16/bfloat16
  parameters (:func:`orthax.transforms.precision.in_float32`; the AdamW
  branch does so itself) and returns updates in the gradients' dtype."""
  adam = adamw_branch(learning_rate, adam_learning_rate, **adam_kwargs)
  branches = {k: precision.in_float32(v) for k, v in (branches or {}).items()}
  return assemble(precision.in_float32(matrix_chain), adam, router,
                  check_finite, branches)
