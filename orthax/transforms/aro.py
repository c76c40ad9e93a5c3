"""ARO: the momentum replaced by its adaptively rotated step (the
:class:`~orthax.matrix_stages.AroRotate` slot stage run by the engine
instead of Newton–Schulz)."""

from __future__ import annotations

from typing import Any

import optax

from orthax import _tree
from orthax import _validate
from orthax import matrix_stages as ms
from orthax.matrix_stages import _rotate
from orthax import sharding
from orthax.transforms import matrix_stage
from orthax.transforms.chain import named_chain
from orthax.transforms.momentum import momentum as ema_momentum

SCALES = ('rms_norm', 'update_rms', 'spectral_norm', 'muon', 'none')
# The rules of the arguments that take one of a set of names, for
# _validate.arguments (orthax.aro checks its own with them too).
OPTIONS = dict(base=_validate.choice(_rotate.BASES),
               qr=_validate.choice(_rotate.QR_KINDS),
               rotate=_validate.choice(_rotate.ROTATE_SIDES),
               scale=_validate.choice(SCALES))


def scale_stages(scale: str, scale_rms: Any) -> list[ms.MatrixStage]:
  """The stage that sizes ARO's step (dion's ``adjust_lr``):
  ``'rms_norm'`` ``rms·√max(m, n)``, ``'spectral_norm'`` ``√(m/n)`` (``m``
  fan-out, ``n`` fan-in), ``'update_rms'`` ``rms·U/RMS(U)`` (the paper's
  form), ``'muon'`` ``√max(1, m/n)/‖U‖₂`` (Muon's step size), ``'none'``."""
  OPTIONS['scale']('scale_stages', 'scale', scale)
  if scale == 'rms_norm':
    return [ms.ScaleByShape('moonlight', scale_rms)]
  if scale == 'spectral_norm':
    return [ms.ScaleByShape('spectral')]
  if scale == 'update_rms':
    return [ms.ScaleToRms(scale_rms)]
  if scale == 'muon':
    return [ms.ScaleToSpectralNorm('keller')]
  return []


def aro_rotate(
    *,
    base: str = 'sinkhorn',
    qr: str = 'auto',
    rotate: str = 'smaller',
    scale: str = 'none',
    scale_rms: Any = 0.2,
    stable: bool = True,
    matrix_specs: _tree.SpecsLike = None,
    distributed: sharding.Distributed | None = None,
) -> optax.GradientTransformation:
  r"""Replaces each matrix ``A`` of the update (the momentum) by its
  adaptively rotated step, with a rotation ``R`` kept per matrix:

  .. math::
     C = A\,f(R^\top A)^\top,\qquad R \leftarrow \mathrm{qr}(C)_Q,\qquad
     U = s\cdot R\,f(R^\top A)

  ``A`` has the rotated side as rows (``s`` rows of ``t`` entries), ``f``
  is the base map (Sinkhorn: 5 alternating row/column normalizations,
  columns last) and ``s`` the scale of ``scale``. ``R`` starts as the
  identity and lives in slots: on a mesh each device keeps the rotations of
  the matrices it works on; they are never gathered. The state is a
  :class:`~orthax.transforms.SlotStepState`.

  Args:
    base: ``'sinkhorn'``, ``'row_norm'`` or ``'sign'``.
    qr: how ``Q`` is computed: ``'auto'`` (Householder on CPU, Cholesky
      QR3 elsewhere: :func:`~orthax.matrix_stages.resolve_qr`),
      ``'cholesky_qr3'`` (matrix products and three Cholesky
      factorizations, Householder's ``Q`` up to column signs where
      certified, Householder otherwise), ``'householder'`` or
      ``'shifted_cholesky'`` (``CᵀC + 10⁻⁷‖C‖²I``, Householder where the
      Cholesky fails); see :class:`~orthax.matrix_stages.AroRotate`.
    rotate: the rotated side: ``'smaller'``, ``'fan_out'`` (PyTorch rows,
      dion) or ``'fan_in'``.
    scale: ``'rms_norm'`` (``scale_rms·√max(m, n)``), ``'update_rms'``
      (``scale_rms·U/RMS(U)``), ``'spectral_norm'`` (``√(m/n)``),
      ``'muon'`` (``U``'s spectral norm set to Muon's, ``√max(1, m/n)``:
      :class:`~orthax.matrix_stages.ScaleToSpectralNorm`) or ``'none'``.
    scale_rms: the RMS target of ``rms_norm`` and ``update_rms``.
    stable: compute the exact-arithmetic value of the reference's update,
      stably: the QR of ``C = A Fᵀ`` without forming ``C`` (the explicit
      product where ``F``'s leading block is singular) and, where the
      rotated side is the larger, the rows that are roundoff zero (see
      :class:`~orthax.matrix_stages.AroRotate`); ``False``: the reference's
      floating-point arithmetic.
    matrix_specs: as :func:`orthax.orthogonalize` takes them.
    distributed: an :class:`orthax.sharding.Distributed`: each device runs
      whole matrices, as :func:`orthax.orthogonalize` does.

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> tx = orthax.transforms.aro_rotate()
    >>> params = {'w': jnp.ones((4, 8))}
    >>> state = tx.init(params)
    >>> u, state = tx.update({'w': jnp.eye(4, 8)}, state)
    >>> u['w'].shape
    (4, 8)

  References: Gong et al., *ARO: Adaptively Rotated Optimization*,
  arXiv 2602.09006.
  """
  _validate.arguments('aro_rotate', aro_rotate, locals(), **OPTIONS)
  stage = ms.AroRotate(base=base, qr=qr, rotate=rotate,
                       stable=stable)
  return matrix_stage.slot_step(lambda count: stage, matrix_specs,
                                distributed, 'aro_rotate',
                                then=scale_stages(scale, scale_rms))


