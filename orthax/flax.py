"""Flax integration: logical axes to ``PartitionSpec``\\ s, optimizer-state
specs.

Flax models name each parameter dimension with a *logical* axis
(``nnx.with_partitioning``, ``nn.with_logical_partitioning``): ``'embed'``,
``'heads'``, ``'mlp'``... A rule table maps each logical name onto a mesh axis
(or ``None``: replicated). :func:`param_specs` turns a tree of logical-axis
tuples into the ``PartitionSpec`` tree that
:class:`orthax.sharding.Distributed` and ``jax.jit`` take; :func:`state_specs`
gives an optimizer state the layout of the parameters it mirrors, so that an
orthax (or optax) optimizer state is sharded like the model.

Opt-in: ``import orthax.flax`` (``import orthax`` does not load it). Nothing
here imports Flax itself: the helpers read plain pytrees of tuples and
arrays, so they also serve models written without Flax.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from orthax import _tree
from orthax import engine
from orthax import sharding

Rules = Mapping[str, str | tuple[str, ...] | None]

__all__ = ['logical_to_spec', 'param_specs', 'spec_per_param',
           'state_shardings', 'state_specs']


def _is_spec(x: Any) -> bool:
  return isinstance(x, P)


def _axes(ax: Any) -> tuple[str, ...]:
  if ax is None:
    return ()
  return tuple(ax) if isinstance(ax, (tuple, list)) else (ax,)


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> P:
  """The ``PartitionSpec`` of one parameter from its logical axis names.

  Each name is looked up in ``rules`` (``None`` names stay ``None``). A mesh
  axis shards one dimension only: when two dimensions map onto the same mesh
  axis, the first keeps it and the later one is replicated.

  Example:

  >>> from jax.sharding import PartitionSpec as P
  >>> import orthax.flax
  >>> rules = {'layers': None, 'embed': 'fsdp', 'mlp': 'tensor'}
  >>> spec = orthax.flax.logical_to_spec(('layers', 'embed', 'mlp'), rules)
  >>> spec == P(None, 'fsdp', 'tensor')
  True
  >>> orthax.flax.logical_to_spec(('embed', 'embed'), rules) == P('fsdp', None)
  True

  Args:
    names: one logical axis name (or ``None``) per dimension.
    rules: logical name → mesh axis name, tuple of mesh axis names, or
      ``None`` (replicated along that dimension).

  Returns:
    A ``PartitionSpec`` with one entry per dimension.

  Raises:
    ValueError: a logical name has no rule (the message names it).
  """
  return _logical_to_spec(names, rules, 'logical_to_spec')


def _logical_to_spec(names: Sequence[str | None], rules: Rules,
                     owner: str) -> P:
  """:func:`logical_to_spec`, its error naming ``owner`` (the function
  the user called)."""
  out, used = [], set()
  for n in names:
    if n is not None and n not in rules:
      raise ValueError(f'{owner}: rules must map every logical axis name; '
                       f'{n!r} has no rule (rules: {dict(rules)}).')
    axes = _axes(None if n is None else rules[n])
    if any(a in used for a in axes):  # one mesh axis shards one dim only
      axes = ()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def param_specs(logical: Any, rules: Rules) -> Any:
  """A ``PartitionSpec`` tree from a tree of logical-axis tuples.

  Example:

  >>> from jax.sharding import PartitionSpec as P
  >>> import orthax.flax
  >>> logical = {'mlp': {'kernel': ('embed', 'mlp'), 'bias': ('mlp',)},
  ...            'scale': ()}
  >>> specs = orthax.flax.param_specs(logical, {'embed': 'fsdp',
  ...                                           'mlp': 'tensor'})
  >>> specs == {'mlp': {'kernel': P('fsdp', 'tensor'), 'bias': P('tensor')},
  ...           'scale': P()}
  True

  Args:
    logical: a pytree whose leaves are tuples of logical axis names (one per
      dimension of the parameter; ``()`` for a scalar).
    rules: as :func:`logical_to_spec` takes them.

  Returns:
    The same tree with a ``PartitionSpec`` at every leaf.
  """
  return jax.tree.map(
      lambda names: _logical_to_spec(names, rules, 'param_specs'), logical,
      is_leaf=lambda x: isinstance(x, tuple))


def _keys(path) -> tuple:
  return tuple(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))
               for k in path)


def spec_per_param(params: Any, specs: Any) -> list[P]:
  """The ``PartitionSpec`` of each leaf of ``params``, in flatten order,
  from ``specs`` shaped like ``params`` (or holding the same paths in other
  containers, e.g. an ``nnx.State``): a ``None`` entry (unspecified) is
  ``P()``, a ``NamedSharding`` its spec.

  Args:
    params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``\\ s).
    specs: a ``PartitionSpec``, ``NamedSharding`` or ``None`` (replicated)
      per parameter, shaped like ``params`` or with the same paths.

  Returns:
    A list with one ``PartitionSpec`` per leaf of ``params``, in
    ``jax.tree.leaves`` order.

  Raises:
    ValueError: ``specs`` has no entry for a parameter (naming it and
      the structures' difference), or an entry is not a ``PartitionSpec``,
      ``NamedSharding`` or ``None``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> import orthax.flax
    >>> params = {'w': jnp.ones((8, 16)), 'b': jnp.zeros(16)}
    >>> specs = orthax.flax.spec_per_param(params, {'w': P('fsdp'), 'b': None})
    >>> specs == [P(), P('fsdp')]  # leaf order: 'b', 'w'
    True
  """
  return _spec_per_param(params, specs, 'spec_per_param')


def _spec_per_param(params: Any, specs: Any, owner: str) -> list[P]:
  """:func:`spec_per_param`, its errors naming ``owner`` (the function
  the user called)."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  try:
    flat = treedef.flatten_up_to(specs)
  except (ValueError, TypeError) as e:
    # Other containers with the same keys (an nnx.State of specs for a
    # dict of parameters): matched by path.
    by_path = _tree.leaves_by_path(
        specs, lambda x: x is None or _is_spec(x)
        or isinstance(x, NamedSharding))
    names = [_tree.path_str(p) for p, _ in paths]
    missing = [name for name in names if name not in by_path]
    if missing:
      raise ValueError(f'{owner}: specs must be shaped like the parameters: '
                       f'none for parameter {missing[0]!r} ({e})') from None
    flat = [by_path[name] for name in names]
  out = []
  for (path, _), spec in zip(paths, flat):
    if spec is not None and not isinstance(spec, (P, NamedSharding)):
      name = _tree.path_str(path)
      raise ValueError(f'{owner}: specs must hold a PartitionSpec (or None: '
                       f'replicated) per parameter: parameter {name!r} has '
                       f'{spec!r}.')
    out.append(sharding.as_spec(spec))
  return out


def state_specs(abstract_opt_state: Any, params: Any, specs: Any) -> Any:
  """A ``PartitionSpec`` tree for an optimizer state, mirroring the params.

  A state leaf whose path ends with a parameter's path and has that
  parameter's shape (momentum, Adam moments: optax nests them under the
  parameter tree) gets that parameter's spec; a slot stage's state
  (:class:`orthax.engine.SlotState`) is sharded over every mesh axis, each
  device holding its own matrices' state; every other leaf (step counts,
  per-row statistics, norms) is replicated, ``PartitionSpec()``.

  Example:

  >>> import jax, jax.numpy as jnp, optax
  >>> from jax.sharding import PartitionSpec as P
  >>> import orthax, orthax.flax
  >>> params = {'w': jax.ShapeDtypeStruct((64, 32), jnp.float32),
  ...           'b': jax.ShapeDtypeStruct((32,), jnp.float32)}
  >>> specs = {'w': P('fsdp', 'tensor'), 'b': P('tensor')}
  >>> state = jax.eval_shape(orthax.muon(learning_rate=0.02).init, params)
  >>> out = orthax.flax.state_specs(state, params, specs)
  >>> leaves = jax.tree.leaves(out, is_leaf=lambda x: isinstance(x, P))
  >>> set(leaves) == {P('fsdp', 'tensor'), P('tensor'), P()}  # P(): counts
  True

  Args:
    abstract_opt_state: the optimizer state, abstract
      (``jax.eval_shape(tx.init, params)``) or concrete.
    params: the parameters it was built from (arrays or
      ``jax.ShapeDtypeStruct``\\ s).
    specs: the parameters' ``PartitionSpec`` tree (same structure;
      ``None`` entries are replicated).

  Returns:
    A tree of the optimizer state's structure with a ``PartitionSpec`` at
    every leaf.
  """
  return _state_specs(abstract_opt_state, params, specs, 'state_specs')


def _state_specs(abstract_opt_state: Any, params: Any, specs: Any,
                 owner: str) -> Any:
  """:func:`state_specs`, its errors naming ``owner`` (the function the
  user called)."""
  by_path = {}
  for (path, x), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                             _spec_per_param(params, specs, owner)):
    by_path[_keys(path)] = (tuple(x.shape), spec)
  lengths = sorted({len(k) for k in by_path}, reverse=True)

  def one(path, x):
    if isinstance(x, engine.SlotState):  # on its owner devices
      return engine.SlotState(
          jax.tree.map(lambda _: P(x.axes), x.slots), x.axes, x.members,
          jax.tree.map(lambda _: P(x.axes), x.ids))
    keys = _keys(path)
    for n in lengths:
      hit = by_path.get(keys[-n:]) if len(keys) >= n else None
      if hit is not None and hit[0] == tuple(x.shape):
        return hit[1]
    return P()

  return jax.tree_util.tree_map_with_path(
      one, abstract_opt_state,
      is_leaf=lambda x: isinstance(x, engine.SlotState))


