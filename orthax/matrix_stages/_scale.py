"""Shape scales: ``ScaleByShape`` and ``ScaleToRms``."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp

from orthax.matrix_stages._base import MatrixStage
from orthax.matrix_stages._base import stage
from orthax.matrix_stages._base import static
from orthax.matrix_stages._base import wide

SCALE_MODES = ('keller', 'moonlight', 'spectral', 'none')

def shape_factor(fan_in: int, fan_out: int, mode: str,
                 rms: float = 0.2) -> float:
  """The shape scale of one ``fan_in × fan_out`` matrix (see
  :func:`orthax.scale_by_shape`)."""
  if mode == 'keller':
    return math.sqrt(max(1.0, fan_out / fan_in))
  if mode == 'moonlight':
    return rms * math.sqrt(max(fan_in, fan_out))
  if mode == 'spectral':
    return math.sqrt(fan_out / fan_in)
  if mode == 'none':
    return 1.0
  raise ValueError(f'scale mode must be one of {SCALE_MODES}, got {mode!r}.')


@stage
class ScaleByShape(MatrixStage):
  """``O ← O·shape_factor(fan_in, fan_out, mode)``."""

  name = 'scale_by_shape'
  mode: str = static('keller')
  rms: Any = 0.2

  def __post_init__(self):
    if self.mode not in SCALE_MODES:
      raise ValueError(f'scale mode must be one of {SCALE_MODES}, got '
                       f'{self.mode!r}.')

  def apply(self, o, state, blocks):
    if self.mode == 'none':
      return o, state
    f = shape_factor(blocks.fan_in, blocks.fan_out, self.mode, self.rms)
    return (o * f).astype(o.dtype), state


@stage
class ScaleToRms(MatrixStage):
  """``O ← O·rms·√(mn) / (‖O‖_F + ε)`` (a zero matrix stays zero)."""

  name = 'scale_to_rms'
  rms: Any = 0.2
  eps: Any = 1e-10

  def apply(self, o, state, blocks):
    x = o.astype(wide(o.dtype))
    norm = jnp.sqrt(blocks.sum(x * x, (-2, -1)))
    size = (blocks.fan_in * blocks.fan_out) ** 0.5
    return (x * (self.rms * size / (norm + self.eps))).astype(o.dtype), state
