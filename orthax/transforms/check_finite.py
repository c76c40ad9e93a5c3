"""Fail loudly, naming the leaf, when a gradient is not finite."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import optax

from orthax import _tree


class NonFiniteGradientError(ValueError):
  """A gradient leaf holds NaN or Inf."""


def _raise(paths, bad):
  bad = np.asarray(bad)
  if bad.any():
    names = [p for p, b in zip(paths, bad) if b]
    raise NonFiniteGradientError(
        f'non-finite gradient (NaN or Inf) in leaf {names[0]!r}'
        + (f' and {len(names) - 1} more: {names[1:]}' if len(names) > 1 else '')
        + '. Orthogonalizing it would turn the whole matrix into NaN; fix the '
        'loss or skip the step with optax.apply_if_finite.')


def check_finite() -> optax.GradientTransformation:
  r"""Raises :class:`NonFiniteGradientError` naming every non-finite leaf.

  Identity on finite updates. The check is one ``isfinite`` reduction per leaf;
  the host callback that raises runs only on the branch where some leaf is
  not finite, so a healthy step does not synchronize with the host. Called
  eagerly it raises the ``ValueError`` subclass itself; under ``jit`` XLA
  wraps it in a runtime error whose message carries the same text.
  """

  def update_fn(updates, state, params=None):
    del params
    paths, leaves, _ = _tree.leaves_with_paths(updates)
    if not leaves:
      return updates, state
    bad = jnp.stack([~jnp.all(jnp.isfinite(x)) for x in leaves])
    if not isinstance(bad, jax.core.Tracer):  # eager: a plain ValueError
      _raise(paths, bad)
      return updates, state
    jax.lax.cond(jnp.any(bad),
                 lambda b: jax.debug.callback(
                     lambda b_: _raise(paths, b_), b),
                 lambda b: None, bad)
    return updates, state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)
