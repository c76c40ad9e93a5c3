"""Non-finite gradients: a step that is skipped on device, and flags that
say which leaves were at fault.

The decision is made inside the compiled step, on every device alike, so a
NaN on a mesh never leaves some devices waiting in a collective for others
that stopped; the host reads the outcome from the optimizer state
afterwards (:func:`nonfinite_status`, :func:`nonfinite_leaves`,
:func:`raise_if_nonfinite`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from orthax import _tree


class NonFiniteGradientError(ValueError):
  """A gradient leaf holds NaN or Inf."""


class SkipIfNonfiniteState(NamedTuple):
  """State of :func:`skip_if_nonfinite`.

  Attributes:
    inner_state: the wrapped transformation's state (kept as it was by a
      skipped step).
    nonfinite: a tree shaped like the gradients, one bool scalar per leaf:
      True where that leaf held NaN or Inf at the last step.
    consecutive: skipped steps in a row up to the last one (0 after a step
      that was applied).
    total: skipped steps since ``init``.
  """
  inner_state: Any
  nonfinite: Any
  consecutive: jax.Array
  total: jax.Array


def skip_if_nonfinite(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  r"""Applies ``inner`` only when every gradient leaf is finite.

  With :math:`\mathrm{ok} = \bigwedge_\ell \mathrm{all}(\mathrm{isfinite}(g_\ell))`,

  .. math::
     (u, s') = \begin{cases} \mathrm{inner}(g, s) & \mathrm{ok} \\
                             (0, s) & \text{otherwise,} \end{cases}

  as ``optax.apply_if_finite`` does, but with no limit on skipped steps and
  with the outcome kept per leaf in the state, so that the caller can name
  the leaves at fault. On a skipped step ``inner`` sees zeros instead of
  the gradient (its result is discarded; nothing in it can loop on a NaN).
  The flags are reductions of the (possibly sharded) gradients, computed
  alike on every device: no host callback, nothing that can hang a mesh.

  Reading the outcome in your own loop (the trainer does this for you,
  with ``train.nonfinite`` = ``'raise'`` or ``'skip'``)::

    updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
    orthax.raise_if_nonfinite(opt_state, step)   # or:
    if orthax.nonfinite_status(opt_state).consecutive > 0:
      print('skipped; bad leaves:', orthax.nonfinite_leaves(opt_state))

  Args:
    inner: the transformation to guard (every orthax recipe is wrapped
      with it by ``check_finite=True``, its default).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`SkipIfNonfiniteState`.

  Example:
    >>> import jax.numpy as jnp, optax, orthax
    >>> tx = orthax.skip_if_nonfinite(optax.sgd(0.1))
    >>> params = {'w': jnp.ones(2)}
    >>> u, s = tx.update({'w': jnp.array([1.0, jnp.nan])}, tx.init(params))
    >>> u['w'].tolist(), orthax.nonfinite_leaves(s)
    ([0.0, 0.0], ['w'])
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return SkipIfNonfiniteState(
        inner_state=inner.init(params),
        nonfinite=jax.tree.map(lambda _: jnp.zeros([], jnp.bool_), params),
        consecutive=jnp.zeros([], jnp.int32),
        total=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    flags = jax.tree.map(lambda g: ~jnp.all(jnp.isfinite(g)), updates)
    leaves = jax.tree.leaves(flags)
    ok = ~jnp.any(jnp.stack(leaves)) if leaves else jnp.bool_(True)
    safe = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)),
                        updates)
    new, inner_state = inner.update(safe, state.inner_state, params,
                                    **extra_args)
    new = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new)
    inner_state = jax.tree.map(lambda a, b: jnp.where(ok, a, b),
                               inner_state, state.inner_state)
    skipped = (~ok).astype(jnp.int32)
    return new, SkipIfNonfiniteState(
        inner_state=inner_state, nonfinite=flags,
        consecutive=(state.consecutive + 1) * skipped,
        total=state.total + skipped)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find(state: Any) -> SkipIfNonfiniteState | None:
  if isinstance(state, SkipIfNonfiniteState):
    return state
  if isinstance(state, (tuple, list)):
    children = state
  elif isinstance(state, dict):
    children = state.values()
  else:
    return None
  for child in children:
    found = _find(child)
    if found is not None:
      return found
  return None


def nonfinite_status(opt_state: Any) -> SkipIfNonfiniteState | None:
  """The :func:`skip_if_nonfinite` state inside ``opt_state`` (searched
  through chains, partitions and ``optax.inject_hyperparams``), or ``None``
  when the optimizer has no such guard. Works on traced and host values."""
  return _find(opt_state)


def nonfinite_leaves(opt_state: Any) -> list[str]:
  """Paths (``'a/b/kernel'``) of the leaves whose gradient was not finite
  at the last step; ``[]`` when it was applied or there is no guard."""
  status = nonfinite_status(opt_state)
  if status is None:
    return []
  paths, flags, _ = _tree.leaves_with_paths(status.nonfinite)
  flags = jax.device_get(flags)
  return [p for p, f in zip(paths, flags) if bool(np.asarray(f))]


def raise_if_nonfinite(opt_state: Any, step: int | None = None) -> None:
  """Raises :class:`NonFiniteGradientError` naming the leaves when the last
  step was skipped for a non-finite gradient (host side: it reads the
  flags back from the devices)."""
  names = nonfinite_leaves(opt_state)
  if not names:
    return
  at = '' if step is None else f' at step {step}'
  raise NonFiniteGradientError(
      f'non-finite gradient (NaN or Inf){at} in leaf {names[0]!r}'
      + (f' and {len(names) - 1} more: {names[1:]}' if len(names) > 1
         else '')
      + '. The step was skipped (parameters and optimizer state unchanged); '
      'fix the loss, or skip such steps with the trainer\'s '
      "train.nonfinite='skip'.")
