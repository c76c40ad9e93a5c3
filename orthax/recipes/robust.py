"""Clipping and robust recipes: SPECTRA and ROOT (AuON and Hybrid-AuON are
in :mod:`orthax.recipes.auon`).

References: :mod:`orthax.transforms.clip_outliers` (ROOT) and
:mod:`orthax.transforms.spectral_clip` (SPECTRA) name the papers and code.
"""

from __future__ import annotations

from typing import Any, Callable

import optax

from orthax import _tree
from orthax import _validate
from orthax import matrix_stages as MS
from orthax import routing
from orthax import transforms as T
from orthax.matrices import MatrixSpec
from orthax.polar import spectral as _spectral
from orthax.transforms import precision
from orthax.transforms.clip_schedule import check_decay
from orthax.transforms.clip_schedule import check_warmup
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

# The threshold c per mode: 2 for the library default (the sweep's, README),
# the reference's CLI default 10 for 'repo'.
_SPECTRA_REFERENCES = {
    'orthax': dict(ns_steps=_spectral.DEFAULT_STEPS, step_rule='scaled',
                   shared_bound=False, c=2.0, nesterov=True),
    'repo': dict(ns_steps=_spectral.REFERENCE_STEPS, step_rule='plain',
                 shared_bound=True, c=10.0, nesterov=False),
}


@registry.register(
    'spectra', references=tuple(_SPECTRA_REFERENCES), learning_rate=0.0424,
    mode_rates={'repo': registry.ModeRates(
        2e-3, None, 'mlolab/llm-spectral-clipping @ed9df11 160M scripts: '
        'AdamW lr')})
