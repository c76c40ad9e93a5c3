"""Shape scales: ``ScaleByShape`` and ``ScaleToRms``."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from orthax import _validate
from orthax.matrix_stages._base import MatrixStage
from orthax.matrix_stages._base import stage
from orthax.matrix_stages._base import static
from orthax.matrix_stages._base import wide

SCALE_MODES = ('keller', 'moonlight', 'spectral', 'inverse_side', 'none')


def check_scale_mode(mode: str, where: str = 'check_scale_mode: mode'
                     ) -> None:
  """Raises ``ValueError`` unless ``mode`` is one of :data:`SCALE_MODES`;
  ``where`` names the owner and the argument (e.g.
  ``'scale_by_dct_adam: scale'``).

  Args:
    mode: the shape-scale mode to check.
    where: the error message's prefix: the owner and the argument
      (default ``'check_scale_mode: mode'``).
  """
  if mode not in SCALE_MODES:
    raise ValueError(f'{where} must be one of {SCALE_MODES}, got '
                     f'{mode!r}.')


def check_min_side(min_side: Any, where: str, default: int = 1) -> int:
  """``min_side``, or ``default`` for ``None``; raises ``ValueError``
  (``TypeError`` for a non-integer: a static value) unless it is an
  integer ≥ 1; ``where`` names the argument.

  Args:
    min_side: the value to check (a Python or NumPy integer, or ``None``).
    where: the error message's prefix: the owner and the argument (e.g.
      ``'scale_by_shape: min_side'``).
    default: what ``None`` stands for (default 1).

  Example:
    >>> from orthax.matrix_stages import check_min_side
    >>> check_min_side(None, 'f: min_side'), check_min_side(64, 'f: min_side')
    (1, 64)
  """
  if min_side is None:
    return default
  if isinstance(min_side, bool) or not isinstance(min_side, (int, np.integer)):
    raise TypeError(f'{where} must be an int, got {type(min_side).__name__} '
                    f'{min_side!r} (a static value: pass it in static_args '
                    'of optax.inject_hyperparams).')
  if min_side < 1:
    raise ValueError(f'{where} must be >= 1, got {min_side}.')
  return int(min_side)


def shape_factor(fan_in: int, fan_out: int, mode: str,
                 rms: float = 0.2, min_side: int = 1) -> float:
  """The shape scale of one ``fan_in × fan_out`` matrix (see
  :func:`orthax.scale_by_shape`; ``min_side``: ``'inverse_side'`` divides
  by ``max(min(fan_in, fan_out), min_side)``). An empty matrix (a side of
  0) has nothing to scale: 1.

  Args:
    fan_in, fan_out: the matrix's sides (``≥ 0``; Flax kernel ``(in, out)``).
    mode: one of :data:`SCALE_MODES`: ``'keller'``, ``'moonlight'``,
      ``'spectral'``, ``'inverse_side'`` or ``'none'``.
    rms: the RMS target of ``'moonlight'`` (default 0.2, ``≥ 0``).
    min_side: ``'inverse_side'`` only: the smallest side it divides by
      (default 1).

  Example:
    >>> from orthax.matrix_stages import shape_factor
    >>> shape_factor(16, 25, 'keller'), shape_factor(16, 25, 'moonlight')
    (1.25, 1.0)
    >>> shape_factor(16, 25, 'inverse_side')
    0.0625
  """
  if min(fan_in, fan_out) < 0:
    raise ValueError(f'shape_factor: fan_in and fan_out must be >= 0, got '
                     f'{fan_in} and {fan_out}.')
  _validate.nonnegative('shape_factor', 'rms', rms)
  if min(fan_in, fan_out) == 0:
    check_scale_mode(mode, 'shape_factor: mode')
    return 1.0
  if mode == 'keller':
    return math.sqrt(max(1.0, fan_out / fan_in))
  if mode == 'moonlight':
    return rms * math.sqrt(max(fan_in, fan_out))
  if mode == 'spectral':
    return math.sqrt(fan_out / fan_in)
  if mode == 'inverse_side':
    return 1.0 / max(min(fan_in, fan_out), min_side)
  check_scale_mode(mode, 'shape_factor: mode')
  return 1.0  # 'none'


@stage
class ScaleByShape(MatrixStage):
  """``O ← O·shape_factor(fan_in, fan_out, mode, rms, min_side)``
  (:func:`shape_factor`; the stage of :func:`orthax.scale_by_shape`).

  Args:
    mode: one of :data:`SCALE_MODES` (default ``'keller'``,
      ``√max(1, fan_out/fan_in)``); static.
    rms: the RMS target of ``'moonlight'`` (default 0.2); may be traced.
    min_side: ``'inverse_side'`` only: the smallest side it divides by
      (default 1, an ``int ≥ 1``); static.
  """

  name = 'scale_by_shape'
  checks = {'rms': _validate.nonnegative}
  mode: str = static(default='keller')
  rms: Any = 0.2
  min_side: int = static(default=1)

  def __post_init__(self):
    check_scale_mode(self.mode, f'{self.name}: mode')
    check_min_side(self.min_side, f'{self.name}: min_side')

  def apply(self, o, state, blocks):
    if self.mode == 'none':
      return o, state
    f = shape_factor(blocks.fan_in, blocks.fan_out, self.mode, self.rms,
                     self.min_side)
    return (o * f).astype(o.dtype), state


@stage
class ScaleToRms(MatrixStage):
  """``O ← O·rms·√(mn) / (‖O‖_F + ε)`` (a zero matrix stays zero; the
  stage of :func:`orthax.scale_to_rms`).

  Args:
    rms: the target RMS of each matrix (default 0.2); may be traced.
    eps: ``ε`` added to the Frobenius norm (default 1e-10).
  """

  name = 'scale_to_rms'
  checks = {'rms': _validate.nonnegative, 'eps': _validate.positive}
  rms: Any = 0.2
  eps: Any = 1e-10

  def apply(self, o, state, blocks):
    x = o.astype(wide(o.dtype))
    norm = jnp.sqrt(blocks.sum(x * x, (-2, -1)))
    size = (blocks.fan_in * blocks.fan_out) ** 0.5
    return (x * (self.rms * size / (norm + self.eps))).astype(o.dtype), state


def start_tilt(n: int, dtype: Any) -> jax.Array:
  """``1 + ½·frac(j·φ⁻¹)`` for ``j < n``: multiplies the column energies
  into the power iteration's start. The energies alone can be orthogonal to
  the top singular vector (equal energies and rows that sum to 0, as in the
  rows of a Hadamard matrix): the estimate was 0 and the matrix scaled by
  10³⁰. A fixed irrational tilt leaves no such structured case."""
  j = jnp.arange(n, dtype=dtype)
  return 1 + 0.5 * jnp.mod(j * 0.6180339887498949, 1)


@stage
class ScaleToSpectralNorm(MatrixStage):
  """``O ← O·shape_factor(fan_in, fan_out, mode) / σ̂(O)``: the stack's
  spectral norms set to Muon's (``mode='keller'``: ``√max(1, fan_out /
  fan_in)``), ``σ̂`` the top singular value by ``iters`` power iterations
  on ``OᵀO`` from the column energies times a fixed tilt
  (:func:`start_tilt`), and at least the longest column's norm (an estimate
  from below, exact to within about ``(σ₂/σ₁)^(4·iters)``; on iid noise,
  the flattest spectrum, a few percent). Scale-free: any finite stack gives a finite result, and a
  zero matrix stays zero. Whole matrices only.

  Args:
    mode: the target spectral norm, a :func:`shape_factor` mode of
      :data:`SCALE_MODES` (default ``'keller'``; ``'moonlight'`` at RMS
      0.2, ``'inverse_side'`` with ``min_side`` 1); static.
    iters: power iterations (default 10, at least 1); static.

  Reference: Yang, Simon, Bernstein, *A Spectral Condition for Feature
  Learning* (arXiv 2310.17813): a step of spectral norm
  ``Θ(√(fan_out/fan_in))`` lets one learning rate serve every width."""

  name = 'scale_to_spectral_norm'
  mode: str = static(default='keller')
  iters: int = static(default=10)
  whole_matrices = True  # a power iteration on the whole matrix

  def __post_init__(self):
    check_scale_mode(self.mode, f'{self.name}: mode')
    if int(self.iters) < 1:
      raise ValueError(f'{self.name}: iters must be at least 1, got '
                       f'{self.iters!r}.')

  def flops(self, fan_in, fan_out):
    # Two matrix-vector products per iteration; about 12 element-wise
    # operations an entry around them (scaling, energies, the result).
    return (4 * int(self.iters) + 12) * fan_in * fan_out

  def apply(self, o, state, blocks):
    if blocks.split is not None:
      raise ValueError('ScaleToSpectralNorm needs whole matrices (no column '
                       'blocks).')
    x = o.astype(wide(o.dtype))
    peak = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
    # To max|x| in [½, 1) by two exact powers of two (a single 2⁻ᵉ, or a
    # division, would be subnormal for max|x| near 2¹²⁸, and flushed to 0).
    e = jnp.frexp(peak)[1]
    x = x * jnp.ldexp(jnp.ones((), x.dtype), -(e // 2))
    x = x * jnp.ldexp(jnp.ones((), x.dtype), e // 2 - e)
    energy = jnp.sum(x * x, axis=-2, keepdims=True)  # of each column
    v = energy * start_tilt(x.shape[-1], x.dtype)
    for _ in range(int(self.iters)):            # v ← OᵀO v / ‖v‖
      v = v / jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True) + 1e-30)
      u = jnp.einsum('kio,kzo->kiz', x, v)
      v = jnp.einsum('kio,kiz->kzo', x, u)
    sigma = jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True)
                     / (jnp.sum(u * u, axis=-2, keepdims=True) + 1e-30))
    # No column is longer than σ₁: a floor from below that is never 0 for a
    # nonzero matrix, whatever the start.
    sigma = jnp.maximum(sigma, jnp.sqrt(jnp.max(energy, axis=-1,
                                                keepdims=True)))
    f = shape_factor(blocks.fan_in, blocks.fan_out, self.mode)
    out = jnp.where(peak > 0, x * (f / jnp.maximum(sigma, 1e-30)), 0)
    return out.astype(o.dtype), state