def state_shardings(tx: optax.GradientTransformation, abstract_params: Any,
                    specs: Any, mesh: jax.sharding.Mesh) -> Any:
  """``NamedSharding``\\ s of ``tx``'s state for parameters laid out by
  ``specs`` on ``mesh`` (:func:`state_specs` of ``tx.init``'s shapes).

  Pass them as the ``out_shardings`` of a jitted ``tx.init`` (or the
  optimizer-state part of a train step's shardings).

  Example:

  >>> import jax, jax.numpy as jnp
  >>> from jax.sharding import PartitionSpec as P
  >>> import orthax, orthax.flax
  >>> mesh = jax.make_mesh((1,), ('fsdp',))
  >>> params = {'w': jax.ShapeDtypeStruct((64, 32), jnp.float32)}
  >>> sh = orthax.flax.state_shardings(orthax.muon(learning_rate=0.02),
  ...                                  params, {'w': P('fsdp')}, mesh)
  >>> {s.spec for s in jax.tree.leaves(sh)} == {P('fsdp'), P()}
  True

  Args:
    tx: the optimizer.
    abstract_params: the parameters (``jax.ShapeDtypeStruct``\\ s or arrays).
    specs: the parameters' ``PartitionSpec`` tree.
    mesh: the device mesh.

  Returns:
    A tree of ``NamedSharding`` with the structure of ``tx.init``'s state.
  """
  state = jax.eval_shape(tx.init, abstract_params)
  return jax.tree.map(lambda s: NamedSharding(mesh, s),
                      _state_specs(state, abstract_params, specs,
                                   'state_shardings'),
                      is_leaf=_is_spec)
