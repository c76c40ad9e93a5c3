r"""Soft spectral clipping (SPECTRA) by a coupled Newton–Schulz inverse root.

Pure ``jax.numpy`` on arrays ``[..., m, n]``; knows nothing of optax.

.. math::
   H_c(X) = (I + XX^\top/c^2)^{-1/2} X,\qquad
   σ \mapsto σ/\sqrt{1 + σ^2/c^2},

keeps the singular vectors, leaves ``σ ≪ c`` almost unchanged
(``H_c(X) ≈ X(1 - σ²/2c²)``) and caps ``σ ≫ c`` at ``c``.

Algorithm (Jiang, Semenov, Stich, *Enhancing LLM Training via Spectral
Clipping*, arXiv 2603.14315; ``mlolab/llm-spectral-clipping`` @ ed9df11,
``src/optim/post_process.py::clip_sigvals``):

1. Wide orientation (``m < n``, and ``Xᵀ`` of a square ``X``), ``S = XXᵀ``.
   For a square matrix both Gram matrices have the same spectrum but not
   the same bound ``λ̂`` (step 2), which shows where the steps have not
   converged; ``XᵀX`` is the reference's ``WWᵀ`` (it runs on PyTorch's
   ``W``, ``out × in``) for a Flax kernel ``X = Wᵀ``.
2. ``λ̂ = min(max_i Σ_j |S_ij|, ‖S‖_F) ≥ λ_max(S)``.
3. ``A = I + S/c²``, ``α = 1 + λ̂/c²``, ``Â = A/α`` (eigenvalues in
   ``[1/α, 1]``).
4. ``Y = Â``, ``Z = I``; repeat ``T = aI + b·ZY``, ``Y ← YT``, ``Z ← TZ``.
   Every iterate is a polynomial in ``Â`` with ``Y = ÂZ``, so the
   eigenvalues ``s² = λ z²`` of ``ZY`` follow ``s ↦ as + bs³`` and
   ``Z → Â^{-1/2}`` as ``s → 1``.
5. ``H = (Z/\sqrt{α}) X``, transposed back.

Two step rules:

* ``'plain'`` (the reference): ``a = 3/2, b = -1/2`` at every step. A
  direction with ``σ ≲ c`` starts at ``s = α^{-1/2} ≈ c/σ_max`` and grows by
  only 1.5× per step, so the reference's 10 steps fall short once
  ``σ_max/c`` is large: relative error 0.17 at ``σ_max/c ≈ 600``,
  7e-2 at 100 and still 1e-5 at 30 (``c = 1``,
  64×64, float64; see ``tests/test_spectra.py``). About
  ``log(σ_max/c)/log 1.5 + 6`` steps are needed: 24 for ``σ_max/c = 1e3``.
* ``'scaled'`` (default): the lower end ``ℓ`` of the interval
  ``[ℓ, 1] ∋ s`` is known (``ℓ₀ = α^{-1/2}``, because ``A ⪰ I``), so each
  step uses the minimax-optimal scaled cubic on ``[ℓ, 1]``,
  ``γ = \sqrt{3/(1 + ℓ + ℓ²)}``, ``a = 3γ/2``, ``b = -γ³/2``
  (``f(ℓ) = f(1)``, ``max f = f(1/γ) = 1``; Chen & Chow, *A stable scaling
  of Newton–Schulz for improving the sign function computation*, 2014), and
  ``ℓ ← f(ℓ)``. Small ``s`` grow by ``3\sqrt3/2 ≈ 2.6×`` per step, and the
  steps revert to the plain rule (``γ → 1``) as ``ℓ → 1``. Same cost per
  step (three ``m×m`` matmuls); :data:`DEFAULT_STEPS` = 12 steps reach
  ``≤ 1e-6`` relative Frobenius error against the SVD formula in float64
  for ``σ_max/c`` up to 1e3 (measured ≤ 2e-11; 10 steps: 1e-5 at 1e3).
  Because ``ℓ`` is a certified bound, the loop stops as soon as
  ``1 - ℓ ≤ tol`` (e.g. after ~6 steps at ``σ_max/c ≈ 10``): 12 is a cap.

The bound is taken per matrix by default; ``shared_bound=True`` reproduces
the reference on a batched input: ``λ̂ = min(max_batch row sum,
max_batch ‖S‖_F)``, one ``α`` for the whole batch (a small matrix in a
batch with a large one then needs more steps).

Rounding: an eigenvalue ``1/α`` of ``Â`` below a few ulps may come out
negative, and every step maps ``x = s²`` to ``x(a + bx)²`` with ``a > 1``,
which would blow a negative ``x`` up. ``Â`` is therefore lifted to at least
``4·eps`` of the iteration dtype (a no-op unless ``1/α`` is that small: in
float64 beyond ``σ_max/c ≈ 3e7``, in float32 beyond ``≈ 1.5e3``). float32
accuracy is limited by forming ``I + S/c²``: about 3e-5 relative at
``σ_max/c = 30``, 5e-3 at 1e3, with either step rule.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from orthax import _validate
from orthax.polar import lapack

STEP_RULES = ('scaled', 'plain')
_validate.register(('step_rule',), _validate.choice(STEP_RULES))
DEFAULT_STEPS = 12
REFERENCE_STEPS = 10
_FLOOR_ULPS = 4.0


def lambda_max_bound(s: jax.Array, shared: bool = False) -> jax.Array:
  """``min(max row ℓ1 norm, ‖S‖_F) ≥ λ_max(S)`` for symmetric ``S``,
  shape ``[..., 1, 1]`` (the max over the batch when ``shared``).

  Args:
    s: symmetric matrices ``[..., m, m]`` (e.g. Gram matrices ``XXᵀ``).
    shared: one bound for the whole batch, ``min(max_batch row norm,
      max_batch ‖S‖_F)`` (the reference's batched behaviour), instead of one
      per matrix (default).
  """
  _validate.flag('lambda_max_bound', 'shared', shared)
  row = jnp.max(jnp.sum(jnp.abs(s), axis=-1), axis=-1)
  fro = jnp.sqrt(jnp.sum(jnp.square(s), axis=(-2, -1)))
  if shared and row.ndim:  # the reference: min(max_batch row, max_batch fro)
    lam = jnp.broadcast_to(jnp.minimum(jnp.max(row), jnp.max(fro)), row.shape)
  else:
    lam = jnp.minimum(row, fro)
  return lam[..., None, None]


def _check_threshold(owner: str, c: Any) -> None:
  """A threshold given as a number must be ``> 0``. A ``jax.Array`` is a
  schedule's value (:func:`orthax.transforms.clip_threshold`, traced or
  not): one that reached 0 gives zeros, the limit of ``H_c`` as
  ``c → 0``."""
  if not isinstance(c, jax.Array) and not np.all(np.asarray(c) > 0):
    raise ValueError(f'{owner}: c must be > 0, got {c!r} (H_c divides by '
                     'c).')


def soft_clip_matrix(
    x: jax.Array,
    c: float | jax.Array,
    *,
    steps: int | jax.Array = DEFAULT_STEPS,
    step_rule: str = 'scaled',
    shared_bound: bool = False,
    tol: float | None = None,
    dtype: Any = None,
) -> jax.Array:
  r"""``H_c(X) = (I + XXᵀ/c²)^{-1/2} X`` for every matrix of ``x``.

  Args:
    x: ``[..., m, n]``; leading axes are a batch.
    c: threshold ``c > 0`` (a number, or a scalar ``jax.Array``, traced or
      not; an array ``c ≤ 0``, a threshold decayed to ``final_scale = 0``,
      gives zeros, the limit of ``H_c`` as ``c → 0``).
    steps: coupled Newton–Schulz steps (may be traced). 12 with
      ``'scaled'`` meets 1e-6 relative accuracy for ``σ_max/c ≤ 1e3``; the
      reference runs 10 ``'plain'`` steps, accurate only for moderate
      ``σ_max/c`` (see the module docstring).
    step_rule: ``'scaled'`` (default) or ``'plain'`` (the reference's).
    shared_bound: one ``λ̂`` for the whole batch (the reference's batched
      behaviour) instead of one per matrix.
    tol: ``'scaled'`` only: stop early once the certified lower bound ``ℓ``
      on the iterated singular values satisfies ``1 - ℓ ≤ tol`` for every
      matrix (then every singular value of the result is within a relative
      ``tol`` of exact, up to rounding); ``steps`` stays the maximum.
      Default ``16·eps`` of the iteration dtype; ``0`` runs exactly ``steps``
      steps. Reverse-differentiable unless ``steps`` is traced and ``tol``
      is not ``0`` (then a ``while_loop``).
    dtype: iteration dtype (default: ``x``'s dtype, at least float32); the
      result has ``x``'s dtype.

  Returns:
    An array like ``x``; a zero matrix maps to zeros.
  """
  _validate.flag('soft_clip_matrix', 'shared_bound', shared_bound)
  if step_rule not in STEP_RULES:
    raise ValueError(f'soft_clip_matrix: step_rule must be one of '
                     f'{STEP_RULES}, got {step_rule!r}.')
  if x.ndim < 2:
    raise ValueError(f'soft_clip_matrix: x must be [..., m, n], got shape '
                     f'{x.shape}.')
  _check_threshold('soft_clip_matrix', c)
  # steps=0 or a NaN tol returned the input scaled, steps=2.5 a coarser
  # result, an integer x zeros (the result cast back to int): all silently.
  _validate.count('soft_clip_matrix', 'steps', steps)
  if tol is not None:
    _validate.nonnegative('soft_clip_matrix', 'tol', tol)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError('soft_clip_matrix: x must hold real floating-point '
                    f'numbers, got {x.dtype.name}.')
  out_dtype = x.dtype
  acc = jnp.promote_types(x.dtype if dtype is None else dtype, jnp.float32)
  x = x.astype(acc)
  # Xᵀ of a square X: the reference's orientation (module docstring).
  tall = x.shape[-2] >= x.shape[-1]
  if tall:
    x = jnp.matrix_transpose(x)
  m = x.shape[-2]
  # A traced threshold may reach 0 (a decay to final_scale = 0): H_c → 0
  # as c → 0, so that step is zeros (computed at c = 1, then replaced).
  live = jnp.asarray(c, acc) > 0
  c2 = jnp.where(live, jnp.square(jnp.asarray(c, acc)), 1)
  s = x @ jnp.matrix_transpose(x)
  alpha = 1 + lambda_max_bound(s, shared_bound) / c2
  eye = jnp.eye(m, dtype=acc)
  y = (eye + s / c2) / alpha
  # Rounding leaves eigenvalues of Â near 0 with an error of about eps, so
  # a true eigenvalue 1/α below that may come out negative, and any step
  # (which maps x = s² to x·(a + bx)², a > 1) would amplify it without
  # bound. Lifting the spectrum to at least ``floor`` only touches the
  # regime where 1/α is below the rounding error anyway.
  floor = _FLOOR_ULPS * jnp.finfo(acc).eps
  shift = jnp.maximum(floor - 1 / alpha, 0)
  y = y + shift * eye
  z = jnp.broadcast_to(eye, y.shape)
  ell = jnp.sqrt(1 / alpha + shift)  # s = sqrt(eig(ZY)) lies in [ell, ~1]

  if tol is None:
    tol = 16 * float(jnp.finfo(acc).eps)
  z = _coupled_steps(y, z, ell, steps, step_rule, tol)
  h = jnp.where(live, (z * jax.lax.rsqrt(alpha)) @ x, 0)
  return (jnp.matrix_transpose(h) if tall else h).astype(out_dtype)


def _coupled_steps(y: jax.Array, z: jax.Array, ell: jax.Array,
                   steps: int | jax.Array, step_rule: str,
                   tol: float) -> jax.Array:
  """The coupled Newton–Schulz iteration of :func:`soft_clip_matrix` from
  ``(Y, Z, ℓ)``, ``Z → Â^{-1/2}`` returned: ``steps`` steps, or fewer once
  ``1 - ℓ ≤ tol`` for every matrix (``'scaled'``, ``tol > 0``)."""
  eye = jnp.eye(y.shape[-1], dtype=y.dtype)

  def body(_, carry):
    y, z, ell = carry
    if step_rule == 'plain':
      a, b = 1.5, -0.5
    else:
      g2 = 3 / (1 + ell + ell * ell)
      g = jnp.sqrt(g2)
      a, b = 1.5 * g, -0.5 * g * g2
      ell = a * ell + b * ell * ell * ell
    t = a * eye + b * (z @ y)
    return y @ t, t @ z, ell

  if step_rule == 'plain' or tol <= 0:
    _, z, _ = jax.lax.fori_loop(0, steps, body, (y, z, ell))
  elif isinstance(steps, (int, np.integer)):
    # ell is a certified lower bound on every s: once 1 - ell <= tol for
    # every matrix, the remaining steps are skipped. A fixed trip count
    # with a branch (not a while_loop) keeps it reverse-differentiable.
    def step_until_close(k, carry):
      return jax.lax.cond(jnp.any(1 - carry[2] > tol),
                          lambda c: body(k, c), lambda c: c, carry)

    _, z, _ = jax.lax.fori_loop(0, int(steps), step_until_close,
                                (y, z, ell))
  else:  # a traced step count: a while_loop (forward-mode derivatives only)
    def cond(carry):
      k, _, _, ell = carry
      return (k < steps) & jnp.any(1 - ell > tol)

    def wbody(carry):
      k, y, z, ell = carry
      return (k + 1,) + body(k, (y, z, ell))

    _, _, z, _ = jax.lax.while_loop(cond, wbody, (0, y, z, ell))
  return z


def soft_clip_svd(x: jax.Array, c: float) -> jax.Array:
  """``H_c`` from a thin SVD (tests and small matrices; bfloat16 and
  float16 computed in float32, which LAPACK needs).

  Args:
    x: ``[..., m, n]``; leading axes are a batch. The result has ``x``'s
      dtype.
    c: threshold, as :func:`soft_clip_matrix` takes it (a number ``> 0``,
      or a scalar ``jax.Array``; an array ``c ≤ 0`` gives zeros).
  """
  _check_threshold('soft_clip_svd', c)
  if x.ndim < 2:
    raise ValueError(f'soft_clip_svd: x must be [..., m, n], got shape '
                     f'{x.shape}.')
  out_dtype = x.dtype
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  u, s, vt = lapack.per_matrix(
      lambda m: jnp.linalg.svd(m, full_matrices=False), x)
  c = jnp.asarray(c, s.dtype)
  s = jnp.where(c > 0, s / jnp.sqrt(1 + jnp.square(s / jnp.where(c > 0, c, 1))),
                0)
  return ((u * s[..., None, :]) @ vt).astype(out_dtype)


def soft_clip_vector(g: jax.Array, c: float | jax.Array) -> jax.Array:
  r"""The reference's rule for non-matrix parameters (``apply_to='all'``):

  .. math::
     g \mapsto \begin{cases} g & \|g\| \le c\\
       g/\sqrt{1 + (\|g\|/c)^2} & \text{otherwise}\end{cases}

  over the whole array. **Discontinuous at** ``‖g‖ = c`` (it jumps from
  ``c`` to ``c/√2``) — a quirk of the reference kept for parity.

  Args:
    g: an array of any shape; ``‖g‖`` is its Frobenius norm (computed in
      float32 or wider; the result has ``g``'s dtype).
    c: threshold, as :func:`soft_clip_matrix` takes it (a number ``> 0``,
      or a scalar ``jax.Array``; an array ``c ≤ 0`` gives zeros).
  """
  _check_threshold('soft_clip_vector', c)
  acc = jnp.promote_types(g.dtype, jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(acc))))
  c = jnp.asarray(c, acc)
  safe_c = jnp.where(c > 0, c, 1)
  factor = jnp.where(norm <= c, 1.0,
                     jax.lax.rsqrt(1 + jnp.square(norm / safe_c)))
  factor = jnp.where(c > 0, factor, 0)  # a threshold decayed to 0
  return (g.astype(acc) * factor).astype(g.dtype)
