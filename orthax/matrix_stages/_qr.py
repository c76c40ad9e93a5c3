"""The orthogonal factor ``Q`` of a QR factorization, as ARO's rotation needs
it (:mod:`orthax.matrix_stages._rotate`): LAPACK/cuSOLVER Householder QR, the
stable product QR of ``A Fᵀ`` (:func:`product_q`), dion's one-pass shifted
Cholesky QR and shifted Cholesky QR3, each with certified fallbacks that are
computed for the failing matrices only. Pure ``jax.numpy`` on stacks
``[..., s, t]``; on CPU every LAPACK call sees one matrix at a time
(:func:`orthax.polar.lapack.per_matrix`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from orthax.polar import lapack

QR_KINDS = ('auto', 'cholesky_qr3', 'householder', 'shifted_cholesky')


def resolve_qr(qr: str, backend: str | None = None) -> str:
  """The QR kind ``qr`` names on ``backend`` (default: JAX's default
  backend): ``'auto'`` is ``'householder'`` on CPU, where LAPACK's blocked
  Householder QR is the faster (ARO's step on one GPT-2-small layer: 0.97×
  Muon's against 1.08× with Cholesky QR3), and ``'cholesky_qr3'`` elsewhere
  (an H200 factors a stack's Householder QRs one small matrix at a time:
  260× Muon's step against 4.5×). Both give Householder's ``Q`` up to column
  signs, which ARO's update does not see. Other kinds are returned as
  given. (:class:`~orthax.matrix_stages.AroRotate` makes the choice when
  its step is lowered, for the platform it is lowered for; its FLOP model
  asks this function for JAX's default backend.)

  Args:
    qr: one of ``'auto'``, ``'cholesky_qr3'``, ``'householder'`` or
      ``'shifted_cholesky'`` (not checked here).
    backend: a JAX platform name, e.g. ``'cpu'`` or ``'gpu'`` (default
      ``None``: ``jax.default_backend()``); read only for ``'auto'``.

  Example:
    >>> from orthax.matrix_stages import resolve_qr
    >>> resolve_qr('auto', 'cpu'), resolve_qr('auto', 'gpu')
    ('householder', 'cholesky_qr3')
  """
  if qr != 'auto':
    return qr
  backend = jax.default_backend() if backend is None else backend
  return 'householder' if backend == 'cpu' else 'cholesky_qr3'


def householder_q(c: jax.Array) -> jax.Array:
  """``Q`` of the reduced Householder QR of each ``[k, s, s]`` matrix."""
  return lapack.per_matrix(lambda x: jnp.linalg.qr(x)[0], c)


def beyond_rank(norms: jax.Array, dtype) -> jax.Array:
  """Which of ``norms`` (``[..., n]``, ``≥ 0``: the rows of ``QᵀA``, or
  the pivots ``|R_jj|`` of a QR) lie past the numerical rank, as a mask.
  No bound on the size alone tells rounding from the smallest values of a
  full-rank matrix (a square float32 Gaussian's rows of ``QᵀA`` reach down
  to ``250·ε‖A‖₂``, rounding rows up to ``3000·ε`` of the largest at rank
  500 of 1024), but a gap does: sorted, the values below the first ratio
  of at least 100 between neighbours below which they are at most ``10³·ε``
  times the largest (``ε`` of ``dtype``) are past the rank; exact zeros
  aside (no gap to them, and they are not flagged). The first such gap,
  not the largest: under one entry ``10³⁰`` times the others, a rounding
  row at ``ε`` lies ``10⁸``-fold above the other directions, whose gap to
  it is the larger."""
  if norms.shape[-1] == 1:  # one value: never past the rank
    return jnp.zeros(norms.shape, bool)
  srt = -jnp.sort(-norms, axis=-1)                          # descending
  cur, nxt = srt[..., :-1], srt[..., 1:]
  ratio = jnp.where(nxt > 0, cur / jnp.where(nxt > 0, nxt, 1), 1)
  cuts = (ratio >= 100) & (nxt <= 1e3 * jnp.finfo(dtype).eps * srt[..., :1])
  cut = jnp.argmax(cuts, axis=-1)[..., None]                # the first
  keep_from = jnp.take_along_axis(cur, cut, axis=-1)
  return (jnp.any(cuts, axis=-1, keepdims=True) & (norms < keep_from)
          & (norms > 0))


def rank_completed_q(c: jax.Array) -> jax.Array:
  """The complete (``s×s``) Householder ``Q`` of each ``[k, s, n]`` matrix
  ``C`` (``n ≤ s``) as exact arithmetic gives it where ``C`` is rank
  deficient, up to column signs. Where a pivot ``|R_jj|`` is rounding
  (:func:`beyond_rank`), column ``j`` lies in the span of those before it:
  in exact arithmetic what is left of it is zero and its reflector the
  identity, so ``Q``'s column ``j`` is the next unit vector reflected by
  the reflectors before it; floating point instead reflects by a vector of
  rounding, which sets column ``j`` and every column after it. The
  matrices that have such a pivot are factored again with those columns
  zero (a zero column stays zero under reflections: an identity
  reflector). Full-rank matrices keep LAPACK's ``Q``. (On CPU one matrix
  at a time: :func:`orthax.polar.lapack.per_matrix`.)"""
  return lapack.per_matrix(_rank_completed_q, c)


def _rank_completed_q(c):
  q, r = jnp.linalg.qr(c, mode='complete')
  dead = beyond_rank(jnp.abs(jnp.diagonal(r, axis1=-2, axis2=-1)), c.dtype)
  again = lambda c: jnp.linalg.qr(jnp.where(dead[..., None, :], 0, c),
                                  mode='complete')[0]
  return jax.lax.cond(jnp.any(dead), again, lambda c: q, c)


def _rank_revealing_basis(bt):
  """``W`` (``t×r``) for a ``Bᵀ`` (``t×r``) of lower rank, or too
  ill-conditioned for Cholesky QR3: column ``j`` the unit vector of what
  ``Bᵀ``'s column ``j`` adds to the span of the columns before it, zero
  where it adds nothing (a pivot of rounding, or zero). Then the leading
  columns of ``AW`` span what those of ``C = A Fᵀ`` span, column by
  column, and ``C``'s columns that add nothing are ``AW``'s zero columns:
  both have the same Householder ``Q``, ``AW``'s with ``A``'s condition
  alone. (Householder's own ``Q`` of ``Bᵀ`` would put each later column's
  new direction partly on the vector it picks at such a pivot.) Two
  Householder QRs: one for the pivots, one of the columns that add
  something, put first."""
  pivots = jnp.abs(jnp.diagonal(jnp.linalg.qr(bt, mode='r'),
                                axis1=-2, axis2=-1))
  dead = beyond_rank(pivots, bt.dtype) | (pivots == 0)
  order = jnp.argsort(dead, axis=-1, stable=True)        # live ones first
  q = jnp.linalg.qr(jnp.take_along_axis(bt, order[..., None, :], axis=-1))[0]
  back = jnp.argsort(order, axis=-1)
  w = jnp.take_along_axis(q, back[..., None, :], axis=-1)
  return jnp.where(dead[..., None, :], 0, w)


def product_q(a: jax.Array, fm: jax.Array,
              qr: str = 'householder') -> jax.Array:
  """The Householder ``Q`` (``s×s``, up to column signs) of ``C = A Fᵀ``
  (``A``, ``F``: ``[k, s, t]``) without forming ``C``. With ``r = min(s,
  t)``, ``B = F[:r]`` and ``BBᵀ = LLᵀ`` (Cholesky), ``W = BᵀL⁻ᵀ`` has
  orthonormal columns and ``C[:, :r] = (A W) Lᵀ``, ``Lᵀ`` upper triangular:
  ``C``'s first ``r`` Householder reflectors are those of ``A W``, whose
  condition is ``A``'s alone (the explicit product's is ``κ(A)κ(F)``). The
  other reflectors, for ``s > t``, act on a block that is zero in exact
  arithmetic and are the identity.

  That holds while ``B`` has full rank. ``W`` loses orthogonality as
  ``κ(B)²ε``: where the Cholesky fails or its diagonal spans more than
  ``1/√(100ε)``, ``W`` is recomputed as the ``Q`` of Cholesky QR3 of ``Bᵀ``
  (the same ``W``: the QR with a positive diagonal is unique). Where that
  cannot be certified either — a singular ``B``: a momentum of lower rank
  than ``s`` (Sinkhorn and the row norm scale rows and columns, so ``F``
  has ``A``'s rank), or a zero row of ``F`` (a dead unit) — ``W`` comes
  from two Householder QRs of ``Bᵀ`` (:func:`_rank_revealing_basis`): each
  column the direction its column of ``Bᵀ`` adds, zero where it adds none,
  so that ``AW``'s zero columns are where ``C``'s columns add nothing, and
  ``C``'s Householder ``Q`` is still ``AW``'s for ``s ≤ t``. (For ``s > t``
  with a zero row among ``F``'s first ``t``, ``C``'s columns past ``t`` add
  a direction ``AW`` does not see, and ``Q``'s columns from there differ
  from exact arithmetic's, as they did before: only where the larger side
  is rotated, ``reference='dion'`` or ``rotate=``.) Then ``Q`` is
  :func:`rank_completed_q`'s: past ``A``'s rank its columns are exact
  arithmetic's, not rounding's (ALGORITHMS.md §13.1.4a's defect, inside
  the rotated side). (Before 2026-12-07 a singular ``B`` took the ``Q`` of
  the explicit ``A Fᵀ``, whose rounding set those columns: the next step
  projected new directions on them, and a perturbation of the gradient by
  ``10⁻⁶``, or another device layout, moved the step by 20–40%.) Fallbacks
  are computed for the failing matrices only. ``qr`` is how the square
  ``A W`` (``s ≤ t``) is factored: ``'householder'`` or
  ``'cholesky_qr3'`` (:func:`cholesky_qr3_q`; a rank-deficient ``A W`` is
  refactored by Householder); for ``s > t`` its complete ``Q`` is always
  Householder's. (On CPU one matrix at a time:
  :func:`orthax.polar.lapack.per_matrix`.)"""
  return lapack.per_matrix(functools.partial(_product_q, qr=qr), a, fm)


def _product_q(a, fm, qr):
  r = min(a.shape[-2], a.shape[-1])
  bt = jnp.matrix_transpose(fm[..., :r, :])  # Bᵀ
  low = jnp.linalg.cholesky(_gram(bt))
  w = jax.lax.linalg.triangular_solve(low, bt, left_side=False,
                                      lower=True, transpose_a=True)
  diag = jnp.diagonal(low, axis1=-2, axis2=-1)
  tiny = math.sqrt(100 * jnp.finfo(a.dtype).eps)
  ok = (jnp.all(jnp.isfinite(w), axis=(-2, -1))
        & (jnp.min(diag, axis=-1) > tiny * jnp.max(diag, axis=-1)))
  ok = ok[..., None, None]
  # W lost orthogonality (κ(B)²ε): Bᵀ's Q by Cholesky QR3 is the same W
  # (the QR with a positive diagonal is unique) while B has full rank.
  w, ok = _where_else(ok, (w, ok), lambda x: _cholesky_qr3(x, _CQR3_SHIFT),
                      bt)
  # B singular (a momentum of lower rank: F = f(RᵀA) has A's rank under
  # Sinkhorn and the row norm) or beyond Cholesky QR3: W from the
  # Householder QR of Bᵀ, its columns past B's rank zero.
  w = _where_else(ok, w, _rank_revealing_basis, bt)
  aw = a @ w
  if qr == 'cholesky_qr3' and r == a.shape[-2]:
    return _cholesky_qr3_q(aw, _CQR3_SHIFT, fallback=_rank_completed_q)
  return _rank_completed_q(aw)


def _where_else(ok, value, fallback, *args):
  """``value`` where ``ok`` (``[..., 1, 1]``), else ``fallback(*args)``,
  which is computed for the failing matrices only, one at a time (on a GPU
  a stack's QR runs cuSOLVER's unblocked batched kernel: 0.68 s for one
  group of GPT-2 small's 768×768 matrices on an H200, where ARO's whole
  step takes 45 ms). ``value`` may be a pytree of ``[..., ·, ·]`` arrays;
  ``fallback`` returns the same structure for one matrix."""
  if ok.ndim == 2:  # one matrix
    return jax.lax.cond(ok[0, 0], lambda: value, lambda: fallback(*args))
  lead = ok.shape[:-2]
  flat = lambda x: x.reshape((-1,) + x.shape[len(lead):])

  def one(item):
    good, val, xs = item
    return jax.lax.cond(good, lambda: val, lambda: fallback(*xs))

  def each():
    out = jax.lax.map(one, (flat(ok)[:, 0, 0], jax.tree.map(flat, value),
                            tuple(map(flat, args))))
    return jax.tree.map(lambda y: y.reshape(lead + y.shape[1:]), out)

  return jax.lax.cond(jnp.all(ok), lambda: value, each)


def _to_unit_range(c):
  """``C`` times the exact power of two that brings ``max|C|`` into
  ``[½, 1)`` (a zero matrix is kept): its ``Q`` is unchanged, and its Gram
  neither overflows nor underflows."""
  big = jnp.max(jnp.abs(c), axis=(-2, -1), keepdims=True)
  _, e = jnp.frexp(jnp.where(big > 0, big, 1))
  return jnp.ldexp(c, -e)


def shifted_cholesky_q(c: jax.Array, shift: float = 1e-7) -> jax.Array:
  r"""``Q = C R^{-1}`` with ``RᵀR = CᵀC + shift·‖C‖_F² I`` (shifted Cholesky
  QR); a matrix whose Cholesky fails (a non-finite ``Q``) gets its
  Householder ``Q`` instead. ``C`` is first scaled by an exact power of two
  (``Q`` does not change) so that ``CᵀC`` neither overflows nor
  underflows. (On CPU one matrix at a time:
  :func:`orthax.polar.lapack.per_matrix`.)"""
  return lapack.per_matrix(functools.partial(_shifted_cholesky_q,
                                             shift=shift), c)


def _shifted_cholesky_q(c, shift):
  c = _to_unit_range(c)
  fro2 = jnp.sum(c * c, axis=(-2, -1), keepdims=True)
  gram = (jnp.matrix_transpose(c) @ c
          + shift * fro2 * jnp.eye(c.shape[-1], dtype=c.dtype))
  low = jnp.linalg.cholesky(gram)
  q = jax.lax.linalg.triangular_solve(low, c, left_side=False, lower=True,
                                      transpose_a=True)
  ok = jnp.all(jnp.isfinite(q), axis=(-2, -1), keepdims=True)
  return _where_else(ok, q, householder_q, c)


_CQR3_SHIFT = 1e-6


def cholesky_qr3_q(c: jax.Array, shift: float = _CQR3_SHIFT) -> jax.Array:
  r"""The Householder ``Q`` of each square ``[k, s, s]`` matrix ``C``, up to
  column signs, by matrix products: shifted Cholesky QR3 (Fukaya, Kannan,
  Nakatsukasa, Yamamoto, Yanagisawa, *Shifted Cholesky QR for computing the
  QR factorization of ill-conditioned matrices*, SIAM J. Sci. Comput. 2020).

  .. math::
     Q_1 = C R_1^{-1},\ R_1^\top R_1 = C^\top C + σ I;\qquad
     Q_{i+1} = Q_i R_{i+1}^{-1},\ R_{i+1}^\top R_{i+1} = Q_i^\top Q_i
     \ (i = 1, 2)

  with ``σ = shift·‖C‖_F²``. Each ``Q_i`` is ``C`` times an upper
  triangular matrix, so a ``Q_3`` with orthonormal columns is ``C``'s
  ``Q`` up to column signs; the shift bounds ``κ(Q_1)`` by about
  ``1/√shift``, and the two plain passes bring ``QᵀQ`` to ``I`` within
  rounding. The third pass's Gram ``Q_2ᵀQ_2`` certifies the result: where
  it is more than ``0.1`` from ``I`` in any entry, or anything is not
  finite (a rank-deficient or extremely ill-conditioned ``C``), that matrix
  takes its Householder ``Q`` instead. On a GPU this is a few matrix
  products where cuSOLVER's Householder QR of a stack runs one small
  factorization at a time. (On CPU one matrix at a time:
  :func:`orthax.polar.lapack.per_matrix`.)"""
  return lapack.per_matrix(functools.partial(_cholesky_qr3_q, shift=shift),
                           c)


def _gram(x):
  """``XᵀX`` in full float32 (or wider) precision: on a GPU the default
  precision of a float32 product is TF32, whose ~1e-3 error would become
  the factor's error (the Gram's condition is ``κ(X)²``)."""
  return jnp.matmul(jnp.matrix_transpose(x), x,
                    precision=jax.lax.Precision.HIGHEST)


def _cholesky_pass(q, shift):
  """``(Q R⁻¹, QᵀQ)`` with ``RᵀR = QᵀQ + shift·‖Q‖_F² I``."""
  gram = _gram(q)
  if shift:
    fro2 = jnp.trace(gram, axis1=-2, axis2=-1)[..., None, None]
    gram = gram + shift * fro2 * jnp.eye(q.shape[-1], dtype=q.dtype)
  low = jnp.linalg.cholesky(gram)
  return jax.lax.linalg.triangular_solve(low, q, left_side=False, lower=True,
                                         transpose_a=True), gram


def _cholesky_qr3_q(c, shift, fallback=None):
  q, ok = _cholesky_qr3(c, shift)
  return _where_else(ok, q, fallback or householder_q, c)


def _cholesky_qr3(c, shift):
  """Cholesky QR3 of ``[..., m, n]`` (``m ≥ n``): ``(Q, ok)``, ``ok``
  (``[..., 1, 1]``) where the last Gram certifies ``Q``."""
  c = _to_unit_range(c)
  q, _ = _cholesky_pass(c, shift)
  q, _ = _cholesky_pass(q, 0.0)
  q, gram = _cholesky_pass(q, 0.0)
  eye = jnp.eye(c.shape[-1], dtype=c.dtype)
  # The pivots |R_jj| = |q_jᵀc_j|: one of rounding (a rank-deficient C,
  # which the shift lets through) leaves q_j any unit vector orthogonal to
  # the others, set by the rounding; Householder's exact-arithmetic Q is
  # then the fallback's (rank_completed_q).
  pivots = jnp.abs(jnp.sum(q * c, axis=-2))
  ok = (jnp.all(jnp.isfinite(q), axis=(-2, -1), keepdims=True)
        & (jnp.max(jnp.abs(gram - eye), axis=(-2, -1), keepdims=True) <= 0.1)
        & ~jnp.any(beyond_rank(pivots, c.dtype), axis=-1)[..., None, None])
  return q, ok


Q_OF = {'householder': householder_q, 'cholesky_qr3': cholesky_qr3_q,
        'shifted_cholesky': shifted_cholesky_q}


__all__ = ['QR_KINDS', 'Q_OF', 'beyond_rank', 'cholesky_qr3_q',
           'householder_q', 'product_q', 'rank_completed_q', 'resolve_qr',
           'shifted_cholesky_q']
