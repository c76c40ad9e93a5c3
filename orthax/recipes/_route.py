"""A recipe's router: an :class:`orthax.Router` or a ``params -> labels``
callable, checked (:func:`check_router`), defaulted and, for a callable,
wrapped so that its labels are checked where they are made
(:class:`CheckedLabels`); :func:`route` does all three."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from orthax import _tree
from orthax import _validate
from orthax import routing

RouterLike = routing.Router | Callable[[Any], Any]


def ndim2_labels(params):
  """optax.contrib.muon's rule: 2-D leaves are matrices, the rest Adam."""
  return jax.tree.map(lambda x: 'matrix' if x.ndim == 2 else 'adam', params)


def matrix_specs(router: RouterLike) -> Any:
  """The matrix views of ``router``: ``router.specs`` for a
  :class:`orthax.Router`, ``None`` (the default views) for a labels
  callable."""
  return router.specs if isinstance(router, routing.Router) else None


def check_router(owner: str, name: str, router: Any, *,
                 optional: bool = False) -> None:
  """The rule of a recipe's ``router``: an :class:`orthax.Router` or a
  ``params -> labels`` callable (``None``: the default, where
  ``optional``)."""
  if optional and router is None:
    return
  if not isinstance(router, routing.Router) and not callable(router):
    hint = ('; under optax.inject_hyperparams a labels callable is called '
            f'as a schedule, with the step count: pass {name} in '
            'static_args' if isinstance(router, (str, jax.Array)) else '')
    raise ValueError(
        f'{owner}: {name} must be an orthax.Router or a params -> labels '
        'callable (e.g. lambda params: jax.tree.map(lambda _: "adam", '
        f'params)), got {router!r}{hint}.')


# Every recipe checks its router with its other arguments
# (_validate.arguments), naming itself.
_validate.register(('router',), check_router)


def route(router: RouterLike | None,
          default: RouterLike | None = None, *,
          owner: str = 'recipe') -> tuple[RouterLike, Any]:
  """``(router, matrix_specs)``: ``router``, or ``default`` when it is
  ``None`` (itself defaulting to ``orthax.Router()``), and its matrix views
  (:func:`matrix_specs`); ``owner`` names the recipe in the error for a
  router that is neither a Router nor a callable."""
  if router is None:
    router = routing.Router() if default is None else default
  check_router(owner, 'router', router)
  if not isinstance(router, (routing.Router, CheckedLabels)):
    router = CheckedLabels(owner, router)
  return router, matrix_specs(router)


@dataclasses.dataclass(frozen=True)
class CheckedLabels:
  """A recipe's ``params -> labels`` router whose labels are checked where
  they are made: one string per leaf of the tree it is given, each a
  branch of the recipe (``branches``, once :func:`assemble` knows them).
  optax's partition said only "different numbers of pytree children" or
  "Some parameters have no corresponding transformation"; this names the
  recipe, the leaf and the label."""

  owner: str
  fn: Callable[[Any], Any]
  branches: tuple[str, ...] | None = None

  def __call__(self, tree: Any) -> Any:
    labels = self.fn(tree)
    try:  # A label may stand for a whole subtree, as in optax.partition.
      labels = jax.tree.map(
          lambda label, sub: jax.tree.map(lambda _: label, sub), labels, tree)
    except (ValueError, TypeError) as e:
      raise ValueError(
          f'{self.owner}: router returned labels not shaped like the '
          f'parameters ({e}); return one label per leaf or subtree, e.g. '
          'jax.tree.map(lambda _: "adam", params).') from None
    paths, per_leaf, _ = _tree.leaves_with_paths(labels)
    for path, label in zip(paths, per_leaf):
      if not isinstance(label, str) or (
          self.branches is not None and label not in self.branches):
        raise ValueError(
            f'{self.owner}: router labelled leaf {path!r} as {label!r}; the '
            f'labels are {self.branches or routing.LABELS}.')
    return labels
