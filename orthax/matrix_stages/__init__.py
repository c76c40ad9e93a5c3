"""Per-matrix stages that run right after Newton–Schulz, on whole matrices.

A *matrix stage* maps a stack of orthogonalized matrices ``[k, fan_in,
fan_out]`` (and, for a stateful stage, one small state array per matrix, e.g.
a vector of per-neuron statistics) to a new stack and state. NorMuon's neuron
normalization, the shape scale, the fixed-RMS rescale, AuON's cosh brake and
NAMO's noise-adaptive step are stages.
:func:`orthax.orthogonalize` runs them in the same pass as Newton–Schulz
(``then=``; a stage whose result does not depend on the matrix's
orientation, such as ROOT's :class:`ClipOutliers`, may also run just before
it, ``before=``); on a mesh they therefore run inside the same ``shard_map`` body,
on the device that holds the whole matrix, so that their row statistics and
Frobenius norms are those of the whole matrix (:mod:`orthax.sharding`).

Pure ``jax.numpy``; nothing here knows of optax or meshes. The one concession
to distribution is :class:`Blocks`: a stage sums through
:meth:`Blocks.sum`, which adds up partial sums across devices when a matrix
is held in column blocks (tensor-parallel Newton–Schulz); otherwise it is
``jnp.sum``.

A :class:`ScalingStage` (NAMO's and NAMO-D's step) multiplies the stack by a
factor computed from its state and from norms of the matrices *before*
Newton–Schulz (:class:`Norm`: of the matrix entering it, or of the matching
matrix of an auxiliary tree such as the raw gradient), and may hand a
per-matrix result back to its caller (NAMO's weight-decay factor). The
factor does not need the orthogonalized matrix, so on a mesh every device
computes it from norms summed over the pieces (one small float32 all-reduce
per group) and neither the auxiliary matrix nor the state travels.
"""

from orthax.matrix_stages._base import SOURCES
from orthax.matrix_stages._base import Blocks
from orthax.matrix_stages._base import MatrixStage
from orthax.matrix_stages._base import Norm
from orthax.matrix_stages._base import ScalingStage
from orthax.matrix_stages._base import StageShapes
from orthax.matrix_stages._apply import apply_stages
from orthax.matrix_stages._check import check_declaration
from orthax.matrix_stages._check import check_stage
from orthax.matrix_stages._apply import check_norms
from orthax.matrix_stages._apply import split_sums
from orthax.matrix_stages._base import stage
from orthax.matrix_stages._base import static
from orthax.matrix_stages._apply import stage_norms
from orthax.matrix_stages._base import root_norm
from orthax.matrix_stages._base import sum_squares
from orthax.matrix_stages._base import wide
from orthax.matrix_stages._clip import ClipOutliers
from orthax.matrix_stages._clip import abs_quantile
from orthax.matrix_stages._cosh import BRAKE_INPUTS
from orthax.matrix_stages._cosh import CoshNormalize
from orthax.matrix_stages._dct import DCTAdam
from orthax.matrix_stages._dct import TRION_SCALINGS
from orthax.matrix_stages._dct import TrionStep
from orthax.matrix_stages._fisher import FismoStep
from orthax.matrix_stages._neuron import EPS_PLACEMENTS
from orthax.matrix_stages._neuron import NEURON_AXES
from orthax.matrix_stages._neuron import NeuronNormalize
from orthax.matrix_stages._neuron import neuron_axis
from orthax.matrix_stages._noise import NOISE_MODES
from orthax.matrix_stages._noise import NoiseAdaptStep
from orthax.matrix_stages._qr import resolve_qr
from orthax.matrix_stages._rotate import AroRotate
from orthax.matrix_stages._scale import SCALE_MODES
from orthax.matrix_stages._scale import ScaleByShape
from orthax.matrix_stages._scale import ScaleToRms
from orthax.matrix_stages._scale import ScaleToSpectralNorm
from orthax.matrix_stages._scale import check_min_side
from orthax.matrix_stages._scale import check_scale_mode
from orthax.matrix_stages._scale import shape_factor

__all__ = [
    'AroRotate', 'BRAKE_INPUTS', 'EPS_PLACEMENTS', 'NEURON_AXES', 'NOISE_MODES',
    'SCALE_MODES', 'SOURCES', 'Blocks', 'ClipOutliers', 'CoshNormalize',
    'MatrixStage', 'abs_quantile',
    'FismoStep',
    'DCTAdam', 'TRION_SCALINGS', 'TrionStep',
    'NeuronNormalize', 'NoiseAdaptStep', 'Norm', 'ScaleByShape', 'ScaleToRms',
    'ScaleToSpectralNorm',
    'ScalingStage',
    'StageShapes', 'apply_stages', 'check_declaration', 'check_min_side', 'check_norms', 'check_scale_mode',
    'check_stage',
    'neuron_axis',
    'shape_factor', 'split_sums', 'stage', 'stage_norms', 'static',
    'resolve_qr', 'root_norm', 'sum_squares', 'wide',
]
