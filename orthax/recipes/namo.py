"""NAMO and NAMO-D (Zhang, Liu, Schaeffer, arXiv 2602.17080): orthogonalized
momentum with an Adam-style noise-adaptive step, as named recipes."""

from __future__ import annotations

from typing import Any, Callable

import optax

from orthax import _validate
from orthax import matrix_stages as MS
from orthax import routing
from orthax import transforms as T
from orthax.recipes import _common
from orthax.recipes import registry

# Per mode: the step's shape factor c_s·k (the
# repository's Moonlight factor, or Muon's spectral size), the matrices'
# decay λ and the AdamW branch's (the repository's class default: λ).
# λ multiplies the adaptive step min(α, 1), which is a fraction of the
# learning rate, so the library mode's sweep put it at 0.4.
_NAMO_REFERENCES = {
    'orthax': dict(shape='keller', scale_coeff=2.0, weight_decay=0.4,
                   adam_weight_decay=0.1),
    'repo': dict(shape='moonlight', scale_coeff=0.2, weight_decay=0.1,
                 adam_weight_decay=_common.SHARED_DECAY),
}


# The repository's class defaults: one rate for NAMO and its AdamW branch.
_NAMO_REPO_RATES = {'repo': registry.ModeRates(
    0.01, 0.01, 'minxin-zhg/namo @a3f37b0 src/namo.py: lr, shared by the '
    'AdamW branch')}


def _namo(name, mode, learning_rate, reference, beta, mu2, eps, weight_decay,
          scale_coeff, clamp_c, nesterov, preset, ns_steps, ns_dtype,
          ns_method, mu_dtype, adam_learning_rate, adam_b1, adam_b2, adam_eps,
          adam_weight_decay, router, check_finite, distributed=None,
          shape=None):
  reference, learning_rate = registry.resolve_mode(name, reference,
                                                   learning_rate)
  d = _NAMO_REFERENCES[reference]
  shape, scale_coeff, weight_decay = _common.mode_settings(
      d, shape=shape, scale_coeff=scale_coeff, weight_decay=weight_decay)
  adam_weight_decay = _common.adam_weight_decay(adam_weight_decay, d,
                                                weight_decay)
  router, specs = _common.route(router, owner=name)
  matrix = T.named_chain(('noise_adapt', T.noise_adapt(
      T.momentum(beta, form='ema', nesterov=nesterov,
                 accumulator_dtype=mu_dtype),
      T.orthogonalize(preset, steps=ns_steps, ns_dtype=ns_dtype,
                      method=ns_method, matrix_specs=specs,
                      distributed=distributed),
      learning_rate=learning_rate, b1=beta, mode=mode, mu2=mu2, eps=eps,
      weight_decay=weight_decay, scale_coeff=scale_coeff, clamp_c=clamp_c,
      shape=shape, matrix_specs=specs)))
  return _common.assemble_with_adamw(
      matrix, router, check_finite, learning_rate=learning_rate,
      adam_learning_rate=adam_learning_rate, rms_matched=False,
      matrix_weight_decay=weight_decay, recipe=name, reference=reference,
      notes=(f"{name}'s matrix lr and wd are base values: the step is "
             'min(α·c·k, 1)·O and the decay W ← W(1 − wd·min(α, 1)), α = lr '
             'times a noise-adaptive factor' + (' per input feature'
                                                if mode == 'diagonal' else '')
             + ' (orthax.noise_adapt).',),
      b1=adam_b1, b2=adam_b2, eps=adam_eps,
      weight_decay=adam_weight_decay,
      eps_placement='raw', mu_dtype=mu_dtype)


