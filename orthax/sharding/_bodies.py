"""The per-strategy bodies that run inside ``jax.shard_map`` (see
:mod:`orthax.sharding._execute`).

Each body is ``(stack, states, post) -> (stack, states)``: ``stack`` is the
device's local ``[N, ·, ·]`` stack of the group (wide orientation),
``states`` the ``[N, ...]`` stacks of the stateful matrix stages, and
``post(y, states)`` runs the matrix stages on the whole matrices ``y[k, m,
n]`` (update dtype) a device ends up with, and on their ``[k, ...]`` states.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from orthax.sharding._plan import GroupPlan

NSFn = Callable[[jax.Array], jax.Array]


def _pad(x, padded):
  if padded == x.shape[0]:
    return x
  return jnp.concatenate(
      [x, jnp.zeros((padded - x.shape[0],) + x.shape[1:], x.dtype)], axis=0)


def _mine(states, axes, padded, k):
  """This device's ``k`` rows of each padded ``[N, ...]`` state stack."""
  if not states:
    return []
  idx = jax.lax.axis_index(axes)
  return [jax.lax.dynamic_slice_in_dim(_pad(s, padded), idx * k, k, axis=0)
          for s in states]


def _gather(states, axes, N):
  return [jax.lax.all_gather(s, axes, axis=0, tiled=True)[:N] for s in states]


def _a2a_body(g: GroupPlan, ns_fn: NSFn, ns_dtype):
  axes = g.split_axes
  gr, gc = g.row_shards, g.col_shards
  m, n, k = g.m, g.n, g.padded // g.shards
  a_, b_ = m // gr, n // gc

  def run(stack, states, post):  # [N, a_, b_] local pieces
    N, dt = stack.shape[0], stack.dtype
    x = stack.astype(g.wire_dtype)
    if g.padded > N:
      x = _pad(x, g.padded)
      # Keeps XLA from splitting the padded stack into per-destination
      # operands (XLA:CPU then fails its verifier on mixed layouts).
      x = jax.lax.optimization_barrier(x)
    r = jax.lax.all_to_all(x, axes, 0, 0, tiled=True)
    # r[s·k + i] = piece s (s = row-shard·gc + col-shard) of my i-th matrix.
    full = (r.reshape(gr, gc, k, a_, b_).transpose(2, 0, 3, 1, 4)
            .reshape(k, m, n))
    y = ns_fn(full.astype(ns_dtype or dt)).astype(dt)
    y, mine = post(y, _mine(states, axes, g.padded, k))
    y = y.astype(g.wire_dtype)
    back = (y.reshape(k, gr, a_, gc, b_).transpose(1, 3, 0, 2, 4)
            .reshape(g.padded, a_, b_))
    out = jax.lax.all_to_all(back, axes, 0, 0, tiled=True)
    return out[:N].astype(dt), _gather(mine, axes, N)

  return run


def _replicated_body(g: GroupPlan, ns_fn: NSFn, ns_dtype):
  axes, k = g.split_axes, g.padded // g.shards

  def run(stack, states, post):  # [N, m, n], the whole stack on every device
    N, dt = stack.shape[0], stack.dtype
    idx = jax.lax.axis_index(axes)
    mine = jax.lax.dynamic_slice_in_dim(_pad(stack, g.padded), idx * k, k,
                                        axis=0)
    y = ns_fn(mine.astype(ns_dtype or dt)).astype(dt)
    y, st = post(y, _mine(states, axes, g.padded, k))
    full = jax.lax.all_gather(y.astype(g.wire_dtype), axes, axis=0,
                              tiled=True)
    return full[:N].astype(dt), _gather(st, axes, N)

  return run


def _local_body(g: GroupPlan, ns_fn: NSFn, ns_dtype):
  del g

  def run(stack, states, post):
    y = ns_fn(stack.astype(ns_dtype or stack.dtype)).astype(stack.dtype)
    return post(y, states)

  return run


def _gram_body(g: GroupPlan, ns_fn: NSFn, ns_dtype):
  axes = g.split_axes

  def run(stack, states, post):  # [N, m, n/G]: this device's column blocks
    y = ns_fn(stack.astype(ns_dtype or stack.dtype),
              col_reduce=lambda a: jax.lax.psum(a, axes),
              col_shards=g.shards)
    return post(y.astype(stack.dtype), states)

  return run


BODIES = {'a2a': _a2a_body, 'replicated': _replicated_body,
           'local': _local_body, 'gram': _gram_body}
