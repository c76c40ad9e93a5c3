"""FISMO's Kronecker-factored Fisher step as an optax transform."""

from __future__ import annotations

import numbers

import optax

from orthax import _tree
from orthax import _validate
from orthax import matrix_stages
from orthax import polar
from orthax import sharding
from orthax.transforms import matrix_stage


def scale_by_fismo(
    beta: float = 0.95,
    gamma: float = 0.95,
    damping: float = 1e-3,
    *,
    eig_floor: float = 1e-6,
    precondition_every: int | None = None,
    preset: str | polar.Preset = 'jordan',
    ns_steps: int | None = None,
    ns_eps: float | None = None,
    ns_method: str = 'auto',
    scale: str = 'keller',
    scale_rms: float = 0.2,
    nesterov: bool = False,
    scale_invariant: bool = False,
    matrix_specs: _tree.SpecsLike = None,
    distributed: sharding.Distributed | None = None,
) -> optax.GradientTransformation:
  r"""FISMO's direction: the gradient whitened by Kronecker factors of the
  Fisher, momentum in whitened space, orthogonalized and unwhitened.

  For each matrix (PyTorch layout: ``G`` is ``m×n``, ``m`` = fan-out; ``P``
  ``m×m``, ``Q`` ``n×n`` start at ``I``, ``M`` at 0):

  .. math::
     P &\leftarrow \mathrm{sym}(m\tilde P/\mathrm{tr}\tilde P),\ \tilde P =
       γP + (1-γ)\bigl(GQ^{-1}G^\top/n + μ\,\mathrm{tr}(P)/m\,I\bigr) \\
     Q &\leftarrow \mathrm{sym}(n\tilde Q/\mathrm{tr}\tilde Q),\ \tilde Q =
       γQ + (1-γ)\bigl(G^\top P^{-1}G/m + μ\,\mathrm{tr}(Q)/n\,I\bigr) \\
     M &\leftarrow βM + (1-β)\tilde G,\quad \tilde G = P^{-1/2}GQ^{-1/2},
     \qquad U = c\,P^{-1/2}\,\mathrm{NS}(V)\,Q^{-1/2}

  (``V = M``, or ``V = βM + (1-β)G̃`` with ``nesterov``; ``P`` with the old
  ``Q``, then ``Q`` with the new ``P``; ``c`` the
  ``scale`` mode's factor, :func:`orthax.scale_by_shape`). The step runs
  instead of Newton–Schulz, on whole matrices
  (:class:`orthax.matrix_stages.FismoStep`); its state lives in slots, on
  the device that works on the matrix, never gathered. The update is a
  direction: chain ``optax.scale_by_learning_rate``.

  Args:
    beta: momentum β (EMA, no bias correction).
    gamma: EMA rate γ of the factors ``P`` and ``Q``.
    damping: μ, added as ``μ·tr(P)/m·I``; absolute, so compared with
      ``‖G‖²/(mn)`` (the method is not invariant to the gradient's scale),
      unless ``scale_invariant``.
    eig_floor: floor of the factors' eigenvalues (their mean is 1) before
      the inverse and inverse square roots.
    precondition_every: ``k``: the inverse roots of ``P`` and ``Q`` are
      recomputed on steps ``1, 1+k, 1+2k, …`` and cached in between (``P``
      and ``Q`` themselves are updated every step). ``1`` (the default,
      ``None``) is the method as written; ``k > 1`` divides the ``eigh``
      cost by ``k`` and keeps one more square matrix per matrix,
      ``P^{-1/2}`` (a
      static ``int``: pass it in ``static_args`` of
      ``optax.inject_hyperparams``).
    preset: Newton–Schulz preset of the polar factor.
    ns_steps: Newton–Schulz steps (default: the preset's).
    ns_eps: the normalizer's epsilon (default: the preset's).
    ns_method: ``'auto'``, ``'standard'`` or ``'gram'``, as in
      :func:`orthax.orthogonalize`.
    scale: shape scale, ``'keller'``, ``'moonlight'``, ``'spectral'`` or
      ``'none'``.
    scale_rms: RMS target of the ``moonlight`` scale.
    nesterov: orthogonalize the Nesterov look-ahead ``βM + (1-β)G̃``
      instead of ``M`` (default ``False``, the paper's Algorithm 1 as
      summarised; :func:`orthax.fismo` turns it on).
    scale_invariant: average ``L = GQ⁻¹Gᵀ/n`` and ``R = GᵀP⁻¹G/m`` at mean
      eigenvalue 1, ``P̃ = γP + (1-γ)(m·L/tr L + μI)`` (``Q̃`` alike), so
      that ``μ`` is relative and the step the same for any multiple of
      ``G`` (not in the paper as summarised; default ``False``).
    matrix_specs: as in :func:`orthax.orthogonalize`.
    distributed: an :class:`orthax.sharding.Distributed`: each device steps
      whole matrices and keeps their ``P``, ``Q``, ``M``.

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> tx = orthax.transforms.scale_by_fismo(damping=1e-3)
    >>> g = {'w': jnp.ones((4, 8))}
    >>> u, state = tx.update(g, tx.init(g))
    >>> u['w'].shape
    (4, 8)

  References: Xu, Yan, Zhang, *FISMO: Fisher-Structured
  Momentum-Orthogonalized Optimizer*, arXiv 2601.21750 (ICML 2026); no
  public code, this is a reconstruction (see :func:`orthax.fismo`).
  """
  _validate.arguments('scale_by_fismo', scale_by_fismo, locals(),
                      **OVERRIDES)
  every = check_precondition_every('scale_by_fismo', precondition_every)

  def make(count):
    return matrix_stages.FismoStep(
        beta, gamma, damping, eig_floor, ns_steps, ns_eps, scale_rms,
        count=count, preset=preset, ns_method=ns_method, scale=scale,
        precondition_every=every, nesterov=nesterov,
        scale_invariant=scale_invariant)

  make(None)  # bad modes fail here, not at the first update

  return matrix_stage.slot_step(make, matrix_specs, distributed,
                                'scale_by_fismo')


def check_precondition_every(owner: str, value) -> int:
  """``value`` (``None``: 1), checked to be a Python ``int >= 1``: it fixes
  the state's layout and the program."""
  if value is None:
    return 1
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f'{owner}: precondition_every must be an int >= 1, got '
                    f'{value!r} (a static value: pass it in static_args of '
                    'optax.inject_hyperparams).')
  _validate.count(owner, 'precondition_every', value)
  return int(value)


OVERRIDES = dict(
    gamma=_validate.unit_interval,
    damping=_validate.positive,
    eig_floor=_validate.positive,
    scale=_validate.choice(matrix_stages.SCALE_MODES),
    scale_invariant=_validate.flag,
)
