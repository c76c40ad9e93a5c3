"""The threshold schedule of SPECTRA's clip (:func:`clip_threshold`): the
warm-up that keeps ``c_t·η_t`` constant and the optional decay at the end of
a run; :func:`check_decay` refuses the settings no run can mean."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from orthax import _validate

DECAYS = ('constant', 'linear', 'sqrt', 'cosine', 'exp', 'square')
_validate.register(('decay', 'clip_decay'), _validate.choice(DECAYS))


def clip_threshold(
    c: float | jax.Array,
    count: jax.Array,
    *,
    learning_rate: optax.ScalarOrSchedule | None = None,
    base_learning_rate: float | jax.Array | None = None,
    warmup_steps: int | jax.Array = 0,
    decay: str = 'constant',
    decay_fraction: float | jax.Array = 0.1,
    final_scale: float | jax.Array = 0.0,
    total_steps: int | jax.Array = 0,
    dtype: Any = None,
) -> jax.Array:
  r"""The threshold ``c_t`` of step ``count`` (the reference's
  ``_get_current_clip_c``), in ``dtype`` (default float32; the transforms
  pass the widest of float32 and their updates' dtypes, so a float64 run
  clips at the float64 ``c``):

  * warm-up (``t < warmup_steps``): ``c·η_base/max(η_t, 1e-10)``, so
    ``c_t·η_t`` is constant (``η_base``: ``base_learning_rate``, default the
    schedule's value at ``warmup_steps``);
  * then ``c``; with ``decay != 'constant'`` the last
    ``⌊decay_fraction·total_steps⌋`` steps move it to ``c·final_scale`` along
    ``linear``, ``sqrt``, ``cosine``, ``exp`` (``final^p``; linear when
    ``final = 0``) or ``square`` in the progress ``p ∈ [0, 1]``.

  Args:
    c: the threshold after the warm-up, ``c > 0``.
    count: the step, an integer ``jax.Array`` (the transforms' state
      count, 0 at the first step).
    learning_rate: η (number or schedule ``count -> η_t``); default
      ``None``: no warm-up.
    base_learning_rate: ``η_base`` (default: the schedule's value at
      ``warmup_steps``; required with a constant ``learning_rate``).
    warmup_steps: steps of the warm-up (default 0, none); needs a
      ``learning_rate`` schedule, or a ``learning_rate`` and a
      ``base_learning_rate`` (otherwise ``c_t`` would stay ``c``:
      ``ValueError``).
    decay: ``'constant'`` (default, no decay), ``'linear'``, ``'sqrt'``,
      ``'cosine'``, ``'exp'`` or ``'square'``.
    decay_fraction: fraction of ``total_steps`` the decay takes (default
      0.1).
    final_scale: the decay ends at ``c·final_scale`` (default 0).
    total_steps: the run's length, ``> 0`` with a decay (the decay settings
      without one raise ``ValueError``: :func:`check_decay`).
    dtype: the result's dtype (default float32).
  """
  _validate.arguments('clip_threshold', clip_threshold, locals())
  check_decay('clip_threshold', decay, decay_fraction, final_scale,
              total_steps)
  check_warmup('clip_threshold', learning_rate, warmup_steps,
               base_learning_rate)
  dtype = jnp.float32 if dtype is None else dtype
  t = count.astype(dtype)
  c = jnp.asarray(c, dtype)
  out = c
  if decay != 'constant':
    n_anneal = jnp.floor(decay_fraction * jnp.asarray(total_steps, dtype))
    n_hold = total_steps - n_anneal
    p = jnp.clip((t - n_hold) / jnp.maximum(n_anneal, 1), 0.0, 1.0)
    f = jnp.asarray(final_scale, dtype)
    factor = {
        'linear': lambda: f + (1 - f) * (1 - p),
        'sqrt': lambda: f + (1 - f) * (1 - jnp.sqrt(p)),
        'cosine': lambda: f + (1 - f) * (1 + jnp.cos(math.pi * p)) / 2,
        'exp': lambda: jnp.where(f > 0, jnp.power(jnp.maximum(f, 1e-30), p),
                                 1 - p),
        'square': lambda: f + (1 - f) * (1 - p * p),
    }[decay]()
    out = jnp.where(t < n_hold, c, c * factor)
  if learning_rate is not None:
    if callable(learning_rate):
      lr_t = learning_rate(count)
      base = (learning_rate(jnp.asarray(warmup_steps, jnp.int32))
              if base_learning_rate is None else base_learning_rate)
    else:
      lr_t = learning_rate
      base = learning_rate if base_learning_rate is None else base_learning_rate
    warm = c * base / jnp.maximum(jnp.asarray(lr_t, dtype), 1e-10)
    out = jnp.where(t < warmup_steps, warm, out)
  return out


_DEFAULT_DECAY = dict(decay_fraction=0.1, final_scale=0.0, total_steps=0)


def check_decay(owner: str, decay: str, decay_fraction: Any, final_scale: Any,
                total_steps: Any, prefix: str = '') -> None:
  """Raises ``ValueError`` naming ``owner`` for a decay of the threshold
  that cannot be meant: one over ``total_steps = 0`` (it would start at
  step 1 and reach ``c·final_scale`` there), or a constant threshold given
  a decay's settings (they would change nothing). ``prefix``: the
  recipe's name for them (``'clip_'``: ``clip_decay``, ...). ``decay``
  itself is one of :data:`DECAYS` (every caller's ``_validate.arguments``
  checks it). Traced values (``optax.inject_hyperparams``) are not
  checked."""
  if (decay != 'constant' and not isinstance(total_steps, jax.core.Tracer)
      and total_steps == 0):
    raise ValueError(
        f'{owner}: total_steps must be > 0 with {prefix}decay={decay!r}: '
        f'the decay takes the last {prefix}decay_fraction of total_steps '
        '(pass the run\'s length).')
  given = dict(decay_fraction=decay_fraction, final_scale=final_scale,
               total_steps=total_steps)
  changed = [k for k, v in given.items()
             if _validate.differs(v, _DEFAULT_DECAY[k])]
  if decay == 'constant' and changed:
    names = [n if n == 'total_steps' else prefix + n for n in changed]
    raise ValueError(
        f'{owner}: {names[0]} sets the threshold\'s decay, which '
        f'{prefix}decay=\'constant\' (the default) does not have: pass '
        f'{prefix}decay= one of {DECAYS[1:]}, or leave {", ".join(names)} '
        'out.')


def check_warmup(owner: str, learning_rate: Any, warmup_steps: Any,
                 base_learning_rate: Any) -> None:
  """Raises ``ValueError`` naming ``owner`` for warm-up settings that change
  nothing: ``warmup_steps`` without a ``learning_rate`` schedule, or a
  ``learning_rate`` and a ``base_learning_rate`` (the warm-up keeps ``c·η_t`` at ``c·η_base``, and
  ``η_base`` defaults to the rate itself: a constant rate, or the value
  ``optax.inject_hyperparams`` passes each step, leaves ``c`` unchanged),
  ``base_learning_rate`` without a warm-up."""
  _validate.applies(owner, 'warmup_steps', warmup_steps, 0,
                    callable(learning_rate) or (
                        learning_rate is not None
                        and base_learning_rate is not None),
                    'a learning_rate schedule, or a learning_rate and a '
                    'base_learning_rate')
  _validate.applies(owner, 'base_learning_rate', base_learning_rate, None,
                    learning_rate is not None and not (
                        isinstance(warmup_steps, int) and warmup_steps == 0),
                    'a learning_rate and warmup_steps > 0')
