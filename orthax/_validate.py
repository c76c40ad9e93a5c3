"""Hyperparameter checks at construction, shared by every recipe and
transform.

Each check takes ``owner`` (the recipe or transform the user called), the
argument's name and its value, and raises ``TypeError`` for a value of the
wrong kind (a string, ``None`` where a number is needed, a float step count)
or ``ValueError`` for one out of range, naming both::

  TypeError: muon: learning_rate must be a number, a scalar array or a
  schedule (callable), got None
  ValueError: muon: learning_rate must be >= 0, got -0.1

What cannot be known at construction is not checked: jax tracers (the
hyperparameters ``optax.inject_hyperparams`` passes under ``jit``) and, for
learning rates, schedules. Concrete jax and numpy scalars (``jnp.float32(0.1)``
or what ``inject_hyperparams`` passes to ``init``) are checked like numbers;
an array of any other shape is a ``ValueError`` (it would broadcast against
the updates: a learning rate of shape ``(1, 1)`` turns a bias's ``(4,)``
update into ``(1, 4)``). NaN is always rejected; so is infinity.

A recipe or transform checks its arguments with one call at its top,
``_validate.arguments('muon', muon, locals())``: each argument named in
:data:`RULES` is checked by its rule, ``None`` being accepted exactly where
the signature's default is ``None`` (it then means "the default"). Names
whose meaning differs in one place are overridden there (``eps=...``).
"""

from __future__ import annotations

import functools
import inspect
import numbers
import sys
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Rule = Callable[..., None]

_NUMBER = 'a number or a scalar array'
_SCHEDULE = 'a number, a scalar array or a schedule (callable)'


def _show(value: Any, arr: np.ndarray | None = None) -> str:
  if arr is not None and arr.ndim == 0:
    return str(arr[()])
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + '...'


def _concrete(owner: str, name: str, value: Any, kind: str = _NUMBER,
              integer: bool = False) -> np.ndarray | None:
  """``value`` as a 0-d numpy array, or ``None`` when it cannot be known now
  (a tracer). Raises ``TypeError`` for anything that is not a real number or
  a real-valued array (``integer``: an integer or an integer array), and
  ``ValueError`` for an array that is not a scalar."""
  if isinstance(value, jax.core.Tracer):
    return None
  ok = (isinstance(value, (numbers.Real, np.ndarray, jax.Array, np.generic))
        and not isinstance(value, (bool, np.bool_)))
  arr = None
  if ok:
    try:
      arr = np.asarray(value)
    except Exception:  # pylint: disable=broad-except
      return None  # e.g. an array not addressable from this process
    kinds = (jnp.integer,) if integer else (jnp.integer, jnp.floating)
    ok = any(jnp.issubdtype(arr.dtype, k) for k in kinds)  # incl. bfloat16
  if not ok:
    what = 'an integer' if integer else kind
    raise TypeError(f'{owner}: {name} must be {what}, got {_show(value)}')
  if arr.ndim:
    raise ValueError(f'{owner}: {name} must be a scalar, got an array of '
                     f'shape {arr.shape}')
  if not np.all(np.isfinite(arr)):
    raise ValueError(f'{owner}: {name} must be finite, got '
                     f'{_show(value, arr)}')
  return arr


def _check(owner, name, value, ok, bound, arr):
  if not np.all(ok(arr)):
    narrow = (jnp.issubdtype(arr.dtype, jnp.floating)
              and arr.dtype.itemsize < 4)
    raise ValueError(
        f'{owner}: {name} must be {bound}, got {_show(value, arr)}'
        + (f' (a {arr.dtype.name} value: optax.inject_hyperparams casts '
           "hyperparameters to the parameters' dtype; give it "
           'hyperparam_dtype=jnp.float32)' if narrow else ''))


def number(owner: str, name: str, value: Any, *,
           optional: bool = False) -> None:
  """A finite real number or scalar array (of any sign)."""
  if not (optional and value is None):
    _concrete(owner, name, value)


def _in_range(test: Callable[[np.ndarray], Any], bound: str,
              doc: str) -> Rule:
  """A check ``(owner, name, value, *, optional=False)`` that ``value`` is
  a finite number or scalar array for which ``test`` holds (``bound``
  names the range in the message)."""

  def rule(owner: str, name: str, value: Any, *,
           optional: bool = False) -> None:
    if optional and value is None:
      return
    arr = _concrete(owner, name, value)
    if arr is not None:
      _check(owner, name, value, test, bound, arr)

  rule.__doc__ = doc
  return rule


nonnegative = _in_range(lambda a: a >= 0, '>= 0',
                        'A finite number ``>= 0`` (weight decays, scale '
                        'factors).')
positive = _in_range(lambda a: a > 0, '> 0',
                     'A finite number ``> 0`` (an epsilon that guards a '
                     'division).')
unit_interval = _in_range(lambda a: (a >= 0) & (a < 1), 'in [0, 1)',
                          'A number in ``[0, 1)`` (momentum and EMA decay '
                          'rates).')
