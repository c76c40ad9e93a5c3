"""The matrix-stage protocol: :class:`MatrixStage`, :class:`ScalingStage`,
:class:`StageShapes`, :class:`Blocks`, :class:`Norm` (running a list of
stages on a ``[k, fan_in, fan_out]`` stack: :mod:`._apply`).

A stage is a small frozen dataclass registered as a pytree (decorate it with
:func:`stage`): its hyperparameters are children, so traced values (under
``optax.inject_hyperparams``, or a schedule's learning rate) flow through
``jax.tree`` operations and into a ``shard_map`` body as arguments; its
modes (fields made with :func:`static`) are static. A stage declares what it
keeps and needs in one place, :meth:`MatrixStage.shapes`, and does its work
in :meth:`MatrixStage.apply`; nothing else is overridden. What a sharding
plan counts of a stage (its sums across column blocks) is read by tracing
:meth:`~MatrixStage.apply` (:func:`split_sums`), never from a second,
hand-written copy.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from typing import Any, Callable, Mapping, NamedTuple, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from orthax import _validate
from orthax.polar.scale_safe import huge_scale

SOURCES = ('input', 'aux')


def static(default: Any = dataclasses.MISSING) -> Any:
  """A stage field that is a mode, not a hyperparameter: part of the
  pytree's static structure (hashable, never traced). Pass its default by
  keyword, ``static(default='add')``, for type checkers to see it (no
  default: a required field).

  Args:
    default: the field's default, a hashable value (omitted: the field is
      required).
  """
  return dataclasses.field(default=default, metadata={'static': True})


_S = TypeVar('_S')


# (dataclass_transform: type checkers see each stage's fields as its
# constructor's arguments)
@typing.dataclass_transform(eq_default=False, frozen_default=True,
                            field_specifiers=(dataclasses.field, static))
def stage(cls: type[_S]) -> type[_S]:
  """Makes a :class:`MatrixStage` subclass a frozen dataclass registered as
  a pytree: fields made with :func:`static` are static, all others
  children. A field annotated ``bool`` is checked to be one at
  construction (a ``TypeError`` naming the stage and the field: the string
  ``'False'`` would otherwise switch the mode on), and each field named in
  the class's ``checks`` (a dict of field name to a rule of
  ``orthax._validate``, e.g. ``{'beta2': _validate.unit_interval}``) by its
  rule where its value is a concrete number (a traced hyperparameter, or
  the placeholders JAX rebuilds a pytree with, pass): a ``beta2`` of 2 or a
  negative ``eps`` would otherwise give NaN or a reversed step, silently.

  Args:
    cls: the subclass; returned as a frozen dataclass with ``eq=False``
      (stages compare by identity), registered with ``jax.tree_util``.
  """
  switches = sorted({name for klass in cls.__mro__
                     for name, kind in vars(klass).get(
                         '__annotations__', {}).items()
                     if kind in ('bool', bool)})
  checks = {}
  for klass in reversed(cls.__mro__):
    checks.update(vars(klass).get('checks', {}))
  if switches or checks:
    after = getattr(cls, '__post_init__', None)

    def __post_init__(self):  # pylint: disable=invalid-name
      owner = getattr(self, 'name', type(self).__name__)
      for name in switches:
        _validate.flag(owner, name, getattr(self, name))
      for name, rule in checks.items():
        value = getattr(self, name)
        if is_number(value):
          rule(owner, name, value)
      if after is not None:
        after(self)

    cls.__post_init__ = __post_init__
  cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
  fields = dataclasses.fields(cls)
  return jax.tree_util.register_dataclass(
      cls, data_fields=[f.name for f in fields
                        if not f.metadata.get('static')],
      meta_fields=[f.name for f in fields if f.metadata.get('static')])


def is_number(value: Any) -> bool:
  """Whether ``value`` is a concrete number or array (not a tracer, nor a
  placeholder such as ``None`` or a ``PartitionSpec``)."""
  if isinstance(value, jax.core.Tracer) or isinstance(value, bool):
    return False
  return isinstance(value, (numbers.Number, np.ndarray, np.generic,
                            jax.Array))


class Blocks(NamedTuple):
  """How a stage sees its ``[k, fan_in, fan_out]`` stack.

  ``fan_in``/``fan_out`` are the whole matrix's sizes. ``split`` is ``None``
  when each matrix is whole, else the axis (``-2`` or ``-1``) held in blocks,
  whose partial sums ``reduce`` adds up across the blocks.
  """
  fan_in: int
  fan_out: int
  split: int | None = None
  reduce: Callable[[jax.Array], jax.Array] | None = None

  def sum(self, x: jax.Array, axis: int | Sequence[int]) -> jax.Array:
    """``jnp.sum(x, axis, keepdims=True)`` over the whole matrix: ``x`` is
    ``[k, fan_in or 1, fan_out or 1, ...]``-shaped in its last two matrix
    axes, so a vector along the split axis is held in blocks too."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    axes = tuple(a - x.ndim if a >= 0 else a for a in axes)
    s = jnp.sum(x, axis=axes, keepdims=True)
    if self.split is not None and self.split in axes:
      s = self.reduce(s)
    return s


