"""``Distributed``: how a transform's orthogonalization is spread over a
mesh (the user-facing configuration; the plan is built from it)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax.numpy as jnp

STRATEGIES = ('auto', 'local', 'a2a', 'replicated', 'gram')


def _check_strategy(s: str, where: str) -> str:
  if s not in STRATEGIES:
    raise ValueError(f'{where}: strategy must be one of {STRATEGIES}, got '
                     f'{s!r}.')
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
      sharded along its rows runs as its transpose, which changes the result
      only for the AOL normalizer, whose row scaling is one-sided).
    comm_dtype: dtype of the matrices on the wire (``None``: the update's
      dtype). Never wider than the update's dtype: a wider one is ignored.
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
    _check_strategy(self.strategy, 'Distributed')
    ov = tuple((str(r), _check_strategy(s, f'Distributed.overrides[{r!r}]'))
               for r, s in (self.overrides.items()
                            if isinstance(self.overrides, dict)
                            else self.overrides))
    for r, _ in ov:
      re.compile(r)
    object.__setattr__(self, 'overrides', ov)

  def strategy_for(self, path: str) -> str:
    for r, s in self.overrides:
      if re.search(r, path):
        return s
    return self.strategy