fraction = _in_range(lambda a: (a >= 0) & (a <= 1), 'in [0, 1]',
                     'A number in ``[0, 1]`` (quantiles, fractions of a '
                     'run).')


def count(owner: str, name: str, value: Any, *, minimum: int = 1,
          optional: bool = False) -> None:
  """An integer ``>= minimum`` (step counts); a float such as ``2.5`` or
  ``2.0`` is a ``TypeError``."""
  if optional and value is None:
    return
  arr = _concrete(owner, name, value, integer=True)
  if arr is not None:
    _check(owner, name, value, lambda a: a >= minimum,
           f'an integer >= {minimum}', arr)


def learning_rate(owner: str, name: str, value: Any, *,
                  optional: bool = False) -> None:
  """A number or scalar array ``>= 0``, or a schedule: a callable that
  takes the step count (one positional argument; its values are not
  checked)."""
  if optional and value is None:
    return
  if callable(value):
    if not _takes_one_argument(value):
      raise TypeError(f'{owner}: {name} must be a number or a schedule '
                      'called with the step count (one argument), got a '
                      f'callable of signature {_signature(value)}.')
    return
  arr = _concrete(owner, name, value, kind=_SCHEDULE)
  if arr is not None:
    _check(owner, name, value, lambda a: a >= 0, '>= 0', arr)


def _signature(f: Callable[..., Any],
               follow_wrapped: bool = True) -> inspect.Signature | None:
  try:
    return inspect.signature(f, follow_wrapped=follow_wrapped)
  except (TypeError, ValueError):  # a builtin or extension function
    return None


def _takes_one_argument(f: Callable[..., Any]) -> bool:
  """Whether ``f(count)`` binds, by its own signature or the one
  ``functools.wraps`` gave it (true where no signature can be read)."""
  for follow_wrapped in (True, False):
    sig = _signature(f, follow_wrapped)
    if sig is None:
      return True
    try:
      sig.bind(0)
      return True
    except TypeError:
      pass
  return False


count0 = functools.partial(count, minimum=0)


def flag(owner: str, name: str, value: Any, *,
         optional: bool = False) -> None:
  """A Python (or NumPy) ``bool``: a switch between programs, so neither a
  traced value nor a truthy stand-in such as the string ``'False'``."""
  if optional and value is None:
    return
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f'{owner}: {name} must be True or False, got '
                    f'{_show(value)}.')


def distributed(owner: str, name: str, value: Any, *,
                optional: bool = True) -> None:
  """``None`` or an :class:`orthax.sharding.Distributed` (a mistyped one
  would otherwise fail at ``init`` on a missing attribute). The class is
  looked up, not imported: this module sits below every unit that checks
  arguments, ``orthax.polar`` included, and no instance can exist before
  its module is loaded."""
  if optional and value is None:
    return
  module = sys.modules.get('orthax.sharding._distributed')
  if module is not None and isinstance(value, module.Distributed):
    return
  raise TypeError(f'{owner}: {name} must be an orthax.sharding.Distributed '
                  f'or None, got {_show(value)}.')


def float_dtype(owner: str, name: str, value: Any, *,
                optional: bool = False) -> None:
  """A floating-point dtype (``jnp.bfloat16``, ``'float32'``, ...)."""
  if optional and value is None:
    return
  if isinstance(value, (jax.Array, np.ndarray)):
    # jnp.float32 is callable: optax.inject_hyperparams took it for a
    # schedule and passed jnp.float32(count).
    raise TypeError(f'{owner}: {name} must be a floating-point dtype, got an '
                    'array (under optax.inject_hyperparams a dtype is called '
                    f'as a schedule: pass {name} in static_args).')
  try:
    ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise TypeError(f'{owner}: {name} must be a floating-point dtype, got '
                    f'{_show(value)}.')


def transformation(owner: str, name: str, value: Any, *,
                   optional: bool = False) -> None:
  """An optax transformation (anything with callable ``init`` and
  ``update``): a ``TypeError`` naming the argument otherwise (a string or
  a constructor such as ``optax.adamw`` failed later, at ``init``, with an
  ``AttributeError``)."""
  if optional and value is None:
    return
  if not (callable(getattr(value, 'init', None))
          and callable(getattr(value, 'update', None))):
    raise TypeError(f'{owner}: {name} must be an optax transformation '
                    f'(e.g. optax.adamw(1e-3)), got {_show(value)}.')


def differs(value: Any, default: Any) -> bool:
  """Whether a concrete ``value`` is not its argument's ``default`` (the
  user set it); a tracer, or a value that cannot be compared, is not
  known to."""
  if isinstance(value, jax.core.Tracer):
    return False
  try:
    v, d = np.asarray(value), np.asarray(default)
    if jnp.issubdtype(v.dtype, jnp.floating) and d.dtype.kind in 'fiu':
      # The default in the value's precision: an injected float32 0.2 is
      # the default 0.2 (NumPy 1.x compared them in float64, unequal).
      d = d.astype(v.dtype)
    return not bool(np.all(v == d))
  except (TypeError, ValueError):
    return False