class Norm(NamedTuple):
  """A Frobenius norm (the root of a sum of squares) a stage needs of a
  matrix as it was **before**
  Newton–Schulz, over ``axes`` of ``[fan_in, fan_out]`` (kept as size-1
  axes): ``source='input'`` is the matrix entering Newton–Schulz (NAMO's
  momentum ``u``), ``'aux'`` the matching matrix of an auxiliary tree the
  caller passes with the update (NAMO's raw gradient ``G``).

  Only a :class:`ScalingStage` may ask for norms. On whole matrices they are
  taken scale-safely (:func:`root_norm`); on a mesh the sums of squares are
  added up from each device's pieces before the matrices move (one small
  float32 all-reduce per group), and the root taken after, so the stage
  gets the whole matrix's norms although the auxiliary matrix never
  travels."""
  source: str
  axes: tuple[int, ...]


class StageShapes(NamedTuple):
  """What a stage keeps and needs for one ``fan_in × fan_out`` matrix: the
  one declaration a stage makes (:meth:`MatrixStage.shapes`).

  Attributes:
    state: the per-matrix state's shape (``None``: stateless); any shape,
      e.g. ``(fan_out,)`` per neuron, ``()`` per matrix, ``(m, m)``. A
      slot stage may keep several arrays: a dict of shapes (``{'p': (m,
      m), 'q': (n, n)}``), which :meth:`~MatrixStage.apply` receives and
      returns as a dict of ``[k, *shape]`` arrays.
    axis: the matrix axis (``-2``: fan-in, ``-1``: fan-out) a vector state
      (and output) runs along, or ``None``: under column blocks such a
      vector is held in blocks like the matrix.
    output: the shape of a per-matrix result :meth:`~MatrixStage.apply`
      hands back besides the stack and the state (``None``: none).
    norms: the :class:`Norm`\\ s :meth:`~MatrixStage.apply` receives.
    slots: where the state lives. ``False``: per leaf, ``batch +
      per-matrix`` like the parameter (on a mesh it follows the matrices
      and is gathered back after a move). ``True``: stacked per group of
      same-shape matrices, each device holding the state of the matrices it
      works on (on a mesh: never gathered; for a large state such as an
      ``m×m`` rotation). A slot stage has no output and is no
      :class:`ScalingStage`.
  """
  state: tuple[int, ...] | Mapping[str, tuple[int, ...]] | None = None
  axis: int | None = None
  output: tuple[int, ...] | None = None
  norms: tuple[Norm, ...] = ()
  slots: bool = False


def map_state(fn: Callable[[tuple[int, ...]], Any], state: Any) -> Any:
  """``fn`` of each shape of a declared state (:attr:`StageShapes.state`:
  one shape, or a dict of them), in the same structure; ``None`` stays."""
  if state is None:
    return None
  if isinstance(state, Mapping):
    return {k: fn(tuple(v)) for k, v in state.items()}
  return fn(tuple(state))


def wide(dtype) -> Any:
  """The dtype stage statistics are kept in: float32 or the update's, if
  wider.

  Args:
    dtype: the update's dtype (what ``jnp.promote_types`` takes).
  """
  return jnp.promote_types(dtype, jnp.float32)


def sum_squares(x: jax.Array, axes: Sequence[int]) -> jax.Array:
  """``Σ x²`` over ``axes`` (kept, size 1), in :func:`wide` precision.

  Args:
    x: an array of floats.
    axes: the axes summed over.
  """
  x = x.astype(wide(x.dtype))
  return jnp.sum(x * x, axis=tuple(axes), keepdims=True)


def root_norm(x: jax.Array, axes: Sequence[int]) -> jax.Array:
  """``√Σ x²`` over ``axes`` of whole ``[..., fan_in, fan_out]`` matrices,
  in :func:`wide` precision, with the squares taken of ``x·2⁻ᵉ``
  (:func:`orthax.polar.scale_safe.huge_scale`, one power of two per
  matrix): it cannot overflow, and is the plain root below ``2³²``.

  Args:
    x: whole matrices ``[..., fan_in, fan_out]``.
    axes: the matrix axes summed over, kept as size-1 axes: ``(-2, -1)``
      (per matrix), ``(-1,)`` (one per row, a fan-in unit) or ``(-2,)``
      (one per column, a fan-out unit).
  """
  x = x.astype(wide(x.dtype))
  f = huge_scale(x).astype(x.dtype)
  return jnp.sqrt(jnp.sum(jnp.square(x * f), axis=tuple(axes),
                          keepdims=True)) / f


