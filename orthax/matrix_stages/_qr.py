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
  asks this function for JAX's default backend.)"""
  if qr != 'auto':
    return qr
  backend = jax.default_backend() if backend is None else backend
  return 'householder' if backend == 'cpu' else 'cholesky_qr3'


def householder_q(c: jax.Array) -> jax.Array:
  """``Q`` of the reduced Householder QR of each ``[k, s, s]`` matrix."""
  return lapack.per_matrix(lambda x: jnp.linalg.qr(x)[0], c)


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
  (the same ``W``: the QR with a positive diagonal is unique). A singular
  ``B`` — a zero row of ``F``, as a dead unit's zero gradient row gives —
  changes the column flag of ``C`` that the Householder ``Q`` follows (a
  zero column of ``C`` keeps its unit vector in ``Q``); where Cholesky QR3
  cannot certify ``Bᵀ``'s ``Q`` either, the matrix takes the ``Q`` of the
  explicit ``A Fᵀ`` (by ``qr``), the reference's arithmetic. Fallbacks are
  computed for the failing matrices only. ``qr`` is how the square ``A W``
  (``s ≤ t``) is factored: ``'householder'`` or ``'cholesky_qr3'``
  (:func:`cholesky_qr3_q`); for ``s > t`` its complete ``Q`` is always
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
  aw = a @ jnp.where(ok, w, 0)
  if qr == 'cholesky_qr3' and r == a.shape[-2]:
    q = _cholesky_qr3_q(aw, _CQR3_SHIFT)
  else:
    q = jnp.linalg.qr(aw, mode='complete')[0]
  explicit = Q_OF[qr] if r == a.shape[-2] else householder_q
  return _where_else(ok, q,
                     lambda a, fm: explicit(a @ jnp.matrix_transpose(fm)),
                     a, fm)


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


def _cholesky_qr3_q(c, shift):
  q, ok = _cholesky_qr3(c, shift)
  return _where_else(ok, q, householder_q, c)


def _cholesky_qr3(c, shift):
  """Cholesky QR3 of ``[..., m, n]`` (``m ≥ n``): ``(Q, ok)``, ``ok``
  (``[..., 1, 1]``) where the last Gram certifies ``Q``."""
  c = _to_unit_range(c)
  q, _ = _cholesky_pass(c, shift)
  q, _ = _cholesky_pass(q, 0.0)
  q, gram = _cholesky_pass(q, 0.0)
  eye = jnp.eye(c.shape[-1], dtype=c.dtype)
  ok = (jnp.all(jnp.isfinite(q), axis=(-2, -1), keepdims=True)
        & (jnp.max(jnp.abs(gram - eye), axis=(-2, -1), keepdims=True) <= 0.1))
  return q, ok


Q_OF = {'householder': householder_q, 'cholesky_qr3': cholesky_qr3_q,
        'shifted_cholesky': shifted_cholesky_q}


__all__ = ['QR_KINDS', 'Q_OF', 'cholesky_qr3_q', 'householder_q', 'product_q',
           'resolve_qr', 'shifted_cholesky_q']
