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

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from orthax import _tree
from orthax import _validate
from orthax import routing
from orthax.recipes import registry
from orthax.recipes._route import CheckedLabels
from orthax.recipes._route import RouterLike
from orthax.recipes._route import check_router  # pylint: disable=unused-import
from orthax.recipes._route import matrix_specs  # pylint: disable=unused-import
from orthax.recipes._route import ndim2_labels  # pylint: disable=unused-import
from orthax.recipes._route import route  # pylint: disable=unused-import
from orthax import transforms as T
from orthax.transforms import precision


def mode_settings(defaults: dict[str, Any], **given: Any) -> tuple[Any, ...]:
  """Each keyword argument's value, or where it is ``None`` the mode's
  default of the same name in ``defaults``, in the keywords' order:
  ``nesterov, scale = mode_settings(d, nesterov=nesterov, scale=scale)``.
  Every keyword must name a setting of ``defaults`` (a misspelling raises
  even where its value is given)."""
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise KeyError(f'mode_settings: {unknown} are not among the mode\'s '
                   f'settings {sorted(defaults)}.')
  return tuple(defaults[k] if v is None else v for k, v in given.items())


# A mode's ``adam_weight_decay`` that is the matrices' ``weight_decay``
# (Moonlight's AdamW, dion's ARO, NAMO's repository).
SHARED_DECAY = 'weight_decay'


def adam_weight_decay(given: float | None, defaults: dict[str, Any],
                      weight_decay: float) -> float:
  """The AdamW branch's λ: ``given``, or where it is ``None`` the mode's
  ``defaults['adam_weight_decay']``, a number or :data:`SHARED_DECAY` (the
  matrices' resolved ``weight_decay``)."""
  if given is not None:
    return given
  mode = defaults['adam_weight_decay']
  return weight_decay if mode == SHARED_DECAY else mode


def step_stages(learning_rate: optax.ScalarOrSchedule, weight_decay: Any,
                **kwargs) -> list[tuple[str, optax.GradientTransformation]]:
  """The closing stages of a matrix chain: ``('scale_by_learning_rate',
  ...)`` then ``('decoupled_weight_decay', decoupled_weight_decay(
  weight_decay, learning_rate=learning_rate, **kwargs))``."""
  return [
      # Not named 'learning_rate' or 'weight_decay': those are hyperparameter
      # names, and under optax.inject_hyperparams optax.tree_utils.tree_get
      # and tree_set(state, weight_decay=...) must find the injected value
      # alone (a stage of that name was overwritten by the number).
      ('scale_by_learning_rate', optax.scale_by_learning_rate(learning_rate)),
      ('decoupled_weight_decay', T.decoupled_weight_decay(
          weight_decay, learning_rate=learning_rate, **kwargs)),
  ]


# The AdamW branch's default rate per unit of the matrix rate for a recipe
# that registers no ratio of its own (see :func:`resolve_adam_learning_rate`):
# AdamW's usual peak 3e-3 over Keller-scaled Muon's 0.02.
ADAMW_RATE_PER_MATRIX_RATE = 0.15


def adam_rate_ratio(recipe: str | None, reference: str | None = None
                    ) -> float:
  r"""The AdamW branch's default rate per unit of the matrix rate for
  ``recipe``: :math:`k = \eta_{\text{adam}}^{\text{default}} /
  \eta^{\text{default}}`, its registered ``adam_learning_rate /
  learning_rate`` (the rates the learning-rate sweep measured together),
  else :data:`ADAMW_RATE_PER_MATRIX_RATE`. A ``reference`` mode that
  registers its reference's rates (:class:`orthax.recipes.ModeRates`) has
  their ratio instead.

  Example:
    >>> import orthax
    >>> round(orthax.recipes.adam_rate_ratio('muon'), 6)   # 3e-3 / 0.05656
    0.053041
    >>> round(orthax.recipes.adam_rate_ratio('muon', 'keller'), 6)  # 3e-4 / 0.02
    0.015
  """
  if recipe is not None and recipe in registry.recipe_names():
    entry = registry.recipe_entry(recipe)
    for ratio in (entry.mode_adam_rate_ratio(reference),
                  entry.adam_rate_ratio):
      if ratio is not None:
        return ratio
  return ADAMW_RATE_PER_MATRIX_RATE


