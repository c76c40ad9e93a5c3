"""Optax ``GradientTransformation`` primitives (one family per module).

**Stages that need an earlier stage's signal.** One mechanism, used across the
library: a *combinator* that wraps the stages it adapts. It takes them as
arguments (e.g. ``noise_adapt(momentum=orthax.momentum(...),
orthogonalize=orthax.orthogonalize(...), ...)``), calls their ``init`` and
``update`` itself, and so sees every intermediate signal it needs (the raw
gradient, the momentum output, the orthogonalized direction) in one
``update``. Its state is a ``NamedTuple`` holding the wrapped stages' states
under their names (``optax.tree.get(state, 'momentum')`` still finds them)
plus its own statistics. There is no global state and no stage reads another
stage's state by position. Users: :func:`noise_adapt` (NAMO, NAMO-D) and
:func:`layerwise_noise_adapt` (LANTON). A combinator whose step size depends
on its statistics takes ``learning_rate`` (and ``weight_decay``) itself and
emits the final step.
"""

from orthax.transforms.adam import adamw
from orthax.transforms.adam import scale_by_adam_raw_eps
from orthax.transforms.aro import aro_rotate
from orthax.transforms.aro import scale_by_aro
from orthax.transforms.chain import named_chain
from orthax.transforms.check_finite import NonFiniteGradientError
from orthax.transforms.check_finite import NonFiniteUpdateError
from orthax.transforms.check_finite import SkipIfNonfiniteState
from orthax.transforms.check_finite import nonfinite_leaves
from orthax.transforms.check_finite import nonfinite_status
from orthax.transforms.check_finite import raise_if_nonfinite
from orthax.transforms.check_finite import skip_cause
from orthax.transforms.check_finite import skip_if_nonfinite
from orthax.transforms.check_shapes import check_shapes
from orthax.transforms.clip_outliers import abs_quantile
from orthax.transforms.clip_outliers import clip_outliers
from orthax.transforms.cosh_normalize import cosh_normalize
from orthax.transforms.dct_adam import scale_by_dct_adam
from orthax.transforms.trion import scale_by_trion
from orthax.transforms.fisher import scale_by_fismo
from orthax.transforms.matrix_stage import SlotStepState
from orthax.transforms.matrix_stage import slot_step
from orthax.transforms.momentum import MomentumState
from orthax.transforms.momentum import momentum
from orthax.transforms.lanton import LayerwiseNoiseState
from orthax.transforms.lanton import layerwise_noise_adapt
from orthax.transforms.neuron_normalize import NeuronNormalizeState
from orthax.transforms.neuron_normalize import neuron_normalize
from orthax.transforms.neuron_normalize import scale_to_rms
from orthax.transforms.noise_adapt import NoiseAdaptState
from orthax.transforms.noise_adapt import noise_adapt
from orthax.transforms.orthogonalize import OrthogonalizeState
from orthax.transforms.orthogonalize import orthogonalize
from orthax.transforms.precision import in_float32
from orthax.transforms.state_layout import relayout_state
from orthax.transforms.scale_by_shape import scale_by_shape
from orthax.transforms.scale_by_shape import shape_factor
from orthax.transforms.clip_schedule import clip_threshold
from orthax.transforms.spectral_clip import SpectralClipState
from orthax.transforms.spectral_clip import spectral_clip
from orthax.transforms.spectral_clip import spectral_preclip
from orthax.transforms.weight_decay import WeightDecayState
from orthax.transforms.weight_decay import decoupled_weight_decay

__all__ = [
    'scale_by_dct_adam', 'scale_by_trion',
    'MomentumState', 'NonFiniteGradientError', 'NonFiniteUpdateError',
    'OrthogonalizeState',
    'SkipIfNonfiniteState', 'WeightDecayState',
    'nonfinite_leaves', 'nonfinite_status', 'raise_if_nonfinite',
    'skip_cause', 'skip_if_nonfinite',
    'aro_rotate', 'scale_by_aro',
    'adamw', 'check_shapes', 'decoupled_weight_decay', 'momentum',
    'named_chain', 'orthogonalize',
    'scale_by_adam_raw_eps', 'scale_by_shape', 'shape_factor',
    'LayerwiseNoiseState', 'NeuronNormalizeState', 'NoiseAdaptState',
    'layerwise_noise_adapt', 'neuron_normalize', 'noise_adapt', 'scale_to_rms',
    'SpectralClipState', 'abs_quantile', 'clip_outliers', 'clip_threshold',
    'cosh_normalize', 'spectral_clip', 'spectral_preclip',
    'scale_by_fismo', 'SlotStepState', 'slot_step', 'relayout_state',
    'in_float32',
]
