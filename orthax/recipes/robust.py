"""Clipping and robust recipes: SPECTRA, ROOT, AuON and Hybrid-AuON.

Specifications: ``shared/ALGORITHMS.md`` §5 (AuON), §6 (ROOT), §7 and §12
(SPECTRA).
"""

from __future__ import annotations

from typing import Any, Callable

import optax

from orthax import _validate
from orthax import matrix_stages as MS
from orthax import routing
from orthax import sharding
from orthax import transforms as T
from orthax.matrices import MatrixSpec
from orthax.polar import spectral as _spectral
from orthax.transforms import precision
from orthax.recipes import _common
from orthax.recipes import registry

# SPECTRA routes by the default rules, except that embedding tables and the
# LM head are matrices too (``apply_to='all'`` clips every 2-D parameter). A
# Flax/PyTorch embedding table is ``(vocab, dim)``: PyTorch rows are the
# vocabulary, so its fan-out is axis 0.
SPECTRA_RULES: tuple[routing.Rule, ...] = (
    routing.Rule(r'(^|/)([^/]*embed[^/]*|wte|wpe)(/|$)', 'matrix',
                 MatrixSpec.torch_linear(), ndims=(2,)),
    routing.Rule(r'(^|/)(lm_head|head|unembed[^/]*|logits)(/|$)', 'matrix',
                 ndims=(2,)),
)

_SPECTRA_REFERENCES = {
    'orthax': dict(steps=_spectral.DEFAULT_STEPS, step_rule='scaled',
                   shared_bound=False),
    'repo': dict(steps=_spectral.REFERENCE_STEPS, step_rule='plain',
                 shared_bound=True),
}


@registry.register(
    'spectra', references=tuple(_SPECTRA_REFERENCES), learning_rate=0.0085,
    mode_rates={'repo': registry.ModeRates(
        2e-3, None, 'mlolab/llm-spectral-clipping @ed9df11 160M scripts: '
        'AdamW lr')})
