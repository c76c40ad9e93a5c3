"""ARO's rotation (:class:`AroRotate`): a slot stage that keeps one
orthogonal ``s×s`` matrix ``R`` per matrix and replaces the momentum by
``R f(RᵀA)``, the adaptively rotated step of arXiv 2602.09006.

``A`` is the matrix seen with its **rotated side as rows**: ``s`` rows, one
per index of the rotated side, each a vector of the other side's ``t``
entries. Rotating fan-out (dion's choice) makes ``A`` the PyTorch weight
``W`` (``out×in``); rotating fan-in makes it the Flax kernel ``K = Wᵀ``
(``in×out``). The base map ``f`` always normalizes the rows of ``A`` first
and its columns last, so rotating fan-in is exactly dion's algorithm
applied to the transposed weight.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from orthax import _validate
from orthax.matrix_stages._base import MatrixStage
from orthax.matrix_stages._base import StageShapes
from orthax.matrix_stages._base import stage
from orthax.matrix_stages._base import static
from orthax.matrix_stages._qr import QR_KINDS
from orthax.matrix_stages._qr import Q_OF
from orthax.matrix_stages._qr import beyond_rank
from orthax.matrix_stages._qr import product_q
from orthax.matrix_stages._qr import resolve_qr
from orthax.polar.scale_safe import huge_scale

BASES = ('sinkhorn', 'row_norm', 'sign')
ROTATE_SIDES = ('smaller', 'fan_out', 'fan_in')

# Per-entry FLOPs of one evaluation of each base map as XLA's cost analysis
# counts them (measured on CPU): Sinkhorn's 5 row and 5 column
# normalizations cost 7.5 each (square, sum, root, clamp, scale), the
# row normalization 3, the sign 1.
_MAP_FLOPS = {'sinkhorn': 75, 'row_norm': 3, 'sign': 1}
# Per-entry FLOPs (of the s×s matrix) around the Cholesky QRs' Gram products
# as XLA counts them (measured on CPU: masks, finiteness checks, the shift,
# the certificate and its pivots): Cholesky QR3 6s³ + 109s², shifted
# Cholesky 2s³ + 45s².
_CQR3_ENTRY_FLOPS, _SHIFTED_ENTRY_FLOPS = 109, 45
# Per-entry FLOPs of one rank cut (_beyond_rank_zeroed: the row-scaled
# norms and the mask; measured on CPU): the stable mode cuts RᵀA and QᵀA.
_RANK_CUT_FLOPS = 6


def rotated_side(fan_in: int, fan_out: int, rotate: str, *,
                 owner: str = 'rotated_side') -> str:
  """``'fan_in'`` or ``'fan_out'``: the side ``rotate`` picks for one
  matrix (``'smaller'``: the smaller side, fan-out on a tie); ``owner``
  names the function the user called in the error for another
  ``rotate``."""
  _validate.choice(ROTATE_SIDES)(owner, 'rotate', rotate)
  if rotate == 'smaller':
    return 'fan_in' if fan_in < fan_out else 'fan_out'
  return rotate


def _norm(x, axis, eps):
  return jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True)), eps)


def base_map(x: jax.Array, base: str, iters: int = 5,
             eps: float = 1e-8) -> jax.Array:
  r"""``f(X)`` of a ``[k, s, t]`` stack (rows: the rotated side).

  ``'sinkhorn'``: ``iters`` alternating passes
  :math:`X \leftarrow X\sqrt t/\max(\|x_{i,:}\|, ε)` then
  :math:`X \leftarrow X\sqrt s/\max(\|x_{:,j}\|, ε)` (columns last: every
  column ends with norm ``√s``, RMS 1); ``'row_norm'``: the row step once;
  ``'sign'``: ``sign(X)``.
  """
  s, t = x.shape[-2], x.shape[-1]
  if base == 'sign':
    return jnp.sign(x)
  if base == 'row_norm':
    return x * (math.sqrt(t) / _norm(x, -1, eps))
  if base != 'sinkhorn':
    raise ValueError(f'base_map: base must be one of {BASES}, got '
                     f'{base!r}.')
  for _ in range(iters):
    x = x * (math.sqrt(t) / _norm(x, -1, eps))
    x = x * (math.sqrt(s) / _norm(x, -2, eps))
  return x


def aro_flops(fan_in: int, fan_out: int, rotate: str = 'smaller',
              base: str = 'sinkhorn', qr: str = 'auto',
              stable: bool = True) -> dict[str, int]:
  """FLOPs of one ARO step on one matrix, by part: ``products`` (``RᵀA``,
  ``A Fᵀ``, ``QᵀA``, ``Q F``: ``8s²t``; when
  ``stable``, ``A W`` and the Gram ``BBᵀ`` instead of ``A Fᵀ``:
  ``10s²t`` for ``s ≤ t``; the Gram products of a Cholesky QR, ``6s³``
  for QR3 and ``2s³`` for the shifted one, with their ``O(s²)`` work),
  ``qr`` (what XLA's cost analysis does not count, LAPACK calls:
  Householder ``8/3 s³``, plus ``s³/3 + s²t`` for the Cholesky and
  triangular solve when ``stable``; Cholesky QR3 ``4s³``, three Cholesky
  factorizations and triangular solves; shifted Cholesky ``4/3 s³``) and
  ``base`` (two evaluations of ``f``, as XLA counts them). ``qr='auto'``
  is the kind :func:`~orthax.matrix_stages.resolve_qr` picks for JAX's
  default backend."""
  qr = resolve_qr(qr)
  s, t = ((fan_out, fan_in) if rotated_side(fan_in, fan_out, rotate,
                                            owner='aro_flops')
          == 'fan_out' else (fan_in, fan_out))
  base_flops = (2 * _MAP_FLOPS[base] + (2 * _RANK_CUT_FLOPS if stable else 0)
                ) * s * t
  cqr3 = qr == 'cholesky_qr3' and s <= t
  grams, cqr3_lapack = ((6 * s ** 3 + _CQR3_ENTRY_FLOPS * s * s, 4 * s ** 3)
                        if cqr3 else (0, 0))
  if stable and (qr != 'shifted_cholesky' or s > t):
    # RᵀA, BBᵀ, A W, QᵀA, Q F; Cholesky, L⁻¹B, the QR of A W.
    r = min(s, t)
    householder = (8 * s ** 3 // 3 if s <= t else 4 * s * s * t)
    return dict(products=(6 * s * s * t + 2 * r * r * t + 2 * s * t * r
                          + grams),
                qr=r ** 3 // 3 + r * r * t + (cqr3_lapack if cqr3
                                              else householder),
                base=base_flops)
  qr_flops = {'householder': 8 * s ** 3 // 3, 'cholesky_qr3': cqr3_lapack,
              'shifted_cholesky': 4 * s ** 3 // 3}[qr]
  if qr == 'cholesky_qr3' and not cqr3:  # rank ≤ t < s: Householder's
    qr_flops = 8 * s ** 3 // 3
  if qr == 'shifted_cholesky':
    grams = 2 * s ** 3 + _SHIFTED_ENTRY_FLOPS * s * s
  return dict(products=8 * s * s * t + grams, qr=qr_flops, base=base_flops)


@stage
class AroRotate(MatrixStage):
  r"""ARO's rotated step (a slot stage; run it instead of Newton–Schulz, on
  the momentum ``A``, rows = the rotated side):

  .. math::
     C = A\,f(R^\top A)^\top,\qquad R \leftarrow \mathrm{qr}(C)_Q,\qquad
     O = R\,f(R^\top A)

  with ``f`` the base map
  (:func:`orthax.matrix_stages._rotate.base_map`) and the previous ``R``
  in ``C``. State: ``R`` (``s×s``, float32 or wider, the identity at first).
  A matrix above ``2³²`` enters scaled by a power of two (``f`` and ``Q``
  are scale-invariant, so ``O`` is the unscaled matrix's).

  ``stable`` (default) computes what the reference's arithmetic gives
  exactly, in a numerically stable way: the Householder ``Q`` of the product
  ``C = A Fᵀ`` as that of ``A W``, ``W`` an orthonormal basis of ``Fᵀ``'s
  leading columns (:func:`~orthax.matrix_stages._qr.product_q`; equal up to column
  signs, which ``f`` commutes with, so ``O`` is unchanged), whose condition
  is ``A``'s alone (the explicit product's float32 error reaches 1e-3 on
  square matrices); and, where the rotated side is the larger (``s > t``),
  where ``C`` has rank ``≤ t`` and the reference's last ``s − t`` columns of
  ``Q`` and rows of ``QᵀA`` are roundoff that the clamp in ``f`` blows up to
  full size (``tests/test_aro.py``), the exact-arithmetic values: the
  trailing Householder reflectors the identity and those rows zero (for
  either QR kind). The same holds inside the rotated side: a momentum of
  lower rank than ``s`` (a small batch; a dead unit's zero row) gets the
  exact-arithmetic ``Q`` past its rank, not rounding's, and the rows of
  ``QᵀA`` there zero (so the step is a continuous function of the
  gradient: a perturbation at rounding level, or another device layout,
  moves it at rounding level, where it moved the next steps by 20–40%;
  ``tests/test_aro_low_rank.py``). ``stable=False`` keeps the reference's
  floating-point arithmetic, roundoff and all.

  ``qr`` is how ``Q`` is computed: ``'cholesky_qr3'``
  (:func:`~orthax.matrix_stages._qr.cholesky_qr3_q`: matrix products and Cholesky factorizations,
  Householder's ``Q`` up to column signs, as accurate in float32, with a
  certified fallback to Householder), ``'householder'`` (LAPACK/cuSOLVER:
  on a GPU about 100× slower here, one small factorization at a time),
  ``'auto'`` (default: Householder on CPU, Cholesky QR3 elsewhere, by the
  platform the step is lowered for; the FLOP model takes JAX's default
  backend's, :func:`~orthax.matrix_stages.resolve_qr`) or
  ``'shifted_cholesky'`` (dion's one-pass ``CᵀC + 10⁻⁷‖C‖²I`` form, whose
  ``Q`` is far from orthogonal once ``κ(C)`` passes about 10³).

  The stage of :func:`orthax.transforms.aro_rotate`, which sets ``base``,
  ``qr``, ``rotate`` and ``stable`` and keeps ``iters`` and ``eps`` at their
  defaults. All fields are static.

  Args:
    base: the base map ``f``
      (:func:`orthax.matrix_stages._rotate.base_map`): ``'sinkhorn'``
      (default), ``'row_norm'`` or ``'sign'``.
    qr: how ``Q`` is computed (above): ``'auto'`` (default),
      ``'cholesky_qr3'``, ``'householder'`` or ``'shifted_cholesky'``.
    rotate: the rotated side: ``'smaller'`` (default; fan-out on a tie),
      ``'fan_out'`` (the PyTorch rows, dion's) or ``'fan_in'``.
    iters: Sinkhorn's alternating row/column passes (default 5;
      ``'sinkhorn'`` only).
    eps: the floor of the row and column norms ``f`` divides by (default
      1e-8; not used by ``'sign'``).
    stable: the exact-arithmetic values, computed stably (default
      ``True``, above); ``False``: the reference's arithmetic.
  """

  name = 'aro_rotate'
  checks = {'iters': _validate.count, 'eps': _validate.positive}
  base: str = static(default='sinkhorn')
  qr: str = static(default='auto')
  rotate: str = static(default='smaller')
  iters: int = static(default=5)
  eps: float = static(default=1e-8)
  stable: bool = static(default=True)

  def __post_init__(self):
    for what, value, ok in (('base', self.base, BASES),
                            ('qr', self.qr, QR_KINDS),
                            ('rotate', self.rotate, ROTATE_SIDES)):
      _validate.choice(ok)(self.name, what, value)

  def side(self, fan_in: int, fan_out: int) -> str:
    return rotated_side(fan_in, fan_out, self.rotate)

  def shapes(self, fan_in, fan_out):
    s = fan_out if self.side(fan_in, fan_out) == 'fan_out' else fan_in
    return StageShapes(state=(s, s), slots=True)

  def initial_state(self, fan_in, fan_out, dtype):
    return jnp.eye(self.shapes(fan_in, fan_out).state[0], dtype=dtype)

  def flops(self, fan_in, fan_out):
    return sum(aro_flops(fan_in, fan_out, self.rotate, self.base,
                         self.qr, self.stable).values())

  def apply(self, o, state, blocks):
    if blocks.split is not None:
      raise ValueError('AroRotate needs whole matrices (no column blocks).')
    r = state
    x = o.astype(r.dtype)
    flip = self.side(blocks.fan_in, blocks.fan_out) == 'fan_out'
    # [k, s, t]: rows = the rotated side
    a = jnp.matrix_transpose(x) if flip else x
    a = a * huge_scale(a).astype(a.dtype)
    f = lambda y: base_map(y, self.base, self.iters, self.eps)
    ra = jnp.matrix_transpose(r) @ a
    # Stable: the rows of RᵀA past A's rank (R's columns orthogonal to its
    # range, as a momentum of fixed lower rank leaves them) are zero in
    # exact arithmetic, rounding here, which f would blow up to full rows.
    fm = f(_beyond_rank_zeroed(ra, past_t=False) if self.stable else ra)
    s, t = a.shape[-2], a.shape[-1]
    if self.qr == 'auto':  # the kind by the platform it is lowered for
      q = jax.lax.platform_dependent(
          a, fm, cpu=lambda a, fm: self._q(a, fm, resolve_qr('auto', 'cpu')),
          default=lambda a, fm: self._q(a, fm, resolve_qr('auto', 'gpu')))
    else:
      q = self._q(a, fm, self.qr)
    x = jnp.matrix_transpose(q) @ a
    if self.stable:
      x = _beyond_rank_zeroed(x)
    u = q @ f(x)
    return (jnp.matrix_transpose(u) if flip else u).astype(o.dtype), q

  def _q(self, a, fm, qr):
    """``Q`` of ``C = A Fᵀ`` by QR kind ``qr`` (not ``'auto'``)."""
    s, t = a.shape[-2], a.shape[-1]
    if self.stable and (qr != 'shifted_cholesky' or s > t):
      return product_q(a, fm, qr)
    # Cholesky QR3 of a rank-deficient C (s > t) would always fall back.
    kind = 'householder' if qr == 'cholesky_qr3' and s > t else qr
    return Q_OF[kind](a @ jnp.matrix_transpose(fm))


def _beyond_rank_zeroed(x: jax.Array, past_t: bool = True) -> jax.Array:
  """``x = QᵀA`` with the rows that are zero in exact arithmetic set to
  zero: those past ``A``'s rank (:func:`~orthax.matrix_stages._qr.beyond_rank`
  of the row norms), whose ``Q`` columns are orthogonal to the range of
  ``A`` (ALGORITHMS.md §13.1.4a), and every row past ``t`` when ``s > t``.
  Rounding leaves the first kind at 5–2500·ε‖A‖₂ (ε the dtype's epsilon;
  more as the rank grows), and the base map would scale each up to a whole
  row of the step, in a direction set by the rounding. A rank close to
  ``s`` keeps the reference's arithmetic; a full-rank momentum whose other
  directions lie 10⁴-fold below its largest loses them."""
  s, t = x.shape[-2], x.shape[-1]
  kept = ~beyond_rank(_row_norms(x), x.dtype)
  if past_t and s > t:
    kept = kept & (jnp.arange(s) < t)
  return jnp.where(kept[..., None], x, 0)


def _row_norms(x: jax.Array) -> jax.Array:
  """``‖x_i‖`` of each row, each row divided by its largest ``|entry|``
  before squaring: squared, the rounding rows of a tiny ``QᵀA`` (or all
  rows but one below a huge entry) underflow to zero, which would read as
  exact zeros, no gap."""
  top = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  safe = jnp.where(top > 0, top, 1)
  return top[..., 0] * jnp.sqrt(jnp.sum(jnp.square(x / safe), axis=-1))


def aro_state_bytes(fan_in: int, fan_out: int, rotate: str = 'smaller',
                    itemsize: int = 4) -> int:
  """Bytes of one matrix's rotation ``R``."""
  side = rotated_side(fan_in, fan_out, rotate, owner='aro_state_bytes')
  s = fan_out if side == 'fan_out' else fan_in
  return s * s * itemsize


__all__ = ['AroRotate', 'BASES', 'QR_KINDS', 'ROTATE_SIDES', 'aro_flops',
           'aro_state_bytes', 'base_map', 'rotated_side']
