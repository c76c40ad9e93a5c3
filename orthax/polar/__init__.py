"""Matrix functions: Newton–Schulz, exact polar factor, coefficient tables.

Pure ``jax.numpy`` on arrays ``[..., m, n]``; nothing here knows optax.
"""

from orthax.polar.newton_schulz import NORMALIZERS
from orthax.polar.newton_schulz import newton_schulz
from orthax.polar.newton_schulz import normalize_frobenius
from orthax.polar.newton_schulz import polar_svd
from orthax.polar.presets import Preset
from orthax.polar.presets import get_preset
from orthax.polar.presets import preset_names
from orthax.polar.remez import optimal_quintic
from orthax.polar.remez import polar_express_coefficients

__all__ = [
    'NORMALIZERS', 'Preset', 'get_preset', 'newton_schulz',
    'normalize_frobenius', 'optimal_quintic', 'polar_express_coefficients',
    'polar_svd', 'preset_names',
]
