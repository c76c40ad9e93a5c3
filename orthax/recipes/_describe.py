""":func:`orthax.describe`: the routing table of a parameter tree, with a
recipe's learning rates and weight decays."""

from __future__ import annotations

import sys
from typing import Any, Callable

import jax
import optax

from orthax import _table
from orthax import _tree
from orthax import routing
from orthax.recipes._common import recipe_routing


def describe(params: Any, router: routing.Router | None = None, *,
             optimizer: Any = None) -> str:
  """Prints and returns the routing table of ``params``: each leaf's path,
  shape, branch and matrix view, and notes on leaves that look like output
  layers (:meth:`orthax.Router.output_layer_suspects`).

  Args:
    params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``), or a
      Flax NNX module: its ``nnx.Param`` state, what ``nnx.Optimizer(model,
      tx, wrt=nnx.Param)`` steps (not its batch statistics).
    router: the :class:`orthax.Router` (default: ``optimizer``'s, else
      ``orthax.Router()``). A recipe passed here is taken as
      ``optimizer``.
    optimizer: a recipe (``orthax.muon(...)``, ...): adds each leaf's
      learning rate (``'schedule'`` for a schedule) and weight decay λ,
      and routes by the recipe's router.

  Where the recipe routes by a labels callable (``muon(reference='optax')``:
  2-D leaves are matrices), the table shows its labels, and for each 2-D
  ``'matrix'`` leaf the default view (the last two axes), as the recipe
  reads it.

  Raises:
    ValueError: ``optimizer`` is not a recipe or is wrapped (e.g. by
      ``optax.inject_hyperparams``).

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> params = {'embed': jnp.zeros((50, 8)), 'w': jnp.zeros((8, 8)),
    ...           'head': jnp.zeros((8, 50))}
    >>> _ = orthax.describe(params, optimizer=orthax.muon())
    path   shape    label   view       lr       wd
    -----  -------  ------  ---------  -------  ---
    embed  (50, 8)  adam               0.003    0
    head   (8, 50)  adam               0.003    0
    w      (8, 8)   matrix  1 x 8 x 8  0.05656  0.2
  """
  nnx = sys.modules.get('flax.nnx')  # loaded if params can be a module
  if nnx is not None and isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  if isinstance(router, optax.GradientTransformation):
    if optimizer is not None:
      raise TypeError('describe: router must be an orthax.Router, got an '
                      'optimizer (and optimizer= is given too).')
    router, optimizer = None, router  # describe(params, orthax.muon())
  if router is not None and not isinstance(router, routing.Router):
    raise TypeError(f'describe: router must be an orthax.Router, got '
                    f'{type(router).__name__}.')
  lrs = wds = None
  notes: tuple[str, ...] = ()
  if optimizer is not None:
    info = recipe_routing(optimizer)
    if info is None:
      raise ValueError(
          'describe: optimizer carries no branch learning rates: pass an '
          'orthax recipe itself (orthax.muon(...), orthax.recipe(name, '
          '...)), not a plain optax transformation or one wrapped by '
          'optax.inject_hyperparams.')
    lrs, wds, notes = info.learning_rates, info.weight_decays, info.notes
    if router is None:
      router = info.router
  if router is None or isinstance(router, routing.Router):
    table = (router or routing.Router()).describe(params, lrs, wds)
  else:  # the recipe's own labels callable
    table = _labelled_table(params, router, lrs, wds)
  table = '\n'.join([table] + [f'note: {n}' for n in notes])
  print(table)
  return table


def _labelled_table(params: Any, labels: Callable[[Any], Any],
                    learning_rates: dict[str, Any],
                    weight_decays: dict[str, Any]) -> str:
  """The table of a recipe routed by the labels callable ``labels``: its
  label per leaf, and the default view of each 2-D ``'matrix'`` leaf (a
  leaf of another rank has none: such a recipe refuses it)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  rows = [('path', 'shape', 'label', 'view', 'lr', 'wd')]
  for (p, x), label in zip(flat, treedef.flatten_up_to(labels(params))):
    shape = tuple(getattr(x, 'shape', ()))
    view = (f'1 x {shape[0]} x {shape[1]}'
            if label == 'matrix' and len(shape) == 2 else '')
    rows.append((_tree.path_str(p), str(shape), str(label), view,
                 _table.format_hyperparameter(learning_rates.get(label)),
                 _table.format_hyperparameter(weight_decays.get(label))))
  return _table.format_table(rows)
