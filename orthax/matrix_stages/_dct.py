r"""DCT low-rank slot stages: DCT-AdamW's Adam step on the selected DCT
coefficients (:class:`DCTAdam`) and Trion's orthogonalized low-rank
momentum (:class:`TrionStep`).

Each runs *instead of* Newton–Schulz (``engine.map_matrices(None, ...)``)
on whole matrices, its state in slots (on a mesh: on the device that owns
the matrix, never gathered). Matrices are seen as ``[k, fan_in, fan_out]``
and handled in their tall view (:func:`orthax.polar.dct.tall`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from orthax import _validate
from orthax.polar import dct
from orthax.polar.gram import standard_flops
from orthax.polar.newton_schulz import newton_schulz
from orthax.polar.scale_safe import root_ema
from orthax.matrix_stages._base import MatrixStage
from orthax.matrix_stages._base import StageShapes
from orthax.matrix_stages._base import stage
from orthax.matrix_stages._base import static
from orthax.matrix_stages._scale import shape_factor


@stage
class DCTAdam(MatrixStage):
  r"""Adam on the ``r`` selected DCT coefficients of each matrix
  (DCT-AdamW's matrix step, without the learning rate).

  With ``Y`` the tall view ``L×s`` of the gradient, ``D`` the ``s×s``
  DCT-II matrix and ``t`` the step (``count``, from 1):

  .. math::
     \text{if } t = 1 \text{ or } t \bmod g = 0:&\quad
       S = YD,\ \mathrm{idx} = \mathrm{top}_r\|S_{:,j}\|_p,\
       a = S_{:,\mathrm{idx}},\ (m, v) \leftarrow (mP, vP)\\
     \text{else}:&\quad a = Y D_{:,\mathrm{idx}}\\
     m &\leftarrow β_1 m + (1-β_1)a,\qquad v \leftarrow β_2 v + (1-β_2)a^2\\
     O &= \frac{\sqrt{1-β_2^t}}{1-β_1^t}\cdot
        \frac{m}{\sqrt v + ε\sqrt{1-β_2^t}}\,D_{:,\mathrm{idx}}^\top

  ``P`` is the 0/1 slot map of :func:`orthax.polar.dct.remap_slots`
  (``remap=True``; ``False``: the moments stay in their slots, as in the
  reference without ``rotate_subspace``). State (slots): ``idx`` ``(r,)``
  int32, ``m`` and ``v`` ``(L, r)``; ``v`` is kept as its root ``√v``
  (updated by ``hypot``), so a gradient of ``10¹⁹`` cannot overflow it.
  The stage of :func:`orthax.transforms.scale_by_dct_adam`, which builds it
  each step.

  Args:
    count: ``t``, the 1-based step (default 1), set by the transform each
      step (traced): the bias corrections and the re-selection steps.
    b1, b2: Adam's ``β₁``, ``β₂`` (default 0.9, 0.999).
    eps: ``ε``, added to ``√v`` as torch's AdamW does (default 1e-8).
    rank: static: ``r``, an ``int``, or a ``float`` in ``(0, 1]``, a
      fraction of the smaller side ``s`` (rounded up); at least 1, at most
      ``s`` (default 0.25).
    update_every: static: ``g``, the steps between re-selections (default
      1, every step).
    ell_norm: static: ``p`` of the column score (default 1, the L1 norm).
    remap: static: carry the moments over at a re-selection (default
      ``True``).
  """

  name = 'dct_adam'
  checks = {'b1': _validate.unit_interval, 'b2': _validate.unit_interval,
            'eps': _validate.positive}
  count: Any = 1
  b1: Any = 0.9
  b2: Any = 0.999
  eps: Any = 1e-8
  rank: Any = static(default=0.25)
  update_every: int = static(default=1)
  ell_norm: float = static(default=1.0)
  remap: bool = static(default=True)

  def shapes(self, fan_in, fan_out):
    big, small = dct.sides(fan_in, fan_out)
    r = dct.resolve_rank(self.rank, small)
    return StageShapes(state={'idx': (r,), 'm': (big, r), 'v': (big, r)},
                       slots=True)

  def initial_state(self, fan_in, fan_out, dtype):
    sh = self.shapes(fan_in, fan_out).state
    return {'idx': jnp.zeros(sh['idx'], jnp.int32),
            'm': jnp.zeros(sh['m'], dtype), 'v': jnp.zeros(sh['v'], dtype)}

  def flops(self, fan_in, fan_out):
    big, small = dct.sides(fan_in, fan_out)
    r = dct.resolve_rank(self.rank, small)
    full = 2 * big * small * small + 2 * big * small   # S = YD, scores
    low = 2 * big * small * r                           # a = Y D[:, idx]
    g = self.update_every
    return (full + (g - 1) * low) // g + 2 * big * small * r  # + back

  def apply(self, o, state, blocks):
    fi, fo = blocks.fan_in, blocks.fan_out
    dt = state['m'].dtype
    y = dct.tall(o.astype(dt), fi, fo)
    d = dct.dct_matrix(y.shape[-1], dt)
    r = state['idx'].shape[-1]
    t = jnp.asarray(self.count)

    def reselect(y, idx):
      del idx
      s = jnp.einsum('kls,sj->klj', y, d)
      new = dct.select(dct.column_scores(s, self.ell_norm), r)
      return new, dct.take_columns(s, new)

    def keep(y, idx):
      return idx, dct.project(y, d, idx)

    if self.update_every == 1:
      idx, a = reselect(y, state['idx'])
    else:
      due = (t == 1) | (t % self.update_every == 0)
      idx, a = jax.lax.cond(due, reselect, keep, y, state['idx'])
    m, v = state['m'], state['v']
    if self.remap:
      m = dct.remap_slots(m, state['idx'], idx)
      v = dct.remap_slots(v, state['idx'], idx)
    m = self.b1 * m + (1 - self.b1) * a
    v = root_ema(v, a, self.b2)  # √v ← √(β₂v + (1-β₂)a²)
    tt = t.astype(dt)
    c2 = jnp.sqrt(1 - self.b2 ** tt)
    u = m / (v + self.eps * c2) * (c2 / (1 - self.b1 ** tt))
    out = dct.untall(dct.back_project(u, d, idx), fi, fo)
    return out.astype(o.dtype), {'idx': idx, 'm': m.astype(dt),
                                 'v': v.astype(dt)}


# Trion's shape scales, as orthax.matrix_stages.shape_factor modes.
TRION_SCALINGS = {'kj': 'keller', 'none': 'none', 'kimi': 'moonlight',
                  'dion': 'spectral'}
_validate.register(('scaling',), _validate.choice(TRION_SCALINGS))


@stage
class TrionStep(MatrixStage):
  r"""Trion's matrix step (without the learning rate): DCT selection on the
  sum-form buffer, error feedback, Newton–Schulz on the low-rank momentum.

  With ``Y`` the tall view of the gradient (``L×s``), ``B`` that of the
  buffer and ``E`` the basis — ``D`` when PyTorch's rows ≥ cols (for a
  kernel: ``fan_out ≥ fan_in``), else ``Dᵀ`` (the reference's left case
  uses the rows of ``D``):

  .. math::
     B &\leftarrow B + Y,\qquad S = BE,\qquad
       \mathrm{idx} = \mathrm{top}_r\|S_{:,j}\|_1,\qquad
       M = S_{:,\mathrm{idx}}\\
     B &\leftarrow B - (1-μ)\,M E_{:,\mathrm{idx}}^\top,\qquad
     O = c\cdot\mathrm{NS}_5(M)\,E_{:,\mathrm{idx}}^\top

  with ``c`` the shape scale of ``scaling`` (:data:`TRION_SCALINGS`). With
  ``nesterov``, Newton–Schulz takes the look-ahead
  ``Y E_{:,idx} + μM`` in place of ``M`` (the selection and the feedback
  are unchanged; at full rank this is Muon's Nesterov step). With
  ``fraction_scale`` and a fractional ``rank``, ``c`` is multiplied by
  ``rank·s/r``: where rounding up keeps more than the fraction (``r = 1``
  of a side of 1), the step is that of exactly the fraction kept; 1 where
  ``rank·s`` is whole. State (slots): ``b`` ``(fan_in, fan_out)``, the
  buffer in the kernel's layout. The stage of
  :func:`orthax.transforms.scale_by_trion` (whose ``beta`` is
  ``momentum``).

  Args:
    momentum: ``μ``, the momentum of the error feedback (default 0.95).
    rank: static: ``r``, an ``int``, or a ``float`` in ``(0, 1]``, a
      fraction of the smaller side ``s`` (rounded up); at least 1, at most
      ``s`` (default 0.25).
    scaling: static: a key of :data:`TRION_SCALINGS`: ``'kj'`` (default,
      ``√max(1, fan_out/fan_in)``), ``'none'``, ``'kimi'``
      (``0.2√max(fan_in, fan_out)``) or ``'dion'`` (``√(fan_out/fan_in)``).
    ns_dtype: static: dtype of the Newton–Schulz iteration (default
      ``None``: the state's, float32 or wider; the reference: bfloat16).
    nesterov: static: orthogonalize the look-ahead (default ``False``, the
      reference's step).
    fraction_scale: static: the ``rank·s/r`` correction of ``c`` (default
      ``False``, the reference's).
  """

  name = 'trion'
  checks = {'momentum': _validate.unit_interval}
  momentum: Any = 0.95
  rank: Any = static(default=0.25)
  scaling: str = static(default='kj')
  ns_dtype: Any = static(default=None)
  nesterov: bool = static(default=False)
  fraction_scale: bool = static(default=False)

  def __post_init__(self):
    _validate.choice(TRION_SCALINGS)(self.name, 'scaling', self.scaling)

  def shapes(self, fan_in, fan_out):
    return StageShapes(state={'b': (fan_in, fan_out)}, slots=True)

  def flops(self, fan_in, fan_out):
    big, small = dct.sides(fan_in, fan_out)
    r = dct.resolve_rank(self.rank, small)
    ns = standard_flops(r, big, 5)
    # S = BE, scores, error feedback, NS5 on L×r, back-projection (and
    # the gradient's r coefficients for the look-ahead).
    extra = 2 * big * small * r if self.nesterov else 0
    return (2 * big * small * small + big * small + 4 * big * small * r + ns
            + extra)

  def apply(self, o, state, blocks):
    fi, fo = blocks.fan_in, blocks.fan_out
    dt = state['b'].dtype
    y = dct.tall(o.astype(dt), fi, fo)
    b = dct.tall(state['b'], fi, fo) + y
    s = b.shape[-1]
    d = dct.dct_matrix(s, dt)
    e = d if fo >= fi else d.T
    r = dct.resolve_rank(self.rank, s)
    full = jnp.einsum('kls,sj->klj', b, e)
    idx = dct.select(dct.column_scores(full), r)
    mom = dct.take_columns(full, idx)
    b = b - (1 - self.momentum) * dct.back_project(mom, e, idx)
    # Nesterov: the gradient's selected coefficients plus μ·momentum.
    look = (dct.project(y, e, idx) + self.momentum * mom if self.nesterov
            else mom)
    ortho = newton_schulz(look, 'jordan', dtype=self.ns_dtype)
    c = shape_factor(fi, fo, TRION_SCALINGS[self.scaling])
    if self.fraction_scale and isinstance(self.rank, float):
      c = c * (self.rank * s / r)
    out = dct.untall(c * dct.back_project(ortho, e, idx), fi, fo)
    return out.astype(o.dtype), {'b': dct.untall(b, fi, fo).astype(dt)}
