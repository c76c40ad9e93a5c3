"""AuON and Hybrid-AuON: momentum divided by its cosh-RMS, the hybrid after
Newton–Schulz steps.

References: Maity, arXiv 2509.24320; ``ryyzn9/AuON`` (``auon/optimizer.py``
@ bba2e82; ``Auon_Adam_train.py`` @ c87b862).
"""

from __future__ import annotations

from typing import Any, Callable

import optax

from orthax import _validate
from orthax import matrix_stages as MS
from orthax import routing
from orthax import transforms as T
from orthax.recipes import _common
from orthax.recipes import registry


# Paper formula, with the original (Oct 2025) code's Keller scale.
_AUON_PAPER = dict(gamma=1.0, normalize=True, brake_input='normalized',
                   scale='keller', ns_steps=1, hybrid_brake='raw',
                   weight_decay=0.0)
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
                  scale='none', ns_steps=5, hybrid_brake='normalized',
                  weight_decay=0.0)
_AUON_REFERENCES = {
    'orthax': _AUON_PAPER,  # the paper's formula at the sweep's rates
    'paper': _AUON_PAPER,
    'repo': _AUON_REPO,
}
# Hybrid-AuON's library mode is the repository's current code (five
# Newton–Schulz steps before the brake): the paper's one step ended 0.19–
# 0.24 nats higher at its best rate (docs/training.md); at the sweep's
# decay 0.2 and rate 0.056 (the references': 0 and their own rates).
_HYBRID_REFERENCES = {**_AUON_REFERENCES,
                      'orthax': dict(_AUON_REPO, weight_decay=0.2)}


