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
  (:func:`prefer_gram`: ``max(m, n) > 1.5·min(m, n)`` with the default
  restarts every 2 steps) **and** the
  iteration runs in float32 or wider; half-precision iterations stay on the
  plain iteration unless ``method='gram'`` is asked for explicitly, and a
  traced step count also selects the plain iteration.

  Args:
    m, n: the matrix's sides (either orientation).
    steps: the step count; anything but a Python or NumPy int (a traced or
      array count) gives ``'standard'`` under ``'auto'``.
    dtype: the iteration dtype; narrower than 32 bits gives ``'standard'``
      under ``'auto'``.
    method: ``'auto'`` (default), ``'standard'`` or ``'gram'``
      (:data:`METHODS`); the last two are returned as given.
    restart_every: the Gram iteration's restart period (default 2; ``None``
      or ``0``: never), as :func:`gram_newton_schulz` takes it; ``1``
      never prefers Gram.
    owner: the function the user called, named in the error for an unknown
      ``method`` or a bad ``restart_every`` (checked whichever method is
      asked for).
  """
  _validate.choice(METHODS)(owner, 'method', method)
  check_restart(restart_every, owner)
  if method != 'auto':
    return method
  if not isinstance(steps, (int, np.integer)):
    return 'standard'
  if jnp.finfo(dtype).bits < 32:
    return 'standard'
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
  """Newton–Schulz on a stack of matrices, by the method
  :func:`choose_method` picks.

  Approximates the polar factor ``UVᵀ`` of every matrix of ``x``, each on
  its own, by :func:`newton_schulz` or :func:`gram_newton_schulz` (the
  same result in exact arithmetic; ``method`` picks).

  Args:
    x: floating-point array ``[..., m, n]``, e.g. a stack ``[k, m, n]`` of
      ``k`` same-shape matrices (leading axes are a batch); tall matrices
      are transposed in and out (unless ``col_reduce`` is given).
    preset: a name from :func:`preset_names` (``'jordan'``, the default;
      ``'polar_express'``, ``'polar_express_paper'``, ``'dion'`` /
      ``'quintic'``, ``'cans'``, ``'aol'``) or a :class:`Preset`.
    method: ``'auto'`` (default: Gram where :func:`prefer_gram` says it
      saves FLOPs, the iteration dtype is float32 or wider and ``steps``
      is a Python int), ``'standard'`` or ``'gram'`` (:data:`METHODS`).
    restart_every: Gram only: re-form the Gram matrix every this many steps
      (default 2; ``None`` or ``0``: never), see :func:`gram_newton_schulz`.
    steps: number of steps (default: the preset's, e.g. 5 for
      ``'jordan'``, 8 for ``'polar_express_paper'``); an integer array or
      a traced count makes ``'auto'`` run the plain iteration.
    dtype: dtype of the iteration (e.g. ``jnp.bfloat16``; default
      ``x.dtype``); matmuls accumulate in float32 or wider, and the result
      has ``x``'s shape and dtype.
    col_shards: ``x`` is one of that many column blocks of wide matrices
      (``m × n·col_shards``; pass ``col_reduce`` too), so the method is
      chosen for the whole matrix (default 1).
    **kwargs: the other keywords of :func:`newton_schulz`: ``coeffs``,
      ``normalizer``, ``norm_scale``, ``eps`` (the normalizer's epsilon;
      default the preset's, 1e-7, or 1e-6 for ``'polar_express'``) and
      ``col_reduce``; and :func:`gram_newton_schulz`'s ``symmetrize``
      (read when Gram runs; the plain iteration has no Gram matrix to
      symmetrize, and ignores it, so that the call does not depend on the
      method chosen).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from orthax.polar import choose_method, orthogonalize_stack
    >>> x = jax.random.normal(jax.random.key(0), (3, 16, 64))  # [k, m, n]
    >>> choose_method(16, 64, 5, jnp.float32)  # 64 > 1.5·16
    'gram'
    >>> o = orthogonalize_stack(x, 'polar_express_paper')
    >>> o.shape, o.dtype
    ((3, 16, 64), dtype('float32'))
    >>> bool(jnp.allclose(o @ o.mT, jnp.eye(16), atol=1e-3))
    True
  """
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
  symmetrize = kwargs.pop('symmetrize', True)
  _validate.flag(who, 'symmetrize', symmetrize)
  if choose_method(x.shape[-2], x.shape[-1] * col_shards, k, dt, method,
                   restart_every, owner=who) == 'gram':
    return gram_iterate(x, preset, steps=steps, dtype=dtype,
                        restart_every=restart_every, who=who,
                        symmetrize=symmetrize, **kwargs)
  return ns_iterate(x, preset, steps=steps, dtype=dtype, who=who, **kwargs)
