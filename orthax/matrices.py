"""How a parameter is seen as a batch of matrices, and grouping by shape.

A :class:`MatrixSpec` names the axes of a parameter that form a matrix's
fan-in (rows of a Flax kernel) and fan-out (its columns); every other axis is
a batch axis (stacked layers, experts, heads). :func:`to_matrices` turns a leaf
into ``[batch, fan_in, fan_out]`` (axes transposed in the order batch, fan-in,
fan-out, then flattened — the same order as ``optax.contrib``'s
``MuonDimensionNumbers``), :func:`from_matrices` inverts it.

:func:`group_by_shape` turns many leaves into a few stacks: each leaf's
matrices are put in the wide orientation (``m ≤ n``, transposing tall ones)
and all matrices of the same ``(m, n, dtype)`` are concatenated so that one
stacked Newton–Schulz call serves a whole group. This stack is also the unit
that the sharding layer distributes.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp

Axes = tuple[int, ...]


def _axes(a: int | Iterable[int], what: str) -> Axes:
  """``a`` (an int or a sequence of ints, NumPy's included) as a tuple of
  Python ints; ``TypeError`` naming ``what`` (``'owner: argument'``)
  otherwise."""
  items = (a,) if isinstance(a, numbers.Integral) else a
  try:
    items = tuple(items)
  except TypeError:
    items = None
  if items is None or not all(isinstance(x, numbers.Integral)
                              and not isinstance(x, bool) for x in items):
    raise TypeError(f'{what} must be an int or a sequence of ints, got '
                    f'{a!r}.')
  return tuple(int(x) for x in items)


@dataclasses.dataclass(frozen=True)
class MatrixSpec:
  """Which axes of a leaf are fan-in and fan-out; the rest are batch axes.

  Axes may be negative (counted from the end), so the default
  ``MatrixSpec()`` — fan-in ``-2``, fan-out ``-1`` — covers a 2-D Flax kernel
  ``(in, out)`` and a stacked kernel ``(L, in, out)`` alike.

  Attributes:
    fan_in: the axis (an int) or axes (a sequence of ints) flattened into
      the matrix's rows, in that order; default ``(-2,)``.
    fan_out: the axis or axes flattened into its columns; default
      ``(-1,)``. Both are stored as tuples and must each name at least one
      axis; an axis in both is an error when a leaf is resolved.

  Example:
    >>> from orthax import MatrixSpec
    >>> MatrixSpec().matrix_shape((4, 8, 16))  # (batch, fan_in, fan_out)
    (4, 8, 16)
    >>> MatrixSpec(fan_in=(0, 1, 2), fan_out=3).matrix_shape((3, 3, 16, 32))
    (1, 144, 32)
  """

  fan_in: Axes = (-2,)
  fan_out: Axes = (-1,)

  def __post_init__(self):
    object.__setattr__(self, 'fan_in', _axes(self.fan_in, 'MatrixSpec: '
                                             'fan_in'))
    object.__setattr__(self, 'fan_out', _axes(self.fan_out, 'MatrixSpec: '
                                              'fan_out'))
    if not self.fan_in or not self.fan_out:
      raise ValueError(f'MatrixSpec: fan_in and fan_out must each name an '
                       f'axis, got {self}.')

  # Constructors for the common layouts -------------------------------------

  @classmethod
  def kernel(cls) -> 'MatrixSpec':
    """A Flax ``Dense`` kernel ``(in, out)``; leading axes are batch axes."""
    return cls((-2,), (-1,))

  @classmethod
  def torch_linear(cls) -> 'MatrixSpec':
    """A PyTorch-layout weight ``(out, in)``."""
    return cls((-1,), (-2,))

  @classmethod
  def stacked(cls, layer_axis: int = 0, ndim: int = 3) -> 'MatrixSpec':
    """A stack of kernels with the stack axis anywhere, e.g. ``(in, L, out)``.

    The two non-stack axes, in order, are fan-in and fan-out.
    """
    if ndim != 3:
      raise ValueError(f'MatrixSpec.stacked: ndim must be 3 (it describes '
                       f'3-D leaves), got ndim={ndim}.')
    (layer_axis,) = _axes(layer_axis, 'MatrixSpec.stacked: layer_axis')
    if not -ndim <= layer_axis < ndim:
      raise ValueError(f'MatrixSpec.stacked: layer_axis {layer_axis} is not '
                       f'an axis of a {ndim}-D leaf (-{ndim} to '
                       f'{ndim - 1}).')
    la = layer_axis % ndim
    rest = [a for a in range(ndim) if a != la]
    return cls((rest[0],), (rest[1],))

  @classmethod
  def conv(cls, ndim: int = 4) -> 'MatrixSpec':
    """A Flax conv kernel ``(*window, in, out)``: window and in are fan-in."""
    return cls(tuple(range(ndim - 1)), (ndim - 1,))

  @classmethod
  def heads(cls, fan_in: int | Sequence[int],
            fan_out: int | Sequence[int]) -> 'MatrixSpec':
    """Per-head matrices, e.g. ``(d, H, k)`` → ``heads(0, 2)``: one d×k
    matrix per head, the head axis being a batch axis."""
    return cls(_axes(fan_in, 'MatrixSpec.heads: fan_in'),
               _axes(fan_out, 'MatrixSpec.heads: fan_out'))

  # Geometry -----------------------------------------------------------------

  def resolve(self, shape: Sequence[int]) -> tuple[Axes, Axes, Axes]:
    """Returns non-negative ``(batch, fan_in, fan_out)`` axes for ``shape``."""
    nd = len(shape)
    try:
      fi = tuple(a % nd if -nd <= a < nd else _bad(a) for a in self.fan_in)
      fo = tuple(a % nd if -nd <= a < nd else _bad(a) for a in self.fan_out)
    except IndexError:
      raise ValueError(
          f'{self} does not fit a leaf of shape {tuple(shape)}.') from None
    if len(set(fi + fo)) != len(fi) + len(fo):
      raise ValueError(
          f'{self} uses an axis twice for a leaf of shape {tuple(shape)}.')
    batch = tuple(a for a in range(nd) if a not in fi and a not in fo)
    return batch, fi, fo

  def matrix_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
    """``(batch, fan_in, fan_out)`` sizes for a leaf of ``shape``."""
    b, fi, fo = self.resolve(shape)
    size = lambda axes: math.prod(shape[a] for a in axes)
    return size(b), size(fi), size(fo)


def _bad(a):
  raise IndexError(a)


def to_matrices(x: jax.Array, spec: MatrixSpec) -> jax.Array:
  """Views ``x`` as ``[batch, fan_in, fan_out]`` per ``spec``."""
  b, fi, fo = spec.resolve(x.shape)
  return jnp.transpose(x, b + fi + fo).reshape(spec.matrix_shape(x.shape))


def from_matrices(y: jax.Array, spec: MatrixSpec,
                  shape: Sequence[int]) -> jax.Array:
  """Inverse of :func:`to_matrices` for a leaf of ``shape``."""
  b, fi, fo = spec.resolve(shape)
  perm = b + fi + fo
  y = y.reshape(tuple(shape[a] for a in perm))
  inv = tuple(sorted(range(len(shape)), key=lambda i: perm[i]))
  return jnp.transpose(y, inv)


def per_matrix_to_leaf(values: jax.Array, spec: MatrixSpec,
                       shape: Sequence[int]) -> jax.Array:
  """Per-matrix values ``[batch]`` or ``[batch, fan_in]`` (``batch`` and
  ``fan_in`` flattened as :func:`to_matrices` flattens them, size-1 axes
  allowed) laid out to broadcast against a leaf of ``shape``: its batch
  (and fan-in) axes in place, size 1 elsewhere. Only ``values`` is
  reshaped, never the leaf, so a leaf sharded over Explicit mesh axes on
  axes its view merges (a conv kernel's ``kh, kw, in``) is left as it is."""
  b, fi, fo = spec.resolve(shape)
  keep = set(b) | (set(fi) if values.ndim > 1 and values.size > math.prod(
      shape[a] for a in b) else set())
  perm = b + fi + fo
  y = values.reshape(tuple(shape[a] if a in keep else 1 for a in perm))
  inv = tuple(sorted(range(len(shape)), key=lambda i: perm[i]))
  return jnp.transpose(y, inv)


def matrix_axes(spec: MatrixSpec, shape: Sequence[int]) -> tuple[int, ...]:
  """The fan-in and fan-out axes of a leaf of ``shape``: a reduction over
  them is one value per matrix, in the leaf's own layout."""
  _, fi, fo = spec.resolve(shape)
  return fi + fo


# Grouping ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Member:
  """One leaf's place in a group: its index, batch size and orientation."""
  leaf: int
  count: int
  transposed: bool


@dataclasses.dataclass(frozen=True)
class Group:
  """Same-shape wide matrices ``[count, m, n]`` (``m ≤ n``) from many leaves."""
  m: int
  n: int
  dtype: Any
  members: tuple[Member, ...]

  @property
  def count(self) -> int:
    return sum(mb.count for mb in self.members)


def plan_groups(shapes: Sequence[tuple[int, int, int]],
                dtypes: Sequence[Any]) -> tuple[Group, ...]:
  """Groups ``[batch, fan_in, fan_out]`` leaves by wide shape and dtype.

  Static (shapes only), so it can run at trace time. Groups keep the order in
  which their first member appears; members keep leaf order.
  """
  order: dict[tuple[int, int, Any], list[Member]] = {}
  for i, ((count, fi, fo), dt) in enumerate(zip(shapes, dtypes)):
    key = (min(fi, fo), max(fi, fo), jnp.dtype(dt))
    order.setdefault(key, []).append(Member(i, count, fi > fo))
  return tuple(Group(m, n, dt, tuple(mbs)) for (m, n, dt), mbs in order.items())


def stack_group(group: Group, mats: Sequence[jax.Array]) -> jax.Array:
  """Concatenates the group's members (wide orientation) into one stack."""
  parts = [jnp.swapaxes(mats[mb.leaf], -1, -2) if mb.transposed
           else mats[mb.leaf] for mb in group.members]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def unstack_group(group: Group, stack: jax.Array) -> dict[int, jax.Array]:
  """Splits a group's stack back into ``{leaf index: [batch, fan_in, fan_out]}``."""
  out, start = {}, 0
  for mb in group.members:
    part = stack[start:start + mb.count] if len(group.members) > 1 else stack
    start += mb.count
    out[mb.leaf] = jnp.swapaxes(part, -1, -2) if mb.transposed else part
  return out
