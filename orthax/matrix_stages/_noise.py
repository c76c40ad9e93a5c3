"""NAMO's and NAMO-D's noise-adaptive step as a matrix stage."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from orthax import _validate
from orthax.matrix_stages._base import Norm
from orthax.matrix_stages._base import ScalingStage
from orthax.matrix_stages._base import StageShapes
from orthax.matrix_stages._base import stage
from orthax.matrix_stages._base import static
from orthax.matrix_stages._scale import check_scale_mode
from orthax.matrix_stages._scale import shape_factor
from orthax.polar.scale_safe import root_ema

NOISE_MODES = ('scalar', 'diagonal')


@stage
class NoiseAdaptStep(ScalingStage):
  r"""The step of NAMO (``mode='scalar'``) or NAMO-D (``'diagonal'``) on the
  orthogonalized momentum ``O`` of one optimizer step ``t`` (rule and
  defaults in :func:`orthax.noise_adapt`, which builds this stage each
  step with that step's ``learning_rate`` and ``count``).

  Norms (of the matrices before Newton–Schulz): ``‖G‖`` of the raw
  gradient (``aux``) and ``‖u‖`` of the momentum (``input``), per matrix or
  per fan-in unit ``j`` (a row of the ``[fan_in, fan_out]`` view). State:
  ``√v`` (``[]`` or ``[fan_in]``), kept as the root so that it cannot
  overflow (``v`` is ``4·10⁴¹`` for a 64×64 gradient of ``10¹⁹``); its EMA
  is taken as ``√v ← hypot(√μ₂·√v, √(1-μ₂)·‖G‖)``. With ``β = η_t\sqrt{1-μ_2^t}/(1-μ_1^t +
  10^{-12})``:

  .. math::
     v &\leftarrow μ_2 v + (1-μ_2)\|G\|^2,\qquad
     s = β\,\frac{\|u\|}{\sqrt v + ε}\ \ (\text{NAMO-D: clipped to }
     [c\bar s, \bar s/c])\\
     O &\leftarrow -\min(s\,c_s\,k, 1)\,O,\qquad
     \text{output } r = -λ\min(s, 1)\ \ (\text{NAMO-D: } \ge -1)

  with the shape factor ``k`` of ``shape``: ``'moonlight'`` (the paper's)
  ``√max(fan_in, fan_out)``, ``'keller'`` ``√max(1, fan_out/fan_in)``,
  ``'spectral'`` ``√(fan_out/fan_in)``, ``'inverse_side'``
  ``1/min(fan_in, fan_out)``, ``'none'`` 1.
  So the caller's step is ``Δ = r·W + O'`` (``W·diag(r)`` for NAMO-D). The
  factor ``-min(·, 1)`` needs only norms and state, so this is a
  :class:`~orthax.matrix_stages.ScalingStage`.

  Args:
    mode: static, required: one of :data:`NOISE_MODES`, ``'scalar'``
      (NAMO) or ``'diagonal'`` (NAMO-D).
    learning_rate: ``η_t``, required: this step's learning rate, set by
      the transform each step (traced; a schedule's value at the count
      before the update).
    count: ``t``, required: the 1-based step, set by the transform each
      step (traced): the bias corrections.
    b1: keyword-only: ``μ₁``, the momentum's β, for ``1 - μ₁ᵗ`` (default
      0.95).
    mu2: keyword-only: ``μ₂``, the EMA rate of ``v`` (default 0.99).
    eps: keyword-only: ``ε`` added to ``√v`` (default 1e-8).
    weight_decay: keyword-only: ``λ`` of the output ``r`` (default 0.1).
    scale_coeff: keyword-only: ``c_s``, the coefficient of the shape
      factor ``k`` (default 0.2).
    clamp_c: keyword-only: NAMO-D's clamp ``c`` toward the mean (default
      0.75; ``≤ 0`` or ``> 1``: off); unused by NAMO.
    shape: keyword-only, static: the shape factor ``k`` (listed above; one
      of :data:`~orthax.matrix_stages.SCALE_MODES`, default
      ``'moonlight'``).

  References: Zhang, Liu, Schaeffer, *Adam Improves Muon* (arXiv
  2602.17080); minxin-zhg/namo ``src/namo.py`` @ a3f37b0.
  """

  name = 'noise_adapt'
  checks = {'b1': _validate.unit_interval, 'mu2': _validate.unit_interval,
            'eps': _validate.positive, 'weight_decay': _validate.nonnegative,
            'scale_coeff': _validate.nonnegative,
            'clamp_c': _validate.nonnegative}
  mode: str = static()
  learning_rate: Any = dataclasses.MISSING
  count: Any = dataclasses.MISSING
  _: dataclasses.KW_ONLY
  b1: Any = 0.95
  mu2: Any = 0.99
  eps: Any = 1e-8
  weight_decay: Any = 0.1
  scale_coeff: Any = 0.2
  clamp_c: Any = 0.75
  shape: str = static(default='moonlight')

  def __post_init__(self):
    _validate.choice(NOISE_MODES)(self.name, 'mode', self.mode)
    check_scale_mode(self.shape, f'{self.name}: shape')

  @property
  def _keep_fan_in(self) -> bool:
    return self.mode == 'diagonal'

  def shapes(self, fan_in, fan_out):
    per = (fan_in,) if self._keep_fan_in else ()
    axes = (-1,) if self._keep_fan_in else (-2, -1)
    return StageShapes(state=per, axis=-2 if self._keep_fan_in else None,
                       output=per,
                       norms=(Norm('aux', axes), Norm('input', axes)))

  def scale(self, state, norms, blocks):
    g, u = norms                           # [k, 1, 1] or [k, fan_in, 1]
    r = state.reshape(g.shape)             # √v
    dt = r.dtype
    r = root_ema(r, g, self.mu2)
    t = jnp.asarray(self.count).astype(dt)
    base = (self.learning_rate * jnp.sqrt(1 - self.mu2 ** t)
            / (1 - self.b1 ** t + 1e-12))
    ratio = u / (r + self.eps)
    if self._keep_fan_in:
      ratio = self._clamp_to_mean(ratio, blocks)
    step = ratio * base
    shrink = -self.weight_decay * jnp.minimum(step, 1.0)  # decay - 1
    if self._keep_fan_in:                                 # max(0, 1-x) - 1
      shrink = jnp.maximum(shrink, -1.0)
    shape_k = self.scale_coeff * shape_factor(blocks.fan_in, blocks.fan_out,
                                              self.shape, rms=1.0)
    eta = jnp.minimum(step * shape_k, 1.0)
    return (-eta).astype(dt), r.reshape(state.shape), shrink.reshape(
        state.shape)

  def _clamp_to_mean(self, ratio: jax.Array, blocks) -> jax.Array:
    """``clip(d, c·mean, mean/c)`` with the NaN-ignoring mean over fan-in,
    only if ``0 < c ≤ 1`` and the mean is finite and positive."""
    nan = jnp.isnan(ratio)
    both = blocks.sum(jnp.concatenate(
        [jnp.where(nan, 0.0, ratio), (~nan).astype(ratio.dtype)], axis=-1),
                      -2)                                 # [k, 1, 2]
    mean = both[..., :1] / both[..., 1:]
    c = self.clamp_c
    on = (c > 0) & (c <= 1) & jnp.isfinite(mean) & (mean > 0)
    c = jnp.where(on, c, 1.0)
    lo = jnp.where(on, c * mean, 0.0)
    hi = jnp.where(on, mean / c, jnp.inf)
    return jnp.clip(ratio, lo, hi)
