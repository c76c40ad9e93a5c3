"""Ahead-of-time inspection: the plan an optimizer will run, without running it.

:func:`distributed_orthogonalize` calls :func:`record` with every plan it
builds; :func:`plan` traces an optimizer's ``init`` and ``update`` with
``jax.eval_shape`` inside :func:`recording` and merges what was recorded.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Mapping

import jax
import optax

from orthax import _tree
from orthax.sharding import _specs
from orthax.sharding._distributed import Distributed
from orthax.sharding._plan_types import Plan


class NotDistributedError(ValueError):
  """:func:`plan` of an optimizer without distributed orthogonalization."""


_RECORDED: contextvars.ContextVar[list[Plan] | None] = contextvars.ContextVar(
    'orthax_sharding_recorded_plans', default=None)


@contextlib.contextmanager
def recording() -> Iterator[list[Plan]]:
  """Yields the list every :class:`Plan` built (traced) by a distributed
  orthogonalization inside the ``with`` block is appended to."""
  plans: list[Plan] = []
  token = _RECORDED.set(plans)
  try:
    yield plans
  finally:
    _RECORDED.reset(token)


def record(p: Plan) -> None:
  """Appends ``p`` to the active :func:`recording`; no-op outside one."""
  plans = _RECORDED.get()
  if plans is not None:
    plans.append(p)


def _merge(plans: list[Plan]) -> Plan:
  meshes = {(p.mesh_shape, p.num_devices) for p in plans}
  if len(meshes) > 1:
    raise ValueError('orthax.sharding.plan: the optimizer orthogonalizes on '
                     f'several meshes {sorted(m[0] for m in meshes)}; one '
                     'plan covers one mesh.')
  groups = tuple(g for p in plans for g in p.groups)
  return Plan(groups, plans[0].num_devices, plans[0].mesh_shape)


def _plan_tx(tx: optax.GradientTransformation, abstract_params: Any) -> Plan:
  placed, done = abstract_params, set()
  while True:  # each distributed call placing its leaves
    try:
      plans = _traced_plans(tx, placed)
      break
    except _specs.UnplacedLeafError as e:
      # Abstract values without sharding= on an Explicit mesh: placed as
      # the Distributed says (only shapes and specs matter here).
      paths = set(_tree.leaves_with_paths(placed)[0]) & set(e.specs)
      if paths <= done:
        raise  # its paths are not the parameters' (a wrapped subtree)
      placed, done = _placed(placed, e.mesh, e.specs), done | paths
  if not plans:
    raise NotDistributedError(
        'orthax.sharding.plan: the optimizer runs no distributed '
        'orthogonalization on these parameters: plain optax, a '
        'recipe/orthogonalize built without distributed= (build it with '
        'distributed=orthax.sharding.Distributed(mesh, param_specs)), one '
        'whose matrix step has no distributed pass (AuON), or no leaf '
        'routed to its matrix branch.')
  return _merge(plans)


def _traced_plans(tx: optax.GradientTransformation, params: Any
                  ) -> list[Plan]:
  # Fresh closures: jax caches traces by function, and a cached trace would
  # not run the Python that records.
  with recording() as plans:
    state = jax.eval_shape(lambda p: tx.init(p), params)
    jax.eval_shape(lambda g, s, p: tx.update(g, s, p), params, state, params)
  return plans


def _placed(params: Any, mesh: Any, specs: dict[str, Any]) -> Any:
  """``params`` as ``ShapeDtypeStruct`` values, those at a path of
  ``specs`` sharded by it on ``mesh``."""
  paths, leaves, treedef = _tree.leaves_with_paths(params)
  return treedef.unflatten([
      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=(
          jax.sharding.NamedSharding(mesh, specs[p]) if p in specs
          else getattr(x, 'sharding', None)))
      for p, x in zip(paths, leaves)])


def _plan_distributed(dist: Distributed, abstract_params: Any,
                      matrix_specs: _tree.SpecsLike, plan_kw) -> Plan:
  from orthax.sharding import _execute  # pylint: disable=g-import-not-at-top
  from orthax.sharding import _specs  # pylint: disable=g-import-not-at-top
  ms = _tree.resolve_specs(matrix_specs, abstract_params, 'plan')
  paths, leaves, _ = _tree.leaves_with_paths(abstract_params)
  return _execute.plan_leaves(paths, leaves, ms,
                              _specs.specs_for(abstract_params, dist), dist,
                              **plan_kw)


_CONFIG_HINT = ('an optimizer config is planned next to the trainer: '
                'orthax.train.optim.plan(config, abstract_params, distributed)')


def plan(tx_or_dist: Any, abstract_params: Any,
         matrix_specs: _tree.SpecsLike = None, **plan_kw) -> Plan:
  """The static plan of a distributed orthogonalization; ``print`` it.

  Nothing is compiled or run: shapes, dtypes and ``PartitionSpec``\\ s only.
  For a trainer ``optimizer`` config use
  :func:`orthax.train.optim.plan` ``(config, abstract_params, distributed)``.

  Args:
    tx_or_dist: one of

      * an ``optax.GradientTransformation`` built with ``distributed=`` (a
        recipe, or a chain holding :func:`orthax.transforms.orthogonalize`):
        its ``init`` and ``update`` are traced with ``jax.eval_shape`` and
        every plan they build is merged (the FLOPs follow the transform's own
        preset, steps and method);
      * a :class:`Distributed`: every leaf of ``abstract_params`` is
        orthogonalized, with ``matrix_specs`` and ``plan_kw``.
    abstract_params: the parameters: ``jax.ShapeDtypeStruct``\\ s (with
      ``sharding=`` when the specs are read from the arrays) or arrays.
    matrix_specs: with a :class:`Distributed` only, as
      :func:`orthax.orthogonalize` takes them.
    **plan_kw: with a :class:`Distributed` only, the FLOP model of
      :func:`plan_orthogonalize` (``steps``, ``method``, ``matrix_flops``...).

  Returns:
    A :class:`Plan`: groups, strategy per group, padding, predicted FLOPs and
    bytes per device. Merged plans keep each group's ``paths``; ``leaves``
    indices are per traced call. Raises :class:`NotDistributedError` (a
    ``ValueError``) for an optimizer that has nothing to plan, ``TypeError``
    for anything else (an optimizer config included: see above).
  """
  if 'distributed' in plan_kw:
    raise TypeError('orthax.sharding.plan: distributed is not one of its '
                    'arguments: a transformation carries its own distributed= '
                    '(pass it when building the optimizer), a Distributed is '
                    f'the first argument; {_CONFIG_HINT}.')
  if isinstance(tx_or_dist, Distributed):
    return _plan_distributed(tx_or_dist, abstract_params, matrix_specs,
                             plan_kw)
  if isinstance(tx_or_dist, Mapping):
    raise TypeError(f'orthax.sharding.plan: got a mapping; {_CONFIG_HINT}.')
  if not isinstance(tx_or_dist, optax.GradientTransformation):
    raise TypeError(
        'orthax.sharding.plan: expected an optax.GradientTransformation or an '
        'orthax.sharding.Distributed, got '
        f'{type(tx_or_dist).__name__}: {tx_or_dist!r:.200}.')
  extra = sorted(plan_kw) + (['matrix_specs'] if matrix_specs is not None
                             else [])
  if extra:
    raise ValueError(f'orthax.sharding.plan: {extra} apply to a Distributed '
                     'only; an optimizer plans with its own settings.')
  return _plan_tx(tx_or_dist, abstract_params)
