r"""ROOT's proximal outlier suppression: clip each matrix at a quantile of |u|.

He et al., *ROOT: Robust Orthogonalized Optimizer* (Huawei Noah, arXiv
2511.20626); reference ``huawei-noah/noah-research`` @ a99fb00,
``ROOT/examples/example_train.py``.
"""

from __future__ import annotations

import jax
import optax

from orthax import _tree
from orthax import _validate
from orthax import matrix_stages
from orthax.matrix_stages import abs_quantile  # re-export
from orthax.transforms import matrix_stage

__all__ = ['abs_quantile', 'clip_outliers']


def clip_outliers(
    quantile: float | jax.Array = 0.9,
    *,
    eps: float | jax.Array = 1e-9,
    matrix_specs: _tree.SpecsLike = None,
) -> optax.GradientTransformation:
  r"""Clips every matrix of the update at its own ``quantile`` of ``|u|``.

  .. math::
     ε = \mathrm{quantile}_q(|u|) + 10^{-9},\qquad
     B = \mathrm{clip}(u, -ε, ε) = u - \mathrm{sign}(u)\,\mathrm{relu}(|u| - ε)

  i.e. ``u`` minus its soft-thresholded outliers ``T_ε(u)`` (ROOT's proximal
  step; the quantile is over all entries of each matrix, ``jnp.quantile``
  ``'linear'`` semantics as ``torch.quantile``, computed exactly without a
  sort by :func:`abs_quantile`). Place it before
  :func:`orthax.orthogonalize`, or pass its stage
  (:class:`orthax.matrix_stages.ClipOutliers`) as that transform's
  ``before=``, which :func:`orthax.root` does: on a mesh the clip then runs
  where each matrix is whole, in the same pass, with nothing gathered. A
  zero matrix stays zero.

  Args:
    quantile: ``q`` (ROOT: 0.9, the top 10% of magnitudes are clipped).
    eps: added to the quantile (ROOT: 1e-9).
    matrix_specs: as in :func:`orthax.orthogonalize` (one quantile per
      matrix of each leaf's ``[batch, fan_in, fan_out]`` view).

  Example:

  >>> import jax.numpy as jnp, orthax
  >>> u = {'w': jnp.array([[1.0, -2.0, 3.0], [-4.0, 5.0, -100.0]])}
  >>> tx = orthax.clip_outliers(0.8)
  >>> out, _ = tx.update(u, tx.init(u))
  >>> [round(float(v), 3) for v in out['w'][1]]  # |-100| clipped to q₀.₈
  [-4.0, 5.0, -5.0]
  """
  # eps is added to a clip bound, not a divisor: 0 is allowed.
  _validate.arguments('clip_outliers', clip_outliers, locals(),
                      eps=_validate.nonnegative)
  return matrix_stage.stage_transform(
      matrix_stages.ClipOutliers(quantile, eps), matrix_specs,
      'clip_outliers')
