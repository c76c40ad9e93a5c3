"""What a plan's group costs: Newton–Schulz FLOPs per matrix, and the bytes
and collectives per device of each strategy and of the matrix stages run in
its body (all from shapes and dtypes; stage sums are read by tracing the
stages, :func:`orthax.matrix_stages.split_sums`)."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax.numpy as jnp

from orthax import _validate
from orthax import matrix_stages as _stages
from orthax.polar import dispatch as _dispatch
from orthax.polar import gram as _gram
from orthax.polar.newton_schulz import NORMALIZERS


def wire_dtype(comm_dtype, dtype):
  dtype = jnp.dtype(dtype)
  if comm_dtype is None:
    return dtype
  c = jnp.dtype(comm_dtype)
  return c if c.itemsize <= dtype.itemsize else dtype


def check_method(method: str, restart_every: Any, owner: str) -> None:
  """``ValueError`` naming ``owner`` (the function the user called) for a
  Newton–Schulz ``method`` or ``restart_every`` it cannot take."""
  _validate.choice(_dispatch.METHODS)(owner, 'method', method)
  _gram.check_restart(restart_every, owner)


def default_matrix_flops(steps: int = 5, method: str = 'standard',
                         restart_every: int | None = 2,
                         ns_dtype: Any = None, normalizer: str = 'frobenius'
                         ) -> Callable[[int, int, Any], int]:
  """``(m, n, dtype) -> FLOPs`` of one Newton–Schulz call on an ``m×n``
  matrix, with the method :func:`orthax.polar.choose_method` would pick:
  its matrix products and its normalizer's element-wise work
  (:func:`orthax.polar.normalizer_flops`; the iteration's own element-wise
  work is not counted).

  Args:
    steps: Newton–Schulz steps per call.
    method: ``'standard'`` (default), ``'gram'`` or ``'auto'``
      (:data:`orthax.polar.METHODS`; ``'auto'`` lets
      :func:`orthax.polar.choose_method` pick per shape and dtype).
    restart_every: Gram Newton–Schulz restart period in steps (``None`` or
      0: never); a ``ValueError`` unless ``None`` or an int ``>= 0``.
    ns_dtype: the iteration dtype ``'auto'`` decides on; ``None``: the
      ``dtype`` the returned function is given.
    normalizer: the normalizer whose element-wise FLOPs are added, one of
      :data:`orthax.polar.NORMALIZERS` (``'none'`` adds none).

  Example:
    >>> import jax.numpy as jnp
    >>> import orthax
    >>> flops = orthax.sharding.default_matrix_flops(steps=5)
    >>> flops(64, 128, jnp.float32)  # 5 · (4m²n + 2m³) + 7mn
    13164544
  """

  check_method(method, restart_every, 'default_matrix_flops')
  _validate.count('default_matrix_flops', 'steps', steps)
  _validate.choice(NORMALIZERS)('default_matrix_flops', 'normalizer',
                                normalizer)

  def flops(m, n, dtype):
    dt = dtype if ns_dtype is None else ns_dtype
    meth = _dispatch.choose_method(m, n, steps, dt, method, restart_every)
    normalize = _gram.normalizer_flops(normalizer, m, n)
    if meth == 'gram':
      return _gram.gram_flops(m, n, steps, restart_every) + normalize
    return _gram.standard_flops(m, n, steps) + normalize

  return flops


def stage_traffic(s, stages, transposed, m, n, dtype, G, padded,
                   local_count, shards=(1, 1)) -> tuple[float, int]:
  """Bytes per device and collectives the matrix ``stages`` add to a group
  of ``m×n`` (wide) matrices under strategy ``s`` (see
  :func:`plan_orthogonalize`); ``shards``: the pieces' row and column
  shards (``a2a``)."""
  fi, fo = (n, m) if transposed else (m, n)
  item = jnp.promote_types(dtype, jnp.float32).itemsize
  flip = {-2: -1, -1: -2}
  wide = [tuple(flip[a] if transposed else a for a in nm.axes)
          for st in stages for nm in _stages.check_norms(st, fi, fo)]
  allreduce = lambda count: 2 * (G - 1) / G * local_count * count
  nbytes, ncoll = 0.0, 0
  if s == 'gram':
    # Column blocks: each stage sum across the split axis is one all-reduce
    # of what it keeps; the norms summed along it share one (each norm two
    # sums: scale_safe.split_squares).
    split_ax = -2 if transposed else -1
    for st in stages:
      for kept in _stages.split_sums(st, fi, fo, split_ax):
        nbytes += allreduce(kept * 4)
        ncoll += 1
    kept = sum(1 if -2 in ax else m for ax in wide if -1 in ax)
    if kept:
      nbytes += allreduce(2 * kept * item)
      ncoll += 1
  elif s in ('a2a', 'replicated'):
    # States and outputs of the stages other than scaling stages (those are
    # computed on every device): one all-gather of [padded, ...].
    per = sum(math.prod(shape) for st in stages
              if not isinstance(st, _stages.ScalingStage)
              and not st.slot_state
              for shape in (st.shapes(fi, fo).state, st.shapes(fi, fo).output)
              if shape is not None)
    if per:
      nbytes += (G - 1) / G * padded * per * item
      ncoll += 1
    if s == 'a2a' and wide:
      # The whole matrices' norms on every device: one all-reduce; a sum
      # over a split axis in two parts (scale_safe.split_squares).
      split = {-2: shards[0] > 1, -1: shards[1] > 1}
      width = sum((1 if -2 in ax else m) * (1 if -1 in ax else n)
                  * (2 if any(split[a] for a in ax) else 1) for ax in wide)
      nbytes += allreduce(width * item)
      ncoll += 1
  return nbytes, ncoll


def group_cost(s: str, m: int, n: int, dtype: Any, G: int, local_count: int,
               padded: int, comm_dtype: Any, matrix_flops, *, steps: int,
               method: str, restart_every: int | None, ns_dtype: Any,
               stages=(), transposed=None, shards=(1, 1),
               block_normalizer: str = 'none', block_norm: bool = True):
  """``(matrix_flops, wire_dtype, bytes, collectives)`` per device of a
  group of ``m×n`` (wide) matrices under strategy ``s`` over ``G`` shards,
  ``shards`` of rows and columns (see
  :func:`orthax.sharding.plan_orthogonalize`); ``block_normalizer``: the
  normalizer whose element-wise FLOPs a column block adds
  (:func:`orthax.polar.normalizer_flops`), and
  ``block_norm``: whether it sums a norm across the blocks (``gram``; every
  normalizer but ``'none'``)."""
  wire = wire_dtype(comm_dtype, dtype)
  if s == 'gram':
    it_dtype = dtype if ns_dtype is None else ns_dtype
    if _dispatch.choose_method(m, n, steps, it_dtype, method,
                               restart_every) == 'gram':
      mf = _gram.gram_flops(m, n, steps, restart_every, col_shards=G)
      grams = _gram.gram_products(steps, restart_every)
    else:
      mf, grams = _gram.standard_flops(m, n, steps, col_shards=G), steps
    mf += _gram.normalizer_flops(block_normalizer, m, n, col_shards=G)
    wire = jnp.promote_types(it_dtype, jnp.float32)
    # The Gram products and the norm (its two sums, split_squares, are
    # counted as one float: a few bytes per matrix).
    nbytes = (2 * (G - 1) / G * local_count * (grams * m * m + block_norm)
              * wire.itemsize)
    ncoll = grams + block_norm
  else:
    mf = int(matrix_flops(m, n, dtype))
    if s == 'a2a':
      nbytes = 2 * (G - 1) / G * padded * (m * n // G) * wire.itemsize
      ncoll = 2
    elif s == 'replicated':
      nbytes = (G - 1) / G * padded * m * n * wire.itemsize
      ncoll = 1
    else:
      nbytes, ncoll = 0.0, 0
  if stages:
    fi, fo = (n, m) if transposed else (m, n)
    mf += sum(int(st.flops(fi, fo)) for st in stages)
    b, c = stage_traffic(s, stages, transposed, m, n, dtype, G, padded,
                         local_count, shards)
    nbytes, ncoll = nbytes + b, ncoll + c
  return mf, wire, nbytes, ncoll