_NAMO_DOC = r"""

  One stage, :func:`orthax.transforms.noise_adapt`, wraps the momentum
  (EMA, Nesterov) and the Newton–Schulz orthogonalization (Keller's
  coefficients) and emits the final step, learning rate and weight decay
  included; see its docstring for the update rule, ``min(α·c_s·k, 1)·O``
  with ``k`` the shape factor of ``shape``.

  ``reference='orthax'`` (default): the repository's update with Muon's
  spectral size, ``shape='keller'`` (``k = √max(1, A/B)``, ``A×B`` the
  PyTorch ``out×in``) and ``scale_coeff=2``, so that one rate serves both
  widths, as Muon's does: {best} on the embedded corpus, whereas under the
  repository's factor (at decay 0) the best fell by √2 per doubling of the
  width, 0.08 at d_model 128 to 0.057 at 256. ``reference='repo'``
  (``'namo_repo'``, its former name, is accepted as an alias):
  minxin-zhg/namo ``src/namo.py`` @ a3f37b0, after the eps fix
  (``sqrt(v) + ε``), with its factor ``shape='moonlight'``
  (``k = √max(A, B)``) and ``scale_coeff=0.2``: an update RMS of about
  ``0.2α`` at any width, so its best rate falls with the width as AdamW's
  does. It runs at the repository's rates, 0.01 for both branches (on the
  embedded corpus at d_model 128, 0.08 was best in this mode and 0.01 ended
  0.5 nats above it). ``shape`` and ``scale_coeff`` default to the mode's.

  Weight decay scales with the adaptive step, ``W ← W·(1 − λ·min(α, 1))``,
  and ``α`` is a fraction of the learning rate that shrinks as the
  gradient noise grows, so the best ``λ`` lies above Muon's 0.2:
  ``weight_decay`` defaults to 0.4 in the library mode ({decay}; embedded
  corpus, d_model 128, two seeds) and to the repository's 0.1 in
  ``'repo'``.

  The AdamW branch: β = (0.9, 0.95), ε = 1e-8 added to ``sqrt(v)``
  *before* bias correction, weight decay ``adam_weight_decay``, by default
  0.1 (``reference='repo'``: ``weight_decay``, the repository's class
  default; its training script passes 0: ``adam_weight_decay=0``), at
  ``adam_learning_rate``, by default ``{ratio}·learning_rate`` (3e-3 at the
  default {default}; ``reference='repo'``: ``learning_rate``). The
  repository runs it at the matrices' rate; in the repository's mode at
  0.08 that trained worse (validation loss 1.594 against 1.557 with 3e-3;
  embedded corpus, d_model 128, 200 steps).
  ``distributed=orthax.sharding.Distributed(...)`` runs the Newton–Schulz
  stage on whole matrices per device.

  References: Zhang, Liu, Schaeffer, *Adam Improves Muon* (arXiv
  2602.17080); reference code ``minxin-zhg/namo`` @ a3f37b0
  (``src/namo.py``).
  """


@registry.register('namo', references=tuple(_NAMO_REFERENCES),
                   aliases={'namo_repo': 'repo'}, learning_rate=0.22624,
                   adam_learning_rate=3e-3, mode_rates=_NAMO_REPO_RATES)
def namo(
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    reference: str = 'orthax',
    beta: float = 0.95,
    mu2: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float | None = None,
    scale_coeff: float | None = None,
    shape: str | None = None,
    nesterov: bool = True,
    preset: str = 'jordan',
    ns_steps: int | None = None,
    ns_dtype: Any = None,
    ns_method: str = 'auto',
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
  _validate.arguments('namo', namo, locals(),
                      shape=_validate.choice(MS.SCALE_MODES))
  return _namo('namo', 'scalar', learning_rate, reference, beta, mu2, eps,
               weight_decay, scale_coeff, 0.0, nesterov, preset, ns_steps,
               ns_dtype, ns_method, mu_dtype, adam_learning_rate, adam_b1,
               adam_b2, adam_eps, adam_weight_decay, router, check_finite,
               distributed, shape)


namo.__doc__ = ('NAMO: orthogonalized momentum with a scalar Adam-style '
                'noise-adaptive step per matrix.' + _NAMO_DOC.format(
                    best='0.226 at d_model 128 and 0.16 at 256 (0.226 ends '
                    '0.44% higher there)', ratio='0.01326', default='0.226',
                    decay='1.4600 against 1.5070 at λ 0.1, both at learning '
                    'rate 0.16'))


@registry.register('namo_d', references=tuple(_NAMO_REFERENCES),
                   aliases={'namo_repo': 'repo'}, learning_rate=0.22,
                   adam_learning_rate=3e-3, mode_rates=_NAMO_REPO_RATES)
def namo_d(
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    reference: str = 'orthax',
    beta: float = 0.95,
    mu2: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float | None = None,
    scale_coeff: float | None = None,
    shape: str | None = None,
    clamp_c: float = 0.75,
    nesterov: bool = True,
    preset: str = 'jordan',
    ns_steps: int | None = None,
    ns_dtype: Any = None,
    ns_method: str = 'auto',
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
  _validate.arguments('namo_d', namo_d, locals(),
                      shape=_validate.choice(MS.SCALE_MODES))
  return _namo('namo_d', 'diagonal', learning_rate, reference, beta, mu2, eps,
               weight_decay, scale_coeff, clamp_c, nesterov, preset, ns_steps,
               ns_dtype, ns_method, mu_dtype, adam_learning_rate, adam_b1,
               adam_b2, adam_eps, adam_weight_decay, router, check_finite,
               distributed, shape)


namo_d.__doc__ = ('NAMO-D: NAMO with one adaptive step per input feature '
                  '(a diagonal right factor), clamped toward the mean by '
                  '``clamp_c`` (the class default 0.75; the GPT-2 configs '
                  'use 0.01–0.9).' + _NAMO_DOC.format(
                      best='0.22 at d_model 128 and at 256', ratio='0.01364',
                      default='0.22',
                      decay='1.4814 against 1.5162 at λ 0.1, both at '
                      'learning rate 0.11'))