def spectra(
    learning_rate: optax.ScalarOrSchedule = None,
    *,
    reference: str = 'orthax',
    c: float = 10.0,
    base: optax.GradientTransformation | None = None,
    b1: float = 0.8,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    ns_steps: int | None = None,
    step_rule: str | None = None,
    shared_bound: bool | None = None,
    apply_to: str = 'all',
    warmup_steps: int = 0,
    base_learning_rate: float | None = None,
    clip_decay: str = 'constant',
    clip_decay_fraction: float = 0.1,
    clip_final_scale: float = 0.0,
    total_steps: int = 0,
    router: routing.Router | None = None,
    distributed: Any = None,
    check_finite: bool = True,
) -> optax.GradientTransformation:
  r"""SPECTRA: AdamW (or any ``base``) whose step direction is soft-clipped.

  ``named_chain(('base', adamw), ('spectral_clip', spectral_clip))``: the
  base step ``Δ = -η(U + λW)`` is recomposed as
  ``Δ' = -ηλW - η·α·H_c(U)`` (:func:`orthax.spectral_clip`), with
  ``H_c(X) = (I + XXᵀ/c²)^{-1/2}X`` on every matrix, the reference's vector
  rule on every other parameter (``apply_to='all'``, the reference's CLI
  default; ``'2d'`` leaves them to the base step) and
  ``α = sqrt(max(1, out/in))``.

  Routing differs from :func:`orthax.muon`: there is no AdamW branch — all
  parameters take the base step. Hidden matrices (incl. stacked ones) are
  seen through ``router`` (default: the default rules plus
  :data:`SPECTRA_RULES`, which make embedding tables and the LM head
  matrices); every non-matrix leaf is *one* vector (a stacked ``(L, d)``
  bias is one vector of ``L·d`` entries, where PyTorch would have ``L``).
  ``'frozen'`` labels are not honoured: the base step updates every leaf
  (wrap the recipe in ``optax.partition`` to freeze some).

  ==========  =====  ===========  ===============  ===========================
  reference   steps  step rule    λ_max bound      source
  ==========  =====  ===========  ===============  ===========================
  ``orthax``  12     scaled       per matrix       1e-6 accurate to σ/c = 1e3
  ``repo``    10     plain 3/2    shared per leaf  ``clip_sigvals`` @ ed9df11
  ==========  =====  ===========  ===============  ===========================

  The reference's 10 plain steps are inaccurate once ``σ_max/c`` is large
  (0.17 relative error at 600; see :mod:`orthax.polar.spectral`); its
  iteration runs in bf16 unless ``--ns_float32``, ours in float32 or wider.

  Args:
    learning_rate: η of the base optimizer (number or schedule); default:
      0.0085 (``'orthax'``, the sweep's best at d_model 128), 2e-3
      (``'repo'``, its 160M scripts').
    reference: ``'orthax'`` (default) or ``'repo'`` (see the table).
    c: clipping threshold (reference default 10; its 160M scripts use 5).
    base: any optax optimizer with decoupled weight decay, built with the
      same ``learning_rate`` and ``weight_decay`` (default:
      ``adamw(learning_rate, b1, b2, eps, weight_decay)``, the 160M scripts'
      β = (0.8, 0.999), λ = 0.1; kept scale-safe,
      :func:`orthax.transforms.adamw` with ``scale_safe=True``: ``√v``
      kept per entry by ``hypot``, optax's result to float32 rounding,
      and no overflow of ``g²``).
    b1, b2, eps: the default AdamW base's moments and epsilon.
    weight_decay: λ of the base optimizer.
    ns_steps, step_rule, shared_bound: override the reference's clip settings.
    apply_to: ``'all'`` (reference CLI default) or ``'2d'``.
    warmup_steps: the threshold schedule
      (:func:`orthax.transforms.clip_threshold`), with
      ``base_learning_rate``, ``clip_decay``, ``clip_decay_fraction``,
      ``clip_final_scale`` and ``total_steps`` (the 780M runs decay c to 0
      with ``clip_decay='sqrt'``).
    router: a :class:`orthax.Router` giving the matrix views.
    check_finite: skip a step whose gradient holds NaN/Inf, on device
      (update zero, state kept; :func:`orthax.skip_if_nonfinite`), and
      flag its leaves in the state (:func:`orthax.nonfinite_leaves`).

  ``distributed=orthax.sharding.Distributed(...)`` runs the soft clip on
  whole matrices per device (see :func:`orthax.spectral_clip`; needs
  ``shared_bound=False``, the ``'orthax'`` reference's default).

  References: Jiang, Semenov, Stich, *Enhancing LLM Training via Spectral
  Clipping*, arXiv 2603.14315 (ICML 2026); github.com/mlolab/llm-spectral-clipping.
  """
  _validate.arguments('spectra', spectra, locals())
  reference, learning_rate = registry.resolve_mode('spectra', reference,
                                                   learning_rate)
  d = _SPECTRA_REFERENCES[reference]
  router, specs = _common.route(
      router, routing.Router(extra_rules=SPECTRA_RULES))
  if base is None:
    base = T.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                   weight_decay=weight_decay, scale_safe=True)
  clip = T.spectral_clip(
      c, learning_rate=learning_rate, weight_decay=weight_decay,
      steps=d['steps'] if ns_steps is None else ns_steps,
      step_rule=d['step_rule'] if step_rule is None else step_rule,
      shared_bound=d['shared_bound'] if shared_bound is None else shared_bound,
      apply_to=apply_to, warmup_steps=warmup_steps,
      base_learning_rate=base_learning_rate, decay=clip_decay,
      decay_fraction=clip_decay_fraction, final_scale=clip_final_scale,
      total_steps=total_steps, matrix_specs=specs,
      distributed=distributed)
  # In float32 for float16/bfloat16 parameters: the base step reaches the
  # clip unrounded (the clip recovers its direction as -Δ/η - λW).
  tx = precision.in_float32(
      optax.named_chain(('base', base), ('spectral_clip', clip)))
  # No AdamW branch and no partition: the chain itself follows the check.
  # Every leaf takes the base AdamW step at `learning_rate`; the matrices'
  # are then clipped.
  return _common.with_routing(
      _common.with_shape_check(_common.with_check_finite(tx, check_finite)),
      router, {'matrix': learning_rate, 'adam': learning_rate})


@registry.register(
    'root', references=('orthax', 'repo'), learning_rate=0.014,
    adam_learning_rate=3e-3, mode_rates={'repo': registry.ModeRates(
        1e-3, 1e-3, 'huawei-noah/noah-research @a99fb00 ROOT/examples/'
        'example_train.py: one lr for ROOT and AdamW')})
