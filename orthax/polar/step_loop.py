"""The loop over an iteration's steps, rolled on CPU and unrolled elsewhere.

On a GPU, a rolled ``lax.while_loop`` of a few large products copies its
carry each step and leaves the device idle between steps while the next one
is launched: on GPT-2 small's Muon update (H200, bf16) a quarter of the
6.5 ms was such gaps, and the unrolled product chain alone is 21% faster than
the rolled one (``scripts/bench_ns.py``'s two roofline rows). On a CPU,
unrolling gains nothing measurable and multiplies compile time, which is most
of what small programs cost there. So a loop whose bounds are Python
integers runs rolled on CPU and unrolled on every other platform (one
lowering per platform: :func:`jax.lax.platform_dependent`); a traced bound
keeps the rolled loop everywhere.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np


def run_steps(lower: int | jax.Array, upper: int | jax.Array,
              body: Callable[[Any, Any], Any], init: Any) -> Any:
  """``jax.lax.fori_loop(lower, upper, body, init)``, unrolled off CPU.

  ``body(k, carry)`` receives a Python ``int`` ``k`` when unrolled and a
  traced one when rolled; it must work with both.

  Example:
    >>> import jax.numpy as jnp
    >>> from orthax.polar.step_loop import run_steps
    >>> float(run_steps(0, 4, lambda k, x: x * 2, jnp.float32(1)))
    16.0
  """
  rolled = lambda c: jax.lax.fori_loop(lower, upper, body, c)
  static = (int, np.integer)
  if not (isinstance(lower, static) and isinstance(upper, static)):
    return rolled(init)
  lower, upper = int(lower), int(upper)

  def unrolled(c):
    for k in range(lower, upper):
      c = body(k, c)
    return c

  leaves, tree = jax.tree.flatten(init)
  wrap = lambda fn: lambda *xs: jax.tree.leaves(
      fn(jax.tree.unflatten(tree, xs)))
  out = jax.lax.platform_dependent(*leaves, cpu=wrap(rolled),
                                   default=wrap(unrolled))
  return jax.tree.unflatten(tree, out)


__all__ = ['run_steps']
