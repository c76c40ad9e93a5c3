"""orthax: orthogonalized optimizers (the Muon family) for JAX and Optax."""

from orthax import polar
from orthax.matrices import MatrixSpec
from orthax.recipes import muon
from orthax.recipes import recipe
from orthax.recipes import recipe_factory
from orthax.recipes import recipe_names
from orthax.recipes import recipe_references
from orthax.routing import DEFAULT_RULES
from orthax.routing import Router
from orthax.routing import Rule
from orthax.routing import describe
from orthax.transforms import NonFiniteGradientError
from orthax.transforms import check_finite
from orthax.transforms import decoupled_weight_decay
from orthax.transforms import momentum
from orthax.transforms import orthogonalize
from orthax.transforms import scale_by_shape

__version__ = '0.1.0'

__all__ = [
    'DEFAULT_RULES', 'MatrixSpec', 'NonFiniteGradientError', 'Router', 'Rule',
    'check_finite', 'decoupled_weight_decay', 'describe', 'momentum', 'muon',
    'orthogonalize', 'polar', 'recipe', 'recipe_factory', 'recipe_names',
    'recipe_references', 'scale_by_shape',
]