def root(
    learning_rate: optax.ScalarOrSchedule = None,
    *,
    reference: str = 'orthax',
    beta: float = 0.95,
    nesterov: bool = True,
    quantile: float = 0.9,
    quantile_eps: float = 1e-9,
    coeffs_for_shape: Any = 'root',
    ns_steps: int | None = None,
    ns_dtype: Any = None,
    mu_dtype: Any = None,
    weight_decay: float = 0.1,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-8,
    router: routing.Router | Callable[[Any], Any] | None = None,
    distributed: Any = None,
    check_finite: bool = True,
) -> optax.GradientTransformation:
  r"""ROOT: Muon with outlier clipping and per-shape Newton–Schulz rows.

  For each routed matrix (``reference='orthax'``, the default, and
  ``'repo'``, the toy script at a99fb00):

  .. math::
     M_t &= μM_{t-1} + G_t,\qquad u = G_t + μM_t \\
     B &= \mathrm{clip}(u, -ε, ε),\quad ε = \mathrm{quantile}_{0.9}(|u|) + 10^{-9} \\
     O &= \mathrm{NS}^{(m,n)}_5\big(B/(\|B\|_F + 10^{-7})\big) \\
     W &\leftarrow W(1 - ηλ) - η\,0.2\sqrt{\max(m, n)}\;O

  (:func:`orthax.clip_outliers`, then :func:`orthax.orthogonalize` with
  ``coeffs_for_shape='root'``: ROOT's AdaNewton row for its four published
  shapes, Keller's row otherwise). Other parameters: AdamW as in Moonlight
  (same η and λ, betas (0.9, 0.95), ε = 1e-8 added before bias correction).
  The toy code iterates in the input dtype (two other copies cast to bf16
  with ε = 1e-8; pass ``ns_dtype=jnp.bfloat16`` for that).

  The two modes differ only in their default learning rate:
  ``'orthax'`` runs at 0.014, the sweep's best at d_model 256 (README), and
  ``'repo'`` at the toy script's 1e-3; the AdamW branch takes the same rate
  unless ``adam_learning_rate`` is given (the trainer's default is 3e-3).

  ``distributed=orthax.sharding.Distributed(...)`` runs the Newton–Schulz
  stage on whole matrices per device (the outlier quantile is computed on
  the parameter-sharded momentum, exact, under GSPMD).

  References: He et al., *ROOT: Robust Orthogonalized Optimizer*, arXiv
  2511.20626; github.com/huawei-noah/noah-research (ROOT/).
  """
  _validate.arguments('root', root, locals())
  reference, learning_rate = registry.resolve_mode('root', reference,
                                                   learning_rate)
  router, specs = _common.route(router)
  matrix = optax.named_chain(
      ('momentum', T.momentum(beta, form='sum', nesterov=nesterov,
                              accumulator_dtype=mu_dtype)),
      ('clip_outliers', T.clip_outliers(quantile, eps=quantile_eps,
                                        matrix_specs=specs)),
      ('orthogonalize', T.orthogonalize(
          'jordan', steps=ns_steps, ns_dtype=ns_dtype, matrix_specs=specs,
          coeffs_for_shape=coeffs_for_shape, distributed=distributed,
          then=[MS.ScaleByShape('moonlight')])),
      *_common.step_stages(learning_rate, weight_decay),
  )
  return _common.assemble_with_adamw(
      matrix, router, check_finite, learning_rate=learning_rate,
      adam_learning_rate=adam_learning_rate, rms_matched=True,
      recipe='root', reference=reference,
      b1=adam_b1, b2=adam_b2, eps=adam_eps, weight_decay=weight_decay,
      eps_placement='raw',
      mu_dtype=mu_dtype)


# Paper formula, with the original (Oct 2025) code's Keller scale.
_AUON_PAPER = dict(gamma=1.0, normalize=True, brake_input='normalized',
                   scale='keller', hybrid_steps=1, hybrid_brake='raw')
# The rates the references' training code pairs: AuON (or Hybrid-AuON)
# with AdamW at a tenth of its rate (0.24 with 0.024 at c87b862; 0.08 with
# 0.008 in bba2e82's training config, whose optimizer classes default to
# 0.24 without an AdamW branch).
_AUON_RATES = {
    'paper': registry.ModeRates(
        0.24, 0.024, 'ryyzn9/AuON @c87b862 Auon_Adam_train.py: auon_lr, '
        'AdamW at auon_lr·0.1'),
    'repo': registry.ModeRates(
        0.08, 0.008, 'ryyzn9/AuON @bba2e82 training/config.py: auon_lr, '
        'adam_lr'),
}
# ryyzn9/AuON auon/optimizer.py @ bba2e82 (Jan 2026).
_AUON_REPO = dict(gamma=1.5, normalize=False, brake_input='normalized',
                  scale='none', hybrid_steps=5, hybrid_brake='normalized')
