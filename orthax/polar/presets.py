"""Named Newton–Schulz coefficient tables.

Each preset is a table of odd-quintic coefficients ``(a, b, c)``, one row per
step, acting on singular values as ``p(σ) = aσ + bσ³ + cσ⁵``; steps beyond
the table repeat its last row. A preset also fixes the normalizer applied
before the first step and its default step count.

Sources:

* ``jordan`` – K. Jordan, *Muon* (2024), fixed ``(3.4445, −4.7750, 2.0315)``.
* ``polar_express`` – Amsel et al., *The Polar Express* (arXiv 2505.16932),
  the 5-row table used by modded-nanogpt and Dion (ℓ=1e-3, safety 1.02,
  cushion 0.02) with its ``1.02·‖X‖_F + 1e-6`` normalizer ("Table C").
* ``polar_express_paper`` – the 8-row table of the paper listing
  (``basic.py``; "Table A") with the ``1.01·‖X‖_F + 1e-7`` normalizer.
* ``dion`` / ``quintic`` – the 5-row table of Dion / NVIDIA ``quintic``.
* ``cans`` – Grishina et al., *CANS* (arXiv 2506.10935), NVIDIA's 5 rows;
  float32 only: the table has no safety margin, and bfloat16 rounding can
  push singular values past the point where rows 3–5 diverge.
* ``aol`` – Boissin et al., *Turbo-Muon* (arXiv 2512.04632): AOL first-step
  rescaling (no Frobenius normalization), 4 rows from the flash-newton-schulz
  repository at cdb03db.
"""

from __future__ import annotations

from typing import NamedTuple

from orthax import _validate

Coeffs = tuple[tuple[float, float, float], ...]


class Preset(NamedTuple):
  """A Newton–Schulz configuration.

  Attributes:
    name: registry name.
    coeffs: rows ``(a, b, c)``; step ``k`` uses row ``min(k, len-1)``.
    steps: default number of steps.
    normalizer: ``'frobenius'``, ``'schatten4'``, ``'aol'`` or ``'none'``.
    norm_scale: ``X / (norm_scale·‖X‖ + eps)`` for the Frobenius normalizer.
    eps: the normalizer's additive (Frobenius) or clamp (AOL, Schatten) term.
    domain: the smallest normalized input singular value the band covers.
    band: ``(lo, hi)`` bounds on the output singular values at the default
      step count for normalized input singular values in ``[domain, 1]``
      (from iterating the scalar polynomial on a dense grid; the tests check
      them on matrices with prescribed spectra).
  """

  name: str
  coeffs: Coeffs
  steps: int
  normalizer: str
  norm_scale: float
  eps: float
  domain: float
  band: tuple[float, float]


JORDAN: Coeffs = ((3.4445, -4.7750, 2.0315),)

POLAR_EXPRESS_C: Coeffs = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

POLAR_EXPRESS_A: Coeffs = (
    (8.205160414008757, -22.90193498708130, 16.46072491020200),
    (4.066395159944305, -2.861154086758272, 0.5183995226701543),
    (3.909594904439181, -2.823351735042520, 0.5250369769396879),
    (3.285564017197834, -2.415301959635374, 0.4852940655278453),
    (2.277873287083301, -1.619821765264845, 0.3984807870416201),
    (1.872575651274583, -1.230704257488356, 0.3585161620951092),
    (1.856437109738448, -1.213239281884336, 0.3567997893969947),
    (1.875, -1.25, 0.375),
)

DION: Coeffs = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

CANS: Coeffs = (
    (8.4703, -25.1081, 18.6293),
    (4.1828, -3.1087, 0.5806),
    (3.9619, -2.9541, 0.5630),
    (3.2866, -2.4647, 0.5074),
    (2.2737, -1.6447, 0.4162),
)

# flash-newton-schulz @ cdb03db (HEAD). The older table that NVIDIA ships as
# `aol`, (4.0098, −7.0585, 2.4635), … maps σ = 1 to −0.585 in its first row,
# so an input whose rows are already orthogonal (where the AOL bound is tight)
# comes out with flipped signs; we do not ship it.
AOL: Coeffs = (
    (4.6051, -9.6552, 5.6769),
    (4.7505, -6.0861, 2.1790),
    (2.7763, -2.3190, 0.5523),
    (2.4231, -2.2861, 0.8193),
)

_PRESETS: dict[str, Preset] = {}


def _register(p: Preset) -> None:
  _PRESETS[p.name] = p


_register(Preset('jordan', JORDAN, 5, 'frobenius', 1.0, 1e-7, 1e-3,
                 (0.470, 1.203)))
_register(Preset('polar_express', POLAR_EXPRESS_C, 5, 'frobenius', 1.02, 1e-6,
                 1e-3, (0.846, 1.142)))
_register(Preset('polar_express_paper', POLAR_EXPRESS_A, 8, 'frobenius', 1.01,
                 1e-7, 1e-3, (0.9999, 1.0001)))
_register(Preset('dion', DION, 5, 'frobenius', 1.0, 1e-7, 1e-3,
                 (0.474, 1.146)))
_register(_PRESETS['dion']._replace(name='quintic'))
_register(Preset('cans', CANS, 5, 'frobenius', 1.0, 1e-7, 1e-3,
                 (0.884, 1.120)))
_register(Preset('aol', AOL, 4, 'aol', 1.0, 1e-7, 1e-2, (0.940, 1.051)))


def preset_names() -> tuple[str, ...]:
  """Names accepted by :func:`get_preset`."""
  return tuple(sorted(_PRESETS))


def get_preset(name: str | Preset) -> Preset:
  """Returns the preset called ``name`` (a :class:`Preset` passes through).

  Args:
    name: a name from :func:`preset_names` (``'jordan'``,
      ``'polar_express'``, ``'polar_express_paper'``, ``'dion'``,
      ``'quintic'``, ``'cans'``, ``'aol'``) or a :class:`Preset`; any
      other value raises ``ValueError``.

  Example:
    >>> from orthax.polar import get_preset
    >>> p = get_preset('polar_express')
    >>> p.steps, p.normalizer, p.norm_scale, p.eps
    (5, 'frobenius', 1.02, 1e-06)
  """
  if isinstance(name, Preset):
    return name
  try:
    return _PRESETS[name]
  except (KeyError, TypeError):
    raise ValueError(
        f'Unknown Newton–Schulz preset {name!r}; known presets: '
        f'{", ".join(preset_names())}.') from None


# The rule of a preset argument: ``check_preset(owner, name, value)``.
check_preset = _validate.parsed(get_preset, 'a preset name or an '
                                'orthax.polar.Preset')
_validate.register(('preset', 'ns_preset', 'noise_ns_preset'), check_preset)