def resolve_adam_learning_rate(learning_rate: optax.ScalarOrSchedule,
                               adam_learning_rate: optax.ScalarOrSchedule
                               | None, *, rms_matched: bool,
                               recipe: str | None = None,
                               reference: str | None = None
                               ) -> optax.ScalarOrSchedule:
  r"""The AdamW branch's learning rate.

  ``adam_learning_rate`` if given; else the matrices' ``learning_rate``
  when ``rms_matched`` (a mode that scales the matrix update to AdamW's
  update RMS, e.g. Moonlight's ``0.2·√max(m, n)``, so one rate fits both
  branches); else ``learning_rate ×`` :func:`adam_rate_ratio` ``(recipe,
  reference)`` (a ``reference`` mode's own ratio where it registers one):

  .. math::

     \eta_{\text{adam}} = \eta \cdot
       \frac{\eta_{\text{adam}}^{\text{default}}}{\eta^{\text{default}}},

  so that a recipe at its default learning rate runs its AdamW branch at
  the registered AdamW rate (3e-3), and both move together when the
  learning rate does. A schedule is scaled step by step, so it drives both
  branches; so is an array (``optax.inject_hyperparams``).
  """
  if adam_learning_rate is not None:
    return adam_learning_rate
  if rms_matched:
    return learning_rate
  k = adam_rate_ratio(recipe, reference)
  if callable(learning_rate):
    return lambda count: k * learning_rate(count)
  return k * learning_rate


@dataclasses.dataclass(frozen=True)
class RecipeRouting:
  """What :func:`orthax.describe` reads off a recipe: its router, and each
  branch's learning rate (a number or a schedule) and decoupled weight
  decay λ, by label; ``notes``: what :func:`orthax.describe` adds below
  the table (where the step scales those numbers itself)."""
  router: RouterLike
  learning_rates: dict[str, optax.ScalarOrSchedule]
  weight_decays: dict[str, float]
  notes: tuple[str, ...] = ()


_ROUTING_ATTR = 'orthax_recipe_routing'


def recipe_routing(tx: Any) -> RecipeRouting | None:
  """The :class:`RecipeRouting` a recipe attached to ``tx``, or ``None``
  (not a recipe, or wrapped, e.g. by ``optax.inject_hyperparams``)."""
  return getattr(getattr(tx, 'update', None), _ROUTING_ATTR, None)


def with_routing(tx: Any, router: RouterLike,
                 learning_rates: dict[str, optax.ScalarOrSchedule],
                 weight_decays: dict[str, float],
                 notes: tuple[str, ...] = ()) -> Any:
  """``tx`` with its :class:`RecipeRouting` attached (to its ``update``
  function, which :func:`with_shape_check` made for this ``tx`` alone).

  Raises:
    ValueError: a label has a learning rate but no weight decay, or the
      other way round (a recipe that forgot to report one).
  """
  if set(learning_rates) != set(weight_decays):
    raise ValueError(
        f'with_routing: learning_rates labels {sorted(learning_rates)} and '
        f'weight_decays labels {sorted(weight_decays)} differ; give both '
        'for every branch.')
  setattr(tx.update, _ROUTING_ATTR,
          RecipeRouting(router, dict(learning_rates), dict(weight_decays),
                        tuple(notes)))
  return tx


def with_check_finite(tx: optax.GradientTransformation, check_finite: bool,
                      router: RouterLike | None = None
                      ) -> optax.GradientTransformation:
  """``tx`` wrapped by :func:`orthax.transforms.skip_if_nonfinite` if
  ``check_finite``: a step whose gradient holds NaN/Inf is skipped on
  device and the state says which leaves (``orthax.nonfinite_leaves``).
  The gradient of a leaf ``router`` labels ``'frozen'`` is never used, so
  it is not checked: it reaches ``tx`` as zeros (a NaN there, say from a
  frozen embedding's unused row, would otherwise skip every step)."""
  if not check_finite:
    return tx
  guarded = T.skip_if_nonfinite(tx)
  if router is None:
    return guarded
  labels = quiet_labels(router)

  def update_fn(updates, state, params=None, **extra_args):
    return guarded.update(zero_frozen(updates, labels), state, params,
                          **extra_args)

  return optax.GradientTransformationExtraArgs(guarded.init, update_fn)


