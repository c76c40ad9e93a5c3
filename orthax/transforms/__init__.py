"""Optax ``GradientTransformation`` primitives (one family per module)."""

from orthax.transforms.adam import adamw
from orthax.transforms.adam import scale_by_adam_raw_eps
from orthax.transforms.check_finite import NonFiniteGradientError
from orthax.transforms.check_finite import check_finite
from orthax.transforms.momentum import MomentumState
from orthax.transforms.momentum import momentum
from orthax.transforms.orthogonalize import orthogonalize
from orthax.transforms.scale_by_shape import scale_by_shape
from orthax.transforms.scale_by_shape import shape_factor
from orthax.transforms.weight_decay import WeightDecayState
from orthax.transforms.weight_decay import decoupled_weight_decay

__all__ = [
    'MomentumState', 'NonFiniteGradientError', 'WeightDecayState',
    'adamw', 'check_finite', 'decoupled_weight_decay', 'momentum', 'orthogonalize',
    'scale_by_adam_raw_eps', 'scale_by_shape', 'shape_factor',
]