def scale_by_aro(
    beta: Any = 0.95,
    *,
    base: str = 'sinkhorn',
    qr: str = 'auto',
    rotate: str = 'smaller',
    scale: str = 'none',
    scale_rms: Any = 0.2,
    stable: bool = True,
    matrix_specs: _tree.SpecsLike = None,
    distributed: sharding.Distributed | None = None,
) -> optax.GradientTransformation:
  r"""ARO's direction: EMA momentum, then :func:`aro_rotate`.

  .. math::
     M \leftarrow βM + (1-β)G,\qquad C = M f(R^\top M)^\top,\qquad
     R \leftarrow \mathrm{qr}(C)_Q,\qquad U = R\,f(R^\top M)

  (no Nesterov, no bias correction). A ``named_chain`` of ``'momentum'``
  and ``'aro_rotate'``; the other arguments as :func:`aro_rotate` takes
  them.

  Args:
    beta: β of the EMA momentum (default 0.95).
    base, qr, rotate, scale, scale_rms, stable: the rotation and its scale,
      as in :func:`orthax.transforms.aro_rotate` (default: Sinkhorn,
      ``qr='auto'``, the smaller side rotated, no scale, stable).
    matrix_specs: as :func:`orthax.orthogonalize` takes them.
    distributed: an :class:`orthax.sharding.Distributed`: each device runs
      whole matrices, as :func:`orthax.orthogonalize` does.

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> tx = orthax.transforms.scale_by_aro(0.9)
    >>> state = tx.init({'w': jnp.ones((3, 5))})
    >>> g = jnp.arange(1.0, 16.0).reshape(3, 5)
    >>> u, _ = tx.update({'w': g}, state)
    >>> round(float(jnp.sqrt(jnp.mean(u['w'] ** 2))), 4)  # Sinkhorn: RMS 1
    1.0

  References: Gong et al., arXiv 2602.09006; microsoft/dion ``dev/aro``.
  """
  _validate.arguments('scale_by_aro', scale_by_aro, locals(), **OPTIONS)
  return named_chain(
      ('momentum', ema_momentum(beta, form='ema', nesterov=False)),
      ('aro_rotate', aro_rotate(base=base, qr=qr, rotate=rotate,
                                scale=scale, scale_rms=scale_rms,
                                stable=stable,
                                matrix_specs=matrix_specs,
                                distributed=distributed)))


__all__ = ['SCALES', 'aro_rotate', 'scale_by_aro',
           'scale_stages']
