r"""Trion's matrix step as a transform: low-rank orthogonalized momentum on
the top-``r`` DCT columns, with error feedback (:func:`scale_by_trion`)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from orthax import _tree
from orthax import _validate
from orthax import matrix_stages as MS
from orthax.transforms import dct_adam
from orthax.transforms import matrix_stage


def scale_by_trion(
    rank: int | float | None = None,
    *,
    beta: float | jax.Array = 0.95,
    scaling: str = 'kj',
    ns_dtype: Any = None,
    nesterov: bool = False,
    fraction_scale: bool = False,
    matrix_specs: _tree.SpecsLike = None,
    distributed: Any = None,
) -> optax.GradientTransformation:
  r"""Trion's direction: Dion's low-rank step with a DCT column selection.

  Per matrix, with ``Y`` its tall view ``L×s`` (see
  :func:`orthax.transforms.scale_by_dct_adam`), ``B`` the buffer's, ``D``
  the ``s×s`` DCT-II matrix and ``E = D`` when PyTorch's rows ≥ cols (a
  kernel's ``fan_out ≥ fan_in``), else ``E = Dᵀ`` (the reference's left
  case uses the rows of ``D``):

  .. math::
     B &\leftarrow B + Y,\qquad S = BE,\qquad
       \mathrm{idx} = \mathrm{top}_r\|S_{:,j}\|_1\ \text{(descending)},
       \qquad M = S_{:,\mathrm{idx}}\\
     B &\leftarrow B - (1-μ)\,M E_{:,\mathrm{idx}}^\top\\
     u &= c\cdot\mathrm{NS}_5(M)\,E_{:,\mathrm{idx}}^\top
       \quad\text{or, with Nesterov,}\quad
       c\cdot\mathrm{NS}_5(Y E_{:,\mathrm{idx}} + μM)\,E_{:,\mathrm{idx}}^\top

  (``NS₅``: Keller Jordan's quintic, 5 steps). ``c`` by ``scaling``, with
  ``(m, n)`` PyTorch's ``(rows, cols)`` = ``(fan_out, fan_in)``: ``'kj'``
  ``√max(1, m/n)``, ``'none'`` 1, ``'kimi'`` ``0.2√max(m, n)``, ``'dion'``
  ``√(m/n)``. The state per matrix is the buffer ``B`` (``fan_in×fan_out``,
  in slots: on a mesh on the device that owns the matrix). No learning
  rate: chain ``optax.scale_by_learning_rate`` after it.

  Args:
    rank: ``r``: an ``int``, or a ``float`` in ``(0, 1]``, a fraction of the
      smaller side (rounded up); default ``0.25``.
    beta: μ, the momentum of the error feedback.
    scaling: ``'kj'``, ``'none'``, ``'kimi'`` or ``'dion'``.
    ns_dtype: dtype of the Newton–Schulz iteration (the reference: bfloat16;
      default: the state's, float32 or wider).
    nesterov: orthogonalize the look-ahead ``Y E_{:,idx} + μM`` (the
      gradient's selected coefficients plus μ times the momentum's; the
      selection and the feedback do not change) instead of ``M``, the
      reference's step (default).
    fraction_scale: with a fractional ``rank``, multiply ``c`` by
      ``rank·s/r``, so that a side whose ``r`` was rounded up (a side of 1,
      2 or 3 at ``rank=0.25``) steps as if exactly the fraction were kept
      (default ``False``, the reference's).
    matrix_specs: as in :func:`orthax.orthogonalize`.
    distributed: an :class:`orthax.sharding.Distributed`.

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> tx = orthax.transforms.scale_by_trion(rank=2)
    >>> params = {'w': jnp.ones((8, 4))}
    >>> u, _ = tx.update({'w': jnp.ones((8, 4))}, tx.init(params))
    >>> u['w'].shape
    (8, 4)

  Reference: Modoranu et al., *FFT-based Dynamic Subspace Selection for Low-Rank Adaptive Optimization of LLMs* (arXiv
  2505.17967).
  """
  _validate.arguments('scale_by_trion', scale_by_trion, locals())
  rank, _, _ = dct_adam.check_structure('scale_by_trion', rank, None, None)

  def make(count):
    del count
    return MS.TrionStep(momentum=beta, rank=rank, scaling=scaling,
                        ns_dtype=ns_dtype, nesterov=nesterov,
                        fraction_scale=fraction_scale)

  return matrix_stage.slot_step(make, matrix_specs, distributed,
                                'scale_by_trion')
