r"""DCT-AdamW's matrix step as a transform: Adam on the top-``r`` DCT
coefficients of each matrix (:func:`scale_by_dct_adam`), and the checks of
the structural arguments it shares with Trion."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import optax

from orthax import _tree
from orthax import _validate
from orthax import matrix_stages as MS
from orthax.transforms import matrix_stage


def scale_by_dct_adam(
    rank: int | float | None = None,
    *,
    update_every: int | None = None,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    ell_norm: float | None = None,
    remap: bool = True,
    scale: str = 'none',
    min_side: int | None = None,
    matrix_specs: _tree.SpecsLike = None,
    distributed: Any = None,
) -> optax.GradientTransformation:
  r"""Adam on the ``r`` DCT coefficients of each matrix that score highest.

  Per matrix, with ``Y`` its tall view ``L×s`` (the smaller side ``s``
  projected: PyTorch's ``G`` when rows ≥ cols, else ``Gᵀ``; for a Flax
  kernel ``[fan_in, fan_out]`` the kernel's transpose when ``fan_out ≥
  fan_in``, else the kernel), ``D`` the orthonormal ``s×s`` DCT-II matrix
  and ``t`` the step:

  .. math::
     t = 1 \lor g \mid t:&\quad S = YD,\
        \mathrm{idx} = \mathrm{top}_r \|S_{:,j}\|_p\ \text{(descending)},\
        a = S_{:,\mathrm{idx}},\ (m, v) \leftarrow (mP, vP)\\
     \text{otherwise}:&\quad a = Y D_{:,\mathrm{idx}}\\
     m &\leftarrow β_1 m + (1-β_1)a,\qquad v \leftarrow β_2 v+(1-β_2)a^2\\
     u &= \frac{\sqrt{1-β_2^t}}{1-β_1^t}\cdot
        \frac{m}{\sqrt v + ε\sqrt{1-β_2^t}}\,D_{:,\mathrm{idx}}^\top

  (torch's AdamW eps placement). ``P`` carries the moments of a column
  index kept at a re-selection to its new slot; new indices start at 0
  (``remap=False``: the moments stay in their slots). The state per matrix
  is ``idx`` ``(r,)`` and ``m``, ``v`` ``(L, r)``: ``2r/s`` of Adam's.
  Then ``u ← u·shape_factor(scale)`` (:func:`orthax.scale_by_shape`; e.g.
  ``'inverse_side'``: ``1/s``) in the same pass. No learning rate: chain
  ``optax.scale_by_learning_rate`` after it.

  Args:
    rank: ``r``: an ``int``, or a ``float`` in ``(0, 1]``, a fraction of the
      smaller side (rounded up); default ``0.25``. Capped at the smaller
      side.
    update_every: ``g``, steps between re-selections (default 1).
    b1, b2: Adam's β₁, β₂.
    eps: ε, added to ``√v`` as torch's AdamW does (see above).
    ell_norm: ``p`` of the column score (default 1, the L1 norm).
    remap: carry the moments over at a re-selection.
    scale: a :func:`orthax.scale_by_shape` mode for the step (default
      ``'none'``).
    min_side: with ``scale='inverse_side'``: ``1/max(s, min_side)``
      (default ``None``: 1).
    matrix_specs: as in :func:`orthax.orthogonalize`.
    distributed: an :class:`orthax.sharding.Distributed`: whole matrices
      per device on its mesh, the state on the owner device.

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> tx = orthax.transforms.scale_by_dct_adam(rank=2)
    >>> params = {'w': jnp.ones((8, 4))}
    >>> u, _ = tx.update({'w': jnp.ones((8, 4))}, tx.init(params))
    >>> u['w'].shape
    (8, 4)

  Reference: Modoranu et al., *FFT-based Dynamic Subspace Selection for Low-Rank Adaptive Optimization of LLMs* (arXiv
  2505.17967).
  """
  _validate.arguments('scale_by_dct_adam', scale_by_dct_adam, locals())
  rank, update_every, ell_norm = check_structure(
      'scale_by_dct_adam', rank, update_every, ell_norm)

  def make(count):
    return MS.DCTAdam(count=count, b1=b1, b2=b2, eps=eps, rank=rank,
                      update_every=update_every, ell_norm=ell_norm,
                      remap=bool(remap))

  MS.check_scale_mode(scale, 'scale_by_dct_adam: scale')
  min_side = MS.check_min_side(min_side, 'scale_by_dct_adam: min_side')
  then = [] if scale == 'none' else [MS.ScaleByShape(scale,
                                                     min_side=min_side)]
  return matrix_stage.slot_step(make, matrix_specs, distributed,
                                'scale_by_dct_adam', then=then)


def check_structure(owner: str, rank: Any, update_every: Any,
                    ell_norm: Any) -> tuple[Any, int, float]:
  """``(rank, update_every, ell_norm)`` with their defaults (0.25, 1, 1.0),
  checked: they fix the state's shapes and the program, so they must be
  Python numbers (pass them to ``optax.inject_hyperparams`` as
  ``static_args``)."""
  rank = 0.25 if rank is None else rank
  update_every = 1 if update_every is None else update_every
  ell_norm = 1.0 if ell_norm is None else ell_norm
  if isinstance(rank, bool) or not isinstance(rank, numbers.Real):
    raise TypeError(f'{owner}: rank must be an int or a float fraction, '
                    f'got {rank!r} (a static value: pass it in static_args '
                    'of optax.inject_hyperparams).')
  rank = int(rank) if isinstance(rank, numbers.Integral) else float(rank)
  if (isinstance(rank, int) and rank < 1) or (
      isinstance(rank, float) and not 0 < rank <= 1):
    raise ValueError(f'{owner}: rank must be an int >= 1 or a fraction in '
                     f'(0, 1], got {rank!r}.')
  if isinstance(update_every, bool) or not isinstance(update_every,
                                                      numbers.Integral):
    raise TypeError(f'{owner}: update_every must be an int, got '
                    f'{update_every!r} (a static value: pass it in '
                    'static_args of optax.inject_hyperparams).')
  _validate.count(owner, 'update_every', update_every)
  if isinstance(ell_norm, bool) or not isinstance(ell_norm, numbers.Real):
    raise TypeError(f'{owner}: ell_norm must be a number, got '
                    f'{ell_norm!r} (a static value: pass it in static_args '
                    'of optax.inject_hyperparams).')
  if not ell_norm > 0 or ell_norm == float('inf'):
    raise ValueError(f'{owner}: ell_norm must be > 0 and finite, got '
                     f'{ell_norm!r}.')
  return rank, int(update_every), float(ell_norm)
