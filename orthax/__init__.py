"""orthax: orthogonalized optimizers (the Muon family) for JAX and Optax."""

# The subpackages, bound here by name (for type checkers too), so that
# `import orthax` then `orthax.transforms.momentum` works as the docs write it.
from orthax import engine
from orthax import matrices
from orthax import matrix_stages
from orthax import polar
from orthax import recipes
from orthax import routing
from orthax import sharding
from orthax import transforms
from orthax.matrices import MatrixSpec
from orthax.recipes import aro
from orthax.recipes import auon
from orthax.recipes import dct_adamw
from orthax.recipes import trion
from orthax.recipes import fismo
from orthax.recipes import hybrid_auon
from orthax.recipes import lanton
from orthax.recipes import muon
from orthax.recipes import namo
from orthax.recipes import namo_d
from orthax.recipes import normuon
from orthax.recipes import recipe
from orthax.recipes import recipe_factory
from orthax.recipes import recipe_names
from orthax.recipes import recipe_references
from orthax.recipes import root
from orthax.recipes import spectra
from orthax.routing import DEFAULT_RULES
from orthax.routing import Router
from orthax.routing import Rule
from orthax.routing import MatrixViewWarning
from orthax.routing import OutputLayerWarning
from orthax.recipes._describe import describe
from orthax.sharding import Distributed
from orthax.transforms import NonFiniteGradientError
from orthax.transforms import NonFiniteUpdateError
from orthax.transforms import nonfinite_leaves
from orthax.transforms import nonfinite_status
from orthax.transforms import raise_if_nonfinite
from orthax.transforms import skip_cause
from orthax.transforms import skip_if_nonfinite
from orthax.transforms import clip_outliers
from orthax.transforms import cosh_normalize
from orthax.transforms import decoupled_weight_decay
from orthax.transforms import momentum
from orthax.transforms import layerwise_noise_adapt
from orthax.transforms import neuron_normalize
from orthax.transforms import noise_adapt
from orthax.transforms import orthogonalize
from orthax.transforms import scale_by_shape
from orthax.transforms import scale_to_rms
from orthax.transforms import spectral_clip
from orthax.transforms import spectral_preclip

__version__ = '0.1.0'

__all__ = [
    'engine', 'matrices', 'recipes', 'routing', 'sharding', 'transforms',
    'DEFAULT_RULES', 'MatrixSpec', 'MatrixViewWarning',
    'NonFiniteGradientError', 'NonFiniteUpdateError', 'OutputLayerWarning', 'Router', 'Rule',
    'Distributed',
    'decoupled_weight_decay', 'nonfinite_leaves', 'nonfinite_status',
    'raise_if_nonfinite', 'skip_cause', 'skip_if_nonfinite', 'describe', 'momentum', 'muon',
    'matrix_stages', 'orthogonalize', 'polar', 'recipe', 'recipe_factory',
    'recipe_names',
    'recipe_references', 'scale_by_shape',
    'lanton', 'layerwise_noise_adapt', 'namo', 'namo_d', 'neuron_normalize',
    'noise_adapt', 'normuon', 'scale_to_rms',
    'dct_adamw', 'trion',
    'aro', 'auon', 'clip_outliers', 'cosh_normalize', 'hybrid_auon', 'root',
    'fismo',
    'spectra', 'spectral_clip', 'spectral_preclip',
]
