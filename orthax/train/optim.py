"""Optimizer for the trainer: a registered orthax recipe or plain AdamW, with
one learning-rate schedule shape shared by every branch.

Every branch (the orthogonalized matrices, the AdamW branch of a recipe, a
SPECTRA base step) follows the same warm-up + decay curve scaled to its own
peak learning rate:

.. math::
   η_b(t) = η_b^{peak} \\cdot s(t),\\qquad
   s(t) = \\begin{cases} t / T_w & t < T_w \\\\
          f + (1-f)\\,d\\big((t-T_w)/(T-T_w)\\big) & t \\ge T_w \\end{cases}

with ``d`` the cosine ``(1+\\cos πx)/2``, linear ``1-x`` or constant ``1``
decay and ``f`` the final fraction.

:func:`plan` prints the distributed Newton–Schulz plan of an ``optimizer``
config (the config form of :func:`orthax.sharding.plan`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from typing import Any, Callable, Mapping

import optax

import orthax
from orthax import sharding

SCHEDULES = ('cosine', 'linear', 'constant')
BASELINES = ('adamw',)


def schedule_shape(total_steps: int, *, kind: str = 'cosine',
                   warmup_steps: int = 0,
                   final_fraction: float = 0.1) -> Callable[[Any], Any]:
  """``s(t)`` above: 0 → 1 over ``warmup_steps``, then decays to
  ``final_fraction`` at ``total_steps``."""
  if kind not in SCHEDULES:
    raise ValueError(f'schedule.kind must be one of {SCHEDULES}, got '
                     f'{kind!r}.')
  if not 0 <= warmup_steps < max(total_steps, 1):
    raise ValueError(f'schedule.warmup_steps={warmup_steps} must be in '
                     f'[0, train.steps={total_steps}).')
  if not 0.0 <= final_fraction <= 1.0:
    raise ValueError('schedule.final_fraction must be in [0, 1], got '
                     f'{final_fraction}.')
  decay_steps = max(total_steps - warmup_steps, 1)
  if kind == 'cosine':
    decay = optax.cosine_decay_schedule(1.0, decay_steps, final_fraction)
  elif kind == 'linear':
    decay = optax.linear_schedule(1.0, final_fraction, decay_steps)
  else:
    decay = optax.constant_schedule(1.0)
  if warmup_steps == 0:
    return decay
  warm = optax.linear_schedule(0.0, 1.0, warmup_steps)
  return optax.join_schedules([warm, decay], [warmup_steps])


@dataclasses.dataclass(frozen=True)
class PeakSchedule:
  """``η_b(t) = peak · shape(t)``: one branch's schedule."""
  shape: Callable[[Any], Any]
  peak: float

  def __call__(self, step):
    return self.peak * self.shape(step)


# Keys of the ``optimizer`` section; any other keyword of the optimizer goes
# in ``optimizer.kwargs``.
SECTION_KEYS = ('name', 'learning_rate', 'adam_learning_rate', 'weight_decay',
                'adam_weight_decay', 'kwargs')
ADAMW_KEYWORDS = ('b1', 'b2', 'eps')
# Recipe keywords the trainer sets itself (from the section keys, the
# schedule and the mesh), so ``optimizer.kwargs`` may not.
_SET_BY_TRAINER = ('learning_rate', 'adam_learning_rate', 'weight_decay',
                   'adam_weight_decay', 'distributed')


def keywords(name: str) -> tuple[str, ...]:
  """The keywords ``optimizer.kwargs`` may set for optimizer ``name``."""
  if name in BASELINES:
    return ADAMW_KEYWORDS
  if name not in orthax.recipe_names():
    raise ValueError(f'optimizer.name={name!r} is neither a baseline '
                     f'{BASELINES} nor a registered recipe '
                     f'{orthax.recipe_names()}.')
  params = inspect.signature(orthax.recipe_factory(name)).parameters
  return tuple(k for k in params if k not in _SET_BY_TRAINER)