class MatrixStage:
  """Base class of a per-matrix step (decorate subclasses with
  :func:`stage`). A subclass sets ``name`` (a class attribute), declares
  :meth:`shapes` if it keeps state, hands back an output or needs norms,
  and implements :meth:`apply`."""

  name = 'stage'

  def shapes(self, fan_in: int, fan_out: int) -> StageShapes:
    """The declaration for one ``fan_in × fan_out`` matrix."""
    del fan_in, fan_out
    return StageShapes()

  def initial_state(self, fan_in: int, fan_out: int, dtype: Any) -> Any:
    """The state of one matrix before the first step, per the declared
    :attr:`StageShapes.state` (default: zeros), e.g. an identity rotation."""
    return map_state(lambda s: jnp.zeros(s, dtype),
                     self.shapes(fan_in, fan_out).state)

  def flops(self, fan_in: int, fan_out: int) -> int:
    """Floating-point operations of :meth:`apply` on one matrix, for the
    sharding plan's cost model (default: 0, negligible next to
    Newton–Schulz); a stage with matrix products of its own declares them."""
    del fan_in, fan_out
    return 0

  def apply(self, o: jax.Array, state: jax.Array | None, blocks: Blocks,
            norms: Sequence[jax.Array] = ()) -> tuple[Any, ...]:
    """``(o[k, fan_in, fan_out], state[k, ...], blocks, norms) -> (o',
    state')``, or ``(o', state', output)`` with a declared output (a
    dict state comes and goes as a dict of ``[k, *shape]`` arrays).
    ``norms[q]`` is the declared ``norms[q]`` of the whole matrices, shaped
    ``[k, fan_in or 1, fan_out or 1]`` (under column blocks, the kept axis is
    in blocks like the stack). Sums over a matrix axis go through
    :meth:`Blocks.sum`."""
    raise NotImplementedError

  @property
  def stateful(self) -> bool:
    return self.shapes(2, 3).state is not None

  @property
  def has_output(self) -> bool:
    return self.shapes(2, 3).output is not None

  @property
  def slot_state(self) -> bool:
    """Its state is kept in slots (:attr:`StageShapes.slots`)."""
    slots = self.shapes(2, 3).slots
    _validate.flag(f'{self.name}.shapes()', 'StageShapes.slots', slots)
    return self.stateful and slots

  #: Whether :meth:`apply` commutes with transposing every matrix of the
  #: stack (an element-wise map by whole-matrix values, such as a clip at a
  #: quantile of all entries): such a stateless stage may run on the wide
  #: stack before Newton–Schulz (:func:`orthax.orthogonalize` ``before=``),
  #: where a matrix's fan-in may be its second axis.
  transpose_invariant = False

  @property
  def whole_matrices(self) -> bool:
    """It needs each matrix whole on one device, not in column blocks (a
    mesh's ``gram`` strategy): every slot stage, and a stage whose
    :meth:`apply` refuses ``Blocks`` with a ``split``."""
    return self.slot_state


class ScalingStage(MatrixStage):
  r"""A stage whose effect on the stack is a factor that depends only on its
  state and declared norms, not on the orthogonalized matrix:

  .. math:: O \leftarrow c \odot O,\qquad (c, \text{state}', \text{output})
     = \mathrm{scale}(\text{state}, \text{norms})

  with ``c`` per matrix ``[k, 1, 1]`` or per row/column ``[k, fan_in|1,
  fan_out|1]``. Because ``c`` does not need ``O``, a sharded executor can
  compute it on every device from the all-reduced norms, before and apart
  from Newton–Schulz, so the state and the output never travel.
  Subclasses implement :meth:`scale` instead of ``apply``.
  """

  def scale(self, state: jax.Array | None, norms: Sequence[jax.Array],
            blocks: Blocks) -> tuple[jax.Array, Any, Any]:
    """``(state[k, ...], norms, blocks) -> (c, state', output)`` (``output``
    ``None`` without a declared output). ``c`` is in :func:`wide`
    precision."""
    raise NotImplementedError

  @staticmethod
  def multiply(o: jax.Array, c: jax.Array) -> jax.Array:
    """``c ⊙ o``, computed in ``c``'s precision, in ``o``'s dtype."""
    return (c * o.astype(c.dtype)).astype(o.dtype)

  def apply(self, o, state, blocks, norms=()):
    c, state, out = self.scale(state, norms, blocks)
    o = self.multiply(o, c)
    return (o, state, out) if self.has_output else (o, state)
