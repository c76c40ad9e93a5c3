"""Running a transformation in float32 for float16 and bfloat16 parameters."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from orthax import _validate


def wide_dtype(dtype: Any) -> Any:
  """float32, or ``dtype`` if it is wider (float64); non-float dtypes are
  returned unchanged. (By width: JAX promotes no 8-bit float implicitly.)"""
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    return dtype
  return dtype if jnp.finfo(dtype).bits > 32 else jnp.dtype(jnp.float32)


def promote(a: Any, b: Any) -> Any:
  """``jnp.promote_types(a, b)``, except that an 8-bit float (which JAX
  promotes to nothing) joins the other dtype, or float32, by width."""
  a, b = jnp.dtype(a), jnp.dtype(b)
  narrow = lambda d: jnp.issubdtype(d, jnp.floating) and d.itemsize == 1
  if narrow(a) or narrow(b):
    return max(wide_dtype(a), wide_dtype(b), key=lambda d: d.itemsize)
  return jnp.promote_types(a, b)


def widen(tree: Any) -> Any:
  """``tree`` with every floating leaf cast to :func:`wide_dtype` (float32
  and wider leaves are returned as they are; a Python number becomes an
  array)."""
  def one(x):
    x = _array(x)
    return x.astype(wide_dtype(x.dtype))

  return jax.tree.map(one, tree)


def _array(x: Any) -> Any:
  """``x``, or ``jnp.asarray(x)`` for a leaf without a dtype (a Python
  float kept as a parameter, which optax's own transforms accept)."""
  return x if hasattr(x, 'dtype') else jnp.asarray(x)


def in_float32(inner: optax.GradientTransformation
               ) -> optax.GradientTransformationExtraArgs:
  r"""``inner`` run on float32 copies of float16/bfloat16 updates and params.

  ``init`` sees the widened parameters, so every state ``inner`` shapes like
  the parameters (moments, accumulators) is float32 unless ``inner`` was
  given a dtype for it (``mu_dtype``, ``accumulator_dtype``); ``update``
  sees widened gradients and parameters and its result is rounded to each
  incoming gradient's dtype once, at the end. float32 and wider leaves pass
  through unchanged, so on them this is ``inner`` exactly.

  Why: float16 cannot hold the intermediate values of an optimizer step. A
  gradient of 1e-5 squares to 0 (1e-3 to a subnormal), ``ε = 1e-8`` is 0,
  and an EMA momentum ``(1-β)g`` of a 1e-5 gradient is a subnormal with a
  few significant bits; Newton–Schulz in bfloat16 is off by about 1%. The
  state is unchanged in structure, so ``optax.tree.get`` finds the same
  entries.

  Args:
    inner: the transformation to run (an
      ``optax.GradientTransformation``; extra arguments of ``update`` are
      passed on where ``inner`` takes them).

  Example:
    >>> import jax.numpy as jnp, optax, orthax
    >>> params = {'w': jnp.ones((4, 4), jnp.bfloat16)}
    >>> tx = orthax.transforms.in_float32(optax.adam(1e-3))
    >>> state = tx.init(params)
    >>> state[0].mu['w'].dtype  # the moments in float32
    dtype('float32')
    >>> updates, state = tx.update(params, state, params)
    >>> updates['w'].dtype      # the update in the gradient's dtype
    dtype(bfloat16)
  """
  _validate.transformation('in_float32', 'inner', inner)

  def update_fn(updates, state, params=None, **extra_args):
    new, state = optax.with_extra_args_support(inner).update(
        widen(updates), state, None if params is None else widen(params),
        **extra_args)
    return jax.tree.map(lambda n, u: n.astype(_array(u).dtype), new,
                        updates), state

  return optax.GradientTransformationExtraArgs(
      lambda params: inner.init(widen(params)), update_fn)
