"""The per-strategy bodies that run inside ``jax.shard_map`` (see
:mod:`orthax.sharding._execute`).

Each body is ``(stack, per, owned, post) -> (stack, slots, owned')``:
``stack`` is the device's local ``[N, ·, ·]`` stack of the group (wide
orientation), ``per`` a list of ``[N, ...]`` per-matrix arrays (the stateful
matrix stages' per-leaf states and the scaling stages' factors), ``owned``
the slot states ``[k, ...]`` of the ``k`` matrices the device ends up with,
and ``post(y, mine, owned)`` runs the matrix stages on those whole matrices
``y[k, m, n]`` (update dtype), on their ``[k, ...]`` rows ``mine`` of
``per`` and on ``owned``; it returns ``y``, ``[k, ...]`` slots (new per-leaf
states, outputs), which come back as ``[N, ...]`` stacks, and the new slot
states, which stay where they are.

:data:`NORMS` holds, per strategy, how a body turns the partial norms of the
device's pieces into the norms of the whole matrices of its local stack;
:func:`piece_norms` takes them so, scale-safely.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from orthax.polar.scale_safe import signed_root
from orthax.polar.scale_safe import signed_squares
from orthax.polar.scale_safe import split_root
from orthax.polar.scale_safe import split_squares
from orthax.sharding._plan_types import GroupPlan

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


def _concat_rows(arrays):
  """``[n, ...]`` arrays as one ``[n, W]`` array (common dtype) and the
  way back."""
  flat = [a.reshape(a.shape[0], -1) for a in arrays]
  widths = [f.shape[1] for f in flat]
  cat = jnp.concatenate(flat, axis=1) if len(flat) > 1 else flat[0]

  def split(x):
    out, start = [], 0
    for a, w in zip(arrays, widths):
      out.append(x[:, start:start + w].reshape((x.shape[0],) + a.shape[1:])
                 .astype(a.dtype))
      start += w
    return out

  return cat, split


def _gather(slots, axes, N):
  """The ``[N, ...]`` stacks of every device's ``[k, ...]`` slots: one
  ``all_gather`` for all of a group's stage states and outputs."""
  if not slots:
    return []
  cat, split = _concat_rows(slots)
  return split(jax.lax.all_gather(cat, axes, axis=0, tiled=True)[:N])


def _a2a_body(g: GroupPlan, ns_fn: NSFn):
  axes = g.split_axes
  gr, gc = g.row_shards, g.col_shards
  m, n, k = g.m, g.n, g.padded // g.shards
  a_, b_ = m // gr, n // gc

  def run(stack, states, owned, post):  # [N, a_, b_] local pieces
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
    # Only the wire is in its dtype: Newton–Schulz iterates in the
    # matrices' own (or the transform's ns_dtype), as on one device.
    y = ns_fn(full.astype(dt)).astype(dt)
    y, mine, owned = post(y, _mine(states, axes, g.padded, k), owned)
    y = y.astype(g.wire_dtype)
    back = (y.reshape(k, gr, a_, gc, b_).transpose(1, 3, 0, 2, 4)
            .reshape(g.padded, a_, b_))
    out = jax.lax.all_to_all(back, axes, 0, 0, tiled=True)
    if g.padded > N:
      # The same barrier for the transpose (jax.grad through the update):
      # the cotangent of out[:N] is padded with zeros before the reverse
      # all-to-all.
      out = jax.lax.optimization_barrier(out)
    return out[:N].astype(dt), _gather(mine, axes, N), owned

  return run


def _replicated_body(g: GroupPlan, ns_fn: NSFn):
  axes, k = g.split_axes, g.padded // g.shards

  def run(stack, states, owned, post):  # [N, m, n]: every device
    N, dt = stack.shape[0], stack.dtype
    idx = jax.lax.axis_index(axes)
    mine = jax.lax.dynamic_slice_in_dim(_pad(stack, g.padded), idx * k, k,
                                        axis=0)
    y = ns_fn(mine).astype(dt)
    y, st, owned = post(y, _mine(states, axes, g.padded, k), owned)
    full = jax.lax.all_gather(y.astype(g.wire_dtype), axes, axis=0,
                              tiled=True)
    return full[:N].astype(dt), _gather(st, axes, N), owned

  return run