def validate(opt_config: Mapping[str, Any]) -> None:
  """Raises ``ValueError`` naming the key (``optimizer.<key>`` or
  ``optimizer.kwargs.<key>``), the optimizer and what it accepts, for an
  unknown name, section key or keyword."""
  cfg = dict(opt_config)
  name = cfg.get('name')
  accepted = keywords(name)
  what = 'adamw' if name in BASELINES else f'recipe {name!r} (orthax.{name})'
  unknown = sorted(set(cfg) - set(SECTION_KEYS))
  if unknown:
    moved = [k for k in unknown if k in accepted]
    hint = (f' ({", ".join(moved)}: a keyword of {what}; set it as '
            f'optimizer.kwargs.{moved[0]})' if moved else '')
    raise ValueError(
        f'unknown optimizer key(s) '
        f'{", ".join("optimizer." + k for k in unknown)}{hint}. The section '
        f'has {list(SECTION_KEYS)}; keywords of {what} go in '
        f'optimizer.kwargs: {list(accepted)}.')
  for key in ('learning_rate', 'adam_learning_rate', 'weight_decay',
              'adam_weight_decay'):
    _check_rate(f'optimizer.{key}', cfg.get(key),
                optional=key != 'learning_rate')
  kwargs = dict(cfg.get('kwargs') or {})
  managed = sorted(set(kwargs) & set(_SET_BY_TRAINER))
  if managed:
    raise ValueError(
        f'{", ".join("optimizer.kwargs." + k for k in managed)}: set by the '
        'trainer; use optimizer.learning_rate, adam_learning_rate, '
        'weight_decay, adam_weight_decay (distributed comes from the mesh).')
  bad = sorted(set(kwargs) - set(accepted))
  if bad:
    raise ValueError(
        f'{", ".join("optimizer.kwargs." + k for k in bad)}: not a keyword '
        f'of {what}; it accepts {list(accepted)}.')
  if 'check_finite' in kwargs and not kwargs['check_finite']:
    raise ValueError(
        'optimizer.kwargs.check_finite=False: the trainer needs the '
        "optimizer's non-finite guard (train.nonfinite acts on its flags; "
        'without it a NaN step is applied, and checkpointed over the good '
        'ones); remove the keyword.')


def _check_rate(key: str, value: Any, optional: bool) -> None:
  """A peak rate or decay: a finite number ``>= 0`` (``None`` where the
  optimizer has a default). A negative rate would train uphill without a
  word: the recipes check a number, not the trainer's schedule."""
  if value is None and optional:
    return
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not math.isfinite(value) or value < 0):
    raise ValueError(f'{key} must be a finite number >= 0'
                     + (' or None' if optional else '') + f', got {value!r}.')


def _make(factory: Callable[..., optax.GradientTransformation],
          kwargs: Mapping[str, Any]) -> optax.GradientTransformation:
  """``factory(**kwargs)``; the recipe's ``TypeError`` for a value of the
  wrong kind (a string from the command line where a number is needed,
  naming the argument) becomes a ``ValueError`` naming the section."""
  try:
    return factory(**kwargs)
  except TypeError as e:
    raise ValueError(f'optimizer.kwargs: {e}') from e


