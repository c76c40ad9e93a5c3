"""NorMuon: Muon with a per-neuron second moment of the orthogonalized step
(arXiv 2510.05491)."""

from __future__ import annotations

from typing import Any, Callable

import optax

from orthax import _validate
from orthax import matrix_stages as MS
from orthax import routing
from orthax import transforms as T
from orthax.recipes import _common
from orthax.recipes import registry

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

  Args:
    learning_rate: η for the matrix branch (number or schedule); default:
      the mode's (table), 0.05656 for ``'orthax'``, the sweep's (README).
    reference: ``'orthax'`` (default), ``'repo'`` (zichongli5/NorMuon),
      ``'paper'`` (Algorithm 1) or ``'modded'`` (modded-nanogpt).
    beta: momentum β (EMA; Nesterov except under ``'paper'``).
    beta2: EMA rate β2 of the per-neuron second moment ``v`` (default: the
      mode's, 0.95; 0.9 for ``'modded'``).
    eps: ε of the neuron normalization (``√v + ε`` and the Frobenius
      restore; ``'modded'``: the clamp ``max(v, ε)``) and, under
      ``'paper'``, of the RMS rescale.
    preset: Newton–Schulz preset (default: the mode's, ``'jordan'``;
      ``'polar_express'`` for ``'modded'``).
    ns_steps: Newton–Schulz steps (default: the preset's).
    ns_dtype: dtype of the Newton–Schulz iteration (e.g. ``jnp.bfloat16``).
    ns_method: ``'auto'`` (default; Gram Newton–Schulz where it saves
      FLOPs, in float32 or wider), ``'standard'`` or ``'gram'``
      (:func:`orthax.orthogonalize`).
    scale_rms: RMS target of the step before η, ``reference='paper'`` only
      (another value in another mode is a ``ValueError``).
    weight_decay: λ for matrices (default: the mode's, 0.2 for
      ``'orthax'``, else 0); ``'modded'``: cautious, ``λ·η·η_eff`` (above).
    mu_dtype: momentum accumulator dtype (both branches; default float32,
      or the parameters' dtype if wider).
    adam_learning_rate: AdamW learning rate (default: ``learning_rate``
      under ``'paper'``, else in proportion to it as the mode's rates are,
      table: ``0.053·learning_rate`` for ``'orthax'``; see
      :func:`orthax.recipes.resolve_adam_learning_rate`).
    adam_b1, adam_b2, adam_eps: AdamW moments and epsilon (KellerJordan's
      auxiliary Adam: 0.9, 0.95, 1e-10 after bias correction).
    adam_weight_decay: AdamW weight decay (default 0 in every mode).
    router: a :class:`orthax.Router` or a ``params -> labels`` callable;
      default: ``Router()``.
    distributed: an :class:`orthax.sharding.Distributed` to run
      Newton–Schulz and the stages after it on whole matrices per device
      over a mesh (above).
    check_finite: skip a step whose gradient holds NaN/Inf, on device
      (update zero, state kept; :func:`orthax.skip_if_nonfinite`), and
      flag its leaves in the state (:func:`orthax.nonfinite_leaves`).

  Example:
    >>> import jax, jax.numpy as jnp, orthax
    >>> params = {'w': jnp.ones((8, 16)), 'b': jnp.zeros(16)}
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> tx = orthax.normuon()         # 'w' -> NorMuon, 'b' -> AdamW
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> updates['w'].shape, round(float(jnp.abs(updates['b']).max()), 6)
    ((8, 16), 0.003)
    >>> tx = orthax.normuon(reference='paper')   # step RMS scale_rms·η
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> round(float(jnp.sqrt(jnp.mean(updates['w'] ** 2))), 6)  # 0.2·0.012
    0.0024

  References: Li et al., arXiv 2510.05491; reference code
  ``zichongli5/NorMuon`` @ d45c9a4 (``normuon.py``).
  """
  _validate.arguments('normuon', normuon, locals())
  reference, lr = registry.resolve_mode('normuon', reference, learning_rate)
  d = _NORMUON_REFERENCES[reference]
  _validate.applies('normuon', 'scale_rms', scale_rms, 0.2,
                    reference == 'paper', "reference='paper'")
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
