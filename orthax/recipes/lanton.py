"""LANTON: noise-adaptive layerwise learning rates on an LMO step (a labelled
reconstruction of arXiv 2510.14009)."""

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
  ``weight_decay`` default to the mode's. The Signum group (``'adam'`` leaves of 2 or more dimensions matching
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

  Args:
    learning_rate: the group rate η, the largest layer's (number or
      schedule); default 0.08 in both modes.
    reference: ``'orthax'`` (default) or ``'paper'`` (modes above).
    beta: EMA rate β of the momentum ``B``.
    nesterov: take the LMO of the look-ahead ``βB + (1-β)G`` (default: the
      mode's, on for ``'orthax'``, off for ``'paper'``).
    scale: the shape factor ``c`` of the LMO and its dual norm, a
      :func:`orthax.scale_by_shape` mode (default: the mode's,
      ``'keller'`` or ``'spectral'``).
    beta2: EMA rate β2 of the noise statistic ``H_ℓ``.
    eps: ε in ``(Ĥ_ℓ + ε)^{-1/2}``.
    difference: the noise sample: ``'previous'`` (default, ``G_t -
      G_{t-1}``) or ``'momentum'`` (``G_t - B_t``).
    normalization: ``'group_max'`` (default; rates relative to the least
      noisy layer, none above η) or ``'absolute'`` (``η·α·r_ℓ^p``).
    alpha: α of ``normalization='absolute'``.
    noise_power: ``p``, the exponent of the noise→rate map (default: the
      mode's, 0.25 or 1); 0 puts every layer at η.
    nuclear: how ``‖X‖_*`` is computed: ``'frobenius'`` (default, the
      bound ``√min(m, n)·‖X‖_F``), ``'ns'`` (``⟨X, NS(X)⟩``) or ``'svd'``.
    noise_ns_preset: Newton–Schulz preset of ``nuclear='ns'`` (default
      ``'polar_express'``).
    preset: Newton–Schulz preset of the LMO (default ``'jordan'``).
    ns_steps: Newton–Schulz steps of the LMO (default: the preset's).
    ns_dtype: dtype of the LMO's Newton–Schulz iteration.
    ns_method: ``'auto'`` (default), ``'standard'`` or ``'gram'``
      (:func:`orthax.orthogonalize`).
    weight_decay: λ, decoupled, at each layer's rate η_ℓ (default: the
      mode's, 0.4 or 0).
    mu_dtype: accumulator dtype of every momentum (matrices, Signum, AdamW;
      default float32, or the parameters' dtype if wider).
    signum_learning_rate: η_s of the Signum group (default: the AdamW
      branch's rate); a ``ValueError`` without a Signum group.
    signum_beta: EMA rate of the Signum group's momentum (default 0.95); a
      ``ValueError`` without a Signum group.
    signum_pattern: regular expression on the paths of the 2-D-or-larger
      ``'adam'`` leaves that go to Signum (default: the mode's, ``None``,
      no Signum group, or ``SIGNUM_PATTERN`` for ``'paper'``); ``'^$'``
      matches none.
    adam_learning_rate: AdamW learning rate (default
      ``0.0375·learning_rate``, 3e-3 at the default 0.08; see
      :func:`orthax.recipes.resolve_adam_learning_rate`).
    adam_b1, adam_b2, adam_eps: AdamW moments and epsilon.
    adam_weight_decay: AdamW weight decay (default 0).
    router: a :class:`orthax.Router` or a ``params -> labels`` callable;
      default: ``Router()``; a Signum group relabels its leaves.
    distributed: an :class:`orthax.sharding.Distributed` to run the LMO's
      Newton–Schulz on whole matrices per device over a mesh.
    check_finite: skip a step whose gradient holds NaN/Inf, on device
      (update zero, state kept; :func:`orthax.skip_if_nonfinite`), and
      flag its leaves in the state (:func:`orthax.nonfinite_leaves`).

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