def spectra(
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    reference: str = 'orthax',
    c: float | None = None,
    base: optax.GradientTransformation | None = None,
    b1: float = 0.8,
    b2: float = 0.999,
    eps: float = 1e-8,
    nesterov: bool | None = None,
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
  r"""SPECTRA: (N)AdamW (or any ``base``) whose step direction is
  soft-clipped.

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
  A leaf labelled ``'frozen'`` gets a zero step and its gradient is not
  read (the base step keeps moments for it, of zeros: wrap the recipe in
  ``optax.partition`` to spare them).

  ==========  ===  =====  ===========  ===============  ========  =======================
  reference   c    steps  step rule    λ_max bound      base      source
  ==========  ===  =====  ===========  ===============  ========  =======================
  ``orthax``  2    12     scaled       per matrix       NAdamW    1e-6 accurate to σ/c = 1e3
  ``repo``    10   10     plain 3/2    shared per leaf  AdamW     ``clip_sigvals`` @ed9df11
  ==========  ===  =====  ===========  ===============  ========  =======================

  At ``c = 2`` the clip caps most singular values of Adam's step (an m×n
  step whose entries have RMS r has singular values near r·√max(m, n)), so
  the library mode's step is close to an orthogonalized Adam step; on the
  sweep's model it trained best there (docs/training.md). Its base takes
  Nesterov's look-ahead in the first moment (optax's ``nesterov``, Dozat's
  NAdam), as Muon's momentum does; the reference's is AdamW.

  The reference's 10 plain steps are inaccurate once ``σ_max/c`` is large
  (0.17 relative error at 600; see :mod:`orthax.polar.spectral`); its
  iteration runs in bf16 unless ``--ns_float32``, ours in float32 or wider.

  Args:
    learning_rate: η of the base optimizer (number or schedule); default:
      0.0424 (``'orthax'``, from the sweep at d_model 128 and 256, README),
      2e-3 (``'repo'``, its 160M scripts').
    reference: ``'orthax'`` (default) or ``'repo'`` (see the table).
    c: clipping threshold (default: the mode's; 2 for ``'orthax'``, from
      the sweep, and the reference's 10 for ``'repo'``; its 160M scripts
      use 5).
    base: any optax optimizer with decoupled weight decay, built with the
      same ``learning_rate`` and ``weight_decay`` (default:
      ``adamw(learning_rate, b1, b2, eps, weight_decay, nesterov)``, the
      160M scripts' β = (0.8, 0.999), λ = 0.1, NAdamW under ``'orthax'``;
      kept scale-safe,
      :func:`orthax.transforms.adamw` with ``scale_safe=True``: ``√v``
      kept per entry by ``hypot``, optax's result to float32 rounding,
      and no overflow of ``g²``).
    b1, b2, eps: the default AdamW base's moments and epsilon.
    nesterov: the default base's Nesterov first moment (default: the
      mode's; ``True`` for ``'orthax'``, ``False`` for ``'repo'``).
    weight_decay: λ of the base optimizer.
    ns_steps, step_rule, shared_bound: override the reference's clip settings.
    apply_to: ``'all'`` (reference CLI default) or ``'2d'``.
    warmup_steps: steps of the threshold's warm-up, ``c_t =
      c·η_base/η_t`` so that ``c_t·η_t`` stays constant (default 0: none;
      :func:`orthax.transforms.clip_threshold`); with a schedule
      ``learning_rate`` or a ``base_learning_rate`` only (at a constant
      rate, or one passed by ``optax.inject_hyperparams``, ``c`` would stay
      unchanged: refused).
    base_learning_rate: ``η_base`` of the warm-up (default: the schedule's
      value at ``warmup_steps``; required with a constant rate or under
      ``optax.inject_hyperparams``); only with ``warmup_steps > 0``.
    clip_decay: the threshold's decay to ``c·clip_final_scale`` over the
      run's last steps: ``'constant'`` (default: none), ``'linear'``,
      ``'sqrt'``, ``'cosine'``, ``'exp'`` or ``'square'`` (the 780M runs
      decay c to 0 with ``'sqrt'``).
    clip_decay_fraction: the fraction of ``total_steps`` the decay takes
      (default 0.1).
    clip_final_scale: the threshold at the end of the decay, as a fraction
      of ``c`` (default 0).
    total_steps: the run's length; needed by a ``clip_decay`` other than
      ``'constant'`` (``clip_decay_fraction``, ``clip_final_scale`` and
      ``total_steps`` are refused without one).
    router: a :class:`orthax.Router` giving the matrix views.
    distributed: an :class:`orthax.sharding.Distributed` to run the soft
      clip on whole matrices per device (:func:`orthax.spectral_clip`);
      needs ``shared_bound=False``, the ``'orthax'`` reference's default.
    check_finite: skip a step whose gradient holds NaN/Inf, on device
      (update zero, state kept; :func:`orthax.skip_if_nonfinite`), and
      flag its leaves in the state (:func:`orthax.nonfinite_leaves`).

  Example:
    >>> import jax, jax.numpy as jnp, orthax
    >>> params = {'w': jnp.zeros((8, 16)), 'b': jnp.zeros(16)}
    >>> tx = orthax.spectra()          # η = 0.0424, c = 2
    >>> state = tx.init(params)
    >>> grads = {'w': jax.random.normal(jax.random.key(0), (8, 16)),
    ...          'b': jnp.ones(16)}
    >>> updates, state = tx.update(grads, state, params)
    >>> # every singular value of the step is below η·α·c, α = √(16/8)
    >>> bool(jnp.linalg.norm(updates['w'], 2) < 0.0424 * 2**0.5 * 2)
    True

  References: Jiang, Semenov, Stich, *Enhancing LLM Training via Spectral
  Clipping*, arXiv 2603.14315 (ICML 2026); github.com/mlolab/llm-spectral-clipping.
  """
  _validate.arguments('spectra', spectra, locals())
  check_decay('spectra', clip_decay, clip_decay_fraction, clip_final_scale,
              total_steps, prefix='clip_')
  _validate.transformation('spectra', 'base', base, optional=True)
  reference, learning_rate = registry.resolve_mode('spectra', reference,
                                                   learning_rate)
  check_warmup('spectra', learning_rate, warmup_steps, base_learning_rate)
  d = _SPECTRA_REFERENCES[reference]
  c, nesterov, ns_steps, step_rule, shared_bound = _common.mode_settings(
      d, c=c, nesterov=nesterov, ns_steps=ns_steps, step_rule=step_rule,
      shared_bound=shared_bound)
  router, specs = _common.route(
      router, routing.Router(extra_rules=SPECTRA_RULES), owner='spectra')
  if not isinstance(router, routing.Router):
    specs = _clipped_by_label(router)
  if base is None:
    base = T.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                   weight_decay=weight_decay, scale_safe=True,
                   nesterov=nesterov)
  clip = T.spectral_clip(
      c, learning_rate=learning_rate, weight_decay=weight_decay,
      steps=ns_steps, step_rule=step_rule, shared_bound=shared_bound,
      apply_to=apply_to, warmup_steps=warmup_steps,
      base_learning_rate=base_learning_rate, decay=clip_decay,
      decay_fraction=clip_decay_fraction, final_scale=clip_final_scale,
      total_steps=total_steps, matrix_specs=specs,
      distributed=distributed)
  # In float32 for float16/bfloat16 parameters: the base step reaches the
  # clip unrounded (the clip recovers its direction as -Δ/η - λW).
  tx = precision.in_float32(
      T.named_chain(('base', base), ('spectral_clip', clip)))
  # No AdamW branch and no partition: the chain itself follows the check.
  # Every leaf takes the base AdamW step at `learning_rate`; the matrices'
  # are then clipped, and the frozen leaves' steps zeroed.
  return _common.with_routing(
      _common.with_trainable_check(_common.with_shape_check(
          _common.with_check_finite(_common.with_frozen_zeroed(tx, router),
                                    check_finite, router)), router),
      router, {'matrix': learning_rate, 'adam': learning_rate, 'frozen': 0.0},
      {'matrix': weight_decay, 'adam': weight_decay, 'frozen': 0.0})


