"""Choosing between the plain and the Gram Newton–Schulz iteration."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from orthax import _validate
from orthax.polar import presets as _presets
from orthax.polar.gram import DEFAULT_RESTART_EVERY
from orthax.polar.gram import check_restart
from orthax.polar.gram import iterate as gram_iterate
from orthax.polar.gram import prefer_gram
from orthax.polar.newton_schulz import iterate as ns_iterate

METHODS = ('auto', 'standard', 'gram')
_validate.register(('ns_method',), _validate.choice(METHODS))


def choose_method(m: int, n: int, steps: Any, dtype: Any, method: str = 'auto',
                  restart_every: int | None = DEFAULT_RESTART_EVERY, *,
                  owner: str = 'choose_method') -> str:
  """``'gram'`` or ``'standard'`` for an ``m×n`` matrix.

  ``auto`` takes Gram Newton–Schulz when it needs fewer FLOPs
  (``max(m, n) > 1.5·min(m, n)`` with restarts every 2 steps) **and** the
  iteration runs in float32 or wider; half-precision iterations stay on the
  plain iteration unless ``method='gram'`` is asked for explicitly, and a
  traced step count also selects the plain iteration. ``owner`` names the
  function the user called in the error for an unknown ``method``.
  """
  _validate.choice(METHODS)(owner, 'method', method)
  if method != 'auto':
    return method
  if not isinstance(steps, (int, np.integer)):
    return 'standard'
  if jnp.finfo(dtype).bits < 32:
    return 'standard'
  check_restart(restart_every, owner)
  return 'gram' if prefer_gram(m, n, int(steps), restart_every) else 'standard'


def orthogonalize_stack(
    x: jax.Array,
    preset: str | _presets.Preset = 'jordan',
    *,
    method: str = 'auto',
    restart_every: int | None = DEFAULT_RESTART_EVERY,
    steps: Any = None,
    dtype: Any = None,
    col_shards: int = 1,
    **kwargs,
) -> jax.Array:
  """Newton–Schulz on ``[..., m, n]`` by the method :func:`choose_method`
  picks; other keyword arguments go to :func:`newton_schulz`.

  ``col_shards``: ``x`` is one of that many column blocks of wide matrices
  (``m × n·col_shards``; pass ``col_reduce`` too), so the method is chosen
  for the whole matrix."""
  who = 'orthogonalize_stack'
  _presets.check_preset(who, 'preset', preset)
  p = _presets.get_preset(preset)
  k = p.steps if steps is None else steps
  dt = x.dtype if dtype is None else dtype
  # Named errors before choose_method reads the shape and the dtype (an
  # IndexError for a vector, numpy's "not inexact" for an integer dtype).
  if x.ndim < 2:
    raise ValueError(f'orthogonalize_stack: x must have shape [..., m, n], '
                     f'got shape {x.shape}.')
  for name, d in (('x', x.dtype), ('dtype', dt)):
    if not jnp.issubdtype(d, jnp.floating):
      raise TypeError(f'orthogonalize_stack: {name} must be a floating-point '
                      f'dtype, got {jnp.dtype(d).name}.')
  if isinstance(col_shards, bool) or not isinstance(
      col_shards, (int, np.integer)) or col_shards < 1:
    raise ValueError(f'orthogonalize_stack: col_shards must be an int >= 1, '
                     f'got {col_shards!r}.')
  if choose_method(x.shape[-2], x.shape[-1] * col_shards, k, dt, method,
                   restart_every, owner=who) == 'gram':
    return gram_iterate(x, preset, steps=steps, dtype=dtype,
                        restart_every=restart_every, who=who, **kwargs)
  return ns_iterate(x, preset, steps=steps, dtype=dtype, who=who, **kwargs)
