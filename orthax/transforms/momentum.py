"""Heavy-ball momentum in the forms the Muon references use."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from orthax import _validate
from orthax.transforms import precision

FORMS = ('ema', 'sum')


class MomentumState(NamedTuple):
  count: jax.Array  # int32 step counter
  mu: Any           # the accumulator, one leaf per parameter


def debiased_ema(m: Any, g: Any, beta: Any, t: Any, nesterov: bool) -> Any:
  r"""optax's bias-corrected EMA output at the 1-based step ``t`` from the
  new accumulator ``m_t = βm_{t-1} + (1-β)g_t`` and the gradient ``g_t``:

  .. math::
     u_t = \frac{m_t}{1-β^t}\quad\text{or, with Nesterov,}\quad
     u_t = \frac{β\,m_t}{1-β^{t+1}} + \frac{(1-β)\,g_t}{1-β^t}

  (``optax.scale_by_adam``'s first moment; Dozat, *Incorporating Nesterov
  Momentum into Adam*, 2016). ``t`` is a real scalar in the arithmetic's
  dtype.
  """
  if nesterov:
    return (beta * (m / (1 - beta ** (t + 1)))
            + (1 - beta) * (g / (1 - beta ** t)))
  return m / (1 - beta ** t)


def momentum(
    beta: float | jax.Array = 0.95,
    *,
    form: str = 'ema',
    nesterov: bool = True,
    bias_correction: bool = False,
    accumulator_dtype: Any = None,
) -> optax.GradientTransformation:
  r"""Momentum accumulator emitting the (Nesterov) look-ahead direction.

  EMA form (KellerJordan/Muon, NorMuon, NAMO, optax)::

    m_t = β m_{t-1} + (1-β) g_t
    u_t = (1-β) g_t + β m_t      (nesterov)   |   u_t = m_t

  Sum form (Moonlight, ROOT, Dion)::

    M_t = β M_{t-1} + g_t
    u_t = g_t + β M_t            (nesterov)   |   u_t = M_t

  The two differ by the factor ``1-β``, which a Frobenius normalization
  cancels. With ``bias_correction=True`` (EMA only) the output matches
  ``optax.contrib.scale_by_muon``:
  ``u_t = β m_t/(1-β^{t+1}) + (1-β) g_t/(1-β^t)`` with nesterov, else
  ``m_t/(1-β^t)``.

  Args:
    beta: momentum coefficient β (a number or a scalar array).
    form: ``'ema'`` or ``'sum'``.
    nesterov: emit the Nesterov look-ahead instead of the accumulator.
    bias_correction: divide by ``1-β^t`` as optax does (EMA form only).
    accumulator_dtype: dtype of the stored accumulator (default: float32,
      or the parameter's dtype if wider); the update is computed in the
      wider of the accumulator's and the gradient's dtype.

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> params = {'w': jnp.ones((8, 16))}
    >>> for form in ('ema', 'sum'):
    ...   tx = orthax.momentum(0.9, form=form)
    ...   u, _ = tx.update(params, tx.init(params))   # g = 1 at step 1
    ...   print(form, round(float(u['w'][0, 0]), 4))
    ema 0.19
    sum 1.9

  References: K. Jordan, *Muon* (2024); Liu et al., *Muon is Scalable for LLM
  Training* (arXiv 2502.16982).
  """
  _validate.arguments('momentum', momentum, locals(),
                      form=_validate.choice(FORMS))
  if bias_correction and form != 'ema':
    raise ValueError('momentum: bias_correction applies to the EMA form '
                     'only.')
  acc_dtype = None if accumulator_dtype is None else jnp.dtype(accumulator_dtype)

  def init_fn(params):
    return MomentumState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=(
            precision.wide_dtype(p.dtype) if acc_dtype is None
            else acc_dtype)), params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    keep = 1.0 if form == 'sum' else 1.0 - beta

    def leaf(g, m):
      wide = precision.promote(g.dtype, m.dtype)
      g_, m_ = g.astype(wide), m.astype(wide)
      m_new = beta * m_ + keep * g_
      if bias_correction:
        u = debiased_ema(m_new, g_, beta, count.astype(wide), nesterov)
      else:
        u = keep * g_ + beta * m_new if nesterov else m_new
      return u.astype(g.dtype), m_new.astype(m.dtype)

    if not jax.tree.leaves(updates):  # e.g. a partition branch with no leaf
      return updates, MomentumState(count=count, mu=state.mu)
    pairs = jax.tree.map(leaf, updates, state.mu)
    outer = jax.tree.structure(updates)
    inner = jax.tree.structure((0, 0))
    u, mu = jax.tree.transpose(outer, inner, pairs)
    return u, MomentumState(count=count, mu=mu)

  return optax.GradientTransformation(init_fn, update_fn)
