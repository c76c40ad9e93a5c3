"""NorMuon's per-neuron normalization as a matrix stage."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from orthax import _validate
from orthax.matrix_stages._base import MatrixStage
from orthax.matrix_stages._base import StageShapes
from orthax.matrix_stages._base import stage
from orthax.matrix_stages._base import static

NEURON_AXES = ('fan_out', 'longer')
EPS_PLACEMENTS = ('add', 'clamp')


def neuron_axis(fan_in: int, fan_out: int, axis: str) -> int:
  """The ``[fan_in, fan_out]`` axis NorMuon keeps one statistic along
  (``-1``: per fan-out unit, ``-2``: per fan-in unit).

  Args:
    fan_in, fan_out: the matrix's sides (Flax kernel ``(in, out)``).
    axis: one of :data:`NEURON_AXES`: ``'fan_out'`` (always ``-1``) or
      ``'longer'`` (``-1`` when ``fan_out ≥ fan_in``, else ``-2``:
      modded-nanogpt's rows of the PyTorch weight when rows ≥ cols).

  Example:
    >>> from orthax.matrix_stages import neuron_axis
    >>> neuron_axis(64, 16, 'fan_out'), neuron_axis(64, 16, 'longer')
    (-1, -2)
  """
  if axis == 'fan_out':
    return -1
  # modded-nanogpt: torch rows (= fan_out) >= cols (= fan_in) -> per row.
  return -1 if fan_out >= fan_in else -2


@stage
class NeuronNormalize(MatrixStage):
  r"""NorMuon's per-neuron normalization of ``O`` (one statistic per neuron
  ``i`` along :func:`neuron_axis`; details in
  :func:`orthax.neuron_normalize`):

  .. math::
     v_i \leftarrow β_2 v_i + (1-β_2)\,\mathrm{mean}_j O_{ij}^2,\qquad
     \hat O = \frac{O}{\sqrt v + ε}\cdot
        \frac{\|O\|_F}{\|O/(\sqrt v + ε)\|_F + ε}\ (\texttt{restore\_norm})

  Args:
    beta2: ``β₂``, the EMA rate of the per-neuron mean square ``v``
      (default 0.95; modded-nanogpt 0.9); may be traced.
    eps: ``ε`` of the denominator and of the Frobenius restore (default
      1e-10).
    axis: keyword-only, static: ``'fan_out'`` (default) or ``'longer'``
      (:func:`neuron_axis`).
    eps_placement: keyword-only, static: ``'add'`` (default, ``√v + ε``;
      restore ``‖Ô‖_F + ε``) or ``'clamp'`` (``√max(v, ε)``; restore
      ``max(‖Ô‖_F, ε)``).
    restore_norm: keyword-only, static: rescale each matrix back to its
      incoming Frobenius norm (default ``True``, the repo form).

  References: Li et al., arXiv 2510.05491; zichongli5/NorMuon @ d45c9a4.
  """

  name = 'neuron_normalize'
  checks = {'beta2': _validate.unit_interval, 'eps': _validate.positive}
  beta2: Any = 0.95
  eps: Any = 1e-10
  _: dataclasses.KW_ONLY
  axis: str = static(default='fan_out')
  eps_placement: str = static(default='add')
  restore_norm: bool = static(default=True)

  def __post_init__(self):
    _validate.choice(NEURON_AXES)(self.name, 'axis', self.axis)
    _validate.choice(EPS_PLACEMENTS)(self.name, 'eps_placement',
                                     self.eps_placement)

  def shapes(self, fan_in, fan_out):
    keep = neuron_axis(fan_in, fan_out, self.axis)
    return StageShapes(state=(fan_out if keep == -1 else fan_in,), axis=keep)

  def apply(self, o, state, blocks):
    keep = neuron_axis(blocks.fan_in, blocks.fan_out, self.axis)
    red = -2 if keep == -1 else -1
    n_red = blocks.fan_in if red == -2 else blocks.fan_out
    x = o.astype(state.dtype)
    mean_sq = jnp.squeeze(blocks.sum(x * x, red), red) / n_red
    v = self.beta2 * state + (1 - self.beta2) * mean_sq
    if self.eps_placement == 'add':
      d = jnp.sqrt(v) + self.eps
    else:
      d = jnp.sqrt(jnp.maximum(v, self.eps))
    out = x / jnp.expand_dims(d, red)
    if self.restore_norm:
      n_in = jnp.sqrt(blocks.sum(x * x, (-2, -1)))
      n_out = jnp.sqrt(blocks.sum(out * out, (-2, -1)))
      n_out = (n_out + self.eps if self.eps_placement == 'add'
               else jnp.maximum(n_out, self.eps))
      out = out * (n_in / n_out)
    return out.astype(o.dtype), v
