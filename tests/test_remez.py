"""Tests for the Polar Express coefficient generator (orthax.polar.remez)."""

import numpy as np
import pytest

from orthax.polar import presets
from orthax.polar import remez

TOL = 1e-9

TABLE_B_ROW0 = (8.237312490495555, -23.1577474145582, 16.68056841144592)


def _max_dev(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  return float(np.max(np.abs(got - want)))


def _grid(lo, hi):
  return np.concatenate([np.linspace(lo, hi, 20001),
                         np.geomspace(lo, hi, 20001)])


# ---------------------------------------------------------------- tables ---


def test_table_a_matches_paper_listing():
  got = remez.polar_express_coefficients(
      8, 1e-3, cushion=remez.PAPER_CUSHION, post_safety=0.01,
      exact_last_row=True)
  assert len(got) == 8
  assert _max_dev(got, presets.POLAR_EXPRESS_A) < TOL
  assert got[-1] == (1.875, -1.25, 0.375)
  assert remez.table('A') == got


def test_table_a_raw_rows_are_post_hoc_scaled():
  raw = remez.polar_express_coefficients(8, cushion=remez.PAPER_CUSHION)
  sf = 1.01
  want = [(a / sf, b / sf**3, c / sf**5) for a, b, c in raw[:7]]
  assert _max_dev(remez.table('A')[:7], want) < 1e-15
  # The post hoc factor does not feed back into the recursion.
  assert _max_dev(raw[:7], [(a * sf, b * sf**3, c * sf**5)
                            for a, b, c in presets.POLAR_EXPRESS_A[:7]]) < TOL


def test_table_b_row0():
  got = remez.polar_express_coefficients(10, 1e-3, cushion=0.02, safety=0.01)
  assert len(got) == 10
  assert _max_dev(got[0], TABLE_B_ROW0) < TOL
  assert remez.table('B') == got


def test_table_b_properties():
  rows = remez.table('B')
  assert np.all(np.isfinite(rows))
  x = _grid(1e-3, 1.0)
  widths = []
  for row in rows:
    x = remez.quintic(row, x)
    assert np.all(x > 0)
    assert x.max() < 2.0
    widths.append(x.max() - x.min())
  # The image of [1e-3, 1] is a band around 1 that shrinks every step ...
  assert all(w1 < w0 for w0, w1 in zip(widths, widths[1:]))
  assert widths[3] < 1.2 and widths[5] < 1e-2 and widths[7] < 1e-8
  # ... and collapses onto 1 after the final (safety-free) row.
  assert np.max(np.abs(x - 1.0)) < 1e-12


def test_table_c_matches_modded_nanogpt():
  got = remez.polar_express_coefficients(5, 1e-3, cushion=0.02, safety=0.02)
  assert len(got) == 5
  assert _max_dev(got, presets.POLAR_EXPRESS_C) < TOL
  assert remez.table('C') == got


def test_table_c_last_row_has_no_safety():
  with_sf = remez.polar_express_coefficients(5, safety=0.02,
                                             last_row_safety=True)
  assert _max_dev(with_sf[:4], presets.POLAR_EXPRESS_C[:4]) < TOL
  a, b, c = presets.POLAR_EXPRESS_C[4]
  sf = 1.02
  assert _max_dev(with_sf[4], (a / sf, b / sf**3, c / sf**5)) < TOL


def test_table_c_band():
  rows = remez.table('C')
  y = remez.compose(rows, _grid(1e-3, 1.0))
  lo, hi = float(y.min()), float(y.max())
  # Measured band: [0.858873, 1.141127], symmetric about 1 (the recursion's
  # [ℓ_5, 2 − ℓ_5] with ℓ_5 = p(ℓ_4), attained at x = 1e-3).
  assert 0.8588 < lo < 0.8590
  assert 1.1410 < hi < 1.1412
  assert abs((lo + hi) - 2.0) < 1e-6
  ell5 = float(remez.compose(rows, 1e-3))
  assert abs(lo - ell5) < 1e-12


def test_table_a_composition_converges_to_one():
  y = remez.compose(remez.table('A'), _grid(1e-3, 1.0))
  assert np.max(np.abs(y - 1.0)) < 1e-13


def test_table_params_and_unknown_table():
  assert set(remez.TABLE_PARAMS) == {'A', 'B', 'C'}
  with pytest.raises(ValueError, match='^table: name must be one of'):
    remez.table('D')


# -------------------------------------------------------------- minimax ---


@pytest.mark.parametrize('lower,upper', [(1e-3, 1.0), (0.02, 1.0),
                                         (0.3, 1.7), (0.9, 1.0)])
def test_optimal_quintic_equioscillates(lower, upper):
  row, err = remez.optimal_quintic(lower, upper)
  a, b, c = row
  assert err > 0
  # Critical points of p computed independently: roots of 5c x⁴ + 3b x² + a.
  crit = np.roots([5 * c, 0, 3 * b, 0, a])
  crit = np.sort(crit[(np.abs(crit.imag) < 1e-12) & (crit.real > lower)
                      & (crit.real < upper)].real)
  assert crit.shape == (2,)
  pts = np.array([lower, crit[0], crit[1], upper])
  dev = 1.0 - remez.quintic(row, pts)
  np.testing.assert_allclose(np.abs(dev), err, rtol=1e-9, atol=1e-15)
  np.testing.assert_array_equal(np.sign(dev), [1, -1, 1, -1])
  grid_max = np.max(np.abs(1.0 - remez.quintic(row, _grid(lower, upper))))
  assert grid_max <= err * (1 + 1e-9)


def test_optimal_quintic_beats_perturbations():
  lower, upper = 0.05, 1.0
  row, err = remez.optimal_quintic(lower, upper)
  x = _grid(lower, upper)
  rng = np.random.default_rng(0)
  for _ in range(100):
    other = np.asarray(row) * (1 + 1e-4 * rng.standard_normal(3))
    assert np.max(np.abs(1.0 - remez.quintic(other, x))) > err


def test_optimal_quintic_limit():
  row, err = remez.optimal_quintic(1.0, 1.0)
  assert row == (1.875, -1.25, 0.375) and err == 0.0
  row, err = remez.optimal_quintic(2.0 * (1 - 1e-6), 2.0)
  assert _max_dev(row, (1.875 / 2, -1.25 / 8, 0.375 / 32)) < 1e-15
  assert 0.0 <= err < 1e-15


def test_optimal_quintic_near_degenerate_interval():
  # Just below the 1 − 5e-6 switch the 4×4 system is singular to working
  # precision; the result must still be a valid near-limit polynomial.
  for ratio in (1 - 1e-5, 1 - 6e-6, 1 - 5.5e-6):
    row, err = remez.optimal_quintic(ratio, 1.0)
    assert _max_dev(row, (1.875, -1.25, 0.375)) < 1e-3
    assert 0.0 <= err < 1e-12


# --------------------------------------------------------------- inputs ---


@pytest.mark.parametrize('kwargs', [
    dict(steps=0), dict(steps=-1), dict(steps=1.5), dict(steps=True),
    dict(steps=3, lower=0.0), dict(steps=3, lower=1.0),
    dict(steps=3, lower=-0.1), dict(steps=3, lower=float('nan')),
    dict(steps=3, cushion=-0.01), dict(steps=3, cushion=1.0),
    dict(steps=3, safety=-0.01), dict(steps=3, post_safety=-0.01),
    dict(steps=3, safety=float('inf')),
])
def test_bad_inputs_raise(kwargs):
  with pytest.raises(ValueError):
    remez.polar_express_coefficients(**kwargs)


@pytest.mark.parametrize('lower,upper', [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0),
                                         (0.1, float('inf'))])
def test_optimal_quintic_bad_interval(lower, upper):
  with pytest.raises(ValueError):
    remez.optimal_quintic(lower, upper)
