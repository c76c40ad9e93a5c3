r"""Gram Newton–Schulz: the quintic iteration run on the small Gram matrix.

For a wide ``X₀`` (``m ≤ n``) every Newton–Schulz iterate is ``X_k = Q_k X₀``
with ``Q_k`` an ``m×m`` polynomial in ``R₀ = X₀X₀ᵀ``. With
``P_k = a_k I + b_k R_k + c_k R_k²`` one step of
:func:`~orthax.polar.newton_schulz.newton_schulz` is

.. math::
   X_{k+1} = P_k X_k,\qquad R_{k+1} = P_k R_k P_k,\qquad Q_{k+1} = Q_k P_k,

(``P_k`` commutes with ``R_k``), so after one Gram product (``2m²n`` FLOPs) the
steps cost only ``m×m`` matmuls (``R²``, ``RP``, ``P(RP)``, ``QP``: ``8m³``)
and one final ``Q X₀`` (``2m²n``) instead of ``4m²n + 2m³`` each. In exact
arithmetic the result equals :func:`newton_schulz` for every preset and
normalizer (the Schatten-4 and AOL normalizers are left multiplications by a
diagonal/scalar, so they only change ``X₀``).

Stability fix (from the literature)
-----------------------------------
J. Zhang, N. Amsel, B. Chen, T. Dao, *Gram Newton–Schulz: A Fast,
Hardware-Aware Newton–Schulz Algorithm for Muon* (Dao AI Lab blog, 2026),
https://tridao.me/blog/2026/gram-newton-schulz/ (mirror:
https://dao-ailab.github.io/blog/2026/gram-newton-schulz/; code and README:
https://github.com/Dao-AILab/gram-newton-schulz). The blog's stability
sections are "Spurious Negative Eigenvalues", "Eigenvector Drift" and
"Stabilizing Gram Newton–Schulz by Restarting". The mechanism: in half
precision the computed Gram matrix has small spurious negative eigenvalues
``δ < 0``; the Gram update maps an eigenvalue ``r ↦ r·p(r)²`` with
``p(r) = a + br + cr²`` and ``p(0) = a > 1``, so ``|δ|`` grows by about
``a²`` (≈10–70× for these tables) per step and, once it is ``O(1)``, ``p``
explodes on the negative axis — the plain iteration never sees it because
it only ever acts on ``σ² ≥ 0``. The fix is **restarting**: after some steps
re-form ``X ← QX``, recompute ``R ← XXᵀ`` (PSD up to one rounding again) and
reset ``Q ← I``. Their default for 5-step tables is one restart after the
2nd step (``gram_newton_schulz_reset_iterations=[2]``, README pseudo-code
"If t = 3: restart"), chosen by an autotuner that runs the scalar eigenvalue
recursions with a negative perturbation of the Gram eigenvalues and
minimises the worst condition number of ``Q``; they iterate in float16
(not bfloat16) and advise more restarts for longer tables or if unstable.
The DeepSpeed port (microsoft/DeepSpeed PR #7953: "fp16 compute … and a
restart at iteration 2 for half-precision stability") and optax PR #1717
(closed) do the same.

This implementation
-------------------
* Restarts every ``restart_every`` steps (default 2: blocks of steps
  ``[0, 1], [2, 3], [4]`` for a 5-step table; ``None`` or ``0`` never
  restarts). Each block costs ``4m²n`` (its Gram ``XXᵀ`` and the final
  ``QX``) plus ``2m³`` for its first step (``Q = P``) and ``8m³`` for each
  further step; ``restart_every=1`` costs exactly the plain iteration
  (:func:`gram_flops`). Gram needs fewer FLOPs than the plain iteration iff
  ``n > 1.5m`` (for any schedule with a block of two or more steps).
* ``R`` and ``Q`` are symmetrised, ``(M + Mᵀ)/2``, after every update: the
  exact iterates are symmetric, and the blog's symmetric GEMM kernels enforce
  this by construction; it removes the skew part of the rounding error.
* One loop over the steps whose body chooses between a restart and a plain
  Gram step: on CPU a ``lax.fori_loop`` with a ``lax.cond``, so ``steps`` may
  be a traced integer and compile time does not grow with it; elsewhere,
  for a Python-integer ``steps``, unrolled with the choice made while
  tracing (:mod:`orthax.polar.step_loop`).

Measured here (CPU, bf16 iteration, error vs the float32 ``newton_schulz``
output, ill-conditioned 128×512 and 256×1024 inputs with singular values down
to 1e-4, or rank 8 plus 1% noise; ``jordan``/``polar_express``/``aol``): the
naive Gram iteration is 10–10⁵× worse than plain bf16 NS (it blows up);
``restart_every=2`` gives 0.5–1.12× the error of plain bf16 NS; symmetrising
lowers it by up to 25%; the literature's single restart after step 2 (blocks
``[0, 1], [2, 3, 4]``) was 1.7–2.2× *worse* than plain bf16 NS on the
singular-value-decay inputs (fine on Gaussian ones), since the spurious
eigenvalues grow for three more steps. In float32 the difference to
``newton_schulz`` is ~2e-6 relative (Gaussian 256×1024; ~1.5e-5 for ``cans``,
whose large coefficients amplify rounding, vs 5e-6 for plain NS vs float64).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from orthax import _validate
from orthax.polar import presets as _presets
from orthax.polar.newton_schulz import _gram
from orthax.polar.newton_schulz import _mm
from orthax.polar.newton_schulz import prepare
from orthax.polar.step_loop import run_steps

DEFAULT_RESTART_EVERY = 2


def _sym(a: jax.Array) -> jax.Array:
  return 0.5 * (a + jnp.matrix_transpose(a))


def check_restart(restart_every, owner: str) -> int | None:
  """``restart_every`` as an int, ``None`` for never; ``ValueError`` naming
  ``owner`` (the function the user called) unless it is ``None`` or an int
  ``>= 0``."""
  if restart_every is None or restart_every == 0:
    return None
  if (not isinstance(restart_every, (int, np.integer))
      or isinstance(restart_every, bool) or restart_every < 0):
    raise ValueError(f'{owner}: restart_every must be None or a '
                     f'non-negative Python int, got {restart_every!r}.')
  return int(restart_every)


def _num_blocks(steps: int, restart_every: int | None) -> int:
  if restart_every is None:
    return 1
  return -(-steps // restart_every)


# Element-wise FLOPs of each normalizer (newton_schulz.prepare) as XLA's
# cost analysis counts them: ``(per entry of X, per entry of its m×m Gram
# matrix)``, on a whole matrix and on a column block (``col_reduce``). The
# Frobenius normalizer (its branch for a stack with a huge matrix, the
# larger): on a whole matrix |x| and the max (the power of two 2⁻ᵉ), X·2⁻ᵉ,
# its square and their sum, and the quotient of X·2⁻ᵉ; on column blocks the
# two-part sums of split_squares instead of the first four. Schatten-4 and
# AOL: the power of two (on column blocks from the Frobenius block norm) and
# two scalings of X; on the Gram matrix, which they form and the first step
# reuses, their norm (squares and a sum; AOL: absolute row sums) and its
# scaling. A sharding plan adds them to Newton–Schulz's matrix products
# (tests/test_newton_schulz.py holds them to XLA's count).
NORMALIZER_FLOPS = {
    'frobenius': ((7, 0), (13, 0)),
    'schatten4': ((5, 3), (14, 3)),
    'aol': ((5, 4), (14, 4)),
    'none': ((0, 0), (0, 0)),
}
FROBENIUS_FLOPS_PER_ENTRY = NORMALIZER_FLOPS['frobenius'][0][0]
FROBENIUS_BLOCK_FLOPS_PER_ENTRY = NORMALIZER_FLOPS['frobenius'][1][0]


def normalizer_flops(normalizer: str, m: int, n: int,
                     col_shards: int | None = None) -> int:
  """Element-wise FLOPs of ``normalizer`` on one ``m×n`` matrix.

  What :func:`~orthax.polar.newton_schulz.newton_schulz` runs before its
  first step, beyond the matrix products :func:`standard_flops` and
  :func:`gram_flops` count (the Gram matrix the Schatten-4 and AOL
  normalizers form is the first step's): ``e·mn + g·m²`` with ``(e, g)``
  from :data:`NORMALIZER_FLOPS`, ``m ≤ n`` after swapping.

  Args:
    normalizer: one of :data:`~orthax.polar.NORMALIZERS`.
    m, n: the matrix's sides (either orientation).
    col_shards: ``None`` (default): a whole matrix; an int: one device's
      ``m × n/col_shards`` column block, normalized with ``col_reduce``
      (the ``m×m`` work is replicated).

  Example:
    >>> from orthax.polar import normalizer_flops
    >>> normalizer_flops('aol', 64, 256)  # 5·64·256 + 4·64²
    98304
  """
  _validate.choice(tuple(NORMALIZER_FLOPS))('normalizer_flops', 'normalizer',
                                            normalizer)
  if col_shards is not None:
    _validate.count('normalizer_flops', 'col_shards', col_shards)
  m, n = min(m, n), max(m, n)
  (e, g) = NORMALIZER_FLOPS[normalizer][col_shards is not None]
  return e * m * (n // (col_shards or 1)) + g * m * m


def standard_flops(m: int, n: int, steps: int, col_shards: int = 1) -> int:
  """Matmul FLOPs of :func:`newton_schulz` on one ``m×n`` matrix.

  Per step ``A = XXᵀ`` (``2m²n``), ``A²`` (``2m³``) and ``(bA + cA²)X``
  (``2m²n``) in the wide orientation (``m ≤ n`` after swapping); a
  ``(p×q)·(q×r)`` product counts ``2pqr``; element-wise work and the
  normalizer are ignored.

  Args:
    m, n: the matrix's sides (either orientation).
    steps: number of Newton–Schulz steps.
    col_shards: count the FLOPs of one device holding an
      ``m × n/col_shards`` column block (``col_reduce``; the ``m×m`` work is
      replicated); default 1, the whole matrix.
  """
  m, n = min(m, n), max(m, n) // col_shards
  return steps * (4 * m * m * n + 2 * m ** 3)


def gram_products(steps: int,
                  restart_every: int | None = DEFAULT_RESTART_EVERY) -> int:
  """How many Gram matrices ``XXᵀ`` :func:`gram_newton_schulz` forms: one
  per block of ``restart_every`` steps (one per step for the plain
  iteration, which is ``restart_every=1``).

  Args:
    steps: number of Newton–Schulz steps.
    restart_every: steps per block (default 2); ``None`` or ``0``: one
      block.
  """
  return _num_blocks(steps, check_restart(restart_every, 'gram_products'))


def gram_flops(m: int, n: int, steps: int,
               restart_every: int | None = DEFAULT_RESTART_EVERY,
               col_shards: int = 1) -> int:
  """Matmul FLOPs of :func:`gram_newton_schulz` on one ``m×n`` matrix.

  The ``steps`` split into ``B = ⌈steps / restart_every⌉`` blocks (one block
  if ``restart_every`` is ``None``/0). Each block forms ``R = XXᵀ`` and
  ``X ← QX`` (``4m²n``); its first step needs only ``R²`` (``2m³``, then
  ``Q = P``) and every further step ``R ← P(RP)``, ``R²``, ``Q ← QP``
  (``8m³``). Same conventions as :func:`standard_flops`.

  Args:
    m, n: the matrix's sides (either orientation).
    steps: number of Newton–Schulz steps.
    restart_every: steps per block (default 2); ``None`` or ``0``: never
      restart.
    col_shards: FLOPs of one device holding an ``m × n/col_shards`` column
      block, as in :func:`standard_flops` (default 1).
  """
  check_restart(restart_every, 'gram_flops')
  m, n = min(m, n), max(m, n) // col_shards
  blocks = gram_products(steps, restart_every)
  return (blocks * (4 * m * m * n + 2 * m ** 3)
          + (steps - blocks) * 8 * m ** 3)


def prefer_gram(m: int, n: int, steps: int,
                restart_every: int | None = DEFAULT_RESTART_EVERY) -> bool:
  """Whether :func:`gram_flops` is strictly below :func:`standard_flops`.

  Subtracting the two counts, Gram saves ``(steps − B)(4m²n − 6m³)`` with
  ``B`` the number of blocks, so for any schedule in which some block has two
  or more steps this is exactly ``max(m, n) > 1.5·min(m, n)``; with
  ``restart_every=1`` the counts are equal and it is ``False``.

  Args:
    m, n: the matrix's sides (either orientation).
    steps: number of Newton–Schulz steps (a Python int).
    restart_every: the Gram schedule's steps per block (default 2; ``None``
      or ``0``: never restart).

  Example:
    >>> from orthax.polar import gram_flops, prefer_gram, standard_flops
    >>> gram_flops(16, 64, 5), standard_flops(16, 64, 5)
    (286720, 368640)
    >>> prefer_gram(16, 64, 5), prefer_gram(16, 24, 5)
    (True, False)
  """
  check_restart(restart_every, 'prefer_gram')
  return gram_flops(m, n, steps, restart_every) < standard_flops(m, n, steps)


def gram_newton_schulz(
    x: jax.Array,
    preset: str | _presets.Preset = 'jordan',
    *,
    steps: int | jax.Array | None = None,
    coeffs: Sequence[Sequence[float]] | None = None,
    normalizer: str | None = None,
    norm_scale: float | None = None,
    eps: float | None = None,
    dtype: Any = None,
    restart_every: int | None = DEFAULT_RESTART_EVERY,
    symmetrize: bool = True,
    col_reduce: Any = None,
) -> jax.Array:
  r"""Gram Newton–Schulz approximation of the polar factor of ``x``.

  Same arguments, normalizers and result (in exact arithmetic) as
  :func:`orthax.polar.newton_schulz`; see the module docstring for the
  algorithm and its stability fix.

  Args:
    x: array ``[..., m, n]``; leading axes are a batch. Tall matrices are
      transposed in and out (as in ``newton_schulz``).
    preset: a name from :func:`orthax.polar.preset_names` or a ``Preset``.
    steps: number of steps (default: the preset's). May be a traced integer.
    coeffs: overrides the preset's table, shape ``(3,)`` or ``(k, 3)``.
    normalizer: overrides the preset's normalizer.
    norm_scale: overrides the Frobenius scale.
    eps: overrides the normalizer's epsilon.
    dtype: dtype of the iteration (e.g. ``jnp.bfloat16``); default
      ``x.dtype``. The result is cast back to ``x.dtype``.
    restart_every: re-form ``X ← QX``, ``R ← XXᵀ``, ``Q ← I`` after every
      this many steps (a static Python int); ``None`` or ``0``: never (the
      naive Gram iteration, fine in float32/64, unstable in bf16/fp16).
    symmetrize: replace ``R`` and ``Q`` by their symmetric parts after each
      update.
    col_reduce: completes the column sums of a column block, as in
      :func:`~orthax.polar.newton_schulz.newton_schulz` (only the Gram
      products ``XXᵀ`` and the norm need it; ``QX`` is blockwise).

  Returns:
    An array like ``x``. A zero matrix maps to zeros.
  """
  return iterate(x, preset, steps=steps, coeffs=coeffs,
                 normalizer=normalizer, norm_scale=norm_scale, eps=eps,
                 dtype=dtype, restart_every=restart_every,
                 symmetrize=symmetrize, col_reduce=col_reduce,
                 who='gram_newton_schulz')


def iterate(x, preset, *, who: str, steps=None, coeffs=None,
            normalizer=None, norm_scale=None, eps=None, dtype=None,
            restart_every: int | None = DEFAULT_RESTART_EVERY,
            symmetrize: bool = True, col_reduce: Any = None) -> jax.Array:
  """:func:`gram_newton_schulz`, its errors naming ``who`` (the function
  the user called)."""
  _validate.flag(who, 'symmetrize', symmetrize)
  restart_every = check_restart(restart_every, who)
  st = prepare(x, preset, steps=steps, coeffs=coeffs, normalizer=normalizer,
               norm_scale=norm_scale, eps=eps, dtype=dtype, who=who,
               col_reduce=col_reduce)
  x, rows, last = st.x, st.rows, st.last
  dt, acc = x.dtype, rows.dtype
  sym = _sym if symmetrize else (lambda a: a)
  gram = sym(_gram(x, col_reduce) if st.gram is None else st.gram)
  eye = jnp.eye(x.shape[-2], dtype=acc)

  def mm(a, b):  # iteration-dtype inputs, float32 accumulation, rounded once
    return _mm(a, b).astype(dt)

  def poly(r, k):
    a, b, c = rows[jnp.minimum(k, last)]
    return (a * eye + b * r.astype(acc) + c * _mm(r, r)).astype(dt)

  def advance(k, carry):
    """Step ``k ≥ 1`` given ``Q = P_0…P_{k-1}`` of the current block."""
    x, r, pk, q = carry
    r = sym(mm(pk, mm(r, pk)))   # R_k = P_{k-1} R_{k-1} P_{k-1}
    pk = poly(r, k)
    return x, r, pk, sym(mm(q, pk))

  def restart(k, carry):
    """Step ``k`` after re-forming ``X ← QX``, ``R ← XXᵀ``, ``Q ← I``."""
    x, _, _, q = carry
    x = mm(q, x)
    r = sym(_gram(x, col_reduce))
    pk = poly(r, k)
    return x, r, pk, pk

  if restart_every is None:
    body = advance
  else:
    def body(k, carry):
      if isinstance(k, int):  # unrolled
        return (restart if k % restart_every == 0 else advance)(k, carry)
      return jax.lax.cond(k % restart_every == 0, restart, advance, k, carry)

  p0 = poly(gram, 0)                      # step 0: Q = P_0
  x, _, _, q = run_steps(1, st.steps, body, (x, gram, p0, p0))
  return st.finish(mm(q, x))              # X ← Q X of the last block


__all__ = ['gram_newton_schulz', 'gram_flops', 'gram_products',
           'standard_flops',
           'prefer_gram', 'DEFAULT_RESTART_EVERY']
