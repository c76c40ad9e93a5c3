"""Adaptive orthogonalized recipes: NorMuon and LANTON (NAMO and NAMO-D:
:mod:`orthax.recipes.namo`)."""

from __future__ import annotations

from typing import Any, Callable

import optax

from orthax import _validate
from orthax import matrix_stages as MS
from orthax import routing
from orthax import transforms as T
from orthax.recipes import _common
from orthax.recipes import registry
from orthax.recipes import signum_group
from orthax.transforms.lanton import OPTIONS as LANTON_OPTIONS

_NORMUON_REPO = dict(nesterov=True, preset='jordan', beta2=0.95,
                     axis='fan_out', eps_placement='add', restore_norm=True,
                     weight_decay=0.0)
_NORMUON_REFERENCES = {
    # The repo's arithmetic at the sweep's rates and decay.
    'orthax': dict(_NORMUON_REPO, weight_decay=0.2),
    'repo': _NORMUON_REPO,
    'paper': dict(nesterov=False, preset='jordan', beta2=0.95, axis='fan_out',
                  eps_placement='add', restore_norm=False, weight_decay=0.0),
    'modded': dict(nesterov=True, preset='polar_express', beta2=0.9,
                   axis='longer', eps_placement='clamp', restore_norm=True,
                   weight_decay=0.0),
}


@registry.register(
    'normuon', references=tuple(_NORMUON_REFERENCES), learning_rate=0.05656,
    adam_learning_rate=3e-3, mode_rates={
        'repo': registry.ModeRates(
            0.02, 3e-4, 'zichongli5/NorMuon @d45c9a4 normuon.py: NorMuon lr, '
            'auxiliary Adam lr (KellerJordan\'s)'),
        # No published default (optax.contrib.normuon requires one). One
        # rate for both branches, as the RMS-0.2 step is AdamW's size; on
        # the embedded corpus (d_model 128, seed 0) 0.012 ended at 1.579,
        # 0.024 at 1.585, AdamW's own 3e-3 at 1.920.
        'paper': registry.ModeRates(
            0.012, 0.012, 'none published; measured on the embedded corpus '
            '(d_model 128): one rate for its RMS-0.2 step and AdamW'),
        'modded': registry.ModeRates(
            0.023, 0.008, 'modded-nanogpt train_gpt.py @f411b3d: NorMuon '
            'lr, Adam group lr')})
