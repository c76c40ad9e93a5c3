"""The AdamW branch, with the eps placement of either reference family."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from orthax import _validate
from orthax.polar.newton_schulz import pow2
from orthax.transforms import precision

EPS_PLACEMENTS = ('corrected', 'raw')


class RawEpsAdamState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any


def scale_by_adam_raw_eps(b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                          mu_dtype: Any = None) -> optax.GradientTransformation:
  r"""Adam with ``eps`` added to :math:`\sqrt{v_t}` before bias correction.

  .. math::
     u_t = \frac{\sqrt{1-β_2^t}}{1-β_1^t}\cdot\frac{m_t}{\sqrt{v_t} + ε}

  as in Moonlight's ``toy_train.py`` and the NAMO repository's AdamW
  (``optax.scale_by_adam`` adds ε after the correction:
  :math:`\hat m_t/(\sqrt{\hat v_t}+ε)`). The arithmetic runs in float32
  (or the gradient's dtype if wider) and ``v`` is stored so: a float16
  gradient of 1e-5 squares to 0 in float16, and ``ε = 1e-8`` is 0 there.
  ``m`` is stored in ``mu_dtype`` (default: as ``v``); the update comes back
  in the gradient's dtype.
  """
  _validate.arguments('scale_by_adam_raw_eps', scale_by_adam_raw_eps,
                      locals())

  def init_fn(params):
    wide = lambda p: precision.wide_dtype(p.dtype)
    mu = jax.tree.map(lambda p: jnp.zeros_like(
        p, wide(p) if mu_dtype is None else mu_dtype), params)
    nu = jax.tree.map(lambda p: jnp.zeros_like(p, wide(p)), params)
    return RawEpsAdamState(jnp.zeros([], jnp.int32), mu, nu)

  def update_fn(updates, state, params=None):
    del params
    wide = precision.widen(updates)
    mu = optax.tree.update_moment(wide, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(wide, state.nu, b2, 2)
    count = optax.safe_increment(state.count)

    def leaf(m, v, g):
      t = count.astype(precision.wide_dtype(m.dtype))
      factor = jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
      return (factor * m / (jnp.sqrt(v) + eps)).astype(g.dtype)

    new = jax.tree.map(leaf, mu, nu, updates)
    cast = lambda new, old: new.astype(old.dtype)
    return new, RawEpsAdamState(count, jax.tree.map(cast, mu, state.mu),
                                jax.tree.map(cast, nu, state.nu))

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleSafeAdamState(NamedTuple):
  """``optax.ScaleByAdamState`` with the second moment kept as
  ``nu = v·4⁻ᵉ`` and ``e`` in ``nu_exp`` (one int32 per leaf, 0 until a
  gradient exceeds ``2⁶²``; ``nu`` is then ``v`` itself)."""
  count: jax.Array
  mu: Any
  nu: Any
  nu_exp: Any


_NU_BITS = 62  # |g|·2⁻ᵉ ≤ 2⁶²: its square, ≤ 2¹²⁴, fits in float32


def _excess(log2_a):
  """``e ≥ 0`` with ``a·2⁻ᵉ ≤ 2⁶²`` from ``log2 a`` (0 for ``a`` of 0 or
  NaN; at most 126, for ``a = ∞``), int32."""
  over = jnp.minimum(jnp.ceil(log2_a) - _NU_BITS, 126.0)
  return jnp.where(log2_a > _NU_BITS, over, 0.0).astype(jnp.int32)


def _scaled_second_moment(g, nu, e_old, b2, count_old):
  """``v ← β₂v + (1-β₂)g²`` on ``v = nu·4^e_old``, returned as ``(nu, e)``
  with ``e`` the least exponent ≥ 0 that keeps ``|g|·2⁻ᵉ`` and the
  bias-corrected old ``√v̂·2⁻ᵉ`` at most ``2⁶²``: the new ``v̂``, their
  weighted mean, cannot overflow. With ``e = e_old = 0`` the arithmetic
  is ``optax``'s, bit for bit."""
  f32 = jnp.float32
  lg = jnp.log2(jnp.max(jnp.abs(g), initial=0).astype(f32))
  corr = 1 - b2 ** count_old.astype(f32)
  lv = 0.5 * (jnp.log2(jnp.max(nu, initial=0).astype(f32)) - jnp.log2(corr)) + e_old
  e = jnp.maximum(_excess(lg), _excess(jnp.where(count_old > 0, lv, 0.0)))
  keep, scale = pow2(e_old - e, nu.dtype), pow2(-e, g.dtype)
  return (1 - b2) * ((g * scale) ** 2) + b2 * (nu * keep * keep), e


def scale_by_adam_scale_safe(b1: float = 0.9, b2: float = 0.999,
                             eps: float = 1e-8, mu_dtype: Any = None
                             ) -> optax.GradientTransformation:
  r"""``optax.scale_by_adam`` (``ε`` after the bias correction,
  ``eps_root = 0``) whose second moment cannot overflow.

  ``g²`` overflows float32 above ``|g| = 1.8·10¹⁹``: ``v`` becomes ``∞`` and
  the update of that entry 0 (optax). Here ``v`` is kept as ``v·4⁻ᵉ`` with
  a per-leaf exponent ``e`` (:class:`ScaleSafeAdamState`): each step takes
  the least ``e ≥ 0`` that keeps ``|g|·2⁻ᵉ`` and ``√v̂·2⁻ᵉ`` at most
  ``2⁶²``, rescales the stored ``v`` by the exact power of two and returns
  ``m̂/(√(v̂·4⁻ᵉ)·2ᵉ + ε)``. While every gradient stays below ``2⁶²``
  (``4.6·10¹⁸``) ``e = 0``, ``nu`` is ``v``, and the result is optax's,
  bit for bit. Costs two extra reductions per leaf (``max|g|``,
  ``max nu``).
  """
  _validate.arguments('scale_by_adam_scale_safe', scale_by_adam_scale_safe,
                      locals())

  def init_fn(params):
    mu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype), params)
    nu = jax.tree.map(jnp.zeros_like, params)
    exp = jax.tree.map(lambda _: jnp.zeros([], jnp.int32), params)
    return ScaleSafeAdamState(jnp.zeros([], jnp.int32), mu, nu, exp)

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    flat = jax.tree.structure(updates).flatten_up_to
    pairs = [_scaled_second_moment(g, v, e, b2, state.count) for g, v, e in
             zip(flat(updates), flat(state.nu), flat(state.nu_exp))]
    unflat = lambda xs: jax.tree.unflatten(jax.tree.structure(updates), xs)
    nu, exp = unflat([v for v, _ in pairs]), unflat([e for _, e in pairs])
    count = optax.safe_increment(state.count)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    new = jax.tree.map(
        lambda m, v, e: m / (jnp.sqrt(v + 0.0) * pow2(e, v.dtype) + eps),
        mu_hat, nu_hat, exp)
    return new, ScaleSafeAdamState(count, optax.tree.cast(mu, mu_dtype),
                                   optax.tree.cast_like(nu, state.nu), exp)

  return optax.GradientTransformation(init_fn, update_fn)


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    eps_placement: str = 'corrected',
    mu_dtype: Any = None,
    nesterov: bool = False,
    scale_safe: bool = False,
) -> optax.GradientTransformation:
  r"""AdamW for the non-matrix branch: ``W ← W(1-ηλ) - η·u_t``.

  ``eps_placement='corrected'`` is ``optax.adamw`` (KellerJordan/Muon,
  optax): :math:`u = \hat m/(\sqrt{\hat v}+ε)`; ``'raw'`` is
  :func:`scale_by_adam_raw_eps` (Moonlight, NAMO, ROOT).

  Both run in float32 (or the parameters' dtype if wider), on widened copies
  of the gradients and parameters: the moments are kept in float32 (``m`` in
  ``mu_dtype`` if given) and the update is rounded to the gradient's dtype
  once, at the end. (In float16 a gradient of 1e-3 squares to a subnormal,
  one of 1e-5 to 0, and ``ε = 1e-8`` is 0: ``m/(√v + ε)`` is then NaN.)

  ``scale_safe=True`` (``'corrected'`` only, no ``nesterov``): the second
  moment is kept so that it cannot overflow
  (:func:`scale_by_adam_scale_safe`; the same result, bit for bit, below
  ``|g| = 2⁶²``), where optax's ``g²`` overflows above ``1.8·10¹⁹``.
  """
  _validate.arguments('adamw', adamw, locals())
  if eps_placement not in EPS_PLACEMENTS:
    raise ValueError(f'eps_placement must be one of {EPS_PLACEMENTS}, got '
                     f'{eps_placement!r}.')
  if scale_safe:
    if eps_placement != 'corrected' or nesterov:
      raise ValueError("adamw: scale_safe=True needs eps_placement="
                       "'corrected' and nesterov=False.")
    return precision.in_float32(optax.chain(
        scale_by_adam_scale_safe(b1, b2, eps, mu_dtype),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    ))
  if eps_placement == 'corrected':
    return precision.in_float32(optax.adamw(
        learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
        mu_dtype=mu_dtype, nesterov=nesterov))
  if nesterov:
    raise ValueError("nesterov Adam is only available with eps_placement="
                     "'corrected'.")
  return precision.in_float32(optax.chain(
      scale_by_adam_raw_eps(b1, b2, eps, mu_dtype),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  ))