def _auon(hybrid, learning_rate, reference, beta, gamma, ns_steps, ns_dtype,
          mu_dtype, weight_decay, adam_learning_rate, adam_b1, adam_b2,
          adam_eps, router, check_finite, distributed):
  name = 'hybrid_auon' if hybrid else 'auon'
  reference, learning_rate = registry.resolve_mode(name, reference,
                                                   learning_rate)
  d = (_HYBRID_REFERENCES if hybrid else _AUON_REFERENCES)[reference]
  router, specs = _common.route(router, owner=name)
  gamma, weight_decay, ns_steps = _common.mode_settings(
      d, gamma=gamma, weight_decay=weight_decay, ns_steps=ns_steps)
  stages = [('momentum', T.momentum(beta, form='ema', nesterov=True,
                                    accumulator_dtype=mu_dtype))]
  if hybrid:
    # The brake and the scale need whole matrices: they run in the
    # orthogonalize pass (on a mesh, in the same body).
    stages.append(('orthogonalize', T.orthogonalize(
        'jordan', steps=ns_steps,
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
      T.named_chain(*stages), router, check_finite,
      learning_rate=learning_rate, adam_learning_rate=adam_learning_rate,
      rms_matched=False, matrix_weight_decay=weight_decay,
      recipe=name, reference=reference,
      b1=adam_b1, b2=adam_b2, eps=adam_eps, weight_decay=0.0,
      eps_placement='corrected', mu_dtype=mu_dtype)


@registry.register('auon', references=tuple(_AUON_REFERENCES),
                   learning_rate=0.08, adam_learning_rate=3e-3,
                   mode_rates=_AUON_RATES)
def auon(
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    reference: str = 'orthax',
    beta: float = 0.95,
    gamma: float | None = None,
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

  Args:
    learning_rate: η for the matrices (number or schedule); default: the
      mode's, 0.08 (``'orthax'``, the sweep's), 0.24 (``'paper'``) or 0.08
      (``'repo'``).
    reference: ``'orthax'`` (default), ``'paper'`` or ``'repo'`` (above).
    beta: momentum β (EMA with Nesterov look-ahead).
    gamma: γ inside the cosh (:func:`orthax.cosh_normalize`); default: the
      mode's, 1 (``'orthax'``, ``'paper'``) or 1.5 (``'repo'``).
    mu_dtype: momentum accumulator dtype (both branches; default float32,
      or the parameters' dtype if wider: every branch computes in float32
      and rounds the update to the gradients' dtype once).
    weight_decay: decoupled λ for matrices (``W ← W(1-ηλ)``; default 0 in
      every mode).
    adam_learning_rate: AdamW learning rate (default: in proportion to
      ``learning_rate`` as the mode's rates are: ``0.0375·learning_rate``,
      3e-3 at 0.08, under ``'orthax'``; ``0.1·learning_rate`` under
      ``'paper'`` and ``'repo'``; see
      :func:`orthax.recipes.resolve_adam_learning_rate`).
    adam_b1, adam_b2, adam_eps: AdamW moments and epsilon (ε added after
      bias correction); the AdamW branch has no weight decay.
    router: a :class:`orthax.Router` or a ``params -> labels`` callable;
      default: ``Router()``.
    distributed: an :class:`orthax.sharding.Distributed`, accepted and
      checked but unused (above).
    check_finite: skip a step whose gradient holds NaN/Inf, on device
      (update zero, state kept; :func:`orthax.skip_if_nonfinite`), and
      flag its leaves in the state (:func:`orthax.nonfinite_leaves`).

  Example:
    >>> import jax, jax.numpy as jnp, orthax
    >>> params = {'w': jnp.ones((8, 16)), 'b': jnp.zeros(16)}
    >>> tx = orthax.auon()            # 'w' -> cosh brake, 'b' -> AdamW
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> # ‖Δw‖_F = η·√(16/8)/r with r ≈ 1: normalized momentum SGD
    >>> round(float(jnp.linalg.norm(updates['w'])), 2)
    0.11
    >>> round(float(jnp.abs(updates['b']).max()), 6)   # AdamW at its 3e-3
    0.003

  References: D. Maity, arXiv 2509.24320; github.com/ryyzn9/AuON.
  """
  _validate.arguments('auon', auon, locals())
  # No matrix function to distribute: every stage is elementwise or a
  # per-matrix norm, exact on parameter-sharded arrays under GSPMD.
  # ``distributed`` is accepted (and checked) so configs can switch recipes.
  return _auon(False, learning_rate, reference, beta, gamma, None, None,
               mu_dtype, weight_decay, adam_learning_rate, adam_b1, adam_b2,
               adam_eps, router, check_finite, None)


@registry.register('hybrid_auon', references=tuple(_HYBRID_REFERENCES),
                   learning_rate=0.056, adam_learning_rate=3e-3,
                   mode_rates={'repo': _AUON_RATES['repo'],
                               'paper': registry.ModeRates(
                                   0.04, 3e-3, 'none published; measured on '
                                   'the embedded corpus (d_model 128 and 256, '
                                   'decay 0): the one-step form\'s best, '
                                   'AdamW at 3e-3')})
def hybrid_auon(
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    reference: str = 'orthax',
    beta: float = 0.95,
    gamma: float | None = None,
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
  the repository's current arithmetic at the sweep's rates, 0.056 with the
  AdamW branch at 3e-3, and decays matrices by λ = 0.2 (``W ← W(1-ηλ)``;
  the references and :func:`auon`: 0). On the embedded corpus (two seeds,
  d_model 128 / 256) it ends at 1.4703 / 1.4338, against 1.4978 / 1.4577
  at the former 0.04 and λ = 0.1 and 1.5323 / 1.4911 at 0.04 and λ = 0;
  at λ = 0.2 the best rate moved from 0.04 to 0.056 at both widths
  (docs/training.md). At decay 0 the paper's one step, best at 0.04,
  ended 0.24 / 0.19 nats above the five-step form (1.7725 / 1.6855).
  ``'paper'`` publishes no rate for the hybrid and runs at that best, 0.04
  with AdamW at 3e-3; ``'repo'`` at the Jan 2026 training config's 0.08
  with Adam at 0.008 (the class defaults to 0.24). For realistic sizes the brake is ≈ 1, so the default
  is close to :func:`muon` without its shape scale; the paper's one step is
  the cheaper form (0.28–0.30× Muon's time on CPU).
  ``distributed=orthax.sharding.Distributed(...)`` runs the Newton–Schulz
  steps on whole matrices per device.

  Args:
    learning_rate: η for the matrices (number or schedule); default: the
      mode's, 0.056 (``'orthax'``, the sweep's), 0.04 (``'paper'``) or
      0.08 (``'repo'``).
    reference: ``'orthax'`` (default), ``'paper'`` or ``'repo'`` (above).
    beta: momentum β (EMA with Nesterov look-ahead).
    gamma: γ inside the cosh brake; default: the mode's, 1.5 (``'orthax'``,
      ``'repo'``) or 1 (``'paper'``).
    ns_steps: Newton–Schulz steps (Keller's coefficients); default: the
      mode's, 5 (``'orthax'``, ``'repo'``) or 1 (``'paper'``).
    ns_dtype: dtype of the Newton–Schulz iteration (e.g. ``jnp.bfloat16``).
    mu_dtype: momentum accumulator dtype (both branches; default float32,
      or the parameters' dtype if wider: every branch computes in float32
      and rounds the update to the gradients' dtype once).
    weight_decay: decoupled λ for matrices (``W ← W(1-ηλ)``); default: the
      mode's, 0.2 (``'orthax'``) or 0 (``'paper'``, ``'repo'``).
    adam_learning_rate: AdamW learning rate (default: in proportion to
      ``learning_rate`` as the mode's rates are: ``0.0536·learning_rate``,
      3e-3 at 0.056, under ``'orthax'``; ``0.075·learning_rate`` under
      ``'paper'``, ``0.1·learning_rate`` under ``'repo'``; see
      :func:`orthax.recipes.resolve_adam_learning_rate`).
    adam_b1, adam_b2, adam_eps: AdamW moments and epsilon (ε added after
      bias correction); the AdamW branch has no weight decay.
    router: a :class:`orthax.Router` or a ``params -> labels`` callable;
      default: ``Router()``.
    distributed: an :class:`orthax.sharding.Distributed` to run
      Newton–Schulz and the brake on whole matrices per device over a mesh.
    check_finite: skip a step whose gradient holds NaN/Inf, on device
      (update zero, state kept; :func:`orthax.skip_if_nonfinite`), and
      flag its leaves in the state (:func:`orthax.nonfinite_leaves`).

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> params = {'w': jnp.zeros((8, 8)), 'b': jnp.zeros(8)}
    >>> _ = orthax.describe(params, optimizer=orthax.hybrid_auon())
    path  shape   label   view       lr     wd
    ----  ------  ------  ---------  -----  ---
    b     (8,)    adam               0.003  0
    w     (8, 8)  matrix  1 x 8 x 8  0.056  0.2

  References: D. Maity, arXiv 2509.24320; github.com/ryyzn9/AuON.
  """
  _validate.arguments('hybrid_auon', hybrid_auon, locals())
  return _auon(True, learning_rate, reference, beta, gamma, ns_steps,
               ns_dtype, mu_dtype, weight_decay, adam_learning_rate, adam_b1,
               adam_b2, adam_eps, router, check_finite, distributed)