def normuon(
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    reference: str = 'orthax',
    beta: float = 0.95,
    beta2: float | None = None,
    eps: float = 1e-10,
    preset: str | None = None,
    ns_steps: int | None = None,
    ns_dtype: Any = None,
    ns_method: str = 'auto',
    scale_rms: float = 0.2,
    weight_decay: float | None = None,
    mu_dtype: Any = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-10,
    adam_weight_decay: float = 0.0,
    router: routing.Router | Callable[[Any], Any] | None = None,
    distributed: Any = None,
    check_finite: bool = True,
) -> optax.GradientTransformation:
  r"""NorMuon: Muon with a per-neuron second moment of the orthogonalized step.

  ``reference='orthax'`` (default) and ``'repo'`` (zichongli5/NorMuon
  ``normuon.py`` @ d45c9a4), per matrix in PyTorch layout ``m×n`` (rows =
  output neurons):

  .. math::
     u &= \mathrm{nesterov}(G),\quad O = \mathrm{NS}_5(u),\quad
     v \leftarrow β_2 v + (1-β_2)\,\mathrm{mean}_{\mathrm{cols}}(O\odot O)\\
     \hat O &= \frac{O}{\sqrt v + ε}\cdot\frac{\|O\|_F}{\|O/(\sqrt v+ε)\|_F + ε}
        \cdot\sqrt{\max(1, m/n)},\qquad W \leftarrow W(1-ηλ) - η\hat O

  ``reference='paper'`` (the paper's Algorithm 1): plain EMA momentum
  (no Nesterov), no Frobenius restore, the step rescaled to RMS
  ``scale_rms·η`` (:func:`orthax.transforms.scale_to_rms`), decay with the
  unscaled η. Learning rates do not transfer between the two forms.
  The paper's ``O ⊘ (sqrt(v) + ε)`` is used (optax HEAD: ``sqrt(v + ε)``).

  ``reference='modded'`` (modded-nanogpt ``train_gpt.py`` @ f411b3d): Polar
  Express (Table C, ``1.02‖X‖_F + 1e-6``), β2 = 0.9, the statistic along the
  longer side, ``max(v, ε)^{-1/2}``, cautious weight decay ``λ·η·η_eff``
  with ``η_eff = η·sqrt(max(1, m/n))``. modded-nanogpt uses λ = 1.2: pass
  ``weight_decay=1.2`` (the default stays 0 because a decay that grows with
  η² would break the rule that the update is linear in the learning rate,
  which ``optax.inject_hyperparams`` users rely on). Not reproduced: bf16
  iteration and parameters with a mantissa buffer, MLP ``c_proj``'s 2× rate,
  per-parameter Adam betas, the Adam group's decay 0.005 (pass
  ``adam_weight_decay=0.005``).

  =========  ========  ======  =======  ============  ==========  ==============  ===  =============
  reference  nesterov  NS      β2       statistic     ε           scale           λ    η / AdamW η
  =========  ========  ======  =======  ============  ==========  ==============  ===  =============
  orthax     yes       jordan  0.95     per out row   √v + ε      restore·keller  0.2  0.0566 / 3e-3
  repo       yes       jordan  0.95     per out row   √v + ε      restore·keller  0    0.02 / 3e-4
  paper      no        jordan  0.95     per out row   √v + ε      RMS 0.2         0    0.012 / 0.012
  modded     yes       PE (C)  0.9      longer side   max(v, ε)   restore·keller  0    0.023 / 0.008
  =========  ========  ======  =======  ============  ==========  ==============  ===  =============

  On a conv kernel (one ``(kh·kw·in) × out`` matrix, the default router's
  view) every mode keeps one statistic per output neuron. Not reproduced
  by ``'repo'``: its code reshapes the orthogonalized step back to 4-D
  first, so it averages over ``kw``, keeps one ``v`` per ``(out, in, kh)``
  and restores the norm of each ``kh × kw`` filter.

  ``'orthax'`` decays matrices by λ = 0.2 (decoupled, ``W ← W(1-ηλ)``):
  at 0.0566 it ended lower than 0.1 and 0 at 0.04 at both widths of the
  learning-rate sweep (README); the references' own defaults are 0. The
  AdamW branch is not decayed.

  The AdamW branch is KellerJordan/Muon's auxiliary Adam (β = (0.9, 0.95),
  ε = 1e-10 after bias correction), at ``adam_learning_rate``: by default
  ``learning_rate`` for ``'paper'`` (RMS-0.2 updates, AdamW's scale) and
  otherwise in proportion to ``learning_rate`` as the mode's rates (table)
  are, e.g. ``0.053·learning_rate`` for ``'orthax'``
  (:func:`orthax.recipes.resolve_adam_learning_rate`). A reference mode
  runs at its reference's rates. The paper publishes none, so ``'paper'``
  runs at 0.012 on both branches, measured on the embedded corpus (d_model
  128: 1.579 there, 1.585 at 0.024; AdamW's own 3e-3, which its RMS-0.2
  step is scaled to share, ended at 1.920). Explicit arguments override the
  reference's defaults (``beta2``, ``preset``, ``weight_decay``).
  ``distributed=orthax.sharding.Distributed(...)`` runs Newton–Schulz, the
  neuron statistics, the Frobenius restore and the scale on whole matrices
  per device, in one ``shard_map`` body per group (``then=`` stages of
  :func:`orthax.orthogonalize`), so they equal the single-device ones.

  References: Li et al., arXiv 2510.05491; reference code
  ``zichongli5/NorMuon`` @ d45c9a4 (``normuon.py``).
  """
  _validate.arguments('normuon', normuon, locals())
  reference, lr = registry.resolve_mode('normuon', reference, learning_rate)
  d = _NORMUON_REFERENCES[reference]
  router, specs = _common.route(router, owner='normuon')
  weight_decay, beta2, preset = _common.mode_settings(
      d, weight_decay=weight_decay, beta2=beta2, preset=preset)
  # The neuron statistics, the Frobenius restore and the scale run on each
  # orthogonalized matrix in the same pass (on a mesh: in the same body).
  post = [MS.NeuronNormalize(
      beta2, eps, axis=d['axis'],
      eps_placement=d['eps_placement'], restore_norm=d['restore_norm'])]
  post.append(MS.ScaleToRms(scale_rms, eps) if reference == 'paper'
              else MS.ScaleByShape('keller'))
  stages = [
      ('momentum', T.momentum(beta, form='ema', nesterov=d['nesterov'],
                              accumulator_dtype=mu_dtype)),
      ('orthogonalize', T.orthogonalize(
          preset, steps=ns_steps, ns_dtype=ns_dtype, method=ns_method,
          matrix_specs=specs, distributed=distributed, then=post)),
      *_common.step_stages(
          lr, weight_decay, cautious=reference == 'modded',
          step_scale='keller' if reference == 'modded' else None,
          matrix_specs=specs),
  ]
  return _common.assemble_with_adamw(
      T.named_chain(*stages), router, check_finite, learning_rate=lr,
      adam_learning_rate=adam_learning_rate,
      rms_matched=reference == 'paper', matrix_weight_decay=weight_decay,
      recipe='normuon', notes=_MODDED_NOTE if reference == 'modded' else (),
      reference=reference, b1=adam_b1,
      b2=adam_b2,
      eps=adam_eps, weight_decay=adam_weight_decay, mu_dtype=mu_dtype)


