"""``Distributed``: how a transform's orthogonalization is spread over a
mesh (the user-facing configuration; the plan is built from it)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax.numpy as jnp

from orthax import _validate

STRATEGIES = ('auto', 'local', 'a2a', 'replicated', 'gram')


def check_comm_dtype(name: str, value: Any) -> None:
  """``ValueError`` naming ``name`` (``'owner: argument'``, or a config
  key) unless ``value`` is ``None`` or a
  wire dtype the all-to-all can carry: ``bfloat16`` or ``float32`` (or
  wider). An integer type sent zeros; ``float16`` sent Inf for a matrix
  past 6.5e4, the float8 types far sooner (the matrices travel before
  their normalization)."""
  if value is None:
    return
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or (
      dtype != jnp.bfloat16 and dtype.itemsize < 4):
    narrow = dtype is not None and jnp.issubdtype(dtype, jnp.floating)
    raise ValueError(
        f'{name} must be bfloat16, float32 (or wider) or None, got '
        f'{dtype.name if dtype is not None else repr(value)}'
        + (f': {dtype.name} overflows far below float32\'s range, and the '
           'matrices are sent before their normalization' if narrow else '')
        + '.')


def _check_overrides(overrides: Any) -> tuple[tuple[str, str], ...]:
  """``overrides`` as ``((pattern, strategy), ...)``: a dict or pairs of a
  regular expression (a string or a compiled pattern) and a strategy; a
  ``ValueError`` naming ``Distributed`` and ``overrides`` otherwise (a compiled
  pattern was kept as its repr and never matched; a flat pair failed to
  unpack)."""
  pairs = overrides.items() if isinstance(overrides, dict) else overrides
  out = []
  for entry in pairs:
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
      raise ValueError(
          'Distributed: overrides must be a dict or pairs (regex, strategy), '
          f'e.g. [("mlp", "local")], got the entry {entry!r}.')
    pattern, strategy = entry
    if isinstance(pattern, re.Pattern):
      if pattern.flags & ~re.UNICODE:  # they would be dropped silently
        raise ValueError(
            f'Distributed: overrides pattern {pattern!r} has flags; write '
            "them in the pattern instead (e.g. '(?i)mlp').")
      pattern = pattern.pattern
    if not isinstance(pattern, str):
      raise ValueError(f'Distributed: overrides patterns must be regular '
                       f'expressions, got {pattern!r}.')
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f'Distributed: overrides pattern {pattern!r} is not '
                       f'a regular expression ({e}).') from None
    out.append((pattern, _check_strategy(
        strategy, 'overrides', f' (the strategy of {pattern!r})')))
  return tuple(out)


def _check_strategy(s: str, name: str, note: str = '') -> str:
  """``s``; a ``ValueError`` naming ``Distributed``, the argument ``name``
  (and ``note``) unless it is one of :data:`STRATEGIES`."""
  if s not in STRATEGIES:
    raise ValueError(f'Distributed: {name} must be one of {STRATEGIES}, got '
                     f'{s!r}{note}.')
  return s


@dataclasses.dataclass(frozen=True, eq=False)
class Distributed:
  """How the orthogonalization of a sharded update is distributed.

  Attributes:
    mesh: the ``jax.sharding.Mesh`` the parameters live on (``Auto`` or
      ``Explicit`` axes).
    param_specs: a tree of ``PartitionSpec`` (or ``NamedSharding``; ``None``
      leaves mean replicated) with the parameters' structure; leaves are
      matched to update leaves by path, so the tree may cover more leaves than
      the transform sees. ``None``: read each array's sharding (concrete
      arrays, or tracers under ``jit`` on a mesh with ``Explicit`` axes).
    strategy: ``'auto'`` (per group: ``gram`` when one matrix is larger than
      ``max_local_matrix_bytes`` and only its long dimension is sharded,
      else ``a2a`` when a matrix dimension is sharded, ``local`` when only
      batch axes are, ``replicated`` when the leaf is replicated, the mesh
      has more than one device and the group has at least as many matrices
      as shards — else ``local``), ``'local'``, ``'a2a'``, ``'replicated'``
      or ``'gram'`` (tensor-parallel Newton–Schulz: each device keeps its
      column block of the long dimension and the ``m×m`` Gram matrix is
      summed across devices, one ``psum`` per Gram product; a square matrix
      sharded along its rows runs as its transpose, the same result for
      every normalizer but AOL, whose row scaling is one-sided: under AOL
      ``auto`` runs such a square ``a2a`` and ``gram`` is an error, where
      the plan knows the normalizer: :func:`orthax.orthogonalize` tells it,
      a function of one's own through ``plan_kw={'normalizer': 'aol'}``).
    comm_dtype: dtype of the matrices on the wire (``None``: the dtype the
      step computes in, which for a recipe's float16 or bfloat16 parameters
      is float32, since recipes widen them: pass ``bfloat16`` for a bf16
      wire): ``bfloat16`` or ``float32``. Never wider than that dtype: a
      wider one is ignored. Not ``float16``: the matrices go out
      before their normalization, and its range (6.5e4) would turn a large
      gradient into Inf; not an integer type (zeros).
    overrides: ``((regex, strategy), ...)``; the first regex that
      ``re.search``-matches a leaf's path picks that leaf's strategy.
    max_local_matrix_bytes: ``auto`` keeps a matrix whole on one device up
      to this size (in the iteration dtype; default 2 GiB) and runs larger
      ones with ``gram``; ``None``: never. Not where the step needs whole
      matrices (a stage with
      :attr:`~orthax.matrix_stages.MatrixStage.whole_matrices`: ARO, FISMO,
      DCT-AdamW, Trion; SPECTRA's clip, which takes no ``col_reduce``):
      there ``auto`` runs ``a2a``, and ``gram`` is a ``ValueError`` naming
      the leaf.

  The Newton–Schulz iteration dtype is the transform's own knob
  (``orthax.orthogonalize(ns_dtype=...)``, a recipe's ``ns_dtype``), on one
  device and on a mesh alike; ``Distributed`` has none.
  """

  mesh: Any
  param_specs: Any = None
  strategy: str = 'auto'
  comm_dtype: Any = jnp.bfloat16
  overrides: tuple[tuple[str, str], ...] = ()
  max_local_matrix_bytes: int | None = 2 ** 31

  def __post_init__(self):
    if not hasattr(self.mesh, 'axis_names'):
      raise TypeError('Distributed: mesh must be a jax.sharding.Mesh (the '
                      f'one the parameters live on), got {self.mesh!r}.')
    _validate.count('Distributed', 'max_local_matrix_bytes',
                    self.max_local_matrix_bytes, optional=True)
    check_comm_dtype('Distributed: comm_dtype', self.comm_dtype)
    _check_strategy(self.strategy, 'strategy')
    object.__setattr__(self, 'overrides', _check_overrides(self.overrides))

  def strategy_for(self, path: str) -> str:
    for r, s in self.overrides:
      if re.search(r, path):
        return s
    return self.strategy
