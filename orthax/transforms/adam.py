"""The AdamW branch, with the eps placement of either reference family."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from orthax import _validate
from orthax.polar.scale_safe import root_ema
from orthax.transforms import precision
from orthax.transforms.momentum import debiased_ema

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

  Args:
    b1: β1, the EMA rate of the first moment ``m``.
    b2: β2, the EMA rate of the second moment ``v`` (default 0.95, not
      optax's 0.999).
    eps: ε, added to :math:`\sqrt{v_t}` before the bias correction.
    mu_dtype: dtype of the stored ``m`` (default: float32, or the
      parameter's dtype if wider).

  Example:
    >>> import jax, jax.numpy as jnp, optax, orthax
    >>> params = {'w': jnp.ones((8, 16)), 'b': jnp.zeros(16)}
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> tx = orthax.transforms.scale_by_adam_raw_eps(eps=0.1)
    >>> u, state = tx.update(grads, tx.init(params))
    >>> round(float(u['b'][0]), 3)  # √0.05/0.1 · 0.1/(√0.05 + 0.1)
    0.691
    >>> ref, _ = optax.scale_by_adam(b2=0.95, eps=0.1).update(
    ...     grads, optax.scale_by_adam(b2=0.95, eps=0.1).init(params))
    >>> round(float(ref['b'][0]), 3)  # ε after the correction: 1/(1 + 0.1)
    0.909
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
  """``optax.ScaleByAdamState`` with the second moment kept as its root:
  ``nu_root = √v`` (per entry)."""
  count: jax.Array
  mu: Any
  nu_root: Any


def scale_by_adam_scale_safe(b1: float = 0.9, b2: float = 0.999,
                             eps: float = 1e-8, mu_dtype: Any = None,
                             nesterov: bool = False
                             ) -> optax.GradientTransformation:
  r"""``optax.scale_by_adam`` (``ε`` after the bias correction,
  ``eps_root = 0``) whose second moment cannot overflow.

  ``g²`` overflows float32 above ``|g| = 1.8·10¹⁹``: ``v`` becomes ``∞`` and
  the update of that entry 0 (optax). Here each entry keeps ``r = √v``,
  updated by ``jnp.hypot`` (which forms no square):

  .. math::
     r \leftarrow \mathrm{hypot}(\sqrt{β_2}\,r,\ \sqrt{1-β_2}\,|g|),\qquad
     u = \hat m / (r/\sqrt{1-β_2^t} + ε)

  — optax's update to float32 rounding (a few ulp: the root is taken each
  step instead of once), finite for every finite gradient, entry by entry
  (a huge entry changes nothing for its neighbours). ``nesterov`` is
  optax's (Dozat's NAdam without the extra ``β₂``):
  ``\hat m = β_1 m/(1-β_1^{t+1}) + (1-β_1) g/(1-β_1^t)``.
  """
  _validate.arguments('scale_by_adam_scale_safe', scale_by_adam_scale_safe,
                      locals())

  def init_fn(params):
    mu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype), params)
    # The root is real for a complex parameter too (|g|², as optax's).
    return ScaleSafeAdamState(
        jnp.zeros([], jnp.int32), mu,
        jax.tree.map(lambda p: jnp.zeros_like(p, dtype=_real(p.dtype)),
                     params))

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    root = jax.tree.map(lambda r, g: root_ema(r, jnp.abs(g), b2),
                        state.nu_root, updates)
    count = optax.safe_increment(state.count)
    mu_hat = jax.tree.map(
        lambda m, g: debiased_ema(m, g, b1, count.astype(_real(m.dtype)),
                                  nesterov), mu, updates)
    new = jax.tree.map(
        lambda m, r: m / (r / jnp.sqrt(1 - b2 ** count.astype(r.dtype))
                          + eps), mu_hat, root)
    return new, ScaleSafeAdamState(count, optax.tree.cast(mu, mu_dtype),
                                   optax.tree.cast_like(root, state.nu_root))

  return optax.GradientTransformation(init_fn, update_fn)


def _real(dtype: Any) -> Any:
  """The real dtype of ``dtype`` (``float32`` for ``complex64``)."""
  return jnp.finfo(dtype).dtype if jnp.issubdtype(
      dtype, jnp.complexfloating) else dtype


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

  ``scale_safe=True`` (``'corrected'`` only): the second moment is kept as
  its root, per entry, so that it cannot overflow
  (:func:`scale_by_adam_scale_safe`; optax's result to float32 rounding),
  where optax's ``g²`` overflows above ``1.8·10¹⁹``.

  Args:
    learning_rate: η (number or schedule).
    b1, b2, eps: the Adam moments' rates and ε (default 0.9, 0.95, 1e-8;
      optax's ``b2`` is 0.999).
    weight_decay: λ, decoupled, multiplied by η (default 0).
    eps_placement: ``'corrected'`` (default; ``optax.adamw``) or ``'raw'``
      (:func:`scale_by_adam_raw_eps`).
    mu_dtype: dtype of the first moment (default: float32, or the
      parameters' dtype if wider).
    nesterov: optax's Nesterov form (``'corrected'`` only; ``'raw'`` raises
      ``ValueError``).
    scale_safe: keep the second moment as its root (``'corrected'`` only;
      :func:`scale_by_adam_scale_safe`).

  Example:
    >>> import jax, jax.numpy as jnp, orthax
    >>> params = {'w': jnp.ones((8, 16)), 'b': jnp.zeros(16)}
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> tx = orthax.transforms.adamw(1e-3, weight_decay=0.1)
    >>> u, state = tx.update(grads, tx.init(params), params)
    >>> round(float(u['b'][0]), 6), round(float(u['w'][0, 0]), 6)  # -η(1 + λW)
    (-0.001, -0.0011)
  """
  _validate.arguments('adamw', adamw, locals(),
                      eps_placement=_validate.choice(EPS_PLACEMENTS))
  if scale_safe:
    if eps_placement != 'corrected':
      raise ValueError("adamw: scale_safe needs eps_placement='corrected', "
                       f'got {eps_placement!r}.')
    return precision.in_float32(optax.chain(
        scale_by_adam_scale_safe(b1, b2, eps, mu_dtype, nesterov),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    ))
  if eps_placement == 'corrected':
    return precision.in_float32(optax.adamw(
        learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
        mu_dtype=mu_dtype, nesterov=nesterov))
  if nesterov:
    raise ValueError("adamw: nesterov needs eps_placement='corrected', "
                     f'got {eps_placement!r}.')
  return precision.in_float32(optax.chain(
      scale_by_adam_raw_eps(b1, b2, eps, mu_dtype),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  ))
