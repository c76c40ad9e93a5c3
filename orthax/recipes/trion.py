"""Trion: low-rank orthogonalized momentum on DCT columns (arXiv
2505.17967)."""

from __future__ import annotations

from typing import Any, Callable

import optax

from orthax import _validate
from orthax import matrix_stages as MS
from orthax import routing
from orthax.recipes import _common
from orthax.recipes import registry
from orthax.transforms import dct_adam
from orthax.transforms import trion as trion_lib
from orthax.transforms.chain import named_chain

# 'ista': the reference's arithmetic, rates and weight decay (IST-DASLab/
# ISTA-DASLab-Optimizers @4c98e6e fft_low_rank/trion.py); 'orthax': its
# arithmetic with Nesterov's look-ahead at the sweep's rate and decay
# (README). weight_decay=None and nesterov=None take the mode's.
_TRION_REFERENCES = {
    'orthax': dict(weight_decay=0.2, nesterov=True, fraction_scale=True),
    'ista': dict(weight_decay=0.0, nesterov=False, fraction_scale=False)}


@registry.register(
    'trion', references=tuple(_TRION_REFERENCES), learning_rate=0.226,
    adam_learning_rate=3e-3, mode_rates={'ista': registry.ModeRates(
        0.02, 3e-4, 'IST-DASLab/ISTA-DASLab-Optimizers @4c98e6e '
        'fft_low_rank/trion.py: Trion lr, Adam lr')})
