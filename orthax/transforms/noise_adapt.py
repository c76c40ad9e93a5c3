"""NAMO and NAMO-D: Adam-style noise-adaptive step sizes for orthogonalized
momentum (a combinator that wraps the momentum and orthogonalize stages)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from orthax import _tree
from orthax import matrices

MODES = ('scalar', 'diagonal')


class NoiseAdaptState(NamedTuple):
  count: jax.Array     # int32 step counter t
  momentum: Any        # the wrapped momentum stage's state
  orthogonalize: Any   # the wrapped orthogonalize stage's state
  nu: Any              # per leaf: batch shape (scalar) or batch + (fan_in,)


def _wide(dtype) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


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
     Δ &= -λ\min(α, 1)\,W - \min(α\,c_s\sqrt{\max(A,B)},\,1)\,O

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
        - \min(d_jβ\,c_s\sqrt{\max(A,B)},\,1)\,O_{:,j}

  i.e. ``W ← W·diag(decay) − O·diag(η_j)``. All numeric arguments may be
  traced (``optax.inject_hyperparams``); ``learning_rate`` may be a schedule,
  evaluated at the step count before the update (as
  ``optax.scale_by_learning_rate``). Zero gradients give a zero step.

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
    scale_coeff: ``c_s`` of the shape factor ``c_s·sqrt(max(A, B))``.
    clamp_c: NAMO-D's clamp ``c`` toward the mean (``0`` or ``> 1``: off).
    matrix_specs: as in :func:`orthax.orthogonalize`.

  References: Zhang, Liu, Schaeffer, *Adam Improves Muon* (arXiv
  2602.17080); github.com/minxin-zhg/namo.
  """
  if mode not in MODES:
    raise ValueError(f'noise_adapt mode must be one of {MODES}, got {mode!r}.')

  def stat_shape(shape, spec):
    batch, _, _ = spec.resolve(shape)
    bshape = tuple(shape[a] for a in batch)
    return bshape if mode == 'scalar' else bshape + (
        spec.matrix_shape(shape)[1],)

  def sq_norms(x, spec):
    """‖x‖_F² per matrix, or ‖x[:, j]‖² per fan-in unit j: ``[b]``/``[b, fi]``."""
    m = matrices.to_matrices(x, spec).astype(_wide(x.dtype))
    return jnp.sum(m * m, axis=(-2, -1) if mode == 'scalar' else -1)

  def init_fn(params):
    specs = _tree.resolve_specs(matrix_specs, params, 'noise_adapt')
    leaves, treedef = jax.tree.flatten(params)
    return NoiseAdaptState(
        count=jnp.zeros([], jnp.int32),
        momentum=momentum.init(params),
        orthogonalize=orthogonalize.init(params),
        nu=jax.tree.unflatten(treedef, [
            jnp.zeros(stat_shape(x.shape, s), _wide(x.dtype))
            for x, s in zip(leaves, specs)]))

  def leaf(g, u, o, w, v, spec, lr, count):
    b, fi, fo = spec.matrix_shape(g.shape)
    dt = v.dtype
    v2 = mu2 * v.reshape(b, -1) + (1 - mu2) * sq_norms(g, spec).reshape(b, -1)
    t = count.astype(dt)
    base = lr * jnp.sqrt(1 - mu2 ** t) / (1 - b1 ** t + 1e-12)
    ratio = jnp.sqrt(sq_norms(u, spec).reshape(b, -1)) / (jnp.sqrt(v2) + eps)
    shape_k = scale_coeff * max(fi, fo) ** 0.5
    if mode == 'diagonal':
      mean = jnp.nanmean(ratio, axis=-1, keepdims=True)
      on = ((clamp_c > 0) & (clamp_c <= 1) & jnp.isfinite(mean) & (mean > 0))
      c = jnp.where(on, clamp_c, 1.0)
      lo = jnp.where(on, c * mean, 0.0)
      hi = jnp.where(on, mean / c, jnp.inf)
      ratio = jnp.clip(ratio, lo, hi)
    step = ratio * base                                       # [b, 1] / [b, fi]
    # W·(decay - 1), with decay - 1 formed directly (no 1 - x - 1 rounding).
    shrink = -weight_decay * jnp.minimum(step, 1.0)
    if mode == 'diagonal':  # max(0, 1 - x) - 1
      shrink = jnp.maximum(shrink, -1.0)
    eta = jnp.minimum(step * shape_k, 1.0)
    wm = matrices.to_matrices(w, spec).astype(dt)
    om = matrices.to_matrices(o, spec).astype(dt)
    delta = wm * shrink[..., None] - eta[..., None] * om
    return (matrices.from_matrices(delta, spec, g.shape).astype(g.dtype),
            v2.reshape(v.shape))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('noise_adapt needs params (its weight decay uses the '
                       'adaptive step): call update(grads, state, params).')
    specs = _tree.resolve_specs(matrix_specs, updates, 'noise_adapt')
    u, mom_state = momentum.update(updates, state.momentum, params)
    o, orth_state = orthogonalize.update(u, state.orthogonalize, params)
    lr = learning_rate(state.count) if callable(learning_rate) else (
        learning_rate)
    count = optax.safe_increment(state.count)
    g_l, treedef = jax.tree.flatten(updates)
    flat = lambda tree: treedef.flatten_up_to(tree)
    pairs = [leaf(*args, lr, count) for args in zip(
        g_l, flat(u), flat(o), flat(params), flat(state.nu), specs)]
    new = jax.tree.unflatten(treedef, [p[0] for p in pairs])
    nu = jax.tree.unflatten(treedef, [p[1] for p in pairs])
    return new, NoiseAdaptState(count, mom_state, orth_state, nu)

  return optax.GradientTransformation(init_fn, update_fn)
