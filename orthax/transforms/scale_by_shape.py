"""Shape-dependent step scaling for orthogonalized updates."""

from __future__ import annotations

import math

import jax
import optax

from orthax import _tree

MODES = ('keller', 'moonlight', 'spectral', 'none')


def shape_factor(fan_in: int, fan_out: int, mode: str,
                 rms: float = 0.2) -> float:
  """The factor for one matrix of shape ``fan_in × fan_out`` (see
  :func:`scale_by_shape`)."""
  if mode == 'keller':
    return math.sqrt(max(1.0, fan_out / fan_in))
  if mode == 'moonlight':
    return rms * math.sqrt(max(fan_in, fan_out))
  if mode == 'spectral':
    return math.sqrt(fan_out / fan_in)
  if mode == 'none':
    return 1.0
  raise ValueError(f'scale mode must be one of {MODES}, got {mode!r}.')


def scale_by_shape(
    mode: str = 'keller',
    *,
    rms: float = 0.2,
    matrix_specs: _tree.SpecsLike = None,
) -> optax.GradientTransformation:
  r"""Multiplies each matrix update by a factor of its shape.

  With ``fan_in × fan_out`` the matrix view of the leaf (Flax kernel
  ``(in, out)``; PyTorch weights are ``(out, in)``):

  * ``keller``: :math:`\sqrt{\max(1, \mathrm{out}/\mathrm{in})}`
    (KellerJordan/Muon, NorMuon repo, optax default);
  * ``moonlight``: :math:`\mathrm{rms}\cdot\sqrt{\max(\mathrm{in},\mathrm{out})}`
    with ``rms = 0.2`` — update RMS ≈ 0.2, like AdamW (Liu et al. arXiv
    2502.16982; ROOT, NAMO);
  * ``spectral``: :math:`\sqrt{\mathrm{out}/\mathrm{in}}` (Dion, Scion);
  * ``none``: 1.

  Args:
    mode: one of ``'keller'``, ``'moonlight'``, ``'spectral'``, ``'none'``.
    rms: target RMS for ``moonlight``.
    matrix_specs: as in :func:`orthax.orthogonalize`.
  """
  if mode not in MODES:
    raise ValueError(f'scale mode must be one of {MODES}, got {mode!r}.')

  def update_fn(updates, state, params=None):
    del params
    if mode == 'none':
      return updates, state
    specs = _tree.resolve_specs(matrix_specs, updates, 'scale_by_shape')
    leaves, treedef = jax.tree.flatten(updates)
    out = []
    for x, s in zip(leaves, specs):
      _, fi, fo = s.matrix_shape(x.shape)
      out.append((x * shape_factor(fi, fo, mode, rms)).astype(x.dtype))
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)
