"""Shape-dependent step scaling for orthogonalized updates."""

from __future__ import annotations

import optax

from orthax import _tree
from orthax import _validate
from orthax import matrix_stages
from orthax.matrix_stages import SCALE_MODES as MODES
from orthax.matrix_stages import shape_factor  # re-export
from orthax.transforms.matrix_stage import stage_transform

__all__ = ['MODES', 'scale_by_shape', 'shape_factor']


def scale_by_shape(
    mode: str = 'keller',
    *,
    rms: float = 0.2,
    min_side: int | None = None,
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
  * ``inverse_side``: :math:`1/\min(\mathrm{in}, \mathrm{out})`, for
    Adam-like steps (entries of order one), whose spectral norm grows like
    the width at a fixed aspect ratio: one learning rate then serves every
    width, as μP's ``1/fan_in`` rule for Adam does (Yang, Simon, Bernstein,
    arXiv 2310.17813), taken on the smaller side (DCT-AdamW's default);
    sides below ``min_side`` count as ``min_side`` (their step is then the
    step of a matrix of that side, not larger);
  * ``none``: 1.

  The same scale runs inside :func:`orthax.orthogonalize` as
  ``then=[orthax.matrix_stages.ScaleByShape(mode)]``.

  Args:
    mode: one of ``'keller'``, ``'moonlight'``, ``'spectral'``,
      ``'inverse_side'``, ``'none'``.
    rms: target RMS for ``moonlight``.
    min_side: ``inverse_side`` only: divide by ``max(min(in, out),
      min_side)`` (default ``None``: 1).
    matrix_specs: as in :func:`orthax.orthogonalize`.

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> params = {'w': jnp.ones((16, 25))}    # fan_in 16, fan_out 25
    >>> for mode in ('keller', 'moonlight', 'inverse_side'):
    ...   tx = orthax.scale_by_shape(mode)
    ...   u, _ = tx.update(params, tx.init(params))
    ...   print(mode, round(float(u['w'][0, 0]), 4))
    keller 1.25
    moonlight 1.0
    inverse_side 0.0625
  """
  _validate.arguments('scale_by_shape', scale_by_shape, locals())
  matrix_stages.check_scale_mode(mode, 'scale_by_shape: mode')
  checked = matrix_stages.check_min_side(min_side, 'scale_by_shape: min_side')
  _validate.applies('scale_by_shape', 'rms', rms, 0.2, mode == 'moonlight',
                    "mode='moonlight'")
  _validate.applies('scale_by_shape', 'min_side', min_side, None,
                    mode == 'inverse_side', "mode='inverse_side'")
  min_side = checked
  return stage_transform(matrix_stages.ScaleByShape(mode, rms, min_side),
                         matrix_specs,
                         'scale_by_shape')
