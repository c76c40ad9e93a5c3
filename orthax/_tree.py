"""Pytree helpers shared by every layer: normalized paths and spec trees."""

from __future__ import annotations

import re
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp

from orthax.matrices import MatrixSpec


def _key_name(k: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(path: tuple[Any, ...]) -> str:
  """``'blocks/attn/qkv/kernel'`` for a JAX key path; a trailing ``value``
  attribute (NNX ``Variable``) is dropped."""
  names = [_key_name(k) for k in path]
  if names and names[-1] == 'value' and isinstance(path[-1],
                                                    jax.tree_util.GetAttrKey):
    names = names[:-1]
  return '/'.join(names)


def _flax_boxes() -> tuple[type, ...]:
  """Flax's metadata boxes, where Flax is loaded (never imported here):
  linen's ``AxisMetadata`` (``Partitioned``, ``LogicallyPartitioned``) and
  ``nnx.Variable``."""
  found = []
  for module, name in (('flax.core.meta', 'AxisMetadata'),
                       ('flax.nnx.variablelib', 'Variable')):
    loaded = sys.modules.get(module)
    if loaded is not None and hasattr(loaded, name):
      found.append(getattr(loaded, name))
  return tuple(found)


def unboxed(tree: Any) -> Any:
  """``tree`` with each Flax metadata box replaced by the array it holds.

  A state that is not shaped like the parameters (a flag per leaf, a
  per-neuron vector) takes this structure: built by mapping over boxed
  parameters, it would carry the parameter's sharding annotation to an
  array of another rank, which ``nnx.Optimizer`` under a mesh and linen's
  ``get_partition_spec`` then apply (a ``with_sharding_constraint``
  error). Trees without boxes come back as they are."""
  boxes = _flax_boxes()
  if not boxes:
    return tree
  is_box = lambda x: isinstance(x, boxes)  # pylint: disable=unnecessary-lambda-assignment
  return jax.tree.map(lambda x: _unbox(x) if is_box(x) else x, tree,
                      is_leaf=is_box)


def _unbox(box: Any) -> Any:
  """A linen box's or an ``nnx.Variable``'s array (``get_value`` in newer
  flax; flax 0.12.0 has ``.value`` only, which later ones deprecate)."""
  if hasattr(box, 'unbox'):
    return box.unbox()
  return box.get_value() if hasattr(type(box), 'get_value') else box.value


def plain_structure(tree: Any) -> Any:
  """The treedef of :func:`unboxed` ``(tree)``: of a per-leaf state that is
  not shaped like the leaves (same leaf order as ``tree``)."""
  return jax.tree.structure(unboxed(tree))


def leaves_with_paths(tree: Any) -> tuple[list[str], list[Any], Any]:
  """Flattens ``tree`` into (paths, leaves, treedef)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [path_str(p) for p, _ in flat], [x for _, x in flat], treedef


def leaves_by_path(tree: Any,
                   is_leaf: Callable[[Any], bool] | None = None
                   ) -> dict[str, Any]:
  """``{path: leaf}`` of ``tree`` (:func:`path_str` paths; ``is_leaf`` as
  ``jax.tree_util``'s): to match a tree of specs to the leaves of another
  tree, whatever their containers."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {path_str(p): x for p, x in flat}


SpecsLike = MatrixSpec | Any | Callable[[Any], Any] | None


def _view_hint(ndim: int) -> str:
  """What to pass for a leaf of ``ndim`` axes without a default view."""
  if ndim < 2:
    return ('A vector or scalar is no matrix: route it to another branch '
            'with orthax.routing.')
  if ndim == 3:
    example = 'orthax.MatrixSpec.stacked(0) for (layers, in, out)'
  else:
    example = (f'orthax.MatrixSpec(fan_in=({ndim - 2},), fan_out=({ndim - 1},))'
               f' for {ndim - 2} stacking axes then (in, out), or '
               f'orthax.MatrixSpec.conv({ndim}) for a conv kernel')
  return (f'Pass matrix_specs (e.g. {example}) or route it with '
          'orthax.routing.')


def resolve_specs(specs: SpecsLike, tree: Any, what: str) -> list[MatrixSpec]:
  """One :class:`MatrixSpec` per leaf of ``tree`` (in flatten order).

  ``specs`` is ``None`` (2-D leaves are Flax kernels ``(in, out)``; any other
  rank is an error), one ``MatrixSpec`` for all leaves, a tree of them matching
  ``tree``, or a callable mapping ``tree`` to such a tree. Errors name the leaf.
  """
  paths, leaves, treedef = leaves_with_paths(tree)
  if callable(specs) and not isinstance(specs, MatrixSpec):
    specs = specs(tree)
  if specs is None or isinstance(specs, MatrixSpec):
    per_leaf = [specs] * len(leaves)
  else:
    per_leaf = specs_per_leaf(specs, treedef, len(leaves), what)
  out = []
  for path, x, spec in zip(paths, leaves, per_leaf):
    check_real_floating(path, x, what)
    shape = getattr(x, 'shape', ())
    if spec is None:
      if len(shape) != 2:
        raise ValueError(
            f'{what}: leaf {path!r} has shape {tuple(shape)}; only 2-D leaves '
            f'have a default matrix view. {_view_hint(len(shape))}')
      spec = MatrixSpec()
    try:
      spec.resolve(shape)
    except ValueError as e:
      raise ValueError(f'{what}: leaf {path!r}: {e}') from None
    out.append(spec)
  return out


def _is_spec_leaf(s: Any) -> bool:
  return s is None or isinstance(s, MatrixSpec)


def _specs_by_path(specs: Any, treedef: Any, n: int, what: str) -> list:
  """Each leaf's spec found by its path, when the two trees differ only
  where the updates have no leaf: under ``optax.masked`` or
  ``optax.partition`` a parameter of another branch is a ``MaskedNode``
  in the updates and a spec (or ``None``) in the spec tree.

  Raises:
    ValueError: naming a leaf with no spec at its path, and the spec paths
      no leaf has (a mistyped key was applied by position before).
  """
  updates = jax.tree.unflatten(treedef, [0] * n)
  paths = list(leaves_by_path(updates))
  by_path = leaves_by_path(specs, _is_spec_leaf)
  missing = [p for p in paths if p not in by_path]
  unused = sorted(set(by_path) - set(paths))
  if missing:
    raise ValueError(
        f'{what}: the matrix_specs tree has no spec at {missing[0]!r}'
        f'{f" ({len(missing)} leaves have none)" if len(missing) > 1 else ""}'
        f'; its paths that no leaf has: {unused[:5]}. Give the specs the '
        'updates\' structure (or one MatrixSpec for all leaves).')
  empty = empty_paths(updates)
  stray = [p for p in unused
           if not any(p == e or p.startswith(e + '/') for e in empty)]
  if stray:
    raise ValueError(
        f'{what}: the matrix_specs tree has a spec at {stray[0]!r}'
        f'{f" (and {len(stray) - 1} more paths)" if len(stray) > 1 else ""}'
        ', where the updates have no leaf (a mistyped or stale key?). Give '
        'the specs the updates\' structure (or one MatrixSpec for all '
        'leaves).')
  return [by_path[p] for p in paths]


def _has_no_leaves(x: Any) -> bool:
  return not jax.tree.leaves(x)


def empty_paths(tree: Any,
                is_empty: Callable[[Any], bool] = _has_no_leaves) -> set[str]:
  """The paths of ``tree``'s empty nodes: by default its subtrees without
  leaves (``None``, an ``optax.MaskedNode``, where a spec tree may hold a
  spec no leaf takes); ``is_empty`` decides otherwise (a checkpoint's
  metadata marks a saved ``None`` its own way)."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_empty)[0]
  return {path_str(p) for p, x in flat if is_empty(x)}


def specs_per_leaf(specs: Any, treedef: Any, n: int, what: str,
                   none_means: str = '') -> list:
  """The spec of each of the ``n`` leaves of ``treedef`` from a tree of
  specs shaped like it. A ``None`` subtree of the updates (an absent
  parameter, e.g. a layer without a bias) is ``None`` in the spec tree too
  and has no leaf in either."""
  try:
    per_leaf = treedef.flatten_up_to(specs)
  except (ValueError, TypeError):
    per_leaf = _specs_by_path(specs, treedef, n, what)
  bad = [i for i, s in enumerate(per_leaf) if not _is_spec_leaf(s)]
  if bad and len(per_leaf) == n:
    path = list(leaves_by_path(jax.tree.unflatten(treedef, [0] * n)))[bad[0]]
    raise ValueError(
        f'{what}: the matrix_specs tree holds {per_leaf[bad[0]]!r} at '
        f'{path!r}, not an orthax.MatrixSpec (or None).')
  per_leaf = [s for s in per_leaf if _is_spec_leaf(s)]
  if len(per_leaf) != n:
    raise ValueError(
        f'{what}: the matrix_specs tree has {len(per_leaf)} leaves but the '
        f'updates have {n}; give one MatrixSpec{none_means} per leaf.')
  return per_leaf


def exact_pattern(path: str) -> str:
  """The :class:`orthax.Rule` pattern that matches ``path`` alone (for the
  rule an error or warning suggests)."""
  return '^' + re.escape(path) + '$'


def check_real_floating(path: str, x: Any, what: str) -> None:
  """Raises ``ValueError`` naming ``path`` unless ``x`` (an array or a
  ``ShapeDtypeStruct``) holds real floating-point numbers of 16 bits or
  more: a matrix step (Newton–Schulz, the norms) is defined for real
  floats only (the message says where another leaf can go), and JAX
  promotes no 8-bit float (the message names ``in_float32``)."""
  dtype = getattr(x, 'dtype', None)
  if (dtype is not None and jnp.issubdtype(dtype, jnp.floating)
      and jnp.finfo(dtype).bits <= 8):
    raise ValueError(
        f'{what}: leaf {path!r} has dtype {jnp.dtype(dtype).name}, which JAX '
        'promotes to no other dtype, so this step cannot compute with it: '
        f'run the transformation in float32, orthax.transforms.in_float32('
        f'{what.split(".")[-1]}(...)) (the recipes do), or cast the updates.')
  if dtype is None or jnp.issubdtype(dtype, jnp.floating):
    return
  pattern = exact_pattern(path)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    why, label = ('complex matrices are not supported (their '
                  'orthogonalization needs the conjugate transpose)'), 'adam'
  else:
    why, label = 'it cannot be trained by gradient steps', 'frozen'
  raise ValueError(
      f'{what}: leaf {path!r} has dtype {jnp.dtype(dtype).name}: matrix steps '
      f'need real floating-point leaves, and {why}. Route it elsewhere: '
      f'router=orthax.Router(extra_rules=[orthax.Rule({pattern!r}, '
      f'{label!r})]).')
