"""NAMO and NAMO-D: Adam-style noise-adaptive step sizes for orthogonalized
momentum (a combinator that wraps the momentum and orthogonalize stages)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from orthax import _tree
from orthax import _validate
from orthax import engine
from orthax import matrices
from orthax import matrix_stages as MS
from orthax.transforms.orthogonalize import OrthogonalizeTransformation

MODES = MS.NOISE_MODES


class NoiseAdaptState(NamedTuple):
  count: jax.Array     # int32 step counter t
  momentum: Any        # the wrapped momentum stage's state
  orthogonalize: Any   # the wrapped orthogonalize stage's state
  nu: Any              # per leaf: batch shape (scalar) or batch + (fan_in,)


def noise_adapt(
    momentum: optax.GradientTransformation,
    orthogonalize: optax.GradientTransformation,
    *,
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.95,
    mode: str = 'scalar',
    mu2: float | jax.Array = 0.99,
    eps: float | jax.Array = 1e-8,
    weight_decay: float | jax.Array = 0.1,
    scale_coeff: float | jax.Array = 0.2,
    clamp_c: float | jax.Array = 0.75,
    shape: str = 'moonlight',
    matrix_specs: _tree.SpecsLike = None,
) -> optax.GradientTransformation:
  r"""NAMO / NAMO-D: a noise-adaptive step for orthogonalized momentum.

  A **combinator**: it wraps ``momentum`` and ``orthogonalize``, calls their
  ``init``/``update`` itself and reads the two signals it needs on the way —
  the raw gradient ``G`` (before momentum) and the momentum output ``u``.
  Because the adaptive step multiplies the learning rate *and* the weight
  decay and is clamped after that product, it takes ``learning_rate`` and
  ``weight_decay`` and emits the **final** step ``Δ`` (``W ← W + Δ``): put no
  learning-rate or weight-decay stage after it.

  With ``(A, B)`` the PyTorch shape ``(out, in)`` of one matrix, ``μ1 = b1``
  the momentum's β (pass the same value as to ``momentum``) and ``t`` the
  step:

  ``mode='scalar'`` (NAMO), one scalar ``v`` per matrix:

  .. math::
     v &\leftarrow μ_2 v + (1-μ_2)\|G\|_F^2,\qquad
     O = \mathrm{orthogonalize}(u)\\
     α &= η_t\,\frac{\sqrt{1-μ_2^t}}{1-μ_1^t + 10^{-12}}\cdot
          \frac{\|u\|_F}{\sqrt v + ε}\\
     Δ &= -λ\min(α, 1)\,W - \min(α\,c_s k,\,1)\,O

  ``mode='diagonal'`` (NAMO-D), one entry per input feature ``j`` (a PyTorch
  column, a row of a Flax kernel ``(in, out)``):

  .. math::
     V_j &\leftarrow μ_2 V_j + (1-μ_2)\|G_{:,j}\|^2,\qquad
     d_j = \frac{\|u_{:,j}\|}{\sqrt{V_j} + ε}\\
     d_j &\leftarrow \mathrm{clip}(d_j,\ c\,\bar d,\ \bar d / c)
        \quad(\bar d = \mathrm{mean}_j d_j;\ \text{only if } 0<c\le1
        \text{ and } \bar d \text{ is finite and} > 0)\\
     β &= η_t\sqrt{1-μ_2^t}/(1-μ_1^t + 10^{-12}),\qquad
     Δ_{:,j} = W_{:,j}\big(\max(0, 1-λ\min(d_jβ, 1)) - 1\big)
        - \min(d_jβ\,c_s k,\,1)\,O_{:,j}

  i.e. ``W ← W·diag(decay) − O·diag(η_j)``; ``k`` is the shape factor
  (``shape``; the paper's ``sqrt(max(A, B))`` by default). All numeric arguments may be
  traced (``optax.inject_hyperparams``); ``learning_rate`` may be a schedule,
  evaluated at the step count before the update (as
  ``optax.scale_by_learning_rate``). Zero gradients give a zero step.

  When ``orthogonalize`` is :func:`orthax.orthogonalize` (not wrapped in a
  chain), the step runs as a matrix stage
  (:class:`orthax.matrix_stages.NoiseAdaptStep`) in the same pass as
  Newton–Schulz: with ``distributed=``, inside its ``shard_map`` body, where
  the norms of ``G`` and ``u`` are summed over each device's pieces and
  all-reduced once per group and every device computes the step, so neither
  ``G`` nor the statistics move. Any other ``orthogonalize`` transform gets
  the same step applied to its output.

  Implemented form: minxin-zhg/namo ``src/namo.py`` @ a3f37b0 (after the eps
  fix 5f8805a: ``sqrt(v) + ε``, not ``sqrt(v + ε)`` as in Levanter's port).

  Args:
    momentum: the wrapped momentum stage (NAMO: ``orthax.momentum(μ1,
      form='ema', nesterov=True)``).
    orthogonalize: the wrapped orthogonalization (``orthax.orthogonalize()``).
    learning_rate: η (number or schedule).
    b1: μ1, the momentum's β, for the bias correction ``1 - μ1^t``.
    mode: ``'scalar'`` (NAMO) or ``'diagonal'`` (NAMO-D).
    mu2: μ2, the EMA rate of the squared gradient norm(s).
    eps: ε added to ``sqrt(v)``.
    weight_decay: λ, applied with the adaptive step ``min(α, 1)``.
    scale_coeff: ``c_s``, the coefficient of the shape factor ``k``.
    shape: the factor ``c_s`` multiplies: ``'moonlight'`` (the paper's
      ``sqrt(max(A, B))``, whose step has an RMS of about ``0.2·α`` at any
      width, so its best rate falls with the width as AdamW's does),
      ``'keller'`` (``sqrt(max(1, A/B))``: the step's spectral norm does not
      grow with the width, as Muon's), ``'spectral'`` (``sqrt(A/B)``),
      ``'inverse_side'`` (``1/min(A, B)``) or ``'none'`` (1).
    clamp_c: NAMO-D's clamp ``c`` toward the mean (``0`` or ``> 1``: off).
    matrix_specs: as in :func:`orthax.orthogonalize`.

  Example:
    >>> import jax, jax.numpy as jnp, orthax
    >>> params = {'w': jnp.ones((8, 16))}
    >>> tx = orthax.noise_adapt(orthax.momentum(0.95), orthax.orthogonalize(),
    ...                         learning_rate=0.02, b1=0.95)
    >>> grads = {'w': jnp.arange(128.0).reshape(8, 16) / 128}
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> updates['w'].shape, bool(jnp.all(jnp.isfinite(updates['w'])))
    ((8, 16), True)

  References: Zhang, Liu, Schaeffer, *Adam Improves Muon* (arXiv
  2602.17080); github.com/minxin-zhg/namo.
  """
  _validate.arguments('noise_adapt', noise_adapt, locals(),
                      momentum=_validate.transformation,
                      orthogonalize=_validate.transformation,
                      mode=_validate.choice(MODES),
                      shape=_validate.choice(MS.SCALE_MODES))
  in_body = isinstance(orthogonalize, OrthogonalizeTransformation)

  def init_fn(params):
    specs = _tree.resolve_specs(matrix_specs, params, 'noise_adapt')
    step0 = MS.NoiseAdaptStep(mode, 0.0, 0, shape=shape)
    return NoiseAdaptState(
        count=jnp.zeros([], jnp.int32),
        momentum=momentum.init(params),
        orthogonalize=orthogonalize.init(params),
        nu=_tree.plain_structure(params).unflatten(
            orthogonalize.init_extra_stage(params, step0) if in_body else
            engine.init_stage_states(step0, jax.tree.leaves(params), specs)))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('noise_adapt needs params (its weight decay uses the '
                       'adaptive step): call update(grads, state, params).')
    specs = _tree.resolve_specs(matrix_specs, updates, 'noise_adapt')
    u, mom_state = momentum.update(updates, state.momentum, params)
    lr = learning_rate(state.count) if callable(learning_rate) else (
        learning_rate)
    count = optax.safe_increment(state.count)
    step = MS.NoiseAdaptStep(
        mode, lr, count, b1=b1, mu2=mu2, eps=eps, weight_decay=weight_decay,
        scale_coeff=scale_coeff, clamp_c=clamp_c, shape=shape)
    g_l, treedef = jax.tree.flatten(updates)
    flat = treedef.flatten_up_to
    per_leaf = _tree.plain_structure(updates)  # nu's, without Flax boxes
    if in_body:
      # One pass: Newton–Schulz, then this step on the whole matrices (on a
      # mesh, in the same shard_map body; the gradient's norms are summed
      # from each device's pieces, the gradient itself does not move).
      o, orth_state, (nu,), (shrink,) = orthogonalize.update_with_stages(
          u, state.orthogonalize, [step], [per_leaf.flatten_up_to(state.nu)],
          aux=updates)
      o_l = flat(o)
    else:
      o, orth_state = orthogonalize.update(u, state.orthogonalize, params)
      res = engine.map_matrices(
          None, [x.astype(g.dtype) for x, g in zip(flat(o), g_l)], specs,
          stages=[step], states=[per_leaf.flatten_up_to(state.nu)],
          aux=g_l, inputs=flat(u))
      o_l, (nu,), (shrink,) = res
    new = [_step(g, oo, w, r, s) for g, oo, w, r, s in
           zip(g_l, o_l, flat(params), shrink, specs)]
    return (jax.tree.unflatten(treedef, new),
            NoiseAdaptState(count, mom_state, orth_state,
                            per_leaf.unflatten(list(nu))))

  return optax.GradientTransformation(init_fn, update_fn)


def _step(g, o, w, shrink, spec):
  """``Δ = W·r + O'`` per matrix (``W·diag(r)`` for a per-fan-in ``r``)."""
  dt = shrink.dtype
  if g.size == 0:  # no matrix (a stack of zero layers): -1 is not inferable
    return jnp.zeros_like(g)
  b, _, _ = spec.matrix_shape(g.shape)
  # r ([b, 1] or [b, fan_in]) laid out like the leaf: W and O are never
  # reshaped (an Explicit sharding may refuse a view that merges axes).
  # It comes sharded like the leaf's batch axes; it is gathered only where
  # several of them merge into b (one batch axis: stacked layers sharded
  # on theirs keep r where their matrices are).
  if len(spec.resolve(g.shape)[0]) > 1:
    shrink = engine.replicated(shrink)
  r = matrices.per_matrix_to_leaf(shrink.reshape(b, -1), spec, g.shape)
  return (w.astype(dt) * r + o.astype(dt)).astype(g.dtype)