def _clipped_by_label(labels: Callable[[Any], Any]) -> Callable[[Any], Any]:
  """SPECTRA's matrix views from a labels callable: the default view where
  a leaf is labelled ``'matrix'``, none where ``'adam'`` or ``'frozen'``
  (no matrix clip: the vector clip under ``apply_to='all'``, as for a
  :class:`orthax.Router`'s ``'adam'`` leaves). Without it every 2-D leaf was clipped
  whatever its label, and a mistyped label passed; it is refused naming
  the leaf, as ``optax.partition`` refuses it in the recipes with
  branches."""

  def specs(tree):
    paths, _, treedef = _tree.leaves_with_paths(tree)
    per_leaf = treedef.flatten_up_to(labels(tree))
    for path, label in zip(paths, per_leaf):
      if label not in ('matrix', 'adam', 'frozen'):
        raise ValueError(f"spectra: the router labels {path!r} {label!r}; "
                         "the labels are 'matrix', 'adam' and 'frozen'.")
    return treedef.unflatten([MatrixSpec() if label == 'matrix'
                              else None for label in per_leaf])

  return specs


# What each reference fixes (None takes it from here): Muon's shape scale
# and λ 0.2 for the library default (the sweep's, docs/training.md), the toy
# script's Moonlight scale and λ 0.1 for the repository's mode.
_ROOT_REFERENCES = {'orthax': dict(weight_decay=0.2, scale='keller'),
                    'repo': dict(weight_decay=0.1, scale='moonlight')}


@registry.register(
    'root', references=tuple(_ROOT_REFERENCES), learning_rate=0.05656,
    adam_learning_rate=3e-3, mode_rates={'repo': registry.ModeRates(
        1e-3, 1e-3, 'huawei-noah/noah-research @a99fb00 ROOT/examples/'
        'example_train.py: one lr for ROOT and AdamW')})
