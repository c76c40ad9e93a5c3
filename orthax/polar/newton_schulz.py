"""Batched Newton–Schulz orthogonalization on arrays shaped ``[..., m, n]``.

Pure ``jax.numpy``; knows nothing of optax. One quintic step with row
``(a, b, c)`` is

.. math::
   A = X X^\\top,\\qquad B = bA + cA^2,\\qquad X \\leftarrow aX + BX,

which maps every singular value ``σ ↦ aσ + bσ³ + cσ⁵`` and keeps the singular
vectors. The iteration always runs in the wide orientation (``m ≤ n``) so that
``A`` is the smaller Gram matrix; tall inputs are transposed in and out, which
is exact because ``NS(Xᵀ) = NS(X)ᵀ`` for every normalizer except AOL (whose
row scaling acts along the shorter side, as in the reference).

Steps run in a ``lax.fori_loop`` on CPU, so compile time and memory do not
grow with the step count, and unrolled on other platforms when the step count
is a Python integer (:mod:`orthax.polar.step_loop`); the coefficient row of step ``k`` is
``coeffs[min(k, len(coeffs) - 1)]`` — a table shorter than the step count
repeats its last row (Polar Express semantics).

Tensor-parallel use: every function here takes ``col_reduce``, a callable
applied to the float32 partial sums over the long (column) axis — the Gram
matrix ``XXᵀ`` and the squared Frobenius norm — before they are used. When
each device holds a column block ``[..., m, n/G]`` of wide matrices,
``col_reduce = lambda a: jax.lax.psum(a, axes)`` inside ``shard_map`` makes
the iteration exact on the sharded matrix: the ``m×m`` polynomial is
replicated and ``X ← (aI + bA + cA²)X`` acts on each block locally. The input
is then never transposed (the caller orients it wide). The Frobenius norm of
column blocks is summed in two parts that cannot overflow
(:func:`orthax.polar.scale_safe.split_squares`), in the same one
all-reduce.

References: K. Jordan, *Muon* (2024); Amsel et al., *The Polar Express*
(arXiv 2505.16932); Grishina et al., *CANS* (arXiv 2506.10935); Boissin et
al., *Turbo-Muon* (arXiv 2512.04632).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from orthax import _validate
from orthax.polar import lapack
from orthax.polar import presets as _presets
from orthax.polar.scale_safe import ColReduce
from orthax.polar.scale_safe import block_norm
from orthax.polar.scale_safe import huge_scale
from orthax.polar.step_loop import run_steps

NORMALIZERS = ('frobenius', 'schatten4', 'aol', 'none')


def _reduced(a: jax.Array, col_reduce: ColReduce) -> jax.Array:
  return a if col_reduce is None else col_reduce(a)


def coefficient_table(coeffs: Any, *,
                      owner: str = 'coefficient_table') -> np.ndarray:
  """``coeffs`` (one ``(a, b, c)`` row or ``k`` of them) as a float64
  ``(k, 3)`` table; ``ValueError`` for any other shape or a non-finite
  entry.

  Args:
    coeffs: one row ``(a, b, c)`` (shape ``(3,)``) or ``k ≥ 1`` rows
      (``(k, 3)``), any array-like of numbers.
    owner: the function the user called, named in the errors.
  """
  try:
    table = np.asarray(coeffs, dtype=np.float64)
  except (TypeError, ValueError) as e:
    if type(e) not in (TypeError, ValueError):  # e.g. jax's, for a tracer
      raise
    # numpy's, naming no argument: said again naming them, as its type.
    raise type(e)(f'{owner}: coeffs must be a table of numbers '
                  f'({e}).') from None
  if table.ndim == 1:
    table = table[None]
  if table.ndim != 2 or table.shape[-1] != 3 or table.shape[0] < 1:
    raise ValueError(
        f'{owner}: coeffs must have shape (3,) or (k, 3) with k >= 1, got '
        f'shape {table.shape}.')
  if not np.all(np.isfinite(table)):
    raise ValueError(f'{owner}: coeffs must be finite, got {table}.')
  return table


def _mm(a, b):
  """Matmul accumulating (and returning) float32 or wider."""
  acc = jnp.promote_types(a.dtype, jnp.float32)
  return jnp.matmul(a, b, preferred_element_type=acc)


def _quintic_from_gram(x, gram, row):
  """``(aI + bA + cA²)·X`` with ``A = gram`` already formed.

  Folding ``a`` into the diagonal of the small ``m×m`` polynomial saves an
  elementwise pass over ``X`` per step: each step is three matmuls plus
  ``m×m`` work. Matmul inputs stay in the iteration dtype (bf16 runs at bf16
  speed); products accumulate in float32 and the coefficients are applied in
  float32, so a bf16 iteration rounds the polynomial once per step instead of
  rounding the coefficients themselves (8.1566 → 8.125 in bf16).
  """
  a, b, c = row[0], row[1], row[2]
  eye = jnp.eye(gram.shape[-1], dtype=a.dtype)
  poly = (a * eye + b * gram.astype(a.dtype) + c * _mm(gram, gram))
  return _mm(poly.astype(x.dtype), x).astype(x.dtype)


def _gram(x, col_reduce: ColReduce = None):
  return _reduced(_mm(x, jnp.matrix_transpose(x)), col_reduce).astype(x.dtype)


def _quintic(x, row, col_reduce: ColReduce = None):
  return _quintic_from_gram(x, _gram(x, col_reduce), row)


def _rsqrt_clamped(v, eps):
  return jax.lax.rsqrt(jnp.maximum(v, eps))


def normalize_frobenius(x: jax.Array, scale: float = 1.0,
                        eps: float = 1e-7, *,
                        col_reduce: ColReduce = None) -> jax.Array:
  """``X / (scale·‖X‖_F + eps)`` per matrix (norm taken in float32 or wider;
  ``col_reduce`` completes the sum of squares of a column block), computed
  as ``X·2⁻ᵉ / (scale·‖X·2⁻ᵉ‖_F + eps·2⁻ᵉ)`` where a matrix of the stack
  has ``2⁻ᵉ < 1``: ``max|X| > 2³²`` (:func:`huge_scale`; column blocks:
  ``‖X‖_F > 2³²``, :func:`block_norm`, which sums the squares in two
  parts). Neither the sum of squares nor the quotient can overflow or
  underflow, up to the dtype's largest finite entries; below the threshold
  it is the plain quotient (the same arithmetic; XLA may order the sum of
  squares differently, a last-bit difference).

  Args:
    x: array ``[..., m, n]``; each matrix is normalized by its own norm.
    scale: ``s`` in ``X / (s·‖X‖_F + eps)`` (default 1; Polar Express uses
      1.01/1.02).
    eps: added to the scaled norm (default 1e-7), so a zero matrix maps
      to zeros.
    col_reduce: completes the (float32 or wider) sums of squares of a
      column block ``[..., m, n/G]`` (module docstring), e.g.
      ``lambda a: jax.lax.psum(a, 'tp')``; ``None``: whole matrices.

  Returns:
    An array like ``x`` (its dtype).
  """
  acc = jnp.promote_types(x.dtype, jnp.float32)
  xa = x.astype(acc)
  if col_reduce is not None:
    f, norm = block_norm(xa, col_reduce)  # norm = ‖X·f‖_F, f = 1: ‖X‖_F

    def plain():
      return xa / (scale * norm + eps)
  else:
    f = huge_scale(xa).astype(acc)

    def plain():
      n = jnp.sqrt(jnp.sum(jnp.square(xa), axis=(-2, -1), keepdims=True))
      return xa / (scale * n + eps)

  def scaled():
    xs = xa * f
    n = norm if col_reduce is not None else jnp.sqrt(
        jnp.sum(jnp.square(xs), axis=(-2, -1), keepdims=True))
    return xs / (scale * n + eps * f)

  # X over its norm is a subnormal quotient past ‖X‖ ≈ 2¹²⁶ (8.5e37,
  # float32), flushed: an update of zeros. A stack holding a huge matrix
  # divides X·2⁻ᵉ by its own norm; the others, X by its norm, as before:
  # done for every stack, the product X·2⁻ᵉ took a stack-sized buffer
  # more (+19% temporaries in scripts/bench_ns.py; the branch costs 5%).
  return jax.lax.cond(jnp.all(f == 1), plain, scaled).astype(x.dtype)


class Prepared(NamedTuple):
  """Normalized wide input and the resolved iteration settings."""
  x: jax.Array               # wide [..., m, n] in the iteration dtype
  gram: jax.Array | None     # X Xᵀ of the normalized x, if the normalizer made it
  rows: jax.Array            # coefficient table, float32 or wider
  last: int                  # index of the table's last row
  steps: Any                 # int or traced int
  tall: bool                 # input was transposed
  out_dtype: Any

  def finish(self, x: jax.Array) -> jax.Array:
    return (jnp.matrix_transpose(x) if self.tall else x).astype(self.out_dtype)


def prepare(x, preset, *, steps, coeffs, normalizer, norm_scale, eps, dtype,
            who, col_reduce: ColReduce = None) -> Prepared:
  """Resolves a preset and its overrides, orients ``x`` wide and normalizes
  it (shared by :func:`newton_schulz` and the Gram variant)."""
  _presets.check_preset(who, 'preset', preset)
  p = _presets.get_preset(preset)
  table = coefficient_table(p.coeffs if coeffs is None else coeffs,
                            owner=who)
  normalizer = p.normalizer if normalizer is None else normalizer
  _validate.choice(NORMALIZERS)(who, 'normalizer', normalizer)
  norm_scale = p.norm_scale if norm_scale is None else norm_scale
  eps = p.eps if eps is None else eps
  # A negative norm_scale flipped the result's sign, 0 or NaN made it NaN.
  _validate.positive(who, 'norm_scale', norm_scale)
  _validate.positive(who, 'eps', eps)
  steps = p.steps if steps is None else steps
  if not isinstance(steps, jax.core.Tracer):
    # An int, or a 0-d integer array (what optax.inject_hyperparams passes
    # outside jit).
    arr = None if isinstance(steps, (bool, np.bool_)) else np.asarray(steps)
    if arr is None or arr.ndim or not np.issubdtype(arr.dtype, np.integer):
      raise TypeError(f'{who}: steps must be an int, got {steps!r}.')
    if int(arr) < 1:
      raise ValueError(f'{who}: steps must be >= 1, got {int(arr)}.')
  if x.ndim < 2:
    raise ValueError(f'{who}: x must have shape [..., m, n], got shape '
                     f'{x.shape}.')

  out_dtype = x.dtype
  if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f'{who}: dtype must be a floating-point dtype, got '
                    f'{jnp.dtype(dtype).name}.')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f'{who}: x must hold real floating-point numbers, got '
                    f'{x.dtype.name}.')
  dtype = jnp.dtype(x.dtype if dtype is None else dtype)
  tall = col_reduce is None and x.shape[-2] > x.shape[-1]
  if tall:
    x = jnp.matrix_transpose(x)
  acc = jnp.promote_types(dtype, jnp.float32)
  rows = jnp.asarray(table, acc)
  gram = None
  if normalizer in ('aol', 'schatten4'):
    # Their Gram matrix of the raw x could overflow. Column blocks: scaled
    # by the power of two of the whole norm (one more all-reduce).
    f = (huge_scale(x) if col_reduce is None
         else block_norm(x, col_reduce)[0])
    x = (x * f.astype(x.dtype)).astype(x.dtype)
  if normalizer == 'frobenius':
    x = normalize_frobenius(x, norm_scale, eps,
                            col_reduce=col_reduce).astype(dtype)
  elif normalizer == 'none':
    x = x.astype(dtype)
  else:
    # The raw Gram matrix is formed and scaled in float32 or wider: in
    # float16 the unnormalized XXᵀ could overflow.
    x = x.astype(dtype)
    g = _reduced(_mm(x, jnp.matrix_transpose(x)), col_reduce)
    if normalizer == 'aol':
      s = _rsqrt_clamped(jnp.sum(jnp.abs(g), axis=-1, keepdims=True), eps)
      g = g * s * jnp.matrix_transpose(s)
    else:  # schatten4
      s = _rsqrt_clamped(
          jnp.sqrt(jnp.sum(jnp.square(g), axis=(-2, -1), keepdims=True)), eps)
      g = g * (s * s)
    x = (x.astype(acc) * s).astype(dtype)
    gram = g.astype(dtype)
  return Prepared(x, gram, rows, table.shape[0] - 1, steps, tall, out_dtype)


def newton_schulz(
    x: jax.Array,
    preset: str | _presets.Preset = 'jordan',
    *,
    steps: int | jax.Array | None = None,
    coeffs: Sequence[Sequence[float]] | None = None,
    normalizer: str | None = None,
    norm_scale: float | None = None,
    eps: float | None = None,
    dtype: Any = None,
    col_reduce: ColReduce = None,
) -> jax.Array:
  r"""Approximates the polar factor ``UVᵀ`` of every matrix in ``x``.

  Normalizers (applied once, before the first step):

  * ``frobenius``: :math:`X \leftarrow X / (s\,\|X\|_F + \epsilon)`;
  * ``schatten4``: :math:`X \leftarrow X / \|XX^\top\|_F^{1/2}` (the Schatten-4
    norm, between :math:`\sigma_{max}` and :math:`\|X\|_F`; CANS), the Gram
    matrix of the first step is reused;
  * ``aol``: :math:`X \leftarrow \mathrm{diag}(s)X` with
    :math:`s_i = \max(\sum_j |A_{ij}|, \epsilon)^{-1/2}`, :math:`A = XX^\top`,
    which bounds :math:`\|\mathrm{diag}(s)X\|_2 \le 1` (Turbo-Muon), with
    :math:`A` rescaled in place and reused;
  * ``none``: the caller guarantees :math:`\sigma_{max} \le 1`.

  Args:
    x: array ``[..., m, n]``; leading axes are a batch.
    preset: a name from :func:`orthax.polar.preset_names` or a ``Preset``.
    steps: number of steps (default: the preset's). May be a traced integer.
    coeffs: overrides the preset's table, shape ``(3,)`` or ``(k, 3)``.
    normalizer: overrides the preset's normalizer.
    norm_scale: overrides the Frobenius scale (Polar Express uses 1.01/1.02).
    eps: overrides the normalizer's epsilon.
    dtype: dtype of the iteration (e.g. ``jnp.bfloat16``); default ``x.dtype``.
      The result is cast back to ``x.dtype``.
    col_reduce: completes the column sums of a column block (see the module
      docstring), e.g. ``lambda a: jax.lax.psum(a, 'tp')``; ``x`` is then
      taken as given (wide), never transposed.

  Returns:
    An array like ``x``. A zero matrix maps to zeros.
  """
  return iterate(x, preset, steps=steps, coeffs=coeffs,
                 normalizer=normalizer, norm_scale=norm_scale, eps=eps,
                 dtype=dtype, col_reduce=col_reduce, who='newton_schulz')


def iterate(x, preset, *, who: str, steps=None, coeffs=None,
            normalizer=None, norm_scale=None, eps=None, dtype=None,
            col_reduce: ColReduce = None) -> jax.Array:
  """:func:`newton_schulz`, its errors naming ``who`` (the function the
  user called)."""
  st = prepare(x, preset, steps=steps, coeffs=coeffs, normalizer=normalizer,
               norm_scale=norm_scale, eps=eps, dtype=dtype, who=who,
               col_reduce=col_reduce)
  x = st.x
  if st.gram is not None:  # AOL / Schatten-4: the first step reuses the Gram
    x = _quintic_from_gram(x, st.gram, st.rows[0])
  rows, last = st.rows, st.last

  def body(k, x):
    return _quintic(x, rows[jnp.minimum(k, last)], col_reduce)

  x = run_steps(0 if st.gram is None else 1, st.steps, body, x)
  return st.finish(x)


def polar_svd(x: jax.Array, rtol: float | None = None) -> jax.Array:
  r"""Exact polar factor :math:`U\,\mathrm{diag}(1[\sigma_i > \tau])\,V^\top`.

  Computed from a thin SVD of each matrix in ``x`` (``[..., m, n]``). Singular
  values at or below ``τ = rtol·σ_max`` (default ``rtol = max(m, n)·eps``) are
  treated as zero, so a zero or rank-deficient matrix gets the unique
  partial isometry on its range (zeros for a zero matrix). For tests and small
  matrices; cost is O(mn·min(m, n)) with a large constant.

  Args:
    x: array ``[..., m, n]``; leading axes are a batch. bfloat16 and float16
      are computed in float32 (LAPACK has no half-precision SVD) and the
      result has ``x``'s dtype.
    rtol: relative cut-off ``τ/σ_max`` (default ``max(m, n)·eps`` of the
      computation dtype).
  """
  if x.ndim < 2:
    raise ValueError(f'polar_svd: x must have shape [..., m, n], got shape '
                     f'{x.shape}.')
  out_dtype = x.dtype
  # LAPACK has no half-precision SVD: bfloat16 and float16 in float32.
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  u, s, vt = lapack.per_matrix(
      lambda m: jnp.linalg.svd(m, full_matrices=False), x)
  if rtol is None:
    rtol = max(x.shape[-2:]) * float(jnp.finfo(s.dtype).eps)
  tau = rtol * jnp.max(s, axis=-1, keepdims=True)
  keep = (s > tau).astype(x.dtype)
  return ((u * keep[..., None, :]) @ vt).astype(out_dtype)