def _local_body(g: GroupPlan, ns_fn: NSFn):
  del g

  def run(stack, states, owned, post):
    y = ns_fn(stack).astype(stack.dtype)
    return post(y, states, owned)

  return run


def _gram_body(g: GroupPlan, ns_fn: NSFn):
  axes = g.split_axes

  def run(stack, states, owned, post):  # [N, m, n/G]: my column blocks
    y = ns_fn(stack,
              col_reduce=lambda a: jax.lax.psum(a, axes),
              col_shards=g.shards)
    return post(y.astype(stack.dtype), states, owned)

  return run


def _packed_psum(parts, axes):
  """``psum`` of several arrays in one all-reduce."""
  cat, split = _concat_rows(parts)
  return split(jax.lax.psum(cat, axes))


def _a2a_norms(g: GroupPlan, partials):
  """Each device holds piece ``(r, c)`` of every matrix: a kept axis is
  placed at the piece's offset in a zero ``[N, m|1, n|1]`` array, and one
  float32 ``psum`` over the matrix's axes adds the pieces up, giving every
  device the whole matrices' norms of the group's local stack."""
  if not partials:
    return []
  r = jax.lax.axis_index(g.row_axes) if g.row_axes else 0
  c = jax.lax.axis_index(g.col_axes) if g.col_axes else 0
  placed = []
  for p, axes in partials:
    shape = (p.shape[0], 1 if -2 in axes else g.m, 1 if -1 in axes else g.n)
    at = (0, 0 if -2 in axes else r * p.shape[1],
          0 if -1 in axes else c * p.shape[2])
    placed.append(p if shape == p.shape else jax.lax.dynamic_update_slice(
        jnp.zeros(shape, p.dtype), p, at))
  return _packed_psum(placed, g.split_axes)


def _gram_norms(g: GroupPlan, partials):
  """Column blocks: the norms summed along the columns go through one
  ``psum`` (a single all-reduce for all of them); a kept column axis stays
  in blocks."""
  out = [p for p, _ in partials]
  split = [i for i, (_, ax) in enumerate(partials) if -1 in ax]
  if split:
    for i, v in zip(split, _packed_psum([out[i] for i in split],
                                        g.split_axes)):
      out[i] = v
  return out


def _whole_norms(g: GroupPlan, partials):
  """``local`` and ``replicated``: the device holds whole matrices."""
  del g
  return [p for p, _ in partials]


def piece_norms(g: GroupPlan, sources):
  """The whole matrices' norms ``√Σ x²`` (over each source's summed axes)
  from the device's pieces of them (``a2a``, ``gram``), scale-safely.

  ``sources``: per norm, ``(parts, axes)``, ``parts`` the leaves' local
  ``[n_i, ·, ·]`` pieces (together the group's local stack). Each piece's
  squares are summed in two parts that cannot overflow
  (:func:`~orthax.polar.scale_safe.split_squares`: the entries up to
  ``2³²`` as they are, the larger ones scaled). A sum over a split axis
  adds up across devices: both parts are made whole as :data:`NORMS` says
  (in its one all-reduce); a sum whole on one device travels as one value
  (:func:`~orthax.polar.scale_safe.signed_squares`). Below ``2³²`` the
  plain sums, bit for bit."""
  shards = {-2: g.row_shards, -1: g.col_shards}
  wide = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
  cat = lambda ps: ps[0] if len(ps) == 1 else jnp.concatenate(ps, axis=0)
  partials, split = [], []
  for parts, axes in sources:
    pairs = [split_squares(wide(p), axes) for p in parts]
    lo, hi = cat([a for a, _ in pairs]), cat([b for _, b in pairs])
    split.append(any(shards[a] > 1 for a in axes))
    partials += ([(lo, axes), (hi, axes)] if split[-1]
                 else [(signed_squares(lo, hi), axes)])
  sums, out = iter(NORMS[g.strategy](g, partials)), []
  for s in split:
    out.append(split_root(next(sums), next(sums)) if s
               else signed_root(next(sums)))
  return out


BODIES = {'a2a': _a2a_body, 'replicated': _replicated_body,
           'local': _local_body, 'gram': _gram_body}

NORMS = {'a2a': _a2a_norms, 'replicated': _whole_norms,
         'local': _whole_norms, 'gram': _gram_norms}