def check_mode_rate(name: str, learning_rate: float,
                    kwargs: Mapping[str, Any],
                    adam_learning_rate: float | None = None) -> None:
  """Raises ``ValueError`` when a rate of the ``optimizer`` section is
  recipe ``name``'s registered default but ``kwargs`` pick a mode with
  another default: a ``reference=`` mode runs at its reference's rates
  (e.g. Moonlight's 1e-3 on both branches against the library's 0.05656 and
  3e-3), and DCT-AdamW's 1.5 per unit of the matrix side is 176× too large
  for its unscaled step. Checked: ``learning_rate`` (the message names the
  mode's matrix and AdamW-branch rates), then, for a mode with its
  reference's rates, ``adam_learning_rate`` against the mode's at
  ``learning_rate``."""
  params = inspect.signature(orthax.recipe_factory(name)).parameters
  param = params.get('learning_rate')
  if param is None or param.default is not None or not kwargs:
    return
  entry = orthax.recipes.recipe_entry(name)
  rates = orthax.recipes.recipe_routing(
      _make(orthax.recipe_factory(name), kwargs)).learning_rates
  own = rates['matrix']
  has_adam = 'adam_learning_rate' in params
  if learning_rate == entry.learning_rate and own != entry.learning_rate:
    adam_flag = (f' --config.optimizer.adam_learning_rate={rates["adam"]:g}'
                 if has_adam else '')
    raise ValueError(
        f'optimizer.learning_rate={learning_rate:g} is {name}\'s default for '
        f'its default mode; with optimizer.kwargs {dict(kwargs)} its default '
        f'is {own:g}' + (f' (AdamW branch {rates["adam"]:g})' if has_adam
                         else '') +
        f': set optimizer.learning_rate (e.g. '
        f'--config.optimizer.learning_rate={own:g}{adam_flag}).')
  reference = kwargs.get('reference')
  if (not has_adam or adam_learning_rate != entry.adam_learning_rate
      or entry.mode_rates.get(entry.aliases.get(reference, reference)) is None):
    return
  mode_adam = orthax.recipes.recipe_routing(_make(
      orthax.recipe_factory(name),
      {**kwargs, 'learning_rate': learning_rate})).learning_rates['adam']
  if mode_adam != adam_learning_rate:
    raise ValueError(
        f'optimizer.adam_learning_rate={adam_learning_rate:g} is {name}\'s '
        f'default for its default mode; with optimizer.kwargs {dict(kwargs)} '
        f'at learning_rate {learning_rate:g} its AdamW branch\'s default is '
        f'{mode_adam:g}: set optimizer.adam_learning_rate (e.g. '
        f'--config.optimizer.adam_learning_rate={mode_adam:g}).')


def build(opt_config: Mapping[str, Any], shape: Callable[[Any], Any], *,
          distributed: Any = None
          ) -> tuple[optax.GradientTransformation, dict[str, Callable]]:
  """``(tx, {branch: lr schedule})`` from the ``optimizer`` config.

  ``opt_config`` keys: ``name`` (a registered recipe or ``'adamw'``),
  ``learning_rate`` (peak of the main branch), ``adam_learning_rate``
  (peak of a recipe's AdamW branch; ``None``: the recipe's default for the
  main peak, :func:`orthax.recipes.resolve_adam_learning_rate`),
  ``weight_decay``, ``adam_weight_decay`` (``None``: recipe default) and
  ``kwargs`` (any other keyword of the recipe; see :func:`keywords`).
  ``distributed`` (an :class:`orthax.Distributed`) goes to recipes that
  accept it. Each schedule is a :class:`PeakSchedule` (its ``peak`` is the
  branch's peak learning rate).
  """
  validate(opt_config)
  cfg = dict(opt_config)
  name = cfg.get('name')
  lr = float(cfg['learning_rate'])
  kwargs = dict(cfg.get('kwargs') or {})
  if name == 'adamw':
    sched = PeakSchedule(shape, lr)
    tx = optax.adamw(sched, b1=kwargs.pop('b1', 0.9),
                     b2=kwargs.pop('b2', 0.95), eps=kwargs.pop('eps', 1e-8),
                     weight_decay=float(cfg.get('weight_decay') or 0.0))
    # The guard every recipe has, so train.nonfinite applies alike.
    return orthax.skip_if_nonfinite(tx), {'adam': sched}
  factory = orthax.recipe_factory(name)
  accepted = inspect.signature(factory).parameters
  check_mode_rate(name, lr, kwargs, cfg.get('adam_learning_rate'))
  sched = PeakSchedule(shape, lr)
  kwargs['learning_rate'] = sched
  for key in ('weight_decay', 'adam_weight_decay'):
    if cfg.get(key) is not None and key in accepted:
      kwargs[key] = float(cfg[key])
  branches = {'matrix' if 'adam_learning_rate' in accepted else 'base': sched}
  if 'adam_learning_rate' in accepted:
    adam_lr = cfg.get('adam_learning_rate')
    if adam_lr is None:  # the recipe's own default for this peak
      adam_lr = orthax.recipes.recipe_routing(_make(
          factory, {**kwargs, 'learning_rate': lr})).learning_rates['adam']
    adam_sched = PeakSchedule(shape, float(adam_lr))
    kwargs['adam_learning_rate'] = adam_sched
    branches['adam'] = adam_sched
  if distributed is not None and 'distributed' in accepted:
    kwargs['distributed'] = distributed
  return _make(factory, kwargs), branches