def quiet_labels(router: RouterLike | Any) -> Any:
  """``router``'s labels without its routing warnings (a second look at a
  tree the partition routes, and warns about, itself): a
  :class:`orthax.Router`'s :meth:`~orthax.Router.quiet_labels`, else
  ``router`` (a labels callable or tree)."""
  return (router.quiet_labels if isinstance(router, routing.Router)
          else router)


def zero_frozen(tree: Any, labels: Callable[[Any], Any]) -> Any:
  """``tree`` with zeros on every leaf ``labels(tree)`` calls
  ``'frozen'``."""
  return jax.tree.map(
      lambda u, label: jnp.zeros_like(u) if label == 'frozen' else u,
      tree, labels(tree))


def with_frozen_zeroed(tx: optax.GradientTransformation, router: RouterLike
                       ) -> optax.GradientTransformationExtraArgs:
  """``tx`` whose step is zero on every leaf ``router`` labels
  ``'frozen'``, with ``tx``'s state: for a recipe without branches
  (SPECTRA), where no ``optax.partition`` sends those leaves to
  ``optax.set_to_zero()``. Their gradient reaches ``tx`` as zeros (it is
  never used; a NaN there is then no reason to skip a step)."""
  labels = quiet_labels(router)

  def update_fn(updates, state, params=None, **extra_args):
    updates, state = tx.update(zero_frozen(updates, labels), state, params,
                               **extra_args)
    return zero_frozen(updates, labels), state

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def with_shape_check(tx: optax.GradientTransformation
                     ) -> optax.GradientTransformationExtraArgs:
  """``tx`` whose ``update`` first checks the gradient against the
  parameters (:func:`orthax.transforms.check_shapes`: a ``ValueError``
  naming the leaf and both shapes), with ``tx``'s state unchanged. Every
  recipe needs the parameters (its weight decay reads them): an ``update``
  without them is a ``ValueError`` saying so, here, for all recipes
  alike."""
  check = T.check_shapes()

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          'orthax recipes need the current parameters at every step (their '
          'weight decay reads them, even at weight_decay=0): call '
          'tx.update(grads, state, params).')
    check.update(updates, optax.EmptyState(), params)
    # A frozen integer leaf's float0 gradient (jax.grad(allow_int=True)) as
    # zeros of the leaf's dtype: its zero update then applies
    # (optax.apply_updates refuses to add a float0 array).
    updates = jax.tree.map(
        lambda u, p: jnp.zeros(u.shape, jnp.result_type(p))
        if getattr(u, 'dtype', None) == jax.dtypes.float0 else u,
        updates, params)
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
  _validate.flag('assemble', 'check_finite', check_finite)
  transforms = {'matrix': matrix_chain, 'adam': adam,
                'frozen': optax.set_to_zero(), **(branches or {})}
  if isinstance(router, CheckedLabels):
    router = dataclasses.replace(router, branches=tuple(transforms))
  labels = router.labels if isinstance(router, routing.Router) else router
  tx = optax.partition(transforms, labels)
  return with_trainable_check(
      with_shape_check(with_check_finite(tx, check_finite, router)), router)


def with_trainable_check(tx: optax.GradientTransformation,
                         router: RouterLike | Any
                         ) -> optax.GradientTransformationExtraArgs:
  """``tx`` whose ``init`` first refuses a leaf that gradient steps cannot
  train where ``router`` does not freeze it (:func:`check_trainable`)."""

  labels = quiet_labels(router)  # (the partition's own labels warn once)

  def init_fn(params):
    check_trainable(params, labels(params) if callable(labels) else labels)
    return tx.init(params)

  return optax.GradientTransformationExtraArgs(
      init_fn, optax.with_extra_args_support(tx).update)


