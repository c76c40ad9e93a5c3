"""ARO-Sinkhorn: adaptively rotated optimization (arXiv 2602.09006)."""

from __future__ import annotations

from typing import Any, Callable

import optax

from orthax import _validate
from orthax import routing
from orthax import transforms as T
from orthax.recipes import _common
from orthax.recipes import registry
from orthax.transforms import aro as aro_lib

# What each reference fixes; explicit arguments override it (rotate=None
# and scale=None take it from here).
_ARO_REFERENCES = {
    'orthax': dict(rotate='smaller', scale='muon', qr='auto',
                   weight_decay=0.2, adam_weight_decay=0.0, nesterov=True),
    'dion': dict(rotate='fan_out', scale='rms_norm', qr='householder',
                 weight_decay=0.01, adam_weight_decay=_common.SHARED_DECAY,
                 nesterov=False),
}


@registry.register(
    'aro', references=tuple(_ARO_REFERENCES), learning_rate=0.08,
    adam_learning_rate=3e-3, mode_rates={'dion': registry.ModeRates(
        0.01, 0.01, 'microsoft/dion dev/aro @9c6b30d dion/aro.py: lr, shared '
        'by its AdamW groups')})
def aro(
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    reference: str = 'orthax',
    beta: float = 0.95,
    nesterov: bool | None = None,
    base: str = 'sinkhorn',
    qr: str | None = None,
    rotate: str | None = None,
    scale: str | None = None,
    scale_rms: float = 0.2,
    stable: bool = True,
    weight_decay: float | None = None,
    mu_dtype: Any = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-8,
    adam_weight_decay: float | None = None,
    router: routing.Router | Callable[[Any], Any] | None = None,
    distributed: Any = None,
    check_finite: bool = True,
) -> optax.GradientTransformation:
  r"""ARO: momentum rotated into a learned basis, normalized there.

  For each routed matrix with gradient ``G``, ``A`` the matrix seen with the
  rotated side as rows (``s×t``), ``R`` its ``s×s`` rotation (the identity
  at first) and ``f`` the base map:

  .. math::
     M_t &= β M_{t-1} + (1-β) G_t,\qquad V_t = β M_t + (1-β) G_t \\
     R_t &= \mathrm{qr}\big(V_t\, f(R_{t-1}^\top V_t)^\top\big)_Q,\qquad
     U_t = R_t\, f(R_t^\top V_t) \\
     W_t &= W_{t-1}(1 - ηλ) - η\,c\,U_t

  ``f = 'sinkhorn'``: 5 alternating passes ``X ← X√t/max(‖row‖, 10⁻⁸)``,
  ``X ← X√s/max(‖col‖, 10⁻⁸)`` (columns last, so ``U`` has RMS 1).
  ``c`` is ``scale``: ``'muon'`` ``√max(1, m/n)/‖U‖₂`` (the default:
  the step's spectral norm is Muon's, so the learning rate is on Muon's
  scale and carries over across widths; ``‖U‖₂`` by power iteration),
  ``'rms_norm'`` ``0.2·√max(m, n)`` (dion's ``adjust_lr``; ``U`` has RMS
  1, so the step grows with the matrix and the best rate falls with the
  width: 1.25e-3 at d_model 128 and 6.25e-4 at 256 on the embedded
  corpus), ``'update_rms'`` ``0.2/RMS(U)`` (the paper's form),
  ``'spectral_norm'`` ``√(m/n)`` or ``'none'`` 1 (``m`` fan-out, ``n``
  fan-in). ``V`` is Nesterov's look-ahead (``nesterov=True``, the
  ``'orthax'`` mode's); with ``nesterov=False`` (``'dion'``'s) ``V = M``,
  as in the paper and dion. No bias correction; the decay uses the unscaled
  ``η``. As in Muon, the step's size does not follow the gradient's: ``f``
  normalizes, so a gradient 10⁻⁶ times smaller gives the same step; far
  smaller, where the ``10⁻⁸`` floors of ``f`` bind (10⁻⁹ here), the
  default ``scale='muon'`` still gives the step its full spectral norm,
  its direction changed by ~10⁻³ (tested). A zero gradient gives a zero
  step.

  ``reference='dion'`` is microsoft/dion branch ``dev/aro`` (``dion/aro.py``
  @9c6b30d) and its defaults: the rotation acts on the PyTorch rows
  (``rotate='fan_out'``: the Flax kernel's output axis), Householder QR
  every step, ``scale='rms_norm'``, decoupled decay with the base rate,
  its AdamW groups' betas ``(0.9, 0.95)``, ε ``10⁻⁸`` and decay, and its
  learning rate 0.01 for both branches (on the embedded corpus at d_model
  128, 1.25e-3 was best under ``rms_norm``). Where the rotated
  side is the larger (dion: every PyTorch-tall weight, e.g. an
  up-projection), ``C`` is rank-deficient, the last columns of the
  reference's ``Q`` are set by roundoff and the clamp in ``f`` blows their
  rows up to full size: its update there depends on the gradient's last
  bits (``tests/test_aro.py::test_tall_matrix_defect_of_dion_and_its_fix``). Every mode computes what the reference's
  arithmetic gives exactly, stably (``stable``: there, those rows zero, as
  are the rows of ``QᵀM`` past ``M``'s rank on any shape, a momentum of
  lower rank than the rotated side, found by a gap in their norms down to
  the rounding level, and the columns of ``Q`` there exact arithmetic's,
  which the next step projects on; and everywhere the QR of ``C = M Fᵀ``
  without forming the product, whose float32 error reaches 1e-3 on square
  matrices); ``stable=False`` keeps the reference's floating-point
  arithmetic, roundoff and all. The default ``'orthax'`` mode rotates the
  **smaller** side, where a full-rank momentum leaves no such rows; it
  also costs fewer FLOPs (``O(s²t)`` with ``s ≤ t``) and
  keeps a smaller ``R``; it sizes the step as Muon does (``'muon'``); it
  rotates and normalizes Nesterov's look-ahead, as Muon orthogonalizes it
  (two seeds, at d_model 128 / 256: 1.4395 / 1.3934 against 1.4634 /
  1.4167 without, and AdamW's best loss in 0.51× / 0.52× of its steps
  against 0.60× / 0.59×); and it picks the QR by platform
  (``qr='auto'``): off CPU Cholesky QR3 (matrix products, Householder's
  ``Q`` up to column signs), which on a
  GPU is over 100× faster than cuSOLVER's Householder QR of a stack; on
  CPU LAPACK's Householder QR, the faster there. On a CPU with few cores,
  ``OPENBLAS_NUM_THREADS=1`` (set before NumPy loads) keeps LAPACK's
  threads from competing with XLA's: on 2 cores ARO's step on one
  GPT-2-small layer took 0.95–1.05× Muon's with it and 1.2–1.5× without
  (docs/performance.md).

  Args:
    learning_rate: η (number or schedule); default: the mode's, 0.08 for
      ``'orthax'`` (from the sweep at d_model 128 and 256 at its decay
      0.2, README) and 0.01 for ``'dion'``.
    reference: ``'orthax'`` (default) or ``'dion'``.
    beta: momentum β (dion's ``mu``).
    nesterov: rotate and normalize the look-ahead ``βM + (1-β)G`` instead
      of ``M`` (default: the mode's; ``True`` for ``'orthax'``, ``False``
      for ``'dion'``).
    base: ``'sinkhorn'``, ``'row_norm'`` or ``'sign'``.
    qr: ``'cholesky_qr3'`` (matrix products; Householder's ``Q`` up to
      column signs, which ARO's update does not see),
      ``'householder'``, ``'auto'`` (Householder on CPU, Cholesky QR3
      elsewhere: :func:`orthax.matrix_stages.resolve_qr`) or
      ``'shifted_cholesky'`` (dion's unused ``CᵀC + 10⁻⁷‖C‖²I`` form,
      Householder where the Cholesky fails) (default: the reference's;
      ``'auto'`` for ``'orthax'``).
    rotate: ``'smaller'``, ``'fan_out'`` or ``'fan_in'`` (default: the
      reference's).
    scale: ``'muon'``, ``'rms_norm'``, ``'update_rms'``,
      ``'spectral_norm'``, ``'none'`` (default: the reference's).
    scale_rms: the 0.2 of ``rms_norm`` and ``update_rms``.
    stable: the exact-arithmetic result, computed stably (see above and
      :class:`orthax.matrix_stages.AroRotate`); ``False``: the reference's
      floating-point arithmetic, for comparison.
    weight_decay: λ for matrices (default: the mode's; 0.2 for ``'orthax'``,
      from the sweep (README), and dion's 0.01 for ``'dion'``).
    mu_dtype: momentum dtype (both branches; default float32 or wider).
    adam_learning_rate: AdamW learning rate (default: ``learning_rate``
      under ``scale='update_rms'`` and for ``'dion'``, else
      3e-3 at the default 0.08, in proportion to it; see
      :func:`orthax.recipes.resolve_adam_learning_rate`).
    adam_b1, adam_b2, adam_eps: AdamW moments and epsilon.
    adam_weight_decay: AdamW decay (default: λ for ``'dion'``, else 0).
    router: a :class:`orthax.Router` or a ``params -> labels`` callable.
    distributed: an :class:`orthax.sharding.Distributed`: each device works
      on whole matrices and keeps their rotations (never gathered).
    check_finite: skip a step whose gradient holds NaN/Inf, on device.

  Example:
    >>> import jax, jax.numpy as jnp, orthax
    >>> params = {'dense': {'kernel': jnp.ones((8, 4))}}
    >>> tx = orthax.aro(0.01)
    >>> state = tx.init(params)
    >>> grads = {'dense': {'kernel': jax.random.normal(jax.random.key(0),
    ...                                                (8, 4))}}
    >>> u, state = tx.update(grads, state, params)
    >>> u['dense']['kernel'].shape
    (8, 4)

  References: Gong, Zazo, Luo, Wang, Hensman, Ma, *ARO: Adaptively Rotated
  Optimization*, arXiv 2602.09006; microsoft/dion ``dev/aro``.
  """
  _validate.arguments('aro', aro, locals(), **aro_lib.OPTIONS)
  reference, learning_rate = registry.resolve_mode('aro', reference,
                                                   learning_rate)
  d = _ARO_REFERENCES[reference]
  rotate, scale, qr, weight_decay, nesterov = _common.mode_settings(
      d, rotate=rotate, scale=scale, qr=qr, weight_decay=weight_decay,
      nesterov=nesterov)
  _validate.applies('aro', 'scale_rms', scale_rms, 0.2,
                    scale in ('rms_norm', 'update_rms'),
                    "scale='rms_norm' or 'update_rms'")
  router, specs = _common.route(router, owner='aro')
  matrix = T.named_chain(
      ('momentum', T.momentum(beta, form='ema', nesterov=nesterov,
                              accumulator_dtype=mu_dtype)),
      ('aro_rotate', T.aro_rotate(base=base, qr=qr, rotate=rotate,
                                  scale=scale, scale_rms=scale_rms,
                                  stable=stable, matrix_specs=specs,
                                  distributed=distributed)),
      *_common.step_stages(learning_rate, weight_decay),
  )
  adam_weight_decay = _common.adam_weight_decay(adam_weight_decay, d,
                                                weight_decay)
  return _common.assemble_with_adamw(
      matrix, router, check_finite, learning_rate=learning_rate,
      adam_learning_rate=adam_learning_rate,
      rms_matched=scale == 'update_rms', matrix_weight_decay=weight_decay,
      recipe='aro', reference=reference,
      b1=adam_b1,
      b2=adam_b2,
      eps=adam_eps, weight_decay=adam_weight_decay, mu_dtype=mu_dtype)