def weight_decays(opt_config: Mapping[str, Any], tx: Any,
                  branches: Mapping[str, Any]) -> dict[str, float]:
  """Each branch's weight decay λ, keyed as :func:`build`'s ``branches``:
  ``opt_config``'s for ``'adamw'``, else what the recipe ``tx`` reports
  (:func:`orthax.recipes.recipe_routing`; a recipe without an AdamW branch
  reports its one rate's branch as ``'base'``)."""
  if opt_config.get('name') == 'adamw':
    return {'adam': float(opt_config.get('weight_decay') or 0.0)}
  info = orthax.recipes.recipe_routing(tx)
  if info is None:
    raise ValueError(
        f'optimizer {opt_config.get("name")!r}: the built transformation '
        'reports no branch weight decays (not an orthax recipe).')
  return {b: float(info.weight_decays['matrix' if b == 'base' else b])
          for b in branches}


def plan(opt_config: Mapping[str, Any], abstract_params: Any,
         distributed: sharding.Distributed) -> sharding.Plan:
  """The :func:`orthax.sharding.plan` of the optimizer an ``optimizer``
  config builds with ``distributed=``; ``print`` it.

  The recipe is built from the config as :func:`build` reads it, with the
  values as given (no schedule): top-level ``None`` values and keys the
  recipe does not take are dropped, ``kwargs`` go to the recipe.

  Example:

  >>> import jax, jax.numpy as jnp
  >>> from jax.sharding import AbstractMesh, PartitionSpec as P
  >>> from orthax import sharding
  >>> from orthax.train import optim
  >>> params = {'w': jax.ShapeDtypeStruct((64, 128), jnp.float32)}
  >>> dist = sharding.Distributed(AbstractMesh((8,), ('fsdp',)),
  ...                             {'w': P('fsdp', None)})
  >>> p = optim.plan({'name': 'normuon', 'learning_rate': 0.02}, params, dist)
  >>> [g.strategy for g in p.groups]
  ['a2a']

  Args:
    opt_config: ``{'name': recipe, 'learning_rate': ..., 'kwargs': {...},
      ...}``.
    abstract_params: the parameters (``jax.ShapeDtypeStruct``\\ s or arrays).
    distributed: the :class:`orthax.sharding.Distributed`.

  Returns:
    The :class:`orthax.sharding.Plan`.

  Raises:
    ValueError: the config has no ``name``, or names no registered recipe.
    orthax.sharding.NotDistributedError: the recipe (or ``'adamw'``) has no
      distributed orthogonalization.
  """
  return sharding.plan(_distributed_recipe(opt_config, distributed),
                       abstract_params)


def _distributed_recipe(opt_config: Mapping[str, Any], distributed: Any
                        ) -> optax.GradientTransformation:
  cfg = {k: v for k, v in opt_config.items() if v is not None}
  if 'name' not in cfg:
    raise ValueError('orthax.train.optim.plan: the optimizer config has no '
                     f"'name' (keys: {sorted(opt_config)}).")
  name = cfg.pop('name')
  kwargs = dict(cfg.pop('kwargs', None) or {})
  accepted = ({} if name in BASELINES
              else inspect.signature(orthax.recipe_factory(name)).parameters)
  if 'distributed' not in accepted:
    raise sharding.NotDistributedError(
        f'orthax.train.optim.plan: optimizer {name!r} has no distributed '
        'orthogonalization (no distributed=).')
  keywords = {k: v for k, v in cfg.items() if k in accepted}
  return orthax.recipe(name, **{**keywords, **kwargs},
                       distributed=distributed)