def check_trainable(params: Any, labels: Any) -> None:
  """``ValueError`` naming the first leaf of ``params`` that is not
  floating point (an integer or bool array) and not labelled
  ``'frozen'``: the AdamW branch would return zeros for it, every step,
  silently (the matrix branch refuses such a leaf itself, with the matrix
  step's reason)."""
  paths, leaves, treedef = _tree.leaves_with_paths(params)
  try:
    per_leaf = treedef.flatten_up_to(labels)
  except (ValueError, TypeError):
    return  # not shaped like params: optax.partition says so
  for path, x, label in zip(paths, leaves, per_leaf):
    dtype = getattr(x, 'dtype', None)  # (a Python int or bool: its array's)
    dtype = jnp.result_type(x) if dtype is None else dtype
    pattern = _tree.exact_pattern(path)
    if (label != 'frozen' and jnp.issubdtype(dtype, jnp.floating)
        and float(jnp.finfo(dtype).min) > 0):
      raise ValueError(
          f'leaf {path!r} has dtype {jnp.dtype(dtype).name}, which holds no '
          'zero or negative value: its update would come back as NaN. '
          'Keep a wider dtype for parameters you train, or freeze it: '
          f'router=orthax.Router(extra_rules=[orthax.Rule({pattern!r}, '
          "'frozen')]).")
    if (label in ('frozen', 'matrix')  # (the matrix branch refuses)
        or jnp.issubdtype(dtype, jnp.inexact)):
      continue
    raise ValueError(
        f'leaf {path!r} has dtype {jnp.dtype(dtype).name} and the router '
        f'sends it to {label!r}: it cannot be trained by gradient steps '
        '(its update would be zero every step). Route it to the frozen '
        f'branch: router=orthax.Router(extra_rules=[orthax.Rule('
        f'{pattern!r}, \'frozen\')]), or keep it out of the parameters.')


def assemble_with_adamw(
    matrix_chain: optax.GradientTransformation,
    router: RouterLike,
    check_finite: bool,
    *,
    learning_rate: optax.ScalarOrSchedule,
    adam_learning_rate: optax.ScalarOrSchedule | None,
    rms_matched: bool,
    matrix_weight_decay: float,
    recipe: str | None = None,
    reference: str | None = None,
    branches: dict[str, optax.GradientTransformation] | None = None,
    branch_learning_rates: dict[str, optax.ScalarOrSchedule] | None = None,
    branch_weight_decays: dict[str, float] | None = None,
    notes: tuple[str, ...] = (),
    **adam_kwargs,
) -> optax.GradientTransformation:
  """The shared tail of a recipe: :func:`assemble` with the AdamW branch
  :func:`orthax.transforms.adamw` at :func:`resolve_adam_learning_rate` ``(
  learning_rate, adam_learning_rate, rms_matched=rms_matched, recipe=recipe,
  reference=reference)`` with ``adam_kwargs``. Every branch computes in
  float32 for float16/bfloat16 parameters
  (:func:`orthax.transforms.precision.in_float32`; the AdamW
  branch does so itself) and returns updates in the gradients' dtype. The
  result carries its :class:`RecipeRouting`: ``matrix_weight_decay`` is
  the λ the recipe's ``matrix_chain`` applies (reported, not applied
  here), ``branch_learning_rates`` and ``branch_weight_decays`` those of
  the extra ``branches``, ``notes`` what ``describe`` says under them."""
  adam_lr = resolve_adam_learning_rate(learning_rate, adam_learning_rate,
                                       rms_matched=rms_matched,
                                       recipe=recipe, reference=reference)
  adam = T.adamw(adam_lr, **adam_kwargs)
  branches = {k: precision.in_float32(v) for k, v in (branches or {}).items()}
  if (recipe is not None and isinstance(router, CheckedLabels)
      and router.owner == 'recipe'):  # route() was not told the name
    router = dataclasses.replace(router, owner=recipe)
  tx = assemble(precision.in_float32(matrix_chain), adam, router,
                check_finite, branches)
  return with_routing(tx, router, {
      'matrix': learning_rate, 'adam': adam_lr, 'frozen': 0.0,
      **(branch_learning_rates or {})}, {
          'matrix': matrix_weight_decay,
          'adam': adam_kwargs.get('weight_decay', 0.0), 'frozen': 0.0,
          **(branch_weight_decays or {})}, notes)

