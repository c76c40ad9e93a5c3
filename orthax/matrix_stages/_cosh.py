"""AuON's cosh brake as a matrix stage."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from orthax.matrix_stages._base import MatrixStage
from orthax.matrix_stages._base import Sum
from orthax.matrix_stages._base import wide

BRAKE_INPUTS = ('normalized', 'raw')


class CoshNormalize(MatrixStage):
  r"""AuON's cosh brake (modes in :func:`orthax.cosh_normalize`): with
  ``X = G/(‖G‖_F + ε_n)`` and ``B = X`` or ``G``,

  .. math:: U = (X \text{ or } G)\,/\,\big(\sqrt{\mathrm{mean}\,\cosh(γB)^2}
     + ε\big)

  Reference: Maity, arXiv 2509.24320; ryyzn9/AuON @ bba2e82.
  """

  name = 'cosh_normalize'

  def __init__(self, gamma: Any = 1.0, *, normalize: bool = True,
               brake_input: str = 'normalized', norm_eps: Any = 1e-7,
               eps: Any = 1e-8):
    if brake_input not in BRAKE_INPUTS:
      raise ValueError(f'brake_input must be one of {BRAKE_INPUTS}, got '
                       f'{brake_input!r}.')
    self.gamma, self.normalize, self.brake_input = gamma, normalize, brake_input
    self.norm_eps, self.eps = norm_eps, eps

  def sums(self, fan_in, fan_out):
    return (Sum((-2, -1), 1),) * 2

  def apply(self, o, state, blocks):
    g = o.astype(wide(o.dtype))
    norm = jnp.sqrt(blocks.sum(jnp.square(g), (-2, -1)))
    xn = g / (norm + self.norm_eps)
    b = xn if self.brake_input == 'normalized' else g
    size = blocks.fan_in * blocks.fan_out
    r = jnp.sqrt(blocks.sum(jnp.square(jnp.cosh(self.gamma * b)), (-2, -1))
                 / size)
    return ((xn if self.normalize else g) / (r + self.eps)).astype(
        o.dtype), state


