"""The static sharding plan: which device orthogonalizes which matrices.

Everything here runs on shapes, dtypes and ``PartitionSpec``\\ s only, so a
plan can be built at trace time (inside ``jit``) or ahead of time from
abstract parameters, and printed.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax.numpy as jnp

from orthax import _validate
from orthax.matrices import MatrixSpec
from orthax.polar.newton_schulz import NORMALIZERS
from orthax.sharding._distributed import Distributed
from orthax.sharding._specs import spec_entries
from orthax.sharding import _cost
from orthax.sharding._plan_types import GroupPlan
from orthax.sharding._plan_types import LeafInfo
from orthax.sharding._plan_types import Plan


def _mesh_sizes(mesh) -> dict[str, int]:
  """Axis sizes of a ``Mesh`` or ``AbstractMesh``, in mesh order."""
  return {a: int(mesh.shape[a]) for a in mesh.axis_names}


def plan_orthogonalize(
    leaves: Sequence[LeafInfo | tuple],
    mesh,
    strategy: str = 'auto',
    *,
    overrides: Sequence[tuple[str, str]] = (),
    comm_dtype: Any = jnp.bfloat16,
    matrix_flops: Callable[[int, int, Any], int] | None = None,
    steps: int = 5,
    method: str = 'standard',
    restart_every: int | None = 2,
    ns_dtype: Any = None,
    normalizer: str = 'frobenius',
    max_local_matrix_bytes: int | None = 2 ** 31,
    stages: Sequence[Any] = (),
    column_blocks: bool = True,
) -> Plan:
  """Plans the distributed orthogonalization of ``leaves``.

  Args:
    leaves: ``(path, shape, dtype, MatrixSpec, PartitionSpec)`` per leaf.
    mesh: the device mesh.
    strategy: default strategy (see :class:`Distributed`).
    overrides: ``(regex, strategy)`` pairs matched against leaf paths.
    comm_dtype: wire dtype (never wider than the leaf's).
    matrix_flops: ``(m, n, dtype) -> FLOPs`` of Newton–Schulz on one matrix;
      default :func:`default_matrix_flops` with ``steps``, ``method``,
      ``restart_every``, ``ns_dtype`` and ``normalizer`` (``gram`` groups
      always use those: their count depends on the column split; the
      normalizer's element-wise work is counted only without a
      ``matrix_flops`` of one's own).
    steps, method, restart_every: the Newton–Schulz FLOP model, as
      :func:`default_matrix_flops` takes them (checked here: ``steps`` an
      int ``>= 1``).
    ns_dtype: the iteration dtype (``None``: each leaf's): it sizes a matrix
      against ``max_local_matrix_bytes``, picks ``method='auto'``'s method
      and, widened to float32, the dtype of ``gram``'s all-reduces.
    normalizer: the Newton–Schulz normalizer, for the FLOP model and,
      under ``gram``, the norm's all-reduce (none for ``'none'``).
    max_local_matrix_bytes: see :class:`Distributed`.
    stages: the :class:`orthax.matrix_stages.MatrixStage`\\ s that run after
      Newton–Schulz in the same body. With any, each group holds one
      orientation (a stage sees ``[fan_in, fan_out]``). Under ``a2a`` and
      ``replicated`` the float32 per-matrix states and outputs of the stages
      other than scaling stages add one all-gather to the group's
      collectives and bytes; under ``a2a`` the scaling stages' norms one
      float32 all-reduce of the whole matrices' norms. Under ``gram`` each
      stage sum across the column blocks adds one float32 all-reduce, and
      the norms summed along them one more.
    column_blocks: whether the function run on the matrices works on column
      blocks (it takes ``col_reduce``, as Newton–Schulz does). When it does
      not, or a stage needs whole matrices
      (:attr:`~orthax.matrix_stages.MatrixStage.whole_matrices`), ``auto``
      runs a matrix over ``max_local_matrix_bytes`` as ``a2a``, not
      ``gram``, and a requested ``gram`` is a ``ValueError`` naming the
      leaf.

  Returns:
    A :class:`Plan`. Raises ``ValueError`` naming the leaf when a requested
    strategy does not fit its sharding.

  Example:
    >>> from jax.sharding import AbstractMesh, PartitionSpec as P
    >>> import orthax
    >>> mesh = AbstractMesh((8,), ('fsdp',))
    >>> leaf = ('w', (64, 128), 'float32', orthax.MatrixSpec(), P('fsdp'))
    >>> g = orthax.sharding.plan_orthogonalize([leaf], mesh).groups[0]
    >>> g.strategy, g.local_count, g.padded, g.split_axes
    ('a2a', 1, 8, ('fsdp',))
  """
  _validate.flag('plan_orthogonalize', 'column_blocks', column_blocks)
  _cost.check_method(method, restart_every, 'plan_orthogonalize')
  _validate.count('plan_orthogonalize', 'steps', steps)
  _validate.choice(NORMALIZERS)('plan_orthogonalize', 'normalizer',
                                normalizer)
  dist = Distributed(mesh, strategy=strategy, overrides=tuple(overrides),
                     comm_dtype=comm_dtype)
  block_normalizer = 'none'
  if matrix_flops is None:
    matrix_flops = _cost.default_matrix_flops(steps, method, restart_every,
                                              ns_dtype, normalizer)
    block_normalizer = normalizer
  sizes = _mesh_sizes(mesh)
  prod = lambda axes: math.prod(sizes[a] for a in axes)
  whole = [st.name for st in stages if st.whole_matrices]
  no_blocks = (f'matrix stage {whole[0]!r} needs whole matrices' if whole
               else None if column_blocks else
               'the function run on the matrices takes no col_reduce')
  keyed: dict[tuple, list[_Member]] = {}
  for i, leaf in enumerate(leaves):
    key, member = _place(i, LeafInfo(*leaf), mesh, sizes, dist,
                         ns_dtype, max_local_matrix_bytes, no_blocks,
                         normalizer)
    key = key + (member.transposed if stages else None,)
    keyed.setdefault(key, []).append(member)
  _merge_small_replicated(keyed, prod)
  groups = []
  for (s, m, n, dtype, rows, cols, split, orient), members in keyed.items():
    members = sorted(members)
    local_count = sum(mb.local for mb in members)
    G = prod(split)
    padded = local_count if s == 'gram' else -(-local_count // G) * G
    mf, wire, nbytes, ncoll = _cost.group_cost(
        s, m, n, dtype, G, local_count, padded, comm_dtype, matrix_flops,
        steps=steps, method=method, restart_every=restart_every,
        ns_dtype=ns_dtype, stages=stages, transposed=orient,
        shards=(prod(rows), prod(cols)), block_normalizer=block_normalizer,
        block_norm=normalizer != 'none')
    per_dev = padded // G if s in ('a2a', 'replicated') else local_count
    groups.append(GroupPlan(
        strategy=s, m=m, n=n, dtype=dtype,
        leaves=tuple(mb.index for mb in members),
        paths=tuple(mb.path for mb in members),
        transposed=tuple(mb.transposed for mb in members),
        count=sum(mb.count for mb in members), local_count=local_count,
        padded=padded, row_axes=rows, col_axes=cols, split_axes=split,
        shards=G, row_shards=prod(rows), col_shards=prod(cols),
        wire_dtype=wire, matrix_flops=mf, flops_per_device=per_dev * mf,
        bytes_per_device=nbytes, collectives=ncoll,
        stages=tuple(st.name for st in stages)))
  return Plan(tuple(groups), math.prod(sizes.values()), tuple(sizes.items()))


class _Member(NamedTuple):
  """One leaf's place in a group (sorted by ``index``)."""
  index: int
  path: str
  transposed: bool
  count: int
  local: int
  chosen: bool  # the strategy was picked by 'auto'


def _check_spec(where, shape, entries, sizes, mspec, eff, prod):
  """``ValueError``\\ s for a spec the leaf's shape or the mesh does not
  allow."""
  for axes in entries:
    for a in axes:
      if a not in sizes:
        raise ValueError(f'{where}: mesh has no axis {a!r} '
                         f'(axes {tuple(sizes)}).')
  for d, axes in enumerate(entries):
    if shape[d] % prod(axes):
      raise ValueError(f'{where}: dimension {d} ({shape[d]}) is not '
                       f'divisible by its {prod(axes)} shards.')
  _, fi, fo = mspec.resolve(shape)
  for name, fan in (('fan_in', fi), ('fan_out', fo)):
    sharded = [d for d in fan if eff(entries[d])]
    if len(sharded) > 1 or (sharded and sharded[0] != fan[0]):
      hint = ''
      if len(sharded) == 1:
        # The same matrix with its rows (or columns) permuted: orthogonal
        # steps permute alike; a DCT-based one sees another order.
        first = (sharded[0],) + tuple(d for d in fan if d != sharded[0])
        view = (f'fan_in={first}, fan_out={fo}' if name == 'fan_in'
                else f'fan_in={fi}, fan_out={first}')
        hint = (f' View it with the sharded axis first: a Rule with '
                f'orthax.MatrixSpec({view}) (the same matrix, its '
                f'{"rows" if name == "fan_in" else "columns"} permuted: '
                'orthogonalized steps permute alike; a DCT-based one, '
                'DCT-AdamW or Trion, sees them in another order).')
      raise ValueError(
          f'{where}: only the first {name} axis ({fan[0]}) of a '
          f'multi-axis {name} {fan} may be sharded.' + hint)


def _place(i, leaf: LeafInfo, mesh, sizes, dist, ns_dtype, max_bytes,
           no_blocks: str | None, normalizer: str):
  """The group key (strategy, wide shape, dtype, row/column/split axes) and
  the member entry of one leaf; ``no_blocks``: why column blocks (``gram``)
  cannot run here, or ``None``."""
  path, shape, dtype, mspec, pspec = leaf
  shape = tuple(int(s) for s in shape)
  where = f'leaf {path!r} (shape {shape}, spec {pspec})'
  eff = lambda axes: tuple(a for a in axes if sizes[a] > 1)
  prod = lambda axes: math.prod(sizes[a] for a in axes)
  entries = spec_entries(pspec, len(shape), where)
  _check_spec(where, shape, entries, sizes, mspec, eff, prod)
  batch, fi, fo = mspec.resolve(shape)
  fi_axes, fo_axes = eff(entries[fi[0]]), eff(entries[fo[0]])
  batch_axes = tuple(a for d in batch for a in eff(entries[d]))
  used = set(a for axes in entries for a in eff(axes))
  free = tuple(a for a in mesh.axis_names if sizes[a] > 1 and a not in used)
  count, m_in, n_out = mspec.matrix_shape(shape)
  transposed = m_in > n_out
  m, n = min(m_in, n_out), max(m_in, n_out)
  rows, cols = (fo_axes, fi_axes) if transposed else (fi_axes, fo_axes)
  s = dist.strategy_for(path)
  chosen = s == 'auto'
  it = jnp.dtype(dtype if ns_dtype is None else ns_dtype).itemsize
  big = max_bytes is not None and m * n * it > max_bytes
  if s == 'gram' and no_blocks:
    raise ValueError(f"{where}: strategy 'gram' runs each matrix as column "
                     f"blocks, but {no_blocks}; use 'a2a'.")
  big = big and not no_blocks  # too big for one device, but it must be
  if m == n and rows and not cols and (s == 'gram' or s == 'auto' and big):
    # A square matrix sharded along its rows runs as its transpose, whose
    # columns are sharded: exact, NS(Xᵀ) = NS(X)ᵀ, except under AOL, which
    # scales the rows (one device runs the square as it is).
    if normalizer != 'aol':
      transposed, rows, cols = not transposed, cols, rows
    elif s == 'gram':
      raise ValueError(
          f"{where}: strategy 'gram' would run this square matrix as its "
          "transpose, whose columns are sharded, but the 'aol' normalizer "
          'scales the rows, so its transpose would give another result than '
          "one device; shard the columns or use 'a2a'.")
  s = _strategy(where, s, big, rows, cols, batch_axes, free, m, n,
                fi_axes + fo_axes)
  split = {'a2a': rows + cols, 'replicated': free, 'gram': cols}.get(s, ())
  return ((s, m, n, jnp.dtype(dtype), rows, cols, split),
          _Member(i, path, transposed, count, count // prod(batch_axes),
                  chosen))


def _strategy(where, s, big, rows, cols, batch_axes, free, m, n, matrix_axes):
  """The leaf's strategy (``auto`` resolved), checked against its layout."""
  if s == 'auto' and big and cols and not rows:
    s = 'gram'
  if s == 'gram' and (rows or not cols):
    raise ValueError(
        f"{where}: strategy 'gram' needs the long dimension of the "
        f'{m}×{n} matrix sharded and the short one whole, but they are '
        f'sharded over {rows or "nothing"} (short) and '
        f'{cols or "nothing"} (long); use \'a2a\'.')
  if s == 'auto':
    s = 'a2a' if rows or cols else ('local' if batch_axes or not free
                                    else 'replicated')
  if s == 'a2a' and not (rows or cols):
    raise ValueError(f"{where}: strategy 'a2a' needs a sharded matrix "
                     "dimension; its matrices are whole on each device "
                     "(use 'local' or 'replicated').")
  if s in ('local', 'replicated') and (rows or cols):
    raise ValueError(f'{where}: strategy {s!r} needs unsharded matrix '
                     f'dimensions, but they are sharded over '
                     f'{matrix_axes}; use \'a2a\'.')
  if s == 'replicated' and not free:
    raise ValueError(f"{where}: strategy 'replicated' needs a mesh axis the "
                     "leaf is not sharded over; use 'local'.")
  return s


def _merge_small_replicated(keyed, prod):
  """``auto`` splits a replicated group over the free axes only when there
  are at least as many matrices as shards: below that each device would
  still run one matrix and the all-gather would mostly carry zero padding,
  so running the group redundantly on every device (``local``) is
  cheaper."""
  for key in list(keyed):
    s, m, n, dt, rows, cols, split, orient = key
    members = keyed[key]
    if (s == 'replicated' and all(mb.chosen for mb in members)
        and sum(mb.local for mb in members) < prod(split)):
      keyed.setdefault(('local', m, n, dt, rows, cols, (), orient),
                       []).extend(keyed.pop(key))
