"""Fail at trace time, naming the leaf, when a gradient's shape is not its
parameter's."""

from __future__ import annotations

import optax

from orthax import _tree


def check_shapes() -> optax.GradientTransformation:
  r"""Identity that checks ``updates`` against ``params``.

  Raises ``ValueError`` when the two trees differ in structure or when a
  leaf's shape differs from its parameter's, naming the leaf's path and both
  shapes (e.g. a transposed gradient ``(8, 4)`` for a ``(4, 8)`` kernel,
  which would otherwise fail deep inside the optimizer with a broadcasting
  ``TypeError`` that names neither). Shapes are static, so the check costs
  nothing at run time; without ``params`` it does nothing.

  Example:
    >>> import jax.numpy as jnp
    >>> import orthax
    >>> tx = orthax.transforms.check_shapes()
    >>> params = {'w': jnp.zeros((4, 8))}
    >>> _ = tx.update({'w': jnp.ones((4, 8))}, tx.init(params), params)
    >>> tx.update({'w': jnp.ones((8, 4))}, tx.init(params), params)
    Traceback (most recent call last):
    ...
    ValueError: gradient leaf 'w' has shape (8, 4) but its parameter has shape (4, 8).
  """

  def update_fn(updates, state, params=None):
    if params is None:
      return updates, state
    paths, grads, treedef = _tree.leaves_with_paths(updates)
    try:
      ps = treedef.flatten_up_to(params)
    except (ValueError, TypeError) as e:
      raise ValueError(
          'the gradient tree does not have the structure of the parameter '
          f'tree: {_structure_difference(paths, params, e)}') from None
    for path, g, p in zip(paths, grads, ps):
      gs, ps_ = tuple(getattr(g, 'shape', ())), tuple(getattr(p, 'shape', ()))
      if gs != ps_:
        raise ValueError(f'gradient leaf {path!r} has shape {gs} but its '
                         f'parameter has shape {ps_}.')
    return updates, state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)



def _structure_difference(grad_paths, params, error) -> str:
  """Which leaf paths only one of the two trees has, or JAX's message when
  both have the same paths (e.g. a tuple against a list)."""
  param_paths, _, _ = _tree.leaves_with_paths(params)
  missing = sorted(set(param_paths) - set(grad_paths))
  extra = sorted(set(grad_paths) - set(param_paths))
  parts = []
  if missing:
    parts.append(f'parameters without a gradient: {missing}')
  if extra:
    parts.append(f'gradients without a parameter: {extra}')
  return '; '.join(parts) + '.' if parts else str(error)