def trion(
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    reference: str = 'orthax',
    rank: int | float | None = None,
    beta: float = 0.95,
    scaling: str = 'kj',
    ns_dtype: Any = None,
    nesterov: bool | None = None,
    fraction_scale: bool | None = None,
    weight_decay: float | None = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-10,
    adam_weight_decay: float | None = None,
    router: routing.Router | Callable[[Any], Any] | None = None,
    distributed: Any = None,
    check_finite: bool = True,
) -> optax.GradientTransformation:
  r"""Trion: Dion's low-rank orthogonalized step with DCT column selection.

  For each routed matrix ``W`` with gradient ``G``, ``Y`` and ``B`` the
  tall views (``L×s``) of ``G`` and of the sum-form buffer, ``D`` the
  ``s×s`` orthonormal DCT-II matrix and ``E = D`` when PyTorch's rows ≥
  cols (a kernel's ``fan_out ≥ fan_in``), else ``Dᵀ``:

  .. math::
     B &\leftarrow B + Y,\quad S = BE,\quad
       \mathrm{idx} = \mathrm{top}_r\|S_{:,j}\|_1,\quad
       M = S_{:,\mathrm{idx}}\\
     B &\leftarrow B - (1-μ)\,M E_{:,\mathrm{idx}}^\top\\
     W &\leftarrow W(1-ηλ) - η\,c\,\mathrm{NS}_5(M)\,E_{:,\mathrm{idx}}^\top

  With ``nesterov`` (the library mode's), Newton–Schulz takes the
  look-ahead ``Y E_{:,idx} + μM`` in place of ``M``: at ``rank=1.0`` the
  step is then Muon's Nesterov step (tested). ``c`` is the shape scale of
  ``scaling`` (see :func:`orthax.transforms.scale_by_trion`). Vectors,
  embeddings and heads go to Adam (bias-corrected, betas ``(0.9, 0.95)``,
  ``eps=1e-10``, at ``adam_learning_rate``: by default 3e-3 at the default
  ``learning_rate`` and in proportion to it, or ``learning_rate`` under
  ``scaling='kimi'``; ``reference='ista'``: ``0.015·learning_rate``, the
  reference's ``3e-4`` at its ``0.02``). The state per matrix is ``B`` (as
  Muon's momentum); on a mesh it stays on the device that owns the
  matrix.

  ``reference='ista'`` is IST-DASLab/ISTA-DASLab-Optimizers
  @4c98e6e ``fft_low_rank/trion.py`` with its two undefined names
  (``dct3_matrix``'s ``device``/``dtype``, ``get_dct_matrix``) read as the
  DCT matrix of the matrix's smaller side, and its defaults: ``lr=0.02``,
  ``momentum=0.95``, ``weight_decay=0``; Adam ``lr=3e-4``, betas
  ``(0.9, 0.95)``, ``eps=1e-10``. The reference requires ``rank`` and
  ``scaling_type``: here a quarter of the smaller side and ``'kj'``. It
  runs Newton–Schulz in bfloat16 (``ns_dtype=jnp.bfloat16``); the default
  here is float32. ``reference='orthax'`` (the default) is the same
  arithmetic with Nesterov's look-ahead, at the sweep's rate and decay:
  0.226 and λ = 0.2, with the Adam branch at 3e-3 (both branches decay by
  λ).

  Args:
    learning_rate: η for the matrices (number or schedule); default: the
      mode's, 0.226 for ``'orthax'`` (the sweep's best at d_model 256 and
      within 0.4% of d_model 128's, README) and 0.02 for ``'ista'``.
    reference: ``'orthax'`` (default) or ``'ista'``.
    rank: ``r``: an ``int``, or a ``float`` in ``(0, 1]``, a fraction of the
      smaller side (rounded up); default ``0.25``. An ``int`` above a
      matrix's smaller side is that side there (full rank). Pass it in
      ``static_args`` of ``optax.inject_hyperparams``.
    beta: μ, the momentum (error-feedback) coefficient.
    scaling: ``'kj'``, ``'none'``, ``'kimi'`` or ``'dion'``.
    ns_dtype: dtype of the Newton–Schulz iteration.
    nesterov: orthogonalize the look-ahead (above); default: the mode's,
      ``True`` for ``'orthax'`` and the reference's ``False`` for
      ``'ista'``.
    fraction_scale: the step times ``rank·s/r`` for a fractional
      ``rank`` (:func:`orthax.transforms.scale_by_trion`): the default
      rate is for the quarter of the side kept, and a side of 1–3, where
      rounding keeps all of it, would step as Muon at 4× Muon's rate (a
      64×1 regression head: 13× AdamW's loss at the defaults); 1 where
      ``rank·s`` is whole, so every swept figure holds. Default: the
      mode's, ``True`` for ``'orthax'``, the reference's ``False`` for
      ``'ista'``.
    weight_decay: λ, decoupled (``W(1-ηλ)``); default: the mode's, 0.2
      for ``'orthax'`` (the sweep's, README) and the reference's 0 for
      ``'ista'``.
    adam_learning_rate: Adam's learning rate (default: ``learning_rate``
      under ``scaling='kimi'``, else in proportion to ``learning_rate``,
      3e-3 at the default (``'ista'``: ``0.015·learning_rate``): see
      :func:`orthax.recipes.resolve_adam_learning_rate`). The trainer's
      default, registered with the recipe, is ``3e-3`` (as for most
      recipes; DCT-AdamW's is 0.0085, SPECTRA has no AdamW branch): the
      reference's ``3e-4`` left the trainer's 24-step test model 0.6 nats
      behind.
    adam_b1, adam_b2, adam_eps: Adam's betas and epsilon.
    adam_weight_decay: Adam's weight decay (default: ``weight_decay``).
    router: a :class:`orthax.Router` or a ``params -> labels`` callable.
    distributed: an :class:`orthax.sharding.Distributed`.
    check_finite: skip a step whose gradient holds NaN/Inf, on device.

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> params = {'dense': {'kernel': jnp.ones((16, 8)), 'bias': jnp.ones(8)}}
    >>> tx = orthax.trion(0.02, rank=4)
    >>> u, _ = tx.update(params, tx.init(params), params)
    >>> u['dense']['kernel'].shape
    (16, 8)

  Reference: Modoranu, Safaryan, Schultheis, Ryabinin, Chumachenko,
  Alistarh, *FFT-based Dynamic Subspace Selection for Low-Rank Adaptive Optimization of LLMs* (v1: *SVD-Free Low-Rank Adaptive Gradient
  Optimization for LLMs*) (arXiv 2505.17967);
  github.com/IST-DASLab/ISTA-DASLab-Optimizers.
  """
  _validate.arguments('trion', trion, locals())
  reference, learning_rate = registry.resolve_mode('trion', reference,
                                                   learning_rate)
  d = _TRION_REFERENCES[reference]
  weight_decay, nesterov, fraction_scale = _common.mode_settings(
      d, weight_decay=weight_decay, nesterov=nesterov,
      fraction_scale=fraction_scale)
  rank, _, _ = dct_adam.check_structure('trion', rank, None, None)
  if scaling not in MS.TRION_SCALINGS:
    raise ValueError(f'trion: scaling must be one of '
                     f'{tuple(MS.TRION_SCALINGS)}, got {scaling!r}.')
  router, specs = _common.route(router, owner='trion')
  matrix = named_chain(
      ('trion', trion_lib.scale_by_trion(
          rank, beta=beta, scaling=scaling, ns_dtype=ns_dtype,
          nesterov=nesterov, fraction_scale=fraction_scale,
          matrix_specs=specs, distributed=distributed)),
      *_common.step_stages(learning_rate, weight_decay),
  )
  return _common.assemble_with_adamw(
      matrix, router, check_finite, learning_rate=learning_rate,
      adam_learning_rate=adam_learning_rate,
      rms_matched=scaling == 'kimi', matrix_weight_decay=weight_decay,
      recipe='trion', reference=reference,
      b1=adam_b1, b2=adam_b2, eps=adam_eps,
      weight_decay=weight_decay if adam_weight_decay is None
      else adam_weight_decay, eps_placement='corrected')
