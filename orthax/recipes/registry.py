"""The recipe registry: each recipe's factory, ``reference=`` modes and the
trainer's default learning rates.

A recipe registers itself with :func:`register`; ``orthax.recipe(name)``,
the trainer (``orthax.train``) and ``orthax.sharding.plan`` find it here.
The parts every recipe shares (routing, AdamW branch, partition, finiteness
check) are in :mod:`orthax.recipes._common` (``orthax.recipes.assemble``).
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import types
import typing
from typing import Callable, Mapping, NamedTuple, TypeVar

import optax


Factory = Callable[..., optax.GradientTransformation]

# Every recipe with ``reference=`` modes has this one: the arithmetic of one
# of its references (or orthax's own) at the learning rates the sweep chose.
LIBRARY_MODE = 'orthax'


class ModeRates(NamedTuple):
  """A ``reference=`` mode's own default learning rates: the ones its
  reference code trains with, so that the mode equals it in everything.

  Attributes:
    learning_rate: the matrix branch's (or the base optimizer's) rate.
    adam_learning_rate: the AdamW branch's rate at ``learning_rate``
      (``None``: as the mode's scale resolves it); with another
      ``learning_rate`` it moves in proportion.
    source: where the rates come from (file and commit, or paper).
  """
  learning_rate: float
  adam_learning_rate: float | None = None
  source: str = ''


@dataclasses.dataclass(frozen=True)
class RecipeEntry:
  """What the registry holds for one recipe.

  Attributes:
    name: the registered name (``orthax.recipe(name, ...)``).
    factory: the function that builds the optimizer.
    references: the canonical ``reference=`` modes (empty: the recipe takes
      no ``reference``).
    aliases: other accepted spellings of modes, ``{alias: canonical}``
      (older names kept working).
    learning_rate: the trainer's default peak learning rate of the main
      branch (``orthax.train.configs.optimizer``); ``None``: none known.
    adam_learning_rate: the trainer's default peak learning rate of the
      AdamW branch; ``None``: the main branch's (or no AdamW branch). Its
      ratio to ``learning_rate`` is also the recipe's default AdamW rate per
      unit of the matrix rate (:attr:`adam_rate_ratio`).
    mode_rates: the default rates of the ``reference=`` modes that have
      their reference's own (:class:`ModeRates`); the library mode
      (:data:`LIBRARY_MODE`) and a mode without published rates run at
      ``learning_rate``.
  """
  name: str
  factory: Factory
  references: tuple[str, ...] = ()
  aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
  learning_rate: float | None = None
  adam_learning_rate: float | None = None
  mode_rates: Mapping[str, ModeRates] = dataclasses.field(
      default_factory=dict)

  def __post_init__(self):
    object.__setattr__(self, 'references', tuple(self.references))
    object.__setattr__(self, 'aliases',
                       types.MappingProxyType(dict(self.aliases)))
    object.__setattr__(self, 'mode_rates', types.MappingProxyType(
        {k: ModeRates(*v) for k, v in self.mode_rates.items()}))
    stray = sorted(set(self.mode_rates) - set(self.references))
    if stray or LIBRARY_MODE in self.mode_rates:
      raise ValueError(
          f'register: mode_rates {stray or [LIBRARY_MODE]} of recipe '
          f'{self.name!r} must name its reference modes {self.references}, '
          f'not the library mode {LIBRARY_MODE!r} (that one runs at '
          'learning_rate).')
    for alias, canonical in self.aliases.items():
      if canonical not in self.references or alias in self.references:
        raise ValueError(
            f'register: aliases of recipe {self.name!r} must each name one '
            f'of the modes {self.references} and not be one: alias '
            f'{alias!r} -> {canonical!r}.')

  @property
  def adam_rate_ratio(self) -> float | None:
    """``adam_learning_rate / learning_rate`` (``None`` unless both are
    registered): the AdamW branch's default rate per unit of the matrix
    rate (:func:`orthax.recipes.resolve_adam_learning_rate`)."""
    if self.learning_rate and self.adam_learning_rate is not None:
      return self.adam_learning_rate / self.learning_rate
    return None

  def mode_learning_rate(self, reference: str) -> float | None:
    """The default learning rate of mode ``reference`` (a mode or an
    alias): its reference's own if registered, else :attr:`learning_rate`.

    Raises:
      ValueError: for a mode the recipe does not have.
    """
    rates = self.mode_rates.get(self.resolve_reference(reference))
    return self.learning_rate if rates is None else rates.learning_rate

  def mode_adam_rate_ratio(self, reference: str | None) -> float | None:
    """The AdamW branch's default rate per unit of the matrix rate in mode
    ``reference``: its reference's ratio where it registers an AdamW rate,
    else ``None`` (the recipe resolves it from its scale,
    :func:`orthax.recipes.resolve_adam_learning_rate`); ``None`` also for
    ``reference=None`` or a mode the recipe does not have."""
    rates = self.mode_rates.get(self.aliases.get(reference, reference))
    if rates is None or rates.adam_learning_rate is None:
      return None
    return rates.adam_learning_rate / rates.learning_rate

  def resolve_reference(self, reference: str) -> str:
    """The canonical spelling of ``reference`` (a mode or an alias).

    Raises:
      ValueError: naming the recipe, ``reference`` and the accepted modes.
    """
    if isinstance(reference, str):  # a list or a dict is named below
      if reference in self.references:
        return reference
      if reference in self.aliases:
        return self.aliases[reference]
    aliases = ''.join(f', {a!r} for {c!r}' for a, c in self.aliases.items())
    note = f' (aliases: {aliases[2:]})' if aliases else ''
    raise ValueError(f'{self.name}: reference must be one of '
                     f'{self.references}{note}, got {reference!r}.')


_REGISTRY: dict[str, RecipeEntry] = {}


def _factory_learning_rate(fn: Factory) -> float | None:
  """The numeric default of ``fn``'s ``learning_rate`` argument, if any."""
  try:
    param = inspect.signature(fn).parameters.get('learning_rate')
  except (TypeError, ValueError):
    return None
  default = None if param is None else param.default
  if isinstance(default, numbers.Real) and not isinstance(default, bool):
    return float(default)
  return None


_F = TypeVar('_F', bound=Callable[..., optax.GradientTransformation])


def register(name: str, references: tuple[str, ...] = (), *,
             aliases: Mapping[str, str] | None = None,
             learning_rate: float | None = None,
             adam_learning_rate: float | None = None,
             mode_rates: Mapping[str, ModeRates | tuple] | None = None
             ) -> Callable[[_F], _F]:
  """Decorator adding a recipe factory to the registry as ``name``.

  Args:
    name: the recipe's name (replaces an earlier registration).
    references: its canonical ``reference=`` modes.
    aliases: other spellings of modes, ``{alias: canonical}``.
    learning_rate: the trainer's default peak learning rate (default: the
      factory's ``learning_rate`` default, if it is a number).
    adam_learning_rate: the trainer's default peak learning rate of the
      AdamW branch (default ``None``: the main one).
    mode_rates: ``{mode: ModeRates(...)}``, the reference modes' own
      default rates (:class:`RecipeEntry`).

  Returns:
    A decorator registering its argument and returning it unchanged.
  """
  def deco(fn: _F) -> _F:
    _resolve_annotations(fn)
    lr = _factory_learning_rate(fn) if learning_rate is None else learning_rate
    _REGISTRY[name] = RecipeEntry(
        name, fn, tuple(references), aliases or {}, lr, adam_learning_rate,
        mode_rates or {})
    return fn
  return deco


def _resolve_annotations(fn: Factory) -> None:
  """Gives ``fn`` its signature with evaluated annotations (under ``from
  __future__ import annotations`` they are strings), so that tools that read
  ``inspect.signature`` see e.g. ``learning_rate: optax.ScalarOrSchedule``
  (optax's contract tests pass schedules only to such factories).

  A ``learning_rate: optax.ScalarOrSchedule | None = None`` (the mode's
  rate by default; ``| None`` for type checkers) is read there as
  ``optax.ScalarOrSchedule`` with its default ``None``: optax's harness
  compares the annotation itself, and would skip its schedule check."""
  try:
    sig = inspect.signature(fn, eval_str=True)
  except (NameError, TypeError, SyntaxError):
    return  # an annotation that does not evaluate here stays a string
  lr = sig.parameters.get('learning_rate')
  optional = {*typing.get_args(optax.ScalarOrSchedule), type(None)}
  if lr is not None and set(typing.get_args(lr.annotation)) == optional:
    sig = sig.replace(parameters=[
        p.replace(annotation=optax.ScalarOrSchedule) if p is lr else p
        for p in sig.parameters.values()])
  fn.__signature__ = sig


def unregister(name: str) -> RecipeEntry:
  """Removes recipe ``name`` from the registry and returns its entry."""
  entry = recipe_entry(name, owner='unregister')
  del _REGISTRY[name]
  return entry


def recipe_names() -> tuple[str, ...]:
  """Names accepted by :func:`recipe`."""
  return tuple(sorted(_REGISTRY))


def recipe_entry(name: str, *, owner: str = 'recipe_entry') -> RecipeEntry:
  """The :class:`RecipeEntry` registered as ``name``; for another name a
  ``ValueError`` naming ``owner`` (the function the user called) and the
  registered recipes."""
  if name not in _REGISTRY:
    raise ValueError(f'{owner}: name must be a registered recipe, one of '
                     f'{", ".join(recipe_names())}; got {name!r}.')
  return _REGISTRY[name]


def recipe_factory(name: str) -> Factory:
  """The factory registered as ``name`` (e.g. to wrap it in
  ``optax.inject_hyperparams``).

  Args:
    name: a registered recipe name (:func:`recipe_names`), e.g.
      ``'muon'``; another is a ``ValueError`` listing them.

  Example:
    >>> import orthax
    >>> orthax.recipe_factory('muon') is orthax.muon
    True
  """
  return recipe_entry(name, owner='recipe_factory').factory


def recipe_references(name: str) -> tuple[str, ...]:
  """The canonical ``reference=`` modes recipe ``name`` accepts (may be
  empty; aliases are in :func:`recipe_entry`).

  Args:
    name: a registered recipe name (:func:`recipe_names`); another is a
      ``ValueError`` listing them.

  Example:
    >>> import orthax
    >>> orthax.recipe_references('normuon')
    ('orthax', 'repo', 'paper', 'modded')
  """
  return recipe_entry(name, owner='recipe_references').references


def resolve_reference(name: str, reference: str) -> str:
  """The canonical spelling of recipe ``name``'s mode ``reference``.

  Raises:
    ValueError: naming the recipe, ``reference`` and the accepted modes.
  """
  return recipe_entry(name, owner='resolve_reference').resolve_reference(
      reference)


def default_learning_rates(name: str) -> tuple[float | None, float | None]:
  """``(learning_rate, adam_learning_rate)``: recipe ``name``'s default
  peak learning rates in the trainer (see :class:`RecipeEntry`)."""
  entry = recipe_entry(name, owner='default_learning_rates')
  return entry.learning_rate, entry.adam_learning_rate


def resolve_mode(name: str, reference: str,
                 learning_rate: optax.ScalarOrSchedule | None
                 ) -> tuple[str, optax.ScalarOrSchedule]:
  """``(mode, learning_rate)``: the canonical spelling of recipe ``name``'s
  mode ``reference`` (an alias resolved), and ``learning_rate`` or, where it
  is ``None``, that mode's default rate (:class:`RecipeEntry`).

  Raises:
    ValueError: naming the recipe, ``reference`` and the accepted modes.
  """
  entry = recipe_entry(name, owner='resolve_mode')
  mode = entry.resolve_reference(reference)
  if learning_rate is None:
    learning_rate = entry.mode_learning_rate(mode)
  return mode, learning_rate


def recipe(name: str, **kwargs) -> optax.GradientTransformation:
  """Builds the recipe ``name`` with keyword arguments ``kwargs``.

  Args:
    name: a registered recipe name (:func:`recipe_names`), e.g.
      ``'muon'``; another is a ``ValueError`` listing them.
    **kwargs: the factory's keyword arguments (``learning_rate``,
      ``reference``, ...), passed through unchanged.

  Example:
    >>> import jax, jax.numpy as jnp, orthax
    >>> params = {'w': jnp.ones((8, 16)), 'b': jnp.zeros(16)}
    >>> tx = orthax.recipe('muon', learning_rate=0.02)  # orthax.muon(...)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> updates['w'].shape
    (8, 16)
  """
  return recipe_entry(name, owner='recipe').factory(**kwargs)
