"""The recipe registry and the partition every recipe is built on.

Every recipe is ``optax.partition({'matrix': named_chain(...), 'adam':
adamw(...), 'frozen': set_to_zero()}, labels)``, optionally preceded by a
finiteness check, so ``opt_state`` entries are addressable by name
(``optax.tree.get(state, 'orthogonalize')``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from orthax import routing
from orthax import transforms as T

_REGISTRY: dict[str, Callable[..., optax.GradientTransformation]] = {}
_REFERENCES: dict[str, tuple[str, ...]] = {}


def register(name: str, references: tuple[str, ...] = ()):
  """Decorator adding a recipe factory (and its ``reference=`` modes)."""
  def deco(fn):
    _REGISTRY[name] = fn
    _REFERENCES[name] = tuple(references)
    return fn
  return deco


def recipe_references(name: str) -> tuple[str, ...]:
  """The ``reference=`` modes recipe ``name`` accepts (may be empty)."""
  recipe_factory(name)  # validates the name
  return _REFERENCES[name]


def recipe_names() -> tuple[str, ...]:
  """Names accepted by :func:`recipe`."""
  return tuple(sorted(_REGISTRY))


def recipe_factory(name: str) -> Callable[..., optax.GradientTransformation]:
  """The factory registered as ``name`` (e.g. to wrap it in
  ``optax.inject_hyperparams``)."""
  if name not in _REGISTRY:
    raise ValueError(f'Unknown recipe {name!r}; known recipes: '
                     f'{", ".join(recipe_names())}.')
  return _REGISTRY[name]


def recipe(name: str, **kwargs) -> optax.GradientTransformation:
  """Builds the recipe ``name`` with keyword arguments ``kwargs``."""
  return recipe_factory(name)(**kwargs)


def ndim2_labels(params):
  """optax.contrib.muon's rule: 2-D leaves are matrices, the rest Adam."""
  return jax.tree.map(lambda x: 'matrix' if x.ndim == 2 else 'adam', params)


def assemble(
    matrix_chain: optax.GradientTransformation,
    adam: optax.GradientTransformation,
    router: routing.Router | Callable[[Any], Any],
    check_finite: bool,
    branches: dict[str, optax.GradientTransformation] | None = None,
) -> optax.GradientTransformation:
  """Partitions params by ``router`` into the matrix and AdamW branches
  (and any extra ``branches``, keyed by the labels ``router`` gives)."""
  labels = router.labels if isinstance(router, routing.Router) else router
  tx = optax.partition(
      {'matrix': matrix_chain, 'adam': adam, 'frozen': optax.set_to_zero(),
       **(branches or {})},
      labels)
  if check_finite:
    return optax.named_chain(('check_finite', T.check_finite()),
                             ('partition', tx))
  return tx


