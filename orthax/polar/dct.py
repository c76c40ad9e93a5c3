r"""The DCT projector of DCT-AdamW and Trion: a fixed orthonormal basis of
the smaller side of a matrix, scored and selected per column.

Pure ``jax.numpy`` on stacks ``[k, L, s]`` held **tall** (``L ≥ s``, the
smaller side last); nothing here knows optax.

The basis is the orthonormal DCT-II matrix of size ``s``,

.. math:: D_{ij} = c_i\sqrt{2/s}\,\cos\frac{π\,i\,(2j+1)}{2s},\qquad
   c_0 = 1/\sqrt2,\ c_{i>0} = 1,

built per matrix size (every layer shape gets its own ``D``; the reference
builds one of the first layer's size and shares it). A tall matrix ``Y`` is
projected on the right, ``S = Y D`` (all ``s`` coefficients per row); column
``j`` is scored by ``‖S_{:,j}‖_p``; the ``r`` best columns are kept in
**descending score order** (``jax.lax.top_k``), ``a = S_{:,\mathrm{idx}}``
(``L×r``), and a low-rank ``u`` goes back by ``u\,D_{:,\mathrm{idx}}^\top``.

Layouts. In PyTorch's ``(out, in)`` layout the reference projects the
smaller side: rows ≥ cols → ``S = G D``; rows < cols → ``S = Dᵀ G``
(rows scored). Both are the right projection of the tall view (``Gᵀ`` in
the second case). A Flax kernel ``[fan_in, fan_out]`` is the transpose of
PyTorch's matrix, so its tall view is ``kernelᵀ`` when ``fan_out ≥ fan_in``
(PyTorch's right case, ties included) and the kernel itself otherwise:
:func:`tall` and :func:`untall` make and undo that view.

Reference: Modoranu et al., *FFT-based Dynamic Subspace Selection for Low-Rank Adaptive Optimization of LLMs* (arXiv
2505.17967); IST-DASLab/ISTA-DASLab-Optimizers ``fft_low_rank``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from orthax.polar.scale_safe import huge_scale


_MAX_DCT_SIZE = 32767  # 2k² < 2³¹


def dct_matrix(k: int, dtype: Any = jnp.float32) -> jax.Array:
  """The orthonormal DCT-II matrix ``D`` (``k×k``, its rows the cosine basis
  vectors) in ``dtype``. The phase ``i(2j+1) < 2k²`` is reduced modulo
  ``4k`` in int32 first, so the cosine's argument stays below ``2π`` and
  float32 keeps full accuracy; ``k`` is at most ``32767`` (``2k²`` must fit
  in int32; ``D`` alone would then be 4 GiB in float32).

  Raises:
    ValueError: for ``k > 32767``.
  """
  if k > _MAX_DCT_SIZE:
    raise ValueError(f'dct_matrix: size {k} is above {_MAX_DCT_SIZE} (a '
                     f'{k}×{k} DCT basis); use a smaller side or max_shape.')
  i = jnp.arange(k, dtype=jnp.int32)[:, None]
  j = jnp.arange(k, dtype=jnp.int32)[None, :]
  phase = (i * (2 * j + 1)) % (4 * k)
  wide = jnp.promote_types(dtype, jnp.float32)
  ang = phase.astype(wide) * (math.pi / (2 * k))
  d = jnp.cos(ang) * math.sqrt(2.0 / k)
  d = d.at[0].multiply(1 / math.sqrt(2.0))
  return d.astype(dtype)


def tall(x: jax.Array, fan_in: int, fan_out: int) -> jax.Array:
  """The tall view ``[k, L, s]`` of a kernel stack ``[k, fan_in,
  fan_out]``: transposed when ``fan_out ≥ fan_in``."""
  return jnp.swapaxes(x, -1, -2) if fan_out >= fan_in else x


def untall(y: jax.Array, fan_in: int, fan_out: int) -> jax.Array:
  """The kernel stack back from its tall view (:func:`tall`)."""
  return jnp.swapaxes(y, -1, -2) if fan_out >= fan_in else y


def sides(fan_in: int, fan_out: int) -> tuple[int, int]:
  """``(L, s)``: the larger and the smaller side."""
  return max(fan_in, fan_out), min(fan_in, fan_out)


def resolve_rank(rank: int | float, smaller: int) -> int:
  """The number of kept columns: an ``int`` rank, or a ``float`` in
  ``(0, 1]`` as a fraction of the smaller side (rounded up); at least 1,
  at most ``smaller``."""
  if isinstance(rank, float):
    x = rank * smaller  # (0.07·100 is 7.000000000000001: 7, not 8)
    r = round(x) if abs(x - round(x)) <= 1e-9 * max(1.0, x) else math.ceil(x)
  else:
    r = int(rank)
  return max(1, min(r, smaller))


def column_scores(s: jax.Array, ell_norm: float = 1.0) -> jax.Array:
  """``‖S_{:,j}‖_p·2⁻ᵉ`` per column of ``s[k, L, s]`` (``p = ell_norm > 0``;
  ``p = 1``: the sum of absolute values), ``[k, s]``; ``2⁻ᵉ`` is one exact
  power of two per matrix, 1 unless ``max|S| > 2³²``
  (:func:`~orthax.polar.scale_safe.huge_scale`), so that no score of a huge
  gradient overflows: they would tie at ``inf`` and select the first
  columns. The order of the scores, all that :func:`select` reads, is
  that of the exact ones."""
  a = jnp.abs(s) * huge_scale(s).astype(s.dtype)
  if ell_norm == 1:
    return jnp.sum(a, axis=-2)
  p = float(ell_norm)
  # Scaled by the column maximum: no overflow of |S|^p for huge gradients.
  top = jnp.max(a, axis=-2, keepdims=True)
  safe = jnp.where(top > 0, top, 1)
  return jnp.sum((a / safe) ** p, axis=-2) ** (1 / p) * safe[..., 0, :]


def select(scores: jax.Array, rank: int) -> jax.Array:
  """The ``rank`` best columns, by descending score (ties: lower index
  first), ``[k, rank]`` int32."""
  return jax.lax.top_k(scores, rank)[1].astype(jnp.int32)


def basis(d: jax.Array, idx: jax.Array) -> jax.Array:
  """``D_{:,\\mathrm{idx}}`` per matrix: ``[k, s, r]``."""
  return jnp.swapaxes(jnp.take(d.T, idx, axis=0), -1, -2)


def take_columns(s: jax.Array, idx: jax.Array) -> jax.Array:
  """``S_{:,\\mathrm{idx}}`` of ``s[k, L, s]``: ``[k, L, r]``."""
  return jnp.take_along_axis(s, idx[:, None, :], axis=-1)


def project(y: jax.Array, d: jax.Array, idx: jax.Array) -> jax.Array:
  """``a = Y D_{:,\\mathrm{idx}}`` (``[k, L, r]``) without the full ``S``."""
  return jnp.einsum('kls,ksr->klr', y, basis(d, idx))


def back_project(u: jax.Array, d: jax.Array, idx: jax.Array) -> jax.Array:
  """``u D_{:,\\mathrm{idx}}^\\top``: ``[k, L, r] → [k, L, s]``."""
  return jnp.einsum('klr,ksr->kls', u, basis(d, idx))


def remap_slots(x: jax.Array, old: jax.Array, new: jax.Array) -> jax.Array:
  """Per-slot values ``x[k, L, r]`` moved from the slots of ``old`` (the
  previously selected indices ``[k, r]``) to those of ``new``: a column
  index kept keeps its values in its new slot, a new one starts at zero.
  This is ``x P`` with the 0/1 map ``P = D_{:,old}^\\top D_{:,new}`` of the
  reference's ``rotate_subspace`` (``|v P|`` for the second moment),
  computed as a gather."""
  match = old[:, :, None] == new[:, None, :]          # [k, r_old, r_new]
  pos = jnp.argmax(match, axis=1)                      # [k, r_new]
  kept = jnp.any(match, axis=1)
  moved = jnp.take_along_axis(x, pos[:, None, :], axis=-1)
  return jnp.where(kept[:, None, :], moved, jnp.zeros_like(moved))