def root(
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    reference: str = 'orthax',
    beta: float = 0.95,
    nesterov: bool = True,
    quantile: float = 0.9,
    quantile_eps: float = 1e-9,
    coeffs_for_shape: Any = 'root',
    scale: str | None = None,
    ns_steps: int | None = None,
    ns_dtype: Any = None,
    mu_dtype: Any = None,
    weight_decay: float | None = None,
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
     W &\leftarrow W(1 - ηλ) - η\,s\;O

  (:func:`orthax.orthogonalize` with the clip,
  :class:`~orthax.matrix_stages.ClipOutliers`, as its ``before=`` stage
  and ``coeffs_for_shape='root'``: ROOT's AdaNewton row for its four published
  shapes, Keller's row otherwise), with the shape scale ``s`` of ``scale``
  (:func:`orthax.scale_by_shape`). Other parameters: AdamW (betas (0.9,
  0.95), ε = 1e-8 added before bias correction, the matrices' λ). The toy
  code iterates in the input dtype (two other copies cast to bf16 with
  ε = 1e-8; pass ``ns_dtype=jnp.bfloat16`` for that).

  The modes differ in their defaults for η, λ and ``s``. ``'repo'`` runs
  the toy script's Moonlight scale ``s = 0.2√max(m, n)`` at its 1e-3 with
  λ = 0.1, one rate for both branches (an RMS-matched step). ``'orthax'``
  takes Muon's ``s = √max(1, n_out/n_in)`` at 0.05656 with λ = 0.2 and its
  AdamW branch at 3e-3, from the sweep
  (docs/training.md): under the Moonlight scale the best rate fell with
  the width, and ROOT needed 0.61× AdamW's steps at d 128; with Muon's
  scale and λ 0.2 it needs 0.55× / 0.54× (d_model 128 / 256). ``scale=``,
  ``weight_decay=`` and ``adam_learning_rate=`` override the mode's
  (``scale='moonlight'`` shares the rate with the AdamW branch unless
  ``adam_learning_rate`` is given, and so does any scale under ``'repo'``,
  whose rates are 1:1).

  ``distributed=orthax.sharding.Distributed(...)`` runs the clip and
  Newton–Schulz on whole matrices per device, in one body: the quantile of
  each matrix is taken where it is whole, after the all-to-all in, and
  nothing is gathered. So a matrix is never split in column blocks: a
  ``gram`` strategy is refused, naming the leaf, and ``auto`` runs a
  matrix over ``max_local_matrix_bytes`` as ``a2a``.

  Args:
    learning_rate: η for the matrices (number or schedule); default: the
      mode's, 0.05656 (``'orthax'``, the sweep's) or 1e-3 (``'repo'``).
    reference: ``'orthax'`` (default) or ``'repo'`` (above).
    beta: momentum μ (summed: ``M ← μM + G``).
    nesterov: Nesterov look-ahead ``u = G + μM`` (default on; else
      ``u = M``).
    quantile: the quantile ``q`` of ``|u|``, per matrix, at which the
      clip's ``ε`` is taken.
    quantile_eps: added to that quantile (the ``10^{-9}`` above).
    coeffs_for_shape: per-shape Newton–Schulz coefficients: ``'root'``
      (default; ROOT's AdaNewton rows, :data:`orthax.polar.ROOT_TABLE`), a
      mapping ``(min(m, n), max(m, n)) -> rows`` or ``None`` (Keller's
      everywhere); see :func:`orthax.orthogonalize`.
    scale: the shape scale ``s``: ``'keller'``, ``'moonlight'``,
      ``'spectral'``, ``'inverse_side'`` or ``'none'``
      (:func:`orthax.scale_by_shape`); default: the mode's, ``'keller'``
      (``'orthax'``) or ``'moonlight'`` (``'repo'``).
    ns_steps: Newton–Schulz steps (default: the ``'jordan'`` preset's, 5).
    ns_dtype: dtype of the Newton–Schulz iteration (e.g. ``jnp.bfloat16``).
    mu_dtype: momentum accumulator dtype (both branches; default float32,
      or the parameters' dtype if wider: every branch computes in float32
      and rounds the update to the gradients' dtype once).
    weight_decay: decoupled λ of the matrices and of the AdamW branch
      (``W ← W(1-ηλ)``); default: the mode's, 0.2 (``'orthax'``) or 0.1
      (``'repo'``).
    adam_learning_rate: AdamW learning rate (default: ``learning_rate``
      under ``scale='moonlight'`` or ``reference='repo'``; else
      ``0.053·learning_rate``, 3e-3 at 0.05656; see
      :func:`orthax.recipes.resolve_adam_learning_rate`).
    adam_b1, adam_b2, adam_eps: AdamW moments and epsilon (ε added to
      ``sqrt(v)`` before bias correction).
    router: a :class:`orthax.Router` or a ``params -> labels`` callable;
      default: ``Router()``.
    distributed: an :class:`orthax.sharding.Distributed` to run the clip
      and Newton–Schulz on whole matrices per device over a mesh (above).
    check_finite: skip a step whose gradient holds NaN/Inf, on device
      (update zero, state kept; :func:`orthax.skip_if_nonfinite`), and
      flag its leaves in the state (:func:`orthax.nonfinite_leaves`).

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> params = {'w': jnp.zeros((8, 8)), 'b': jnp.zeros(8)}
    >>> _ = orthax.describe(params, optimizer=orthax.root(reference='repo'))
    path  shape   label   view       lr     wd
    ----  ------  ------  ---------  -----  ---
    b     (8,)    adam               0.001  0.1
    w     (8, 8)  matrix  1 x 8 x 8  0.001  0.1

  References: He et al., *ROOT: Robust Orthogonalized Optimizer*, arXiv
  2511.20626; github.com/huawei-noah/noah-research (ROOT/).
  """
  _validate.arguments('root', root, locals())
  reference, learning_rate = registry.resolve_mode('root', reference,
                                                   learning_rate)
  d = _ROOT_REFERENCES[reference]
  weight_decay, scale = _common.mode_settings(d, weight_decay=weight_decay,
                                              scale=scale)
  MS.check_scale_mode(scale, 'root: scale')
  router, specs = _common.route(router, owner='root')
  matrix = T.named_chain(
      ('momentum', T.momentum(beta, form='sum', nesterov=nesterov,
                              accumulator_dtype=mu_dtype)),
      ('orthogonalize', T.orthogonalize(
          'jordan', steps=ns_steps, ns_dtype=ns_dtype, matrix_specs=specs,
          coeffs_for_shape=coeffs_for_shape, distributed=distributed,
          before=[MS.ClipOutliers(quantile, quantile_eps)],
          then=[MS.ScaleByShape(scale)])),
      *_common.step_stages(learning_rate, weight_decay),
  )
  return _common.assemble_with_adamw(
      matrix, router, check_finite, learning_rate=learning_rate,
      adam_learning_rate=adam_learning_rate, rms_matched=scale == 'moonlight',
      matrix_weight_decay=weight_decay, recipe='root', reference=reference,
      b1=adam_b1, b2=adam_b2, eps=adam_eps, weight_decay=weight_decay,
      eps_placement='raw',
      mu_dtype=mu_dtype)
