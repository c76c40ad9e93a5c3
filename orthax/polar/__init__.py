"""Matrix functions: Newton–Schulz, exact polar factor, coefficient tables.

Pure ``jax.numpy`` on arrays ``[..., m, n]``; nothing here knows optax.
"""

from orthax.polar.dispatch import METHODS
from orthax.polar.dispatch import choose_method
from orthax.polar.dispatch import orthogonalize_stack
from orthax.polar.gram import gram_flops
from orthax.polar.gram import gram_newton_schulz
from orthax.polar.gram import prefer_gram
from orthax.polar.gram import standard_flops
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
    'METHODS', 'NORMALIZERS', 'Preset', 'choose_method', 'get_preset',
    'gram_flops', 'gram_newton_schulz', 'newton_schulz',
    'orthogonalize_stack', 'prefer_gram', 'standard_flops',
    'normalize_frobenius', 'optimal_quintic', 'polar_express_coefficients',
    'polar_svd', 'preset_names',
]
