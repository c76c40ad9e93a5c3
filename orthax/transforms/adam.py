"""The AdamW branch, with the eps placement of either reference family."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

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
  :math:`\hat m_t/(\sqrt{\hat v_t}+ε)`).
  """

  def init_fn(params):
    mu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype), params)
    nu = jax.tree.map(jnp.zeros_like, params)
    return RawEpsAdamState(jnp.zeros([], jnp.int32), mu, nu)

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)

    def leaf(m, v, g):
      t = count.astype(jnp.promote_types(m.dtype, jnp.float32))
      factor = jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
      return (factor * m / (jnp.sqrt(v) + eps)).astype(g.dtype)

    new = jax.tree.map(leaf, mu, nu, updates)
    mu = jax.tree.map(lambda m, p: m.astype(p.dtype), mu, state.mu)
    return new, RawEpsAdamState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def _keep_update_dtype(
    inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Casts ``inner``'s updates back to the incoming gradients' dtypes
  (``optax.adamw`` widens bf16 updates to a float32 ``mu_dtype``)."""

  def update_fn(updates, state, params=None):
    new, state = inner.update(updates, state, params)
    return jax.tree.map(lambda n, u: n.astype(u.dtype), new, updates), state

  return optax.GradientTransformation(inner.init, update_fn)


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
) -> optax.GradientTransformation:
  r"""AdamW for the non-matrix branch: ``W ← W(1-ηλ) - η·u_t``.

  ``eps_placement='corrected'`` is ``optax.adamw`` (KellerJordan/Muon,
  optax): :math:`u = \hat m/(\sqrt{\hat v}+ε)`; ``'raw'`` is
  :func:`scale_by_adam_raw_eps` (Moonlight, NAMO, ROOT).
  """
  if eps_placement not in EPS_PLACEMENTS:
    raise ValueError(f'eps_placement must be one of {EPS_PLACEMENTS}, got '
                     f'{eps_placement!r}.')
  if eps_placement == 'corrected':
    return _keep_update_dtype(optax.adamw(
        learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
        mu_dtype=mu_dtype, nesterov=nesterov))
  if nesterov:
    raise ValueError("nesterov Adam is only available with eps_placement="
                     "'corrected'.")
  return optax.chain(
      scale_by_adam_raw_eps(b1, b2, eps, mu_dtype),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
