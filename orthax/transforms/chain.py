"""``optax.named_chain`` with a state that ``flax.serialization`` can write."""

from __future__ import annotations

import optax

from orthax import _validate


def named_chain(*stages: tuple[str, optax.GradientTransformation]
                ) -> optax.GradientTransformationExtraArgs:
  """:func:`optax.named_chain` whose state is a plain ``dict``.

  The same transformation and the same names (``state['momentum']``,
  ``optax.tree.get(state, 'momentum')``); only the state's container
  differs. optax keeps the stages' states in a ``collections.OrderedDict``,
  which ``flax.serialization.to_bytes`` (msgpack, e.g. a linen
  ``TrainState``) refuses: "can not serialize 'collections.OrderedDict'".
  Every recipe chains its stages with this one. (A ``dict`` flattens in
  sorted key order; nothing here depends on the order of the leaves.)

  Args:
    *stages: ``(name, transformation)`` pairs, names unique.

  Example:
    >>> import flax.serialization, jax.numpy as jnp, optax, orthax
    >>> tx = orthax.transforms.named_chain(('momentum', orthax.momentum(0.9)),
    ...                                    ('scale', optax.scale(-0.1)))
    >>> state = tx.init({'w': jnp.ones((2, 3))})
    >>> type(state).__name__, sorted(state)
    ('dict', ['momentum', 'scale'])
    >>> _ = flax.serialization.to_bytes(state)
  """
  for i, stage in enumerate(stages):
    if not (isinstance(stage, (tuple, list)) and len(stage) == 2
            and isinstance(stage[0], str)):
      raise TypeError(f'named_chain: stages must be (name, transformation) '
                      f'pairs, got {stage!r} at position {i}.')
    _validate.transformation('named_chain', f'stage {stage[0]!r}', stage[1])
  chained = optax.named_chain(*stages)

  def init_fn(params):
    return dict(chained.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    updates, state = chained.update(updates, state, params, **extra_args)
    return updates, dict(state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