_MODDED_NOTE = (
    "normuon(reference='modded')'s matrix wd is modded-nanogpt's: each step "
    'decays W by wd·lr·lr_eff (lr_eff = lr·√max(1, fan_out/fan_in)), only '
    'where W and the update agree in sign (cautious), not by lr·wd.',)


# LANTON's modes. 'paper': the reconstruction as the paper establishes it
# (Signum for embeddings and head, the spectral LMO of the momentum itself,
# the inverse noise level, no decay); 'orthax': the sweep's (docs/training.md).
_LANTON_REFERENCES = {
    'orthax': dict(signum_pattern=None, nesterov=True, noise_power=0.25,
                   weight_decay=0.4, scale='keller'),
    'paper': dict(signum_pattern=signum_group.SIGNUM_PATTERN,
                  nesterov=False, noise_power=1.0, weight_decay=0.0,
                  scale='spectral'),
}


@registry.register('lanton', references=tuple(_LANTON_REFERENCES),
                   learning_rate=0.08, adam_learning_rate=3e-3)
def lanton(
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    reference: str = 'orthax',
    beta: float = 0.95,
    nesterov: bool | None = None,
    scale: str | None = None,
    beta2: float = 0.99,
    eps: float = 1e-8,
    difference: str = 'previous',
    normalization: str = 'group_max',
    alpha: float = 1.0,
    noise_power: float | None = None,
    nuclear: str = 'frobenius',
    noise_ns_preset: str = 'polar_express',
    preset: str = 'jordan',
    ns_steps: int | None = None,
    ns_dtype: Any = None,
    ns_method: str = 'auto',
    weight_decay: float | None = None,
    mu_dtype: Any = None,
    signum_learning_rate: optax.ScalarOrSchedule | None = None,
    signum_beta: float | None = None,
    signum_pattern: str | None = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-8,
    adam_weight_decay: float = 0.0,
    router: routing.Router | Callable[[Any], Any] | None = None,
    distributed: Any = None,
    check_finite: bool = True,
) -> optax.GradientTransformation:
  r"""LANTON (reconstruction): Scion-style LMO steps with noise-adaptive
  layerwise rates for the hidden matrices.

  **A labelled reconstruction**: the paper's algorithm box (Hao et al., arXiv
  2510.14009) could not be read and there is no public code; see
  :func:`orthax.transforms.layerwise_noise_adapt` for what is established and
  what is reconstructed. Hidden matrices (label ``'matrix'``):

  .. math::
     B &\leftarrow β B + (1-β) G,\qquad
     D = c\;\mathrm{NS}(βB + (1-β)G)
        \quad(\text{the LMO of the norm }\|W\|_2/c)\\
     H_ℓ &\leftarrow β_2 H_ℓ + (1-β_2)\big(c
        \,\|G_t-G_{t-1}\|_*\big)^2,\qquad
     η_ℓ = η\,\Big(\frac{(\hat H_ℓ+ε)^{-1/2}}
        {\max_j (\hat H_j+ε)^{-1/2}}\Big)^p\\
     W_ℓ &\leftarrow W_ℓ - η_ℓ (D_ℓ + λ W_ℓ)

  (``nesterov=False``, as under ``reference='paper'``: ``NS(B)``.) ``c`` is
  the shape factor of ``scale`` (:func:`orthax.scale_by_shape`), in the LMO
  and in its dual norm alike: ``'keller'`` ``√max(1, d_out/d_in)`` (Muon's)
  in the library mode, ``'spectral'`` ``√(d_out/d_in)`` (the RMS→RMS
  operator norm, the Scion/Gluon LMO the paper builds on) under
  ``reference='paper'``. The two differ where ``d_in > d_out`` (an MLP's
  down-projection): the spectral LMO steps it at ``√(d_out/d_in)`` (½ for a
  4d→d kernel), Muon's at 1; on the embedded corpus Muon's trained better
  (docs/training.md). Modes:

  - ``reference='orthax'`` (default), from the learning-rate sweep on the
    embedded corpus (README): the LMO of Nesterov's look-ahead
    ``βB + (1-β)G``, as Muon's, and Muon's shape factor; the tempered map
    ``p = noise_power = 0.25``; λ = 0.4 at η = 0.08; embeddings, LM head, norm scales and biases on the
    AdamW branch, as in every recipe here (with Signum there LANTON ended
    1.6% higher at d_model 256 at p = 0.5 and η = 0.113, docs/training.md).
  - ``reference='paper'``: what the paper establishes, with the
    reconstruction's map: the spectral LMO of ``B`` itself (the Scion/Gluon
    step), the
    inverse noise level ``p = 1``, no decay, and a Signum group for the
    embeddings and the LM head ("we update these weight-sharing layers with
    Signum"). It runs at the library's rates.

  ``signum_pattern``, ``nesterov``, ``scale``, ``noise_power`` and
  ``weight_decay`` default to the mode's. The Signum group (2-D ``'adam'`` leaves matching
  ``signum_pattern``, e.g. :data:`orthax.recipes.signum_group.SIGNUM_PATTERN`;
  ``'^$'`` matches none; label ``'signum'``): ``W ← W - η_s·sign(B)`` with
  ``B`` an EMA of the gradient (rate ``signum_beta``, default 0.95) and ``η_s =
  signum_learning_rate``, at a fixed rate (the paper's embedding/head group
  holds two layers; its rate map there is not established). ``η_s`` defaults to
  the AdamW branch's rate (``adam_learning_rate``, or its default: 3e-3 at the
  default η, in proportion to η), not η: Signum at η moved every embedding
  entry by the matrices' rate at each step. Without a Signum group,
  ``signum_learning_rate`` and ``signum_beta`` raise a ``ValueError``, as does
  an empty ``signum_pattern`` (it would match every path). The noise statistic
  does not see the look-ahead (with ``difference='momentum'`` it does: ``B_t``
  is then the momentum stage's output). β = 0.95, β2 = 0.99 and ε = 1e-8 are
  this library's choice. Only the matrices decay (the AdamW branch at
  ``adam_weight_decay``, default 0; Signum not at all). The nuclear norm of the
  gradient difference defaults to the bound ``sqrt(min(m, n))·‖X‖_F``
  (``nuclear='frobenius'``): tight up to a constant for the flat spectra of
  gradient noise, and free, where ``⟨X, NS(X)⟩`` (``nuclear='ns'``) costs a
  second orthogonalization per step (≈1.95× Muon's update time on GPT-2-small
  matrices against ≈1.0× here; the paper reports ≈4% wall-clock overhead over
  D-Muon, which rules out a second orthogonalization); ``'svd'`` is exact.
  ``noise_power`` tempers the noise→rate map
  (:func:`orthax.transforms.layerwise_noise_adapt`), ``p = 0`` every layer at
  the group rate: on the embedded corpus the inverse map ended behind the group
  rate, and the tempered one ahead of both (docs/training.md).
  ``distributed=orthax.sharding.Distributed(...)`` runs the Newton–Schulz stage
  on whole matrices per device.

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> params = {'embed': jnp.zeros((50, 8)), 'w': jnp.zeros((8, 8))}
    >>> _ = orthax.describe(params, optimizer=orthax.lanton(reference='paper'))
    path   shape    label   view       lr     wd
    -----  -------  ------  ---------  -----  --
    embed  (50, 8)  signum             0.003  0
    w      (8, 8)   matrix  1 x 8 x 8  0.08   0
    note: lanton's matrix lr is the largest layer's: each layer steps and decays at lr·(its noise ratio)^p ≤ lr (noise_power p), W ← W − η_ℓ(D + wd·W).

  References: Hao et al., arXiv 2510.14009 (no public code: see
  :func:`orthax.transforms.layerwise_noise_adapt` for what is
  reconstructed).
  """
  _validate.arguments('lanton', lanton, locals(), **LANTON_OPTIONS)
  reference, learning_rate = registry.resolve_mode('lanton', reference,
                                                   learning_rate)
  signum_pattern, nesterov, noise_power, weight_decay, scale = (
      _common.mode_settings(
          _LANTON_REFERENCES[reference], signum_pattern=signum_pattern,
          nesterov=nesterov, noise_power=noise_power,
          weight_decay=weight_decay, scale=scale))
  signum_group.check_settings(reference, signum_pattern,
                              signum_learning_rate, signum_beta)
  router, specs = _common.route(router, owner='lanton')
  direction = T.named_chain(('orthogonalize', T.orthogonalize(
      preset, steps=ns_steps, ns_dtype=ns_dtype, method=ns_method,
      matrix_specs=specs, distributed=distributed,
      then=[MS.ScaleByShape(scale)])))
  matrix = T.named_chain(('layerwise_noise_adapt', T.layerwise_noise_adapt(
      T.momentum(beta, form='ema', nesterov=nesterov,
                 accumulator_dtype=mu_dtype),
      direction, learning_rate=learning_rate, beta2=beta2, eps=eps,
      dual_norm='nuclear', difference=difference,
      normalization=normalization, alpha=alpha, noise_power=noise_power,
      nuclear=nuclear, scale=scale,
      ns_preset=noise_ns_preset, weight_decay=weight_decay,
      matrix_specs=specs)))
  signum = {}
  if signum_pattern is not None:
    router = signum_group.signum_labels(router, signum_pattern)
    signum_lr = (_common.resolve_adam_learning_rate(
        learning_rate, adam_learning_rate, rms_matched=False, recipe='lanton',
        reference=reference)
                 if signum_learning_rate is None else signum_learning_rate)
    signum = dict(
        branches={'signum': signum_group.signum_step(
            0.95 if signum_beta is None else signum_beta, signum_lr,
            mu_dtype)},
        branch_learning_rates={'signum': signum_lr},
        branch_weight_decays={'signum': 0.0})
  return _common.assemble_with_adamw(
      matrix, router, check_finite, learning_rate=learning_rate,
      adam_learning_rate=adam_learning_rate, rms_matched=False,
      matrix_weight_decay=weight_decay, recipe='lanton', reference=reference,
      notes=("lanton's matrix lr is the largest layer's: each layer steps "
             'and decays at lr·(its noise ratio)^p ≤ lr (noise_power p), '
             'W ← W − η_ℓ(D + wd·W).',),
      **signum, b1=adam_b1, b2=adam_b2, eps=adam_eps,
      weight_decay=adam_weight_decay, mu_dtype=mu_dtype)
