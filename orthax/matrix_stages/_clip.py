r"""ROOT's outlier clip as a matrix stage: :func:`abs_quantile` and
:class:`ClipOutliers`.

He et al., *ROOT: Robust Orthogonalized Optimizer* (Huawei Noah, arXiv
2511.20626); reference ``huawei-noah/noah-research`` @ a99fb00,
``ROOT/examples/example_train.py``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from orthax import _validate
from orthax.matrix_stages._base import MatrixStage
from orthax.matrix_stages._base import stage


def _bits(x):
  """Order-preserving integer image of non-negative floats (float32 or
  float64; narrower floats are widened to float32, exactly)."""
  if jnp.finfo(x.dtype).bits < 32:
    x = x.astype(jnp.float32)
  it = jnp.int64 if x.dtype == jnp.float64 else jnp.int32
  return x, jax.lax.bitcast_convert_type(x, it)


def abs_quantile(x: jax.Array, q: float | jax.Array) -> jax.Array:
  r"""``jnp.quantile(|x|, q, axis=-1)`` (``method='linear'``), exactly,
  without sorting.

  The two order statistics ``v_{(⌊p⌋)}``, ``v_{(⌈p⌉)}`` (``p = q(n-1)``)
  that the linear interpolation needs are found by a bitwise binary search
  (radix select) over the float bit patterns of ``|x|`` — which are ordered
  like the values — counting ``#{v ≤ t}`` in each of 31 (float64: 63)
  passes, plus one pass for the next larger value: ``O(n)`` work per row
  and no sort (on CPU ``jax.lax.top_k`` with ``k ≈ n/10`` costs as much as
  a full sort, 14× more than this search). The interpolation repeats
  ``jnp.quantile``'s arithmetic (``low·(1-w) + high·w`` in ``q``'s dtype,
  cast to ``x``'s), equal up to how XLA fuses that last expression (≤ 2
  ulp; exact where ``q(n-1)`` is an integer). ``q`` may be traced. Its
  derivative in ``x`` is ``jnp.quantile``'s (the interpolation weights on
  the two elements; split between tied ones). Returns ``x.shape[:-1]``.

  Args:
    x: ``[..., n]``, real floating; the quantile of ``|x|`` is taken over
      the last axis, the leading axes are a batch.
    q: the quantile, in ``[0, 1]`` (a number or a scalar array, may be
      traced); the interpolation runs in its dtype.

  Example:

  >>> import jax.numpy as jnp
  >>> from orthax.matrix_stages import abs_quantile
  >>> float(abs_quantile(jnp.array([[-4.0, 1.0, 2.0, -3.0, 0.0]]), 0.5)[0])
  2.0
  """
  if jnp.ndim(q) == 0:  # (one per row also works, unchecked)
    _validate.fraction('abs_quantile', 'q', q)
  out_dtype = x.dtype
  a, b = _bits(jnp.abs(x))
  n = x.shape[-1]
  qd = jnp.asarray(q)  # jnp.quantile interpolates in q's dtype (float32 for
  if not jnp.issubdtype(qd.dtype, jnp.floating):  # a Python float, float64
    qd = qd.astype(jnp.result_type(float))        # with x64), then casts back
  pos = qd * (jnp.asarray(n, qd.dtype) - 1)
  low = jnp.floor(pos)
  w_hi = pos - low
  w_lo = 1 - w_hi
  target = jnp.clip(low, 0, n - 1).astype(b.dtype)  # 0-based rank
  top = jnp.asarray(jnp.finfo(a.dtype).max, a.dtype)
  hi0 = jax.lax.bitcast_convert_type(top, b.dtype)
  lo = jnp.zeros(x.shape[:-1], b.dtype)
  hi = jnp.full(x.shape[:-1], hi0, b.dtype)
  cnt_dtype = jnp.int32 if n < 2**31 else jnp.int64

  def body(_, carry):  # invariant: the target-th smallest lies in [lo, hi]
    lo, hi = carry
    mid = lo + (hi - lo) // 2
    cnt = jnp.sum((b <= mid[..., None]).astype(cnt_dtype), axis=-1)
    ok = cnt > target
    return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

  passes = jnp.iinfo(b.dtype).bits - 1
  lo, _ = jax.lax.fori_loop(0, passes, body, (lo, hi))
  # Read back from |x| where its bits are lo's (not bit-converted from lo,
  # which no derivative passes through): jax.grad and jvp then see
  # jnp.quantile's weights on the two order statistics. (The fill -1 is
  # below every |x|, so no masked entry shares max's derivative; a row
  # whose statistic is NaN, above every finite pattern, matches nothing
  # and takes lo's bits: NaN, as jnp.quantile.)
  hit = b == lo[..., None]
  v_lo = jnp.where(jnp.any(hit, axis=-1),
                   jnp.max(jnp.where(hit, a, -1), axis=-1),
                   jax.lax.bitcast_convert_type(lo, a.dtype))
  # The next order statistic: v_lo again if it repeats, else the next value.
  n_le = jnp.sum((b <= lo[..., None]).astype(cnt_dtype), axis=-1)
  nxt = jnp.min(jnp.where(b > lo[..., None], a, top), axis=-1)
  v_hi = jnp.where((n_le > target + 1) | (target + 1 > n - 1), v_lo, nxt)
  v_lo, v_hi = v_lo.astype(qd.dtype), v_hi.astype(qd.dtype)
  return (v_lo * w_lo + v_hi * w_hi).astype(out_dtype)


@stage
class ClipOutliers(MatrixStage):
  r"""Each matrix clipped at its own ``quantile`` of ``|u|`` (ROOT):

  .. math::
     ε = \mathrm{quantile}_q(|u|) + \mathrm{eps},\qquad
     B = \mathrm{clip}(u, -ε, ε)

  over all entries of the whole matrix (:func:`abs_quantile`; a zero matrix
  stays zero). The result does not depend on the matrix's orientation, so
  it can run before Newton–Schulz on the wide stack
  (:func:`orthax.orthogonalize` ``before=``; on a mesh inside the body,
  where the matrix is whole). Whole matrices only. The stage of
  :func:`orthax.clip_outliers` and :func:`orthax.root`.

  Args:
    quantile: ``q`` in ``[0, 1]`` (default 0.9, ROOT's: the top 10% of
      magnitudes are clipped); may be traced.
    eps: added to the quantile, the clip bound (default 1e-9, ROOT's).
  """

  name = 'clip_outliers'
  checks = {'quantile': _validate.fraction, 'eps': _validate.nonnegative}
  quantile: Any = 0.9
  eps: Any = 1e-9
  whole_matrices = True       # a quantile over every entry of the matrix
  transpose_invariant = True  # an element-wise map by a whole-matrix value

  def apply(self, o, state, blocks):
    if blocks.split is not None:
      raise ValueError('ClipOutliers needs whole matrices (no column '
                       'blocks).')
    flat = o.reshape(o.shape[0], -1)
    e = (abs_quantile(flat, self.quantile) + self.eps).astype(o.dtype)
    return jnp.clip(o, -e[:, None, None], e[:, None, None]), state