def applies(owner: str, name: str, value: Any, default: Any, used: bool,
            where: str) -> None:
  """A ``ValueError`` naming the argument when it was given another value
  than its ``default`` where it has no effect (``used`` false; ``where``:
  the setting it needs, e.g. ``"scale='moonlight'"``): the user meant it
  to change something. Traced values (``inject_hyperparams``) pass."""
  if not used and differs(value, default):
    raise ValueError(f'{owner}: {name} applies with {where} only; here it '
                     f'would change nothing (got {_show(value)}). Leave it '
                     'out, or pass that setting.')


def choice(options: Any) -> Rule:
  """A rule: the value is one of ``options`` (a tuple, or a mapping's
  keys), a ``ValueError`` listing them otherwise (a list or a number too,
  rather than a ``TypeError`` from looking it up)."""
  names = tuple(options)

  def rule(owner: str, name: str, value: Any, *,
           optional: bool = False) -> None:
    if optional and value is None:
      return
    if not (isinstance(value, str) and value in names):
      raise ValueError(f'{owner}: {name} must be one of {names}, got '
                       f'{_show(value)}.')

  rule.__doc__ = f'One of {names}.'
  return rule


def parsed(parse: Callable[[Any], Any], what: str) -> Rule:
  """A rule: ``parse(value)`` succeeds (a preset name or object, a table);
  its error is said again naming the owner and the argument."""

  def rule(owner: str, name: str, value: Any, *,
           optional: bool = False) -> None:
    if optional and value is None:
      return
    try:
      parse(value)
    except (TypeError, ValueError, KeyError) as e:
      raise ValueError(f'{owner}: {name} must be {what}, got '
                       f'{_show(value)} ({e})') from None

  return rule


def register(names: Sequence[str], rule: Rule) -> None:
  """Adds ``rule`` to :data:`RULES` for ``names``: the module that owns a
  set of choices (the Newton–Schulz methods, the presets, ...) registers
  their rule next to it, on import (before any recipe can be called), so
  that this module stays below all of them."""
  for name in names:
    RULES[name] = rule


# The rule of each hyperparameter, by argument name, for every recipe and
# transform (a name whose meaning differs somewhere is overridden there).
# Arguments that take one of a set of names are added by the module that
# owns the set (:func:`register`).
RULES: dict[str, Rule] = {
    **dict.fromkeys(('learning_rate', 'adam_learning_rate',
                     'signum_learning_rate'), learning_rate),
    **dict.fromkeys(('base_learning_rate', 'weight_decay',
                     'adam_weight_decay'), nonnegative),
    **dict.fromkeys(('beta', 'beta2', 'b1', 'b2', 'adam_b1', 'adam_b2',
                     'mu2', 'signum_beta'), unit_interval),
    # Every eps but these guards a division by a norm or a root that is
    # zero for a zero gradient: 0 would turn it into NaN.
    **dict.fromkeys(('eps', 'adam_eps', 'ns_eps', 'norm_eps'), positive),
    'quantile_eps': nonnegative,  # ROOT: added to a clip bound, no division
    **dict.fromkeys(('ns_steps', 'steps'), count),
    **dict.fromkeys(('warmup_steps', 'total_steps', 'restart_every'),
                    count0),
    **dict.fromkeys(('quantile', 'clip_decay_fraction', 'decay_fraction'),
                    fraction),
    **dict.fromkeys(('c', 'norm_scale'), positive),
    **dict.fromkeys(('clamp_c', 'gamma', 'alpha', 'noise_power', 'scale_rms',
                     'rms', 'scale_coeff', 'clip_final_scale', 'final_scale'),
                    nonnegative),
    **dict.fromkeys(('stable', 'remap', 'nesterov', 'fraction_scale', 'check_finite',
                     'aspect_scale', 'group', 'shared_bound',
                     'check_result', 'cautious_weight_decay', 'cautious',
                     'scale_safe', 'normalize', 'bias_correction',
                     'restore_norm', 'symmetrize', 'shared', 'result',
                     'last_row_safety', 'exact_last_row', 'return_triple',
                     'triple', 'column_blocks'), flag),
    'distributed': distributed,
    **dict.fromkeys(('ns_dtype', 'mu_dtype', 'accumulator_dtype'),
                    float_dtype),
}


@functools.lru_cache(maxsize=None)
def _none_defaults(fn: Callable[..., Any]) -> frozenset[str]:
  return frozenset(k for k, p in inspect.signature(fn).parameters.items()
                   if p.default is None)


def arguments(owner: str, fn: Callable[..., Any], values: Mapping[str, Any],
              **overrides: Rule) -> None:
  """Checks every argument of ``fn`` in ``values`` (its ``locals()`` at the
  top) that :data:`RULES` (or ``overrides``) names; ``None`` passes where
  ``fn``'s default is ``None``.

  Raises:
    TypeError, ValueError: naming ``owner`` and the argument.
  """
  optional = _none_defaults(fn)
  for name, value in values.items():
    rule = overrides.get(name, RULES.get(name))
    if rule is not None:
      rule(owner, name, value, optional=name in optional)
