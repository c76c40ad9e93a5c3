"""Matrix functions: Newton–Schulz, exact polar factor, coefficient tables.

Pure ``jax.numpy`` on arrays ``[..., m, n]``; nothing here knows optax.
"""

from orthax.polar.adanewton import ROOT_TABLE
from orthax.polar.adanewton import fit_quintic
from orthax.polar.adanewton import gaussian_sample_singular_values
from orthax.polar.adanewton import orthogonalization_error
from orthax.polar.adanewton import resolve_shape_table
from orthax.polar.adanewton import shape_coeffs
from orthax.polar.dispatch import METHODS
from orthax.polar.dispatch import choose_method
from orthax.polar.dispatch import orthogonalize_stack
from orthax.polar.gram import FROBENIUS_BLOCK_FLOPS_PER_ENTRY
from orthax.polar.gram import FROBENIUS_FLOPS_PER_ENTRY
from orthax.polar.gram import NORMALIZER_FLOPS
from orthax.polar.gram import gram_flops
from orthax.polar.gram import gram_newton_schulz
from orthax.polar.gram import gram_products
from orthax.polar.gram import normalizer_flops
from orthax.polar.gram import prefer_gram
from orthax.polar.gram import standard_flops
from orthax.polar.newton_schulz import NORMALIZERS
from orthax.polar.newton_schulz import coefficient_table
from orthax.polar.newton_schulz import newton_schulz
from orthax.polar.newton_schulz import normalize_frobenius
from orthax.polar.newton_schulz import polar_svd
from orthax.polar.presets import Preset
from orthax.polar.presets import get_preset
from orthax.polar.presets import preset_names
from orthax.polar.remez import optimal_quintic
from orthax.polar.remez import polar_express_coefficients
from orthax.polar.spectral import lambda_max_bound
from orthax.polar.spectral import soft_clip_matrix
from orthax.polar.spectral import soft_clip_svd
from orthax.polar.spectral import soft_clip_vector

__all__ = [
    'METHODS', 'NORMALIZERS', 'Preset', 'choose_method', 'coefficient_table',
    'get_preset',
    'FROBENIUS_BLOCK_FLOPS_PER_ENTRY', 'FROBENIUS_FLOPS_PER_ENTRY',
    'NORMALIZER_FLOPS', 'normalizer_flops',
    'gram_flops', 'gram_newton_schulz', 'gram_products', 'newton_schulz',
    'orthogonalize_stack', 'prefer_gram', 'standard_flops',
    'normalize_frobenius', 'optimal_quintic', 'polar_express_coefficients',
    'polar_svd', 'preset_names',
    'ROOT_TABLE', 'fit_quintic', 'gaussian_sample_singular_values',
    'lambda_max_bound', 'orthogonalization_error', 'resolve_shape_table',
    'shape_coeffs', 'soft_clip_matrix', 'soft_clip_svd', 'soft_clip_vector',
]
