"""AuON's cosh brake as a matrix stage."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from orthax import _validate
from orthax.matrix_stages._base import MatrixStage
from orthax.matrix_stages._base import stage
from orthax.matrix_stages._base import static
from orthax.matrix_stages._base import wide
from orthax.polar.scale_safe import downscale_huge

BRAKE_INPUTS = ('normalized', 'raw')


@stage
class CoshNormalize(MatrixStage):
  r"""AuON's cosh brake (modes in :func:`orthax.cosh_normalize`): with
  ``X = G/(‖G‖_F + ε_n)`` and ``B = X`` or ``G``,

  .. math:: U = (X \text{ or } G)\,/\,\big(\sqrt{\mathrm{mean}\,\cosh(γB)^2}
     + ε\big)

  Args:
    gamma: ``γ`` inside the cosh (default 1, the paper's; the repo's
      1.5); may be traced.
    normalize: keyword-only, static: output ``X`` (default ``True``, the
      paper's AuON) instead of ``G``.
    brake_input: keyword-only, static, one of :data:`BRAKE_INPUTS`:
      ``'normalized'`` (default: ``B = X``) or ``'raw'`` (``B = G``).
    norm_eps: keyword-only: ``ε_n`` of the Frobenius normalization
      (default 1e-7); may be traced.
    eps: keyword-only: ``ε`` added to the root mean ``cosh²`` (default
      1e-8); may be traced.

  Reference: Maity, arXiv 2509.24320; ryyzn9/AuON @ bba2e82.
  """

  name = 'cosh_normalize'
  checks = {'gamma': _validate.nonnegative, 'norm_eps': _validate.positive,
            'eps': _validate.nonnegative}
  gamma: Any = 1.0
  _: dataclasses.KW_ONLY
  normalize: bool = static(default=True)
  brake_input: str = static(default='normalized')
  norm_eps: Any = 1e-7
  eps: Any = 1e-8

  def __post_init__(self):
    _validate.choice(BRAKE_INPUTS)(self.name, 'brake_input',
                                   self.brake_input)

  def apply(self, o, state, blocks):
    g = o.astype(wide(o.dtype))
    # A whole matrix is first scaled by a power of two when huge, so that
    # its sum of squares cannot overflow (X is scale-invariant).
    gs = g if blocks.split is not None else downscale_huge(g)
    norm = jnp.sqrt(blocks.sum(jnp.square(gs), (-2, -1)))
    xn = gs / (norm + self.norm_eps)
    b = xn if self.brake_input == 'normalized' else g
    size = blocks.fan_in * blocks.fan_out
    r = jnp.sqrt(blocks.sum(jnp.square(jnp.cosh(self.gamma * b)), (-2, -1))
                 / size)
    return ((xn if self.normalize else g) / (r + self.eps)).astype(
        o.dtype), state
