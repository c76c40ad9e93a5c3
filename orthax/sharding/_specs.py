"""Reading the parameters' ``PartitionSpec``\\ s: from
``Distributed.param_specs`` by path, or from the arrays themselves, and
checking them (and the arrays' mesh) against the ``Distributed`` before a
plan is built."""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from orthax import _tree
from orthax.sharding._distributed import Distributed


def spec_entries(spec: Any, ndim: int, where: str = '') -> list[tuple[str, ...]]:
  """The mesh axes of each of ``ndim`` dimensions (``()`` = unsharded).

  Args:
    spec: a ``PartitionSpec``, a ``NamedSharding`` (its spec) or ``None``
      (replicated); missing trailing entries mean unsharded.
    ndim: the leaf's number of dimensions.
    where: what the ``ValueError`` messages name first (e.g. the leaf);
      they are raised for more entries than ``ndim``, an entry other than
      ``None``, an axis name or a tuple of them, and a mesh axis used twice.

  Returns:
    One tuple of mesh axis names per dimension.

  Example:
    >>> from jax.sharding import PartitionSpec as P
    >>> import orthax
    >>> orthax.sharding.spec_entries(P('fsdp', ('data', 'tp')), 3)
    [('fsdp',), ('data', 'tp'), ()]
  """
  if spec is None:
    spec = P()
  if isinstance(spec, NamedSharding):
    spec = spec.spec
  entries = list(spec)
  if len(entries) > ndim:
    raise ValueError(f'{where}: PartitionSpec {spec} has more entries than '
                     f'the leaf has dimensions ({ndim}).')
  out = []
  for e in entries + [None] * (ndim - len(entries)):
    if e is None:
      out.append(())
    elif isinstance(e, str):
      out.append((e,))
    elif isinstance(e, tuple) and all(isinstance(a, str) for a in e):
      out.append(e)
    else:
      raise ValueError(f'{where}: unsupported PartitionSpec entry {e!r} in '
                       f'{spec} (use None, an axis name or a tuple of them).')
  used = [a for axes in out for a in axes]
  twice = sorted({a for a in used if used.count(a) > 1})
  if twice:
    raise ValueError(f'{where}: PartitionSpec {spec} shards along mesh axis '
                     f'{twice[0]!r} twice; each mesh axis may shard one '
                     'dimension.')
  return out


def explicit_spec(x: Any) -> P | None:
  """``x``'s ``PartitionSpec`` when its type says it is sharded over
  Explicit mesh axes (an array or tracer, with or without
  ``jax.set_mesh``; an abstract array under ``jax.set_mesh``); else
  ``None``.

  Args:
    x: an array, a tracer or an abstract array; anything ``jax.typeof``
      does not take gives ``None``.
  """
  try:
    sh = getattr(jax.typeof(x), 'sharding', None)
  except Exception:  # pylint: disable=broad-except
    return None
  mesh = getattr(sh, 'mesh', None)
  if mesh is None or not mesh.axis_names or not any(
      t == AxisType.Explicit for t in mesh.axis_types):
    return None
  return sh.spec


def _is_spec_leaf(s) -> bool:
  return s is None or isinstance(s, (P, NamedSharding))


def as_spec(s) -> P:
  """A spec entry as a ``PartitionSpec`` (``None``: replicated).

  Args:
    s: a ``PartitionSpec`` (returned as is), a ``NamedSharding`` (its
      spec) or ``None`` (``P()``).
  """
  if s is None:
    return P()
  if isinstance(s, NamedSharding):
    return s.spec
  return s


def array_spec(x: Any, path: str = '') -> P:
  """The ``PartitionSpec`` an array carries: a concrete ``jax.Array`` or
  ``ShapeDtypeStruct`` with a ``NamedSharding``, or a tracer under ``jit`` on
  a mesh with ``Explicit`` axes. Raises when the sharding is not known.

  Args:
    x: a concrete ``jax.Array``, a ``jax.ShapeDtypeStruct`` or a tracer.
    path: the leaf's path, named in the ``ValueError`` raised when the
      sharding is not known (an ``Auto`` mesh under ``jit``, an unsharded
      array), which points to ``Distributed(param_specs=...)``.
  """
  sh = None
  if not isinstance(x, jax.core.Tracer):
    sh = getattr(x, 'sharding', None)
  if isinstance(sh, NamedSharding):
    return sh.spec
  spec = explicit_spec(x)
  if spec is not None:
    return spec
  raise ValueError(
      f'leaf {path!r}: its sharding is not known here (an Auto mesh under '
      'jit, or an unsharded array); pass Distributed(param_specs=...) with '
      'the parameters\' PartitionSpec tree.')


def _mesh_of(x: Any):
  """The mesh an array lives on, when known here: a concrete array's
  ``NamedSharding`` mesh, or a tracer's (abstract) mesh under ``jit``;
  ``None`` otherwise."""
  if not isinstance(x, jax.core.Tracer):
    sh = getattr(x, 'sharding', None)
    return sh.mesh if isinstance(sh, NamedSharding) else None
  try:
    mesh = jax.typeof(x).sharding.mesh
  except Exception:  # pylint: disable=broad-except
    return None
  return None if mesh is None or mesh.empty else mesh


def _mesh_str(mesh) -> str:
  return '×'.join(f'{a}={mesh.shape[a]}' for a in mesh.axis_names)


