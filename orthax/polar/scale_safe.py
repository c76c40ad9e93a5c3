"""Scale-safe arithmetic for huge matrices: exact power-of-two scales, and
sums of squares that cannot overflow.

Newton–Schulz and the per-matrix stages are scale-invariant, but their
norms are not representable past the dtype's range (a float32 sum of
squares overflows once ``‖X‖_F > 1.8·10¹⁹``). A power of two scales a
matrix exactly (:func:`huge_scale`, :func:`downscale_huge`); a norm summed
from pieces on several devices is summed in two parts (:func:`split_squares`,
:func:`split_root`, :func:`block_norm`); an EMA of squares is kept as its
root (:func:`root_ema`). Below ``2³²`` every function here is the plain
arithmetic, bit for bit.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

ColReduce = Callable[[jax.Array], jax.Array] | None

HUGE = 2.0 ** 32


def pow2(e: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """Exactly ``2ᵉ`` for integer ``e`` in the normal range of ``dtype``
  (float32: ``-126 ≤ e ≤ 127``), built from exponent bits."""
  if jnp.finfo(dtype).bits == 64:
    bits = (jnp.asarray(e).astype(jnp.int64) + 1023) << 52
    return jax.lax.bitcast_convert_type(bits, jnp.float64).astype(dtype)
  bits = (jnp.asarray(e).astype(jnp.int32) + 127) << 23
  return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(dtype)


def scale_of_max(m: jax.Array) -> jax.Array:
  """``2⁻ᵉ`` with ``2ᵉ ≥ m`` when ``m > 2³²``, else exactly 1 (float32, or
  ``m``'s dtype if wider; shaped like ``m``): the factor :func:`huge_scale`
  takes from a max."""
  dtype = jnp.promote_types(m.dtype, jnp.float32)
  m = m.astype(dtype)
  e = jnp.where(m > HUGE, jnp.ceil(jnp.log2(m)), 0.0).astype(jnp.int32)
  # At most the dtype's smallest normal power of two (2⁻¹²⁶, 2⁻¹⁰²²).
  return pow2(-jnp.minimum(e, -jnp.finfo(dtype).minexp), dtype)


def huge_scale(x: jax.Array) -> jax.Array:
  """Per matrix, ``2⁻ᵉ`` with ``2ᵉ ≥ max|x|`` when ``max|x| > 2³²``, else
  exactly 1 (float32, or ``x``'s dtype if wider; shape ``[..., 1, 1]``).

  Newton–Schulz is scale-invariant, but its normalizer's sum of squares
  overflows float32 once ``‖X‖_F > 1.8·10¹⁹`` (a 64×64 matrix of entries
  ``10¹⁹``), and the update would come out zero. A power of two scales
  exactly, so the direction is that of the unscaled matrix; the factor is
  built from its exponent bits (one scalar per matrix), and multiplying by
  it is the only element-wise work.
  """
  m = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True, initial=0)
  return scale_of_max(m)


def downscale_huge(x: jax.Array) -> jax.Array:
  """``x·2⁻ᵉ`` per matrix (:func:`huge_scale`): unchanged, bit for bit,
  unless ``max|x| > 2³²``."""
  return (x * huge_scale(x).astype(x.dtype)).astype(x.dtype)


_SPLIT = 80  # entries above 2³² are squared scaled by 2⁻⁸⁰


def split_squares(x: jax.Array, axes: Sequence[int]
                  ) -> tuple[jax.Array, jax.Array]:
  """``Σ x²`` over ``axes`` (kept, size 1) of a piece of a matrix, as two
  sums that cannot overflow and add up across pieces like one: ``lo`` of
  the entries up to ``2³²`` as they are, ``hi`` of the larger ones scaled
  by ``2⁻⁸⁰`` (:func:`split_root` joins them). A scale common to all
  pieces would need the whole matrix's max first (one more collective);
  these two sums go through the one all-reduce the sum needed. ``lo`` is
  the plain sum, bit for bit, when no entry exceeds ``2³²``."""
  axes = tuple(axes)
  big = jnp.abs(x) > HUGE
  zero = jnp.zeros([], x.dtype)
  lo = jnp.sum(jnp.square(jnp.where(big, zero, x)), axis=axes, keepdims=True)
  hi = jnp.sum(jnp.square(jnp.where(big, x * pow2(-_SPLIT, x.dtype), zero)),
               axis=axes, keepdims=True)
  return lo, hi


def split_root(lo: jax.Array, hi: jax.Array) -> jax.Array:
  """``√(lo + hi·2¹⁶⁰)`` of :func:`split_squares`'s (summed) pair: the
  plain ``√lo`` while ``hi`` is 0."""
  down = pow2(-_SPLIT, lo.dtype)
  # Each root of what its branch selects (1 in the other): √0's infinite
  # derivative in the unselected branch made jax.grad NaN (0·∞).
  big = (jnp.sqrt(jnp.where(hi > 0, hi + lo * down * down, 1))
         * pow2(_SPLIT, lo.dtype))
  return jnp.where(hi > 0, big, jnp.sqrt(jnp.where(hi > 0, 1, lo)))


def signed_squares(lo: jax.Array, hi: jax.Array) -> jax.Array:
  """:func:`split_squares`'s pair as one value, for a sum that is whole on
  one device (nothing to add across devices but zeros): ``lo``, or
  ``-(hi + lo·2⁻¹⁶⁰)`` (negative: scaled) when it has entries above
  ``2³²``. :func:`signed_root` takes its root."""
  down = pow2(-_SPLIT, lo.dtype)
  return jnp.where(hi > 0, -(hi + lo * down * down), lo)


def signed_root(v: jax.Array) -> jax.Array:
  """The root of a :func:`signed_squares` value: ``√v``, or
  ``√(-v)·2⁸⁰`` for a negative one."""
  r = jnp.sqrt(jnp.abs(v))
  return jnp.where(v < 0, r * pow2(_SPLIT, v.dtype), r)


def root_ema(root: jax.Array, x: jax.Array, decay: Any) -> jax.Array:
  """``√(decay·root² + (1-decay)·x²)``, the EMA of ``x²`` kept as its root,
  by ``jnp.hypot`` (which factors out the larger term): no square is
  formed, so it cannot overflow where ``x²`` would."""
  return jnp.hypot(jnp.sqrt(decay) * root, jnp.sqrt(1 - decay) * x)


def block_norm(x: jax.Array, col_reduce: ColReduce
               ) -> tuple[jax.Array, jax.Array]:
  """``(f, f·‖X‖_F)`` of whole matrices from their column blocks ``x`` (one
  ``col_reduce`` of the two sums of :func:`split_squares`; shapes
  ``[..., 1, 1]``, float32 or wider): ``f`` a power of two, 1 unless the
  norm exceeds ``2³²``, so that ``f·‖X‖_F`` is finite where ``‖X‖_F``
  itself would overflow (a float32 norm past 3.4e38)."""
  xa = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  lo, hi = col_reduce(jnp.stack(split_squares(xa, (-2, -1))))
  down = pow2(-_SPLIT, lo.dtype)
  # ‖X‖·2⁻⁸⁰ where hi > 0; each root of 1 where its branch is not taken
  # (split_root: √0 there made jax.grad NaN).
  scaled = jnp.sqrt(jnp.where(hi > 0, hi + lo * down * down, 1))
  plain = jnp.sqrt(jnp.where(hi > 0, 1, lo))
  f_plain = scale_of_max(plain).astype(lo.dtype)
  # ‖X‖ = scaled·2⁸⁰ ≤ 2⁸⁰⁺ᵏ, 2ᵏ ≥ scaled; f = 2⁻ᵉ, e = 80 + k capped at
  # the dtype's smallest normal power of two: f·‖X‖ ≤ 1, as huge_scale's.
  k = jnp.ceil(jnp.log2(jnp.where(hi > 0, scaled, 1))).astype(jnp.int32)
  e = jnp.minimum(_SPLIT + k, -jnp.finfo(lo.dtype).minexp)
  f_big = pow2(-e, lo.dtype)
  big_norm = scaled * pow2(_SPLIT - e, lo.dtype)
  return (jnp.where(hi > 0, f_big, f_plain),
          jnp.where(hi > 0, big_norm, plain * f_plain))