_AUON_REFERENCES = {
    'orthax': _AUON_PAPER,  # the paper's formula at the sweep's rates
    'paper': _AUON_PAPER,
    'repo': _AUON_REPO,
}
# Hybrid-AuON's library mode is the repository's current code (five
# Newton–Schulz steps before the brake): the paper's one step ended 0.19–
# 0.24 nats higher at its best rate (docs/training.md).
_HYBRID_REFERENCES = {**_AUON_REFERENCES, 'orthax': _AUON_REPO}


def _no_matrix_function(distributed):
  """AuON has no matrix function to distribute: every stage is elementwise
  or a per-matrix norm, exact on parameter-sharded arrays under GSPMD. The
  argument is accepted (and checked) so configs can switch recipes."""
  if distributed is not None and not isinstance(distributed,
                                                sharding.Distributed):
    raise ValueError('auon: distributed must be an orthax.sharding.'
                     f'Distributed or None, got {type(distributed).__name__}.')
  return None


def _auon(hybrid, learning_rate, reference, beta, gamma, ns_steps, ns_dtype,
          mu_dtype, weight_decay, adam_learning_rate, adam_b1, adam_b2,
          adam_eps, router, check_finite, distributed):
  name = 'hybrid_auon' if hybrid else 'auon'
  reference, learning_rate = registry.resolve_mode(name, reference,
                                                   learning_rate)
  d = (_HYBRID_REFERENCES if hybrid else _AUON_REFERENCES)[reference]
  router, specs = _common.route(router)
  gamma = d['gamma'] if gamma is None else gamma
  stages = [('momentum', T.momentum(beta, form='ema', nesterov=True,
                                    accumulator_dtype=mu_dtype))]
  if hybrid:
    # The brake and the scale need whole matrices: they run in the
    # orthogonalize pass (on a mesh, in the same body).
    stages.append(('orthogonalize', T.orthogonalize(
        'jordan', steps=d['hybrid_steps'] if ns_steps is None else ns_steps,
        ns_dtype=ns_dtype, matrix_specs=specs, distributed=distributed,
        then=[MS.CoshNormalize(gamma, normalize=False,
                               brake_input=d['hybrid_brake']),
              MS.ScaleByShape(d['scale'])])))
  else:
    stages += [
        ('cosh_normalize', T.cosh_normalize(
            gamma, normalize=d['normalize'], brake_input=d['brake_input'],
            matrix_specs=specs)),
        ('scale_by_shape', T.scale_by_shape(d['scale'], matrix_specs=specs)),
    ]
  stages += _common.step_stages(learning_rate, weight_decay)
  return _common.assemble_with_adamw(
      optax.named_chain(*stages), router, check_finite,
      learning_rate=learning_rate, adam_learning_rate=adam_learning_rate,
      rms_matched=False, recipe=name, reference=reference,
      b1=adam_b1, b2=adam_b2, eps=adam_eps, weight_decay=0.0,
      eps_placement='corrected', mu_dtype=mu_dtype)


@registry.register('auon', references=tuple(_AUON_REFERENCES),
                   learning_rate=0.08, adam_learning_rate=3e-3,
                   mode_rates=_AUON_RATES)
