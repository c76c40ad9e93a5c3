"""Polar Express coefficient generator (pure NumPy, float64).

Reference: N. Amsel, D. Persson, C. Musco, R. M. Gower, *The Polar Express:
Optimal Matrix Sign Methods and Their Application to the Muon Algorithm*,
arXiv 2505.16932 (2025).

A Newton–Schulz style iteration ``X ← a X + b (X Xᵀ) X + c (X Xᵀ)² X`` acts on
each singular value ``σ`` of ``X`` as the odd quintic

    p(σ) = a σ + b σ³ + c σ⁵.

Polar Express chooses, at every step, the quintic that is *minimax optimal*
on the interval ``[ℓ, u]`` currently known to contain the singular values:

    p* = argmin_{a,b,c} max_{x ∈ [ℓ, u]} |1 − p(x)|,

and then tracks the image interval ``p*([ℓ, u])`` for the next step.  The
optimal quintic equioscillates (Chebyshev alternation theorem) on four points
``ℓ < q < r < u``, where ``q, r`` are the critical points of ``p``:

    1 − p(ℓ) = p(q) − 1 = 1 − p(r) = p(u) − 1 = E  (E > 0).

It is found here by a Remez exchange: solve the 4×4 linear system
``p(x_i) + (−1)^i E = 1`` for ``(a, b, c, E)``, move ``q, r`` to the roots of
``p'(x) = a + 3 b x² + 5 c x⁴`` and repeat until ``|ΔE| < 1e-15``.

The full construction (:func:`polar_express_coefficients`) is, starting from
``u = 1`` and a lower bound ``ℓ``:

1. ``ℓ' = max(ℓ, cushion · u)``; ``p = optimal_quintic(ℓ', u)``.
2. If the cushion was active (``ℓ' > ℓ``) rescale ``p ← p · 2 / (p(ℓ) + p(u))``
   so that ``p(ℓ)`` and ``p(u)`` straddle 1 symmetrically.
3. Safety factor ``sf = 1 + safety`` (all rows but the last):
   ``p(x) ← p(x / sf)``, i.e. ``(a / sf, b / sf³, c / sf⁵)``.
4. ``ℓ ← p(ℓ)`` with the *final* row (safety factor included),
   ``u ← 2 − ℓ``, ``ℓ ← min(ℓ, u)``.

Known tables reproduced by this generator (``table(name)``):

* ``'A'`` – paper listing / ``basic.py``: 8 rows, ``ℓ = 1e-3``, cushion
  ``0.02407327424182761``, no safety inside the recursion, then *post hoc*
  division by ``1.01`` (``a/1.01, b/1.01³, c/1.01⁵``) on rows 0–6 and the
  last row forced to ``(15/8, −10/8, 3/8)``.
* ``'B'`` – PolarExpress repository default: 10 rows, ``ℓ = 1e-3``,
  cushion ``0.02``, safety ``0.01`` inside the recursion.
* ``'C'`` – modded-nanogpt / Dion: 5 rows, ``ℓ = 1e-3``, cushion ``0.02``,
  safety ``0.02`` inside the recursion (not on the last row).

This module has no JAX dependency; it is meant to precompute constants.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import numpy as np

from orthax import _validate

__all__ = [
    'PAPER_CUSHION',
    'TABLE_PARAMS',
    'compose',
    'optimal_quintic',
    'polar_express_coefficients',
    'quintic',
    'table',
]

Row = tuple[float, float, float]
Coeffs = tuple[Row, ...]

#: Cushion of the paper's own generator (Table A). A 9-digit truncation,
#: 0.024073274, moves row 0 by up to ~1.4e-8 — too coarse for 1e-9 agreement.
PAPER_CUSHION = 0.02407327424182761

#: ``ℓ'/u`` at or above which the limit polynomial is used instead of Remez.
_LIMIT_RATIO = 1.0 - 5e-6
#: The limit ``ℓ → u`` of the optimal quintic on ``[ℓ, u]`` for ``u = 1``.
_LIMIT_ROW: Row = (15.0 / 8.0, -10.0 / 8.0, 3.0 / 8.0)

#: Above this ``ℓ/u`` a breakdown of the exchange falls back to the limit.
_FALLBACK_RATIO = 1.0 - 1e-4

_REMEZ_TOL = 1e-15
_REMEZ_MAX_ROUNDS = 1000

#: Keyword arguments of :func:`polar_express_coefficients` for each table.
TABLE_PARAMS: dict[str, dict[str, Any]] = {
    'A': dict(steps=8, lower=1e-3, cushion=PAPER_CUSHION, post_safety=0.01,
              exact_last_row=True),
    'B': dict(steps=10, lower=1e-3, cushion=0.02, safety=0.01),
    'C': dict(steps=5, lower=1e-3, cushion=0.02, safety=0.02),
}


def quintic(row, x):
  """Evaluates ``p(x) = a x + b x³ + c x⁵`` for ``row = (a, b, c)``."""
  a, b, c = row
  x = np.asarray(x, dtype=np.float64)
  x2 = x * x
  return x * (a + x2 * (b + x2 * c))


def compose(rows, x):
  """Applies the rows in order: ``p_{n−1}(… p_1(p_0(x)))``."""
  y = np.asarray(x, dtype=np.float64)
  for row in rows:
    y = quintic(row, y)
  return y


def _scale(row: Row, s: float) -> Row:
  """Coefficients of ``p(x / s)``: ``(a / s, b / s³, c / s⁵)``."""
  a, b, c = row
  return (a / s, b / s**3, c / s**5)


def _critical_points(a: float, b: float, c: float, lo: float, hi: float):
  """Positive roots of ``a + 3 b x² + 5 c x⁴`` in ``(lo, hi)``, ascending."""
  # Quadratic in t = x²: 5c t² + 3b t + a = 0, solved without cancellation.
  disc = 9.0 * b * b - 20.0 * a * c
  if not (c != 0.0 and disc > 0.0):
    return None
  s = math.sqrt(disc)
  big = -(3.0 * b + math.copysign(s, b)) / 2.0
  if big == 0.0:
    return None
  t1, t2 = sorted((big / (5.0 * c), a / big))
  if not (t1 > 0.0):
    return None
  q, r = math.sqrt(t1), math.sqrt(t2)
  if not (lo < q < r < hi):
    return None
  return q, r


def _limit_quintic(lower: float, upper: float) -> tuple[Row, float]:
  """Limit polynomial on ``[lower, upper]`` and its maximum error there."""
  row = (15.0 / 8.0 / upper, -10.0 / 8.0 / upper**3, 3.0 / 8.0 / upper**5)
  # p(x) = 1 − (error) is increasing on [0, u] with p(u) = 1.
  return row, abs(float(1.0 - quintic(row, lower)))


def optimal_quintic(lower: float, upper: float) -> tuple[Row, float]:
  """Minimax odd quintic approximating 1 on ``[lower, upper]``.

  Solves ``min_{a,b,c} max_{x ∈ [lower, upper]} |1 − (a x + b x³ + c x⁵)|``
  by a Remez exchange on the four alternation points ``{lower, q, r, upper}``
  (Amsel et al., arXiv 2505.16932, §4): each round solves the 4×4 system
  ``p(x_i) + (−1)^i E = 1`` for ``(a, b, c, E)`` and moves ``q, r`` to the
  critical points of ``p`` (roots of ``a + 3 b x² + 5 c x⁴``).  It starts
  from ``q = (3·lower + upper)/4``, ``r = (lower + 3·upper)/4`` and stops
  when ``|ΔE| < 1e-15``.  At convergence ``1 − p`` equioscillates with
  amplitude ``E``: ``p(lower) = p(r) = 1 − E``, ``p(q) = p(upper) = 1 + E``.

  If ``lower / upper ≥ 1 − 5e-6`` the (ill-conditioned) exchange is skipped
  and the limit polynomial ``((15/8)/u, (−10/8)/u³, (3/8)/u⁵)`` is returned
  with ``E = 1 − p(lower)`` (its maximum error on the interval).  The same
  fallback is used if the exchange breaks down numerically for
  ``lower / upper ≥ 1 − 1e-4`` (seen just below ``1 − 5e-6``, where the 4×4
  system is singular to working precision).

  Args:
    lower: left end ``ℓ > 0``.
    upper: right end ``u ≥ ℓ``.

  Returns:
    ``((a, b, c), E)`` as Python floats.

  Raises:
    ValueError: on a non-finite or non-positive interval.
    RuntimeError: if the exchange loses its alternation points or fails to
      converge (not observed for ``ℓ/u`` in ``[1e-9, 1]``).
  """
  lower, upper = float(lower), float(upper)
  if not (math.isfinite(lower) and math.isfinite(upper)):
    raise ValueError(f'optimal_quintic: lower and upper must be finite, got '
                     f'[{lower}, {upper}]')
  if not (0.0 < lower <= upper):
    raise ValueError(f'optimal_quintic: lower and upper must satisfy '
                     f'0 < lower <= upper, got [{lower}, {upper}]')

  if lower / upper >= _LIMIT_RATIO:
    return _limit_quintic(lower, upper)

  q = (3.0 * lower + upper) / 4.0
  r = (lower + 3.0 * upper) / 4.0
  signs = np.array([1.0, -1.0, 1.0, -1.0])
  rhs = np.ones(4)
  err = math.inf
  for _ in range(_REMEZ_MAX_ROUNDS):
    x = np.array([lower, q, r, upper])
    system = np.stack([x, x**3, x**5, signs], axis=1)
    a, b, c, new_err = (float(v) for v in np.linalg.solve(system, rhs))
    converged = abs(new_err - err) < _REMEZ_TOL
    err = new_err
    if converged:
      break
    points = _critical_points(a, b, c, lower, upper)
    if points is None:
      if lower / upper >= _FALLBACK_RATIO:
        # The 4×4 system is singular to working precision; the limit
        # polynomial's error here is ≈ 2.5 δ³ (δ = 1 − ℓ/u), i.e. < 3e-12.
        return _limit_quintic(lower, upper)
      raise RuntimeError(
          f'Remez exchange on [{lower}, {upper}] lost its alternation points '
          f'(a={a}, b={b}, c={c}).')
    q, r = points
  else:
    raise RuntimeError(f'Remez exchange on [{lower}, {upper}] did not converge '
                       f'in {_REMEZ_MAX_ROUNDS} rounds.')
  return (a, b, c), abs(err)


def polar_express_coefficients(
    steps: int,
    lower: float = 1e-3,
    *,
    cushion: float = 0.02,
    safety: float = 0.0,
    last_row_safety: bool = False,
    post_safety: float = 0.0,
    exact_last_row: bool = False,
) -> Coeffs:
  """Polar Express coefficient table (Amsel et al., arXiv 2505.16932, Alg. 1).

  Starting from ``u = 1`` and ``ℓ = lower``, each of the ``steps`` rows is
  built as follows:

  1. ``ℓ' = max(ℓ, cushion·u)`` and ``p = optimal_quintic(ℓ', u)``.
  2. If ``ℓ' > ℓ`` (cushion active): ``p ← p · 2/(p(ℓ) + p(u))``.
  3. With ``sf = 1 + safety``: ``p(x) ← p(x/sf)``, i.e.
     ``(a/sf, b/sf³, c/sf⁵)`` — for every row but the last unless
     ``last_row_safety``.
  4. ``ℓ ← p(ℓ)`` using the row *after* step 3, ``u ← 2 − ℓ``,
     ``ℓ ← min(ℓ, u)``.

  Afterwards (outside the recursion, so ``ℓ, u`` are unaffected):

  5. ``post_safety``: divide rows by ``sf' = 1 + post_safety`` in the same
     way (``a/sf', b/sf'³, c/sf'⁵``) — every row but the last unless
     ``last_row_safety``.
  6. ``exact_last_row``: replace the last row by ``(15/8, −10/8, 3/8)``, the
     limit polynomial for ``[ℓ, u] → [1, 1]``.

  Known tables (see :data:`TABLE_PARAMS` and :func:`table`)::

    A = polar_express_coefficients(8, cushion=PAPER_CUSHION,
                                   post_safety=0.01, exact_last_row=True)
    B = polar_express_coefficients(10, safety=0.01)
    C = polar_express_coefficients(5, safety=0.02)

  Args:
    steps: number of rows, ``≥ 1``.
    lower: initial lower bound ``ℓ`` on the singular values (of the
      normalized matrix, whose largest singular value is ``≤ 1``),
      ``0 < lower < 1``.
    cushion: fraction of ``u`` below which the minimax fit is not extended
      (keeps ``p'`` from vanishing near 0), ``0 ≤ cushion < 1``; ``0`` turns
      the cushion off.
    safety: ``ε_sf ≥ 0`` of the safety factor applied inside the recursion.
    last_row_safety: also apply ``safety`` / ``post_safety`` to the last row.
    post_safety: ``≥ 0``; post hoc divisor ``1 + post_safety`` (does not
      change the recursion).
    exact_last_row: force the last row to ``(1.875, −1.25, 0.375)``.

  Returns:
    A tuple of ``steps`` rows ``(a, b, c)`` of Python floats.

  Raises:
    ValueError: on invalid arguments.
  """
  who = 'polar_express_coefficients'
  for name in ('last_row_safety', 'exact_last_row'):
    _validate.flag(who, name, locals()[name])
  if isinstance(steps, bool):
    raise ValueError(f'{who}: steps must be an integer, got {steps!r}')
  try:
    steps = operator.index(steps)
  except TypeError:
    raise ValueError(f'{who}: steps must be an integer, got {steps!r}'
                     ) from None
  if steps < 1:
    raise ValueError(f'{who}: steps must be >= 1, got {steps!r}')
  lower, cushion = float(lower), float(cushion)
  safety, post_safety = float(safety), float(post_safety)
  if not 0.0 < lower < 1.0:
    raise ValueError(f'{who}: lower must lie in (0, 1), got {lower!r}')
  if not 0.0 <= cushion < 1.0:
    raise ValueError(f'{who}: cushion must lie in [0, 1), got {cushion!r}')
  if not (math.isfinite(safety) and safety >= 0.0):
    raise ValueError(f'{who}: safety must be finite and >= 0, got '
                     f'{safety!r}')
  if not (math.isfinite(post_safety) and post_safety >= 0.0):
    raise ValueError(f'{who}: post_safety must be finite and >= 0, got '
                     f'{post_safety!r}')

  ell, u = lower, 1.0
  rows: list[Row] = []
  for k in range(steps):
    last = k == steps - 1
    ell_fit = max(ell, cushion * u)
    row, _ = optimal_quintic(ell_fit, u)
    if ell_fit > ell:
      s = 2.0 / float(quintic(row, ell) + quintic(row, u))
      row = (s * row[0], s * row[1], s * row[2])
    if safety and (not last or last_row_safety):
      row = _scale(row, 1.0 + safety)
    rows.append(row)
    ell = float(quintic(row, ell))
    u = 2.0 - ell
    ell = min(ell, u)

  if post_safety:
    n = steps if last_row_safety else steps - 1
    rows[:n] = [_scale(row, 1.0 + post_safety) for row in rows[:n]]
  if exact_last_row:
    rows[-1] = _LIMIT_ROW
  return tuple(tuple(float(v) for v in row) for row in rows)


@functools.lru_cache(maxsize=None)
def table(name: str) -> Coeffs:
  """Builds a known table: ``'A'``, ``'B'`` or ``'C'``.

  * ``'A'`` (paper listing / ``basic.py``, 8 rows):
    ``polar_express_coefficients(8, cushion=PAPER_CUSHION, post_safety=0.01,
    exact_last_row=True)``.
  * ``'B'`` (PolarExpress repo default, 10 rows):
    ``polar_express_coefficients(10, safety=0.01)``.
  * ``'C'`` (modded-nanogpt / Dion, 5 rows):
    ``polar_express_coefficients(5, safety=0.02)``.

  All use ``lower=1e-3``; B and C use ``cushion=0.02``.
  """
  try:
    params = TABLE_PARAMS[name]
  except (KeyError, TypeError):
    raise ValueError(f'table: name must be one of {sorted(TABLE_PARAMS)}, '
                     f'got {name!r}') from None
  return polar_express_coefficients(**params)
