"""DCT-AdamW: AdamW on the top-``r`` DCT coefficients of each matrix
(arXiv 2505.17967)."""

from __future__ import annotations

import numbers
from typing import Any, Callable

import optax

from orthax import _tree
from orthax import _validate
from orthax import matrices
from orthax import matrix_stages as MS
from orthax import routing
from orthax.recipes import _common
from orthax.recipes import registry
from orthax.transforms import dct_adam
from orthax.transforms.chain import named_chain

# What each reference fixes (``scale=None`` takes it from here).
_DCT_ADAMW_REFERENCES = {
    'orthax': dict(remap=True, scale='inverse_side'),
    'ista': dict(remap=False, scale='none'),
}
# The default learning rate of each step scale: per unit of the smaller
# side, the sweep's best at d_model 128 and 256; unscaled (AdamW-sized, both
# branches), the in-between rate of the two widths' bests (0.012, 0.006).
DEFAULT_LEARNING_RATES = {'inverse_side': 1.5, 'none': 0.0085}
SCALES = tuple(DEFAULT_LEARNING_RATES)
MAX_SHAPE = 32000
# The side below which `inverse_side` stops growing the step: the smallest
# side the default rate was swept at (d_model 128).
MIN_SIDE = 128


def limit_matrix_size(router: _common.RouterLike, max_shape: int
                      ) -> _common.RouterLike:
  """``router`` with every ``'matrix'`` leaf whose fan-in or fan-out is
  ``≥ max_shape`` sent to ``'adam'`` (the reference's full-AdamW fallback
  for embeddings and heads): a copy of an :class:`orthax.Router` with
  ``max_side`` set (so :func:`orthax.describe` reads it), or a labels
  function around a labels callable (default matrix views)."""
  if isinstance(router, routing.Router):
    return router.with_max_side(max_shape)

  def labels(params):
    _, leaves, treedef = _tree.leaves_with_paths(params)
    out = []
    for x, lab in zip(leaves, treedef.flatten_up_to(router(params))):
      if lab == 'matrix':
        _, fi, fo = matrices.MatrixSpec().matrix_shape(x.shape)
        lab = 'adam' if max(fi, fo) >= max_shape else lab
      out.append(lab)
    return treedef.unflatten(out)

  if isinstance(router, _common.CheckedLabels):  # (assemble adds branches)
    return _common.CheckedLabels(router.owner, labels)
  return labels


@registry.register(
    'dct_adamw', references=tuple(_DCT_ADAMW_REFERENCES),
    learning_rate=DEFAULT_LEARNING_RATES['inverse_side'],
    adam_learning_rate=0.0085)
