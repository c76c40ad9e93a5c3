"""Muon (KellerJordan, Moonlight and optax reference modes)."""

from __future__ import annotations

from typing import Any, Callable

import optax

from orthax import _validate
from orthax import matrix_stages as MS
from orthax import routing
from orthax import transforms as T
from orthax.recipes import _common
from orthax.recipes import registry

_KELLER = dict(form='ema', nesterov=True, bias_correction=False,
               preset='jordan', scale='keller', weight_decay=0.0,
               adam_b2=0.95, adam_eps=1e-10,
               adam_eps_placement='corrected', adam_weight_decay=0.0)
_MUON_REFERENCES = {
    # KellerJordan's arithmetic at the sweep's rates and decay.
    'orthax': dict(_KELLER, weight_decay=0.2),
    'keller': _KELLER,
    'moonlight': dict(form='sum', nesterov=True, bias_correction=False,
                      preset='jordan', scale='moonlight', weight_decay=0.1,
                      adam_b2=0.95, adam_eps=1e-8,
                      adam_eps_placement='raw',
                      adam_weight_decay=_common.SHARED_DECAY),
    'optax': dict(form='ema', nesterov=True, bias_correction=True,
                  preset='jordan', scale='keller', weight_decay=0.0,
                  adam_b2=0.999, adam_eps=1e-8,
                  adam_eps_placement='corrected', adam_weight_decay=0.0),
}


@registry.register(
    'muon', references=tuple(_MUON_REFERENCES), learning_rate=0.05656,
    adam_learning_rate=3e-3, mode_rates={
        'keller': registry.ModeRates(
            0.02, 3e-4, 'KellerJordan/Muon @857d1adc muon.py: Muon lr, '
            'auxiliary Adam lr'),
        'moonlight': registry.ModeRates(
            1e-3, 1e-3, 'MoonshotAI/Moonlight @c2ad5b2 examples/'
            'toy_train.py: one lr for Muon and AdamW')})
