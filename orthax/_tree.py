"""Pytree helpers shared by every layer: normalized paths and spec trees."""

from __future__ import annotations

from typing import Any, Callable

import jax

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


def leaves_with_paths(tree: Any) -> tuple[list[str], list[Any], Any]:
  """Flattens ``tree`` into (paths, leaves, treedef)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [path_str(p) for p, _ in flat], [x for _, x in flat], treedef


SpecsLike = MatrixSpec | Any | Callable[[Any], Any] | None


def resolve_specs(specs: SpecsLike, tree: Any, what: str) -> list[MatrixSpec]:
  """One :class:`MatrixSpec` per leaf of ``tree`` (in flatten order).

  ``specs`` is ``None`` (2-D leaves are Flax kernels ``(in, out)``; any other
  rank is an error), one ``MatrixSpec`` for all leaves, a tree of them matching
  ``tree``, or a callable mapping ``tree`` to such a tree. Errors name the leaf.
  """
  paths, leaves, _ = leaves_with_paths(tree)
  if callable(specs) and not isinstance(specs, MatrixSpec):
    specs = specs(tree)
  if specs is None or isinstance(specs, MatrixSpec):
    per_leaf = [specs] * len(leaves)
  else:
    per_leaf = jax.tree.leaves(
        specs, is_leaf=lambda s: s is None or isinstance(s, MatrixSpec))
    per_leaf = [s for s in per_leaf
                if s is None or isinstance(s, MatrixSpec)]
    if len(per_leaf) != len(leaves):
      raise ValueError(
          f'{what}: the matrix_specs tree has {len(per_leaf)} leaves but the '
          f'updates have {len(leaves)}; give one MatrixSpec per leaf.')
  out = []
  for path, x, spec in zip(paths, leaves, per_leaf):
    shape = getattr(x, 'shape', ())
    if spec is None:
      if len(shape) != 2:
        raise ValueError(
            f'{what}: leaf {path!r} has shape {tuple(shape)}; only 2-D leaves '
            'have a default matrix view. Pass matrix_specs (e.g. '
            'orthax.MatrixSpec.stacked(0)) or route it with orthax.routing.')
      spec = MatrixSpec()
    try:
      spec.resolve(shape)
    except ValueError as e:
      raise ValueError(f'{what}: leaf {path!r}: {e}') from None
    out.append(spec)
  return out