def auon(
    learning_rate: optax.ScalarOrSchedule = None,
    *,
    reference: str = 'orthax',
    beta: float = 0.95,
    gamma: float | None = None,
    mu_dtype: Any = None,
    weight_decay: float = 0.0,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-8,
    router: routing.Router | Callable[[Any], Any] | None = None,
    distributed: Any = None,
    check_finite: bool = True,
) -> optax.GradientTransformation:
  r"""AuON: momentum divided by its cosh-RMS — linear time, no SVD or NS.

  EMA + Nesterov momentum (β = 0.95), then per matrix
  (:func:`orthax.cosh_normalize`):

  * ``reference='orthax'`` (default) and ``'paper'`` (arXiv 2509.24320;
    original code c87b862): ``X = u/(‖u‖_F + 1e-7)``,
    ``r = ‖cosh X‖_F/\sqrt N``,
    ``W ← W(1-ηλ) - η\sqrt{\max(1, out/in)}·X/(r + 1e-8)`` (λ 0);
  * ``reference='repo'`` (``auon/optimizer.py`` @ bba2e82):
    ``r = \sqrt{mean\,cosh(1.5·u/(‖u‖_F + 1e-7))²}``,
    ``W ← W(1-ηλ) - η·u/(r + 1e-8)`` — the *raw* momentum, no shape scale.

  ``'orthax'`` runs at 0.08 with the AdamW branch at 3e-3, the sweep's
  rates (README); ``'paper'`` and ``'repo'`` at the rates their training
  code pairs: 0.24 with AdamW at 0.024 (the original script), 0.08 with
  Adam at 0.008 (the Jan 2026 training config; its ``AuON`` class defaults
  to 0.24).

  Non-matrix parameters take AdamW (β = (0.9, 0.95), ε = 1e-8, no decay; the
  original code's AuON+Adam split). The Jan 2026 code applies the brake to
  vectors too; that is not reproduced. For realistic sizes ``r ≈ 1``
  (``r - 1 ≈ γ²/2N``): the paper form is Frobenius-normalized momentum SGD.

  ``distributed`` is accepted so configs can switch recipes; AuON has no
  matrix function, so nothing is distributed (its norms are exact on the
  parameter-sharded arrays).

  References: D. Maity, arXiv 2509.24320; github.com/ryyzn9/AuON.
  """
  _validate.arguments('auon', auon, locals())
  return _auon(False, learning_rate, reference, beta, gamma, None, None,
               mu_dtype, weight_decay, adam_learning_rate, adam_b1, adam_b2,
               adam_eps, router, check_finite, _no_matrix_function(distributed))


@registry.register('hybrid_auon', references=tuple(_HYBRID_REFERENCES),
                   learning_rate=0.04, adam_learning_rate=3e-3,
                   mode_rates={'repo': _AUON_RATES['repo']})
def hybrid_auon(
    learning_rate: optax.ScalarOrSchedule = None,
    *,
    reference: str = 'orthax',
    beta: float = 0.95,
    gamma: float | None = None,
    ns_steps: int | None = None,
    ns_dtype: Any = None,
    mu_dtype: Any = None,
    weight_decay: float = 0.0,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-8,
    router: routing.Router | Callable[[Any], Any] | None = None,
    distributed: Any = None,
    check_finite: bool = True,
) -> optax.GradientTransformation:
  r"""Hybrid-AuON: a few Newton–Schulz steps, then AuON's cosh brake.

  * ``reference='paper'``: **one** Keller quintic step on
    ``X = u/(‖u‖_F + 1e-7)``, ``O = aX + (bA + cA²)X``, then
    ``O/(‖\cosh O‖_F/\sqrt N + 1e-8)`` and the Keller shape scale (the
    paper's hybrid paragraph writes the RMS without the square root, which
    contradicts its main text; we use the main text's RMS);
  * ``reference='orthax'`` (default) and ``'repo'`` (``HybridAuON`` @
    bba2e82): ``ns_steps = 5`` Keller steps, then ``O/(r + 1e-8)`` with
    ``r = \sqrt{mean\,cosh(1.5·O/(‖O‖_F + 1e-7))²}``, no shape scale.

  Non-matrix parameters take AdamW, as in :func:`auon`. ``'orthax'`` runs
  the repository's current arithmetic at the sweep's rates, 0.04 with the
  AdamW branch at 3e-3: the paper's one step, best at 0.04 too, ended 0.24
  / 0.19 nats higher on the embedded corpus (1.7725 / 1.6855 against 1.5323
  / 1.4911 at d_model 128 / 256, two seeds; docs/training.md). ``'paper'``
  publishes no rate for the hybrid and runs at 0.04 / 3e-3; ``'repo'`` at
  the Jan 2026 training config's 0.08 with Adam at 0.008 (the class
  defaults to 0.24). For realistic sizes the brake is ≈ 1, so the default
  is close to :func:`muon` without its shape scale; the paper's one step is
  the cheaper form (0.28–0.30× Muon's time on CPU).
  ``distributed=orthax.sharding.Distributed(...)`` runs the Newton–Schulz
  steps on whole matrices per device.
  """
  _validate.arguments('hybrid_auon', hybrid_auon, locals())
  return _auon(True, learning_rate, reference, beta, gamma, ns_steps,
               ns_dtype, mu_dtype, weight_decay, adam_learning_rate, adam_b1,
               adam_b2, adam_eps, router, check_finite, distributed)