def check_meshes(leaves: Sequence[Any], paths: Sequence[str], mesh) -> None:
  """``ValueError`` naming the first leaf that lives on another mesh than
  ``mesh`` (other axis names or sizes; for concrete arrays, other
  devices): a ``Distributed`` built for one mesh would otherwise hand the
  update back on its own mesh, silently.

  Args:
    leaves: the update leaves; those whose mesh is not known here (neither a
      concrete array with a ``NamedSharding`` nor a tracer on a mesh) are
      skipped.
    paths: their paths, in the same order (for the message).
    mesh: the ``Distributed``'s mesh (``Mesh`` or ``AbstractMesh``).
  """
  want = tuple((a, int(mesh.shape[a])) for a in mesh.axis_names)
  for p, x in zip(paths, leaves):
    got = _mesh_of(x)
    if got is None:
      continue
    axes = tuple((a, int(got.shape[a])) for a in got.axis_names)
    other_devices = (not isinstance(x, jax.core.Tracer) and axes == want
                     and hasattr(got, 'device_ids')
                     and hasattr(mesh, 'device_ids')
                     and list(got.device_ids.flat)
                     != list(mesh.device_ids.flat))
    if axes != want or other_devices:
      what = 'devices' if other_devices else 'axes'
      raise ValueError(
          f'leaf {p!r} lives on mesh {_mesh_str(got)} but the Distributed '
          f'was built for mesh {_mesh_str(mesh)} (their {what} differ); '
          'build Distributed with the mesh the parameters are on.')


class UnplacedLeafError(ValueError):
  """A leaf whose spec names Explicit mesh axes carries no sharding (an
  array on one device, or an abstract value without ``sharding=``):
  ``mesh`` and ``specs`` (``{path: PartitionSpec}`` of the leaves checked)
  say where it belongs."""

  def __init__(self, message: str, mesh: Any, specs: dict[str, P]):
    super().__init__(message)
    self.mesh, self.specs = mesh, specs


def check_specs(leaves: Sequence[Any], paths: Sequence[str],
                param_specs: Sequence[P], mesh) -> None:
  """``ValueError`` naming the first leaf on Explicit mesh axes whose
  sharding differs from its ``param_specs`` entry (axes of size 1 aside),
  or (:class:`UnplacedLeafError`) that carries no sharding where its spec
  names Explicit axes: ``shard_map`` would refuse either with a message
  that names neither the parameter nor the argument.

  Args:
    leaves: the update leaves (with ``ndim``); only those whose type
      carries an Explicit sharding (:func:`explicit_spec`) are compared.
    paths: their paths, in the same order (for the messages).
    param_specs: one ``PartitionSpec`` per leaf, as the plan will use them.
    mesh: the ``Distributed``'s mesh: its axis sizes and types.
  """
  sizes = {a: int(mesh.shape[a]) for a in mesh.axis_names}
  explicit = {a for a, t in zip(mesh.axis_names, mesh.axis_types)
              if t == AxisType.Explicit and sizes[a] > 1}
  effective = lambda spec, nd: [tuple(a for a in axes if sizes.get(a, 1) > 1)
                                for axes in spec_entries(spec, nd)]
  for p, x, want in zip(paths, leaves, param_specs):
    got = explicit_spec(x)
    if got is None and any(a in explicit for axes in spec_entries(
        want, x.ndim) for a in axes):
      raise UnplacedLeafError(
          f'leaf {p!r} carries no sharding, but its spec {want} names '
          'Explicit mesh axes: place it on the mesh '
          '(jax.device_put(x, NamedSharding(mesh, spec))), or trace under '
          'jax.set_mesh(mesh).', mesh, dict(zip(paths, param_specs)))
    if got is not None and (effective(got, x.ndim)
                            != effective(want, x.ndim)):
      raise ValueError(
          f'leaf {p!r} is sharded as {got} but Distributed(param_specs=...) '
          f'says {want}; fix param_specs, or leave them out on Explicit mesh '
          'axes, where each array carries its own.')


def specs_for(tree: Any, dist: Distributed) -> list[P]:
  """One ``PartitionSpec`` per leaf of ``tree`` (flatten order), from
  ``dist.param_specs`` matched by path, or read from the arrays.

  Args:
    tree: the parameters or updates (arrays or abstract arrays), flattened
      with ``/``-joined key paths (``'blocks/attn/kernel'``).
    dist: the :class:`Distributed`; with ``param_specs=None`` each leaf's
      spec is :func:`array_spec`. A leaf with no ``param_specs`` entry, or
      whose entry is longer than its rank, is a ``ValueError``.
  """
  paths, leaves, _ = _tree.leaves_with_paths(tree)
  return leaf_specs(paths, leaves, dist)


def leaf_specs(paths: Sequence[str], leaves: Sequence[Any],
               dist: Distributed) -> list[P]:
  """:func:`specs_for` on flat ``paths`` and ``leaves``.

  Args:
    paths: the leaves' paths, as ``dist.param_specs``' paths are spelled
      (``/``-joined keys, as :func:`specs_for` flattens).
    leaves: the arrays (or abstract arrays), in the order of ``paths``.
    dist: the :class:`Distributed`, as for :func:`specs_for`.
  """
  if dist.param_specs is None:
    return [array_spec(x, p) for p, x in zip(paths, leaves)]
  by_path = {p: as_spec(s) for p, s in _tree.leaves_by_path(
      dist.param_specs, _is_spec_leaf).items()}
  out = []
  for p in paths:
    if p not in by_path:
      raise ValueError(
          f'leaf {p!r} has no entry in Distributed.param_specs (paths there '
          f'include {sorted(by_path)[:5]}...).')
    out.append(by_path[p])
  for p, x, spec in zip(paths, leaves, out):
    if hasattr(x, 'ndim'):
      spec_entries(spec, x.ndim, where=f'Distributed: param_specs at {p!r}')
  return out