def muon(
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    reference: str = 'orthax',
    beta: float = 0.95,
    nesterov: bool | None = None,
    preset: str | None = None,
    ns_steps: int | None = None,
    ns_dtype: Any = None,
    ns_eps: float | None = None,
    ns_method: str | None = None,
    scale: str | None = None,
    scale_rms: float = 0.2,
    weight_decay: float | None = None,
    cautious_weight_decay: bool = False,
    mu_dtype: Any = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float | None = None,
    adam_eps: float | None = None,
    adam_weight_decay: float | None = None,
    router: routing.Router | Callable[[Any], Any] | None = None,
    distributed: Any = None,
    check_finite: bool = True,
) -> optax.GradientTransformation:
  r"""Muon: momentum orthogonalized by Newton–Schulz, AdamW for the rest.

  For each routed matrix ``W`` with gradient ``G`` (``reference='orthax'``,
  the default, and ``'keller'``):

  .. math::
     m_t &= β m_{t-1} + (1-β) G_t,\qquad u_t = (1-β) G_t + β m_t \\
     O_t &= \mathrm{NS}_5(u_t)\cdot\sqrt{\max(1, \mathrm{out}/\mathrm{in})} \\
     W_t &= W_{t-1}(1 - ηλ) - η\,O_t

  ``reference`` picks the defaults of a reference implementation; explicit
  arguments override them:

  =============  ==========  ==========  ========  ======  ===  ===================  =============
  reference      momentum    bias corr.  scale     NS eps  λ    AdamW b2 / eps / wd  η / AdamW η
  =============  ==========  ==========  ========  ======  ===  ===================  =============
  ``orthax``     EMA, nest.  no          keller    1e-7    0.2  0.95 / 1e-10 / 0     0.0566 / 3e-3
  ``keller``     EMA, nest.  no          keller    1e-7    0    0.95 / 1e-10 / 0     0.02 / 3e-4
  ``moonlight``  sum, nest.  no          0.2·√max  1e-7    0.1  0.95 / 1e-8 raw / λ  1e-3 / 1e-3
  ``optax``      EMA, nest.  yes         keller    1e-8    0    0.999 / 1e-8 / 0     0.0566 / 3e-3
  =============  ==========  ==========  ========  ======  ===  ===================  =============

  ("raw": ε added to √v before bias correction, as in Moonlight's AdamW;
  the optax mode's AdamW is NAdam-style, as ``optax.contrib.muon``'s.)
  A reference mode runs at its reference's learning rates and decay;
  ``'orthax'`` is KellerJordan's arithmetic at the rates the learning-rate
  sweep chose (README) and with the decay it chose, 0.2 (at 0.04, 0.1 ended
  0.020 / 0.034 nats lower than 0 at d_model 128 / 256; 0.2 at 0.0566 a
  further 0.032 / 0.014), and ``'optax'``,
  whose reference has no default rate, at the sweep's rates too.

  ``reference='optax'`` with the same arguments, ``router`` left ``None``
  (optax's rule: 2-D leaves are matrices) and
  ``adam_learning_rate=learning_rate`` (optax runs both branches at one
  rate; the default here is in proportion, below) reproduces
  ``optax.contrib.muon`` — including its NAdam-style Adam branch — for
  float32 and float64 parameters and gradients (narrower ones compute in
  float32 here, in their own dtype in optax).
  Weight decay is decoupled and uses the unscaled learning rate in every
  mode (``W ← W(1-ηλ)``), as all three references do.
  A conv kernel ``(kh, kw, in, out)`` is one ``(kh·kw·in) × out`` matrix
  (the default router's view), scaled by that matrix's shape in every
  mode. Not reproduced by ``'keller'``: KellerJordan's code reads the
  factor off the 4-D gradient's last two axes (``kh/kw`` in PyTorch's
  layout, 1 for a square filter), which differs where ``out > kh·kw·in``.

  Args:
    learning_rate: η for the matrix branch (number or schedule); default:
      the mode's (table), 0.05656 for ``'orthax'``, the sweep's best at
      d_model 128 and 256 (README).
    reference: ``'orthax'`` (default), ``'keller'`` (KellerJordan/Muon),
      ``'moonlight'`` (MoonshotAI/Moonlight) or ``'optax'``
      (``optax.contrib.muon``).
    beta: momentum β.
    nesterov: Nesterov look-ahead (default: the reference's, on).
    preset: Newton–Schulz preset (default ``'jordan'``), e.g.
      ``'polar_express'``.
    ns_steps: Newton–Schulz steps (default: the preset's).
    ns_dtype: dtype of the Newton–Schulz iteration (e.g. ``jnp.bfloat16``).
    ns_eps: the normalizer's epsilon (default: the preset's; 1e-8 for
      ``reference='optax'``).
    ns_method: ``'auto'`` (default; Gram Newton–Schulz where it saves
      FLOPs, in float32 or wider), ``'standard'`` or ``'gram'``; ``'standard'`` for
      ``reference='optax'`` so that it matches optax's arithmetic.
    scale: ``'keller'``, ``'moonlight'``, ``'spectral'``, ``'inverse_side'``
      or ``'none'`` (:func:`orthax.scale_by_shape`).
    scale_rms: RMS target of the ``moonlight`` scale.
    weight_decay: λ for matrices (default: the mode's, table).
    cautious_weight_decay: decay only where the update shrinks the weight.
    mu_dtype: momentum accumulator dtype (both branches; default float32,
      or the parameters' dtype if wider: every branch computes in float32
      and rounds the update to the gradients' dtype once).
    adam_learning_rate: AdamW learning rate (default: in proportion to
      ``learning_rate`` as the mode's rates are, table; under the
      ``moonlight`` scale, whose update RMS is AdamW's, ``learning_rate``;
      else ``0.053·learning_rate``, 3e-3 at the default 0.05656, the rates the
      learning-rate sweep measured together: see
      :func:`orthax.recipes.resolve_adam_learning_rate`).
      ``optax.contrib.muon`` reuses ``learning_rate``: pass
      ``adam_learning_rate=learning_rate`` to reproduce it.
    adam_b1, adam_b2, adam_eps: AdamW moments and epsilon.
    adam_weight_decay: AdamW weight decay (default 0; Moonlight: λ).
    router: a :class:`orthax.Router` or a ``params -> labels`` callable;
      default: ``Router()`` (``'optax'`` reference: the 2-D rule).
    distributed: an :class:`orthax.sharding.Distributed` to run
      Newton–Schulz on whole matrices per device over a mesh.
    check_finite: skip a step whose gradient holds NaN/Inf, on device
      (update zero, state kept; :func:`orthax.skip_if_nonfinite`), and
      flag its leaves in the state (:func:`orthax.nonfinite_leaves`).

  Example:
    >>> import jax, jax.numpy as jnp, optax, orthax
    >>> params = {'w': jnp.ones((8, 16)), 'b': jnp.zeros(16)}
    >>> tx = orthax.muon()            # 'w' -> Newton–Schulz, 'b' -> AdamW
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> round(float(jnp.abs(updates['b']).max()), 6)   # AdamW at its 3e-3
    0.003

  References: K. Jordan, *Muon: An optimizer for hidden layers* (2024),
  github.com/KellerJordan/Muon; Liu et al., *Muon is Scalable for LLM
  Training*, arXiv 2502.16982.
  """
  _validate.arguments('muon', muon, locals(),
                      scale=_validate.choice(MS.SCALE_MODES))
  reference, learning_rate = registry.resolve_mode('muon', reference,
                                                   learning_rate)
  d = _MUON_REFERENCES[reference]
  nesterov, preset, scale, weight_decay, adam_b2, adam_eps = (
      _common.mode_settings(d, nesterov=nesterov, preset=preset, scale=scale,
                            weight_decay=weight_decay, adam_b2=adam_b2,
                            adam_eps=adam_eps))
  _validate.applies('muon', 'scale_rms', scale_rms, 0.2,
                    scale == 'moonlight', "scale='moonlight'")
  router, specs = _common.route(
      router, _common.ndim2_labels if reference == 'optax' else None,
      owner='muon')
  if ns_method is None:
    ns_method = 'standard' if reference == 'optax' else 'auto'
  if ns_eps is None and reference == 'optax':
    ns_eps = 1e-8  # optax shares one eps; the other references use the preset's

  matrix = T.named_chain(
      ('momentum', T.momentum(beta, form=d['form'], nesterov=nesterov,
                              bias_correction=d['bias_correction'],
                              accumulator_dtype=mu_dtype)),
      ('orthogonalize', T.orthogonalize(preset, steps=ns_steps, eps=ns_eps,
                                        ns_dtype=ns_dtype, method=ns_method,
                                        matrix_specs=specs,
                                        distributed=distributed,
                                        then=[MS.ScaleByShape(scale,
                                                              scale_rms)])),
      *_common.step_stages(learning_rate, weight_decay,
                           cautious=cautious_weight_decay),
  )
  adam_weight_decay = _common.adam_weight_decay(adam_weight_decay, d,
                                                weight_decay)
  return _common.assemble_with_adamw(
      matrix, router, check_finite, learning_rate=learning_rate,
      adam_learning_rate=adam_learning_rate,
      rms_matched=scale == 'moonlight', matrix_weight_decay=weight_decay,
      recipe='muon', reference=reference,
      b1=adam_b1, b2=adam_b2, eps=adam_eps,
      weight_decay=adam_weight_decay, mu_dtype=mu_dtype,
      eps_placement=d['adam_eps_placement'],
      # optax.contrib.muon hands its `nesterov` to the Adam branch too.
      nesterov=nesterov if reference == 'optax' else False)
