r"""Per-shape Newton–Schulz coefficients (ROOT's "AdaNewton").

He et al., *ROOT: Robust Orthogonalized Optimizer* (arXiv 2511.20626),
``huawei-noah/noah-research`` @ a99fb00 ``ROOT/examples/example_train.py``
: one fixed quintic ``(a, b, c)`` per
matrix shape, keyed by ``(min(m, n), max(m, n))``, Keller Jordan's triple
for any other shape. Only the four shapes of the paper's 2048-wide model are
published.

:func:`fit_quintic` is a generator for other shapes, following the
(secondary-source) description of ROOT's fitting: minimize
``Σ_i (p⁵(σ_i) - 1)²`` over the singular values of Frobenius-normalized
sample matrices, ``p(σ) = aσ + bσ³ + cσ⁵`` composed ``steps`` times. It fits
on whatever sample it is given; :func:`gaussian_sample_singular_values`
provides the Gaussian one. ROOT's own sample was a 1:3 mix of real momentum
matrices and Gaussian matrices, which we do not have: a Gaussian-only fit is
more aggressive than ROOT's table (one 2048² Gaussian sample fits
(3.3346, −4.2607, 1.7790) vs ROOT's
(3.4916, −4.8224, 2.1095)), so fitted rows are *not* ROOT's.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from orthax import _validate
from orthax.polar import presets as _presets
from orthax.polar.newton_schulz import coefficient_table

Row = tuple[float, float, float]

ROOT_TABLE: dict[tuple[int, int], Row] = {
    (2048, 2048): (3.4916, -4.8224, 2.1095),
    (2048, 3072): (3.4509, -4.5790, 1.9325),
    (2048, 8192): (2.9794, -3.6674, 1.6207),
    (2048, 16384): (3.1943, -3.8221, 1.5322),
}

SHAPE_TABLES: dict[str, Mapping[tuple[int, int], Row]] = {'root': ROOT_TABLE}


def resolve_shape_table(
    table: str | Mapping[tuple[int, int], Sequence[float]]
) -> dict[tuple[int, int], np.ndarray]:
  """A per-shape table as ``{(min side, max side): (k, 3) float64 rows}``.

  Args:
    table: ``'root'`` (:data:`ROOT_TABLE`) or a mapping
      ``(m, n) -> row or rows`` (keys in either orientation; values as
      :func:`coefficient_table` takes them).
  """
  if isinstance(table, str):
    if table not in SHAPE_TABLES:
      raise ValueError(f'Unknown per-shape coefficient table {table!r}; known: '
                       f'{", ".join(sorted(SHAPE_TABLES))}.')
    table = SHAPE_TABLES[table]
  out = {}
  for key, row in dict(table).items():
    m, n = key
    out[(min(m, n), max(m, n))] = coefficient_table(row)
  return out


_validate.register(('coeffs_for_shape',), _validate.parsed(
    lambda t: t is None or resolve_shape_table(t),  # None: no table
    "'root', a mapping (min side, max side) -> coefficient rows, or None"))


def shape_coeffs(m: int, n: int,
                 table: str | Mapping[tuple[int, int], Sequence[float]] = 'root',
                 fallback: Sequence[Sequence[float]] = _presets.JORDAN):
  """The coefficient table for an ``m×n`` matrix (either orientation).

  Args:
    m, n: the matrix's sides.
    table: a per-shape table as :func:`resolve_shape_table` takes it
      (default ``'root'``).
    fallback: the rows for a shape the table lacks (default Keller
      Jordan's ``((3.4445, -4.7750, 2.0315),)``; one row ``(a, b, c)``
      is a table of one row), checked as a coefficient table.

  Returns:
    A float64 array of rows ``(a, b, c)``.

  Example:
    >>> from orthax.polar import shape_coeffs
    >>> shape_coeffs(3072, 2048).tolist()  # ROOT's 2048×3072 row
    [[3.4509, -4.579, 1.9325]]
    >>> shape_coeffs(64, 64).tolist()  # not in the table: the fallback
    [[3.4445, -4.775, 2.0315]]
  """
  t = resolve_shape_table(table)
  key = (min(m, n), max(m, n))
  return t[key] if key in t else coefficient_table(fallback,
                                                   owner='shape_coeffs')


def gaussian_sample_singular_values(m: int, n: int, count: int = 4,
                                    seed: int = 0) -> np.ndarray:
  """Singular values of ``count`` Frobenius-normalized ``m×n`` standard
  Gaussian matrices, concatenated (the Gaussian part of ROOT's sample).

  Args:
    m, n: the sample matrices' shape (ints ``≥ 1``).
    count: how many matrices (default 4): ``count·min(m, n)`` values.
    seed: seed of NumPy's ``default_rng``.
  """
  for name, value in (('m', m), ('n', n), ('count', count)):
    _validate.count('gaussian_sample_singular_values', name, value)
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    s = np.linalg.svd(rng.standard_normal((m, n)), compute_uv=False)
    out.append(s / np.sqrt(np.sum(s * s)))
  return np.concatenate(out)


def orthogonalization_error(row: Sequence[float], sigma: np.ndarray,
                            steps: int = 5) -> float:
  """``Σ_i (p^{∘steps}(σ_i) - 1)²`` for the fixed quintic ``row``.

  Args:
    row: ``(a, b, c)`` of ``p(σ) = aσ + bσ³ + cσ⁵``.
    sigma: sample singular values (e.g. of
      :func:`gaussian_sample_singular_values`).
    steps: how many times ``p`` is applied (default 5).
  """
  a, b, c = row
  s = np.asarray(sigma, np.float64)
  for _ in range(steps):
    s = a * s + b * s**3 + c * s**5
  return float(np.sum((s - 1) ** 2))


def fit_quintic(sigma: np.ndarray, steps: int = 5,
                init: Sequence[float] = _presets.JORDAN[0],
                iters: int = 200) -> Row:
  """Fixed ``(a, b, c)`` minimizing :func:`orthogonalization_error` on the
  sample singular values ``sigma`` (Gauss–Newton with a backtracking line
  search, from ``init``; NumPy, offline). Returns a row for a shape table.

  Args:
    sigma: sample singular values, e.g.
      :func:`gaussian_sample_singular_values` of the target shape.
    steps: how many times the quintic is applied (default 5).
    init: the starting row (default Keller Jordan's
      ``(3.4445, -4.7750, 2.0315)``).
    iters: the most Gauss–Newton iterations (default 200); it stops
      earlier when no step lowers the error or the relative decrease is
      below 1e-12.
  """
  s0 = np.asarray(sigma, np.float64)
  theta = np.asarray(init, np.float64)

  def resid_jac(th):
    a, b, c = th
    s = s0.copy()
    ds = np.zeros((s.size, 3))
    for _ in range(steps):
      dp = a + 3 * b * s**2 + 5 * c * s**4
      ds = dp[:, None] * ds + np.stack([s, s**3, s**5], axis=1)
      s = a * s + b * s**3 + c * s**5
    return s - 1, ds

  r, j = resid_jac(theta)
  f = float(r @ r)
  for _ in range(iters):
    step = np.linalg.lstsq(j, -r, rcond=None)[0]
    t = 1.0
    while t > 1e-6:
      cand = theta + t * step
      rc, jc = resid_jac(cand)
      fc = float(rc @ rc)
      if np.isfinite(fc) and fc < f:
        break
      t /= 2
    else:
      break
    theta, r, j, f_old, f = cand, rc, jc, f, fc
    if f_old - f < 1e-12 * max(f_old, 1e-30):
      break
  return tuple(float(v) for v in theta)
