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
"""


# The Args section both docstrings share; {lr}: the library mode's default
# rate, {alpha}: what one adaptive step covers, {norms}: what μ2 averages,
# {clamp}: NAMO-D's ``clamp_c`` entry (empty for NAMO), {ratio}: the AdamW
# branch's default rate per unit of ``learning_rate``.
_NAMO_ARGS = r"""
  Args:
    learning_rate: base η (number or schedule), scaled by the
      noise-adaptive factor into α ({alpha}); default: the
      mode's, {lr} (``'orthax'``) or 0.01 (``'repo'``).
    reference: ``'orthax'`` (default) or ``'repo'`` (alias
      ``'namo_repo'``).
    beta: μ1, the momentum's β (EMA), also in the step's bias correction.
    mu2: μ2, the EMA rate of {norms}.
    eps: ε added to the square root of that EMA.
    weight_decay: λ, applied as ``W ← W(1 − λ·min(α, 1))`` (above);
      default: the mode's, 0.4 (``'orthax'``) or 0.1 (``'repo'``).
    scale_coeff: ``c_s``, the coefficient of the shape factor ``k``;
      default: the mode's, 2 (``'orthax'``) or 0.2 (``'repo'``).
    shape: the shape factor ``k``: ``'keller'``, ``'moonlight'``,
      ``'spectral'``, ``'inverse_side'`` or ``'none'``
      (:func:`orthax.noise_adapt`); default: the mode's, ``'keller'``
      (``'orthax'``) or ``'moonlight'`` (``'repo'``).{clamp}
    nesterov: Nesterov look-ahead of the momentum (default on).
    preset: Newton–Schulz preset (default ``'jordan'``, Keller's
      coefficients), e.g. ``'polar_express'``.
    ns_steps: Newton–Schulz steps (default: the preset's).
    ns_dtype: dtype of the Newton–Schulz iteration (e.g. ``jnp.bfloat16``).
    ns_method: ``'auto'`` (default; Gram Newton–Schulz where it saves
      FLOPs, in float32 or wider), ``'standard'`` or ``'gram'``.
    mu_dtype: momentum accumulator dtype (both branches; default float32,
      or the parameters' dtype if wider: every branch computes in float32
      and rounds the update to the gradients' dtype once).
    adam_learning_rate: AdamW learning rate (default: {ratio} times
      ``learning_rate``, 3e-3 at {lr}; ``'repo'``: ``learning_rate``; see
      :func:`orthax.recipes.resolve_adam_learning_rate`).
    adam_b1, adam_b2, adam_eps: AdamW moments and epsilon (ε added to
      ``sqrt(v)`` before bias correction).
    adam_weight_decay: AdamW weight decay (default 0.1; ``'repo'``:
      ``weight_decay``).
    router: a :class:`orthax.Router` or a ``params -> labels`` callable;
      default: ``Router()``.
    distributed: an :class:`orthax.sharding.Distributed` to run
      Newton–Schulz and the step on whole matrices per device over a mesh.
    check_finite: skip a step whose gradient holds NaN/Inf, on device
      (update zero, state kept; :func:`orthax.skip_if_nonfinite`), and
      flag its leaves in the state (:func:`orthax.nonfinite_leaves`).
"""

_NAMO_REFS = """
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
                    'rate 0.16') + _NAMO_ARGS.format(
                        lr='0.22624', alpha='one per matrix',
                        norms="the squared Frobenius norm of the gradient",
                        clamp='', ratio='0.01326') + """
  Example:
    >>> import jax.numpy as jnp, orthax
    >>> params = {'w': jnp.zeros((8, 8)), 'b': jnp.zeros(8)}
    >>> _ = orthax.describe(params, optimizer=orthax.namo())
    path  shape   label   view       lr      wd
    ----  ------  ------  ---------  ------  ---
    b     (8,)    adam               0.003   0.1
    w     (8, 8)  matrix  1 x 8 x 8  0.2262  0.4
    note: namo's matrix lr and wd are base values: ...
""" + _NAMO_REFS)


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
                      'learning rate 0.11') + _NAMO_ARGS.format(
                          lr='0.22', alpha='one per input feature',
                          norms="each input feature's squared gradient norm",
                          clamp="""
    clamp_c: the clamp ``c`` of each input feature's adaptive factor toward
      their mean, into ``[c·mean, mean/c]`` (default 0.75, the class
      default; ``0`` or ``> 1``: off).""", ratio='0.01364') + """
  Example:
    >>> import jax, jax.numpy as jnp, orthax
    >>> params = {'w': jnp.ones((8, 16)), 'b': jnp.zeros(16)}
    >>> tx = orthax.namo_d(clamp_c=0.5)   # 'w' -> NAMO-D, 'b' -> AdamW
    >>> state = tx.init(params)
    >>> grads = {'w': jax.random.normal(jax.random.key(0), (8, 16)),
    ...          'b': jnp.ones(16)}
    >>> updates, state = tx.update(grads, state, params)
    >>> updates['w'].shape, bool(jnp.all(jnp.isfinite(updates['w'])))
    ((8, 16), True)
""" + _NAMO_REFS)