def dct_adamw(
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    reference: str = 'orthax',
    scale: str | None = None,
    rank: int | float | None = None,
    update_every: int | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    ell_norm: float | None = None,
    max_shape: int | None = None,
    min_side: int | None = None,
    weight_decay: float = 0.0,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float | None = None,
    adam_b2: float | None = None,
    adam_eps: float | None = None,
    adam_weight_decay: float | None = None,
    router: routing.Router | Callable[[Any], Any] | None = None,
    distributed: Any = None,
    check_finite: bool = True,
) -> optax.GradientTransformation:
  r"""DCT-AdamW: AdamW in a subspace of DCT columns chosen per matrix.

  For each routed matrix ``W`` with gradient ``G``, ``Y`` its tall view
  ``L×s`` (the smaller side projected; see
  :func:`orthax.transforms.scale_by_dct_adam`), ``D`` the ``s×s``
  orthonormal DCT-II matrix, ``t`` the step and ``g = update_every``:

  .. math::
     t = 1 \lor g \mid t:&\quad S = YD,\
        \mathrm{idx} = \mathrm{top}_r\|S_{:,j}\|_p\ \text{(descending)},\
        a = S_{:,\mathrm{idx}},\ (m, v) \leftarrow (mP, vP)\\
     \text{otherwise}:&\quad a = YD_{:,\mathrm{idx}}\\
     m &\leftarrow β_1 m + (1-β_1)a,\qquad
     v \leftarrow β_2 v + (1-β_2)a^2\\
     W &\leftarrow W(1-cηλ) - cη\,\frac{\sqrt{1-β_2^t}}{1-β_1^t}\cdot
        \frac{m}{\sqrt v + ε\sqrt{1-β_2^t}}\,D_{:,\mathrm{idx}}^\top

  with ``c`` from ``scale``: ``'inverse_side'`` (the default) ``c =
  1/\max(s, s_0)`` with ``s_0 = min_side`` (128), ``'none'`` ``c = 1``. An Adam step's entries are of order one whatever
  the width, so its spectral norm grows like the width at a fixed aspect
  ratio and the best AdamW-style rate halves when the width doubles (the
  learning-rate sweep: 0.012 at d_model 128, 0.006 at 256). Per unit of the
  smaller side, one ``η`` serves every width (μP's ``1/fan_in`` rule for
  Adam, Yang, Simon, Bernstein, arXiv 2310.17813, on the side DCT-AdamW
  projects): ``η = 1.5`` is an AdamW-style rate of 0.012 on a 128-wide
  model and 0.002 on a 768-wide one. Below ``s_0`` the rate stops
  growing: a side of 8, or a single column (a scalar regression head),
  steps as a side of 128 does, at 0.012; with ``c = 1/s`` there (``min_side=1``)
  it would step at 0.19 and 1.5, 16–128 times that, and small models
  trained far worse than AdamW (an 8→64→64→1 regression MLP ended at 55×
  AdamW's loss, a small CNN at chance, 2026-12-07). 128 is the smallest
  side the default rate was swept at (d_model 128), so every swept figure
  holds.

  ``P`` moves the moments of a column index still selected to its new slot
  and starts new ones at zero. The state per matrix is ``r`` indices and
  ``m``, ``v`` of ``L×r``: ``2r/s`` of AdamW's (on a mesh it stays on the
  device that owns the matrix). Vectors, and matrices with a side
  ``≥ max_shape``, get full AdamW with the same formula (the AdamW branch).

  ``reference`` picks the defaults of an implementation:

  ==========  =====================================================
  reference   moments at a re-selection
  ==========  =====================================================
  ``orthax``  remapped to the new slots (``P`` above)
  ``ista``    kept per slot (IST-DASLab/ISTA-DASLab-Optimizers
              @4c98e6e ``fft_low_rank/dct_adamw.py``, top-k sorted)
  ==========  =====================================================

  Both re-select every step (the reference's ``update_proj_gap=1``) with
  betas ``(0.9, 0.999)``, ``eps=1e-8``, the L1 score and ``max_shape=32000``.
  ``reference='ista'`` also takes ``scale='none'`` (the reference's step).
  The reference requires ``lr``, ``weight_decay`` and ``rank``; here they
  default to ``1.5`` (``0.0085`` under ``scale='none'``, so also under
  ``reference='ista'``: the in-between rate of d_model 128's and 256's
  bests, 1.8% and 2.4% above each), ``0`` and a quarter of the smaller
  side. Its
  ``rotate_subspace`` option zeroes the moments instead of remapping them
  (an in-place matmul); ``reference='orthax'`` does what it means to.

  Args:
    learning_rate: η (number or schedule), per unit of the smaller side
      under the default ``scale`` (see above); default 1.5, or 0.0085 under
      ``scale='none'``.
    reference: ``'orthax'`` or ``'ista'`` (see above).
    scale: ``c`` above: ``'inverse_side'`` or ``'none'`` (default: the
      reference's).
    rank: ``r``: an ``int``, or a ``float`` in ``(0, 1]``, a fraction of the
      smaller side (rounded up); default ``0.25``. An ``int`` above a
      matrix's smaller side is that side there (full rank), so one ``rank``
      serves a tree of mixed sizes. With
      ``optax.inject_hyperparams`` pass ``rank``, ``update_every``,
      ``ell_norm`` and ``max_shape`` in ``static_args`` (they fix shapes).
    update_every: ``g``, steps between re-selections (default 1).
    b1, b2, eps: Adam's β₁, β₂ and ε (torch placement). A column new to
      the selection starts at zero moments under the global bias
      correction, whose growth with ``t`` at β₂ = 0.999 lasts ~3000 steps;
      for long runs or a constant rate ``b2=0.99, adam_b2=0.999`` trains
      better (docs/training.md; at 200 steps 0.999 does).
    ell_norm: ``p`` of the column score (default 1).
    max_shape: matrices with a side ``≥`` this go to AdamW (default 32000).
    min_side: ``s_0`` above (default ``None``: 128; ``1``: ``c = 1/s`` on
      every side). Static under ``optax.inject_hyperparams``, as
      ``max_shape``.
    weight_decay: λ, decoupled (``W(1-cηλ)``, at the AdamW branch's own
      rate there), both branches by default.
    adam_learning_rate: the AdamW branch's rate (default: ``learning_rate ×
      0.0085/1.5``, 0.0085 at the default η, moving with it; under
      ``scale='none'`` ``learning_rate`` itself, both branches then being
      AdamW steps on the same scale).
    adam_b1, adam_b2, adam_eps, adam_weight_decay: the AdamW branch's
      (default: the matrices' values).
    router: a :class:`orthax.Router` or a ``params -> labels`` callable.
    distributed: an :class:`orthax.sharding.Distributed`: each matrix is
      projected whole on one device of the mesh, its state kept there.
    check_finite: skip a step whose gradient holds NaN/Inf, on device.

  Example:
    >>> import jax, jax.numpy as jnp, orthax
    >>> params = {'dense': {'kernel': jnp.ones((16, 8)), 'bias': jnp.ones(8)}}
    >>> tx = orthax.dct_adamw(rank=4)
    >>> state = tx.init(params)
    >>> u, state = tx.update(params, state, params)
    >>> u['dense']['kernel'].shape
    (16, 8)

  Reference: Modoranu, Safaryan, Schultheis, Ryabinin, Chumachenko,
  Alistarh, *FFT-based Dynamic Subspace Selection for Low-Rank Adaptive Optimization of LLMs* (v1: *SVD-Free Low-Rank Adaptive Gradient
  Optimization for LLMs*) (arXiv 2505.17967);
  github.com/IST-DASLab/ISTA-DASLab-Optimizers.
  """
  _validate.arguments('dct_adamw', dct_adamw, locals())
  if max_shape is not None and (isinstance(max_shape, bool) or
                                not isinstance(max_shape, numbers.Integral)):
    # Under optax.inject_hyperparams an int arrives as an array, and failed
    # at the first jitted step on int() of a tracer.
    raise TypeError(f'dct_adamw: max_shape must be an int, got '
                    f'{max_shape!r} (a static value: pass it in static_args '
                    'of optax.inject_hyperparams).')
  _validate.count('dct_adamw', 'max_shape', max_shape, optional=True)
  rank, update_every, ell_norm = dct_adam.check_structure(
      'dct_adamw', rank, update_every, ell_norm)
  max_shape = MAX_SHAPE if max_shape is None else int(max_shape)
  reference = registry.resolve_reference('dct_adamw', reference)
  d = _DCT_ADAMW_REFERENCES[reference]
  (scale,) = _common.mode_settings(d, scale=scale)
  if scale not in SCALES:
    raise ValueError(f'dct_adamw: scale must be one of {SCALES}, got '
                     f'{scale!r}.')
  checked = MS.check_min_side(min_side, 'dct_adamw: min_side', MIN_SIDE)
  _validate.applies('dct_adamw', 'min_side', min_side, None,
                    scale == 'inverse_side', "scale='inverse_side'")
  min_side = checked
  if learning_rate is None:
    learning_rate = DEFAULT_LEARNING_RATES[scale]
  router, specs = _common.route(router, owner='dct_adamw')
  matrix = named_chain(
      ('dct_adam', dct_adam.scale_by_dct_adam(
          rank, update_every=update_every, b1=b1, b2=b2, eps=eps,
          ell_norm=ell_norm, remap=d['remap'], scale=scale,
          min_side=min_side, matrix_specs=specs, distributed=distributed)),
      # W(1 - cηλ) - cη·step: AdamW's decay at the step's own rate.
      *_common.step_stages(learning_rate, weight_decay, **(
          {} if scale == 'none' else dict(
              rate_scale=scale, matrix_specs=specs,
              **(dict(min_side=min_side) if scale == 'inverse_side'
                 else {})))),
  )
  pick = lambda v, default: default if v is None else v
  return _common.assemble_with_adamw(
      matrix, limit_matrix_size(router, max_shape), check_finite,
      learning_rate=learning_rate, adam_learning_rate=adam_learning_rate,
      rms_matched=scale == 'none', matrix_weight_decay=weight_decay,
      recipe='dct_adamw',
      notes=() if scale == 'none' else (
          "dct_adamw's matrix lr and wd are per unit of the matrix side: the "
          'step and the decay use c·lr, c = 1/max(min(fan_in, fan_out), '
          f"{min_side}) (scale='inverse_side', min_side={min_side}; a "
          f'{4 * min_side} × {8 * min_side} kernel steps at '
          f'lr/{4 * min_side}).',),
      b1=pick(adam_b1, b1), b2=pick(adam_b2, b2), eps=pick(adam_eps, eps),
      weight_decay=pick(adam_weight_decay, weight_decay),
      eps_placement='corrected')
