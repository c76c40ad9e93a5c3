"""Decoupled weight decay, plain or cautious, placed after the learning rate."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from orthax import _tree
from orthax import _validate
from orthax.matrix_stages import check_min_side
from orthax.matrix_stages import check_scale_mode
from orthax.transforms.scale_by_shape import shape_factor


class WeightDecayState(NamedTuple):
  count: jax.Array  # steps taken, for a learning-rate schedule


def _mask_per_leaf(mask: Any, updates: Any, treedef: Any) -> list:
  """One boolean per leaf of ``updates`` from ``mask``, a tree of booleans
  shaped like the parameters or a prefix of them (as optax's masks: one
  boolean for a whole subtree)."""
  try:
    full = jax.tree.map(lambda k, sub: jax.tree.map(lambda _: k, sub),
                        mask, updates)
    per_leaf = treedef.flatten_up_to(full)
  except (ValueError, TypeError) as e:
    raise ValueError('decoupled_weight_decay: mask must be a tree of '
                     'booleans shaped like the parameters or a prefix of '
                     f'them: {e}') from None
  # (a string would count as True; a traced or array boolean is fine)
  bad = [i for i, keep in enumerate(per_leaf)
         if not (isinstance(keep, (bool, np.bool_))
                 or getattr(keep, 'dtype', None) == jnp.bool_)]
  if bad:
    path = _tree.leaves_with_paths(full)[0][bad[0]]
    raise ValueError(f'decoupled_weight_decay: mask must hold booleans, '
                     f'got {per_leaf[bad[0]]!r} at {path!r}.')
  return per_leaf


def decoupled_weight_decay(
    weight_decay: float | jax.Array,
    *,
    learning_rate: optax.ScalarOrSchedule | None = None,
    cautious: bool = False,
    mask: Any = None,
    step_scale: str | None = None,
    rate_scale: str | None = None,
    min_side: int | None = None,
    matrix_specs: _tree.SpecsLike = None,
) -> optax.GradientTransformation:
  r"""Adds decoupled weight decay to an update that already includes the lr.

  Place it **after** the learning-rate stage; the incoming ``Δ`` is the step
  that will be added to the parameters (``W ← W + Δ``):

  .. math::
     Δ \leftarrow Δ - λ\,η_t\,(W \odot M),\qquad
     M = \begin{cases} \mathbf 1[\,Δ \odot W \le 0\,] & \text{cautious}\\
                       \mathbf 1 & \text{otherwise}\end{cases}

  ``η_t = learning_rate`` (number or schedule) gives the PyTorch/optax
  convention ``W ← W(1 - ηλ) + Δ`` (KellerJordan/Muon, Moonlight: decay with
  the *unscaled* lr even when the update carries a shape factor);
  ``learning_rate=None`` gives ``η_t = 1``, a decay independent of the learning
  rate (Loshchilov & Hutter's form when λ already includes the schedule
  multiplier). Cautious decay (Dion, modded-nanogpt) only decays coordinates
  where the update moves the weight toward zero.

  Args:
    weight_decay: λ.
    learning_rate: η (number or schedule) multiplying λ, or ``None``.
    cautious: decay only where ``sign(Δ) = -sign(W)``.
    mask: optional tree (or callable ``params -> tree``) of booleans
      choosing the decayed leaves, shaped like the parameters or a prefix of
      them (one boolean for a whole subtree), as optax's masks.
    step_scale: a :func:`orthax.scale_by_shape` mode; multiplies the rate by
      the update's own step size ``η_t·shape_factor`` of each matrix, i.e.
      ``Δ ← Δ - λ η_t (η_t s) W``. modded-nanogpt's NorMuon decays this way
      (``λ·lr·lr_eff`` with ``lr_eff = lr·sqrt(max(1, out/in))``:
      ``step_scale='keller'``). Needs ``learning_rate``.
    rate_scale: a :func:`orthax.scale_by_shape` mode; multiplies each
      matrix's rate by its factor, ``Δ ← Δ - λ η_t s W``: AdamW's decay at
      the step's own rate when the step carries the same factor (DCT-AdamW's
      ``'inverse_side'``).
    min_side: with ``'inverse_side'``, the side below which the factor
      stops growing (:func:`orthax.scale_by_shape`; default ``None``: 1).
    matrix_specs: matrix views for ``step_scale`` or ``rate_scale`` (as in
      :func:`orthax.orthogonalize`).

  Example:
    >>> import jax, jax.numpy as jnp, optax, orthax
    >>> params = {'w': jnp.ones((8, 16)), 'b': jnp.ones(16)}
    >>> tx = optax.chain(
    ...     optax.scale_by_learning_rate(0.01),
    ...     orthax.decoupled_weight_decay(0.1, learning_rate=0.01,
    ...                                   mask={'w': True, 'b': False}))
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> u, _ = tx.update(grads, tx.init(params), params)
    >>> round(float(u['w'][0, 0]), 6), round(float(u['b'][0]), 6)  # 'b' masked
    (-0.011, -0.01)

  References: Loshchilov & Hutter, arXiv 1711.05101; Chen et al., *Cautious
  Optimizers* (arXiv 2411.16085).
  """
  _validate.arguments('decoupled_weight_decay', decoupled_weight_decay,
                      locals())
  if step_scale is not None:
    check_scale_mode(step_scale, 'decoupled_weight_decay: step_scale')
    if learning_rate is None:
      raise ValueError('decoupled_weight_decay: step_scale needs '
                       'learning_rate.')
    if rate_scale is not None:
      raise ValueError('decoupled_weight_decay: step_scale and rate_scale '
                       'cannot both be given: pass one, not both.')
  if rate_scale is not None:
    check_scale_mode(rate_scale, 'decoupled_weight_decay: rate_scale')
  checked = check_min_side(min_side, 'decoupled_weight_decay: min_side')
  _validate.applies('decoupled_weight_decay', 'min_side', min_side, None,
                    'inverse_side' in (step_scale, rate_scale),
                    "step_scale or rate_scale 'inverse_side'")
  min_side = checked

  def init_fn(params):
    del params
    return WeightDecayState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('decoupled_weight_decay needs params: call '
                       'update(grads, state, params).')
    new_state = WeightDecayState(count=optax.safe_increment(state.count))
    if isinstance(weight_decay, (int, float)) and weight_decay == 0:
      return updates, new_state  # static zero: no pass over the parameters
    if callable(learning_rate):
      eta = learning_rate(state.count)
    else:
      eta = 1.0 if learning_rate is None else learning_rate
    rate = weight_decay * eta
    leaves, treedef = jax.tree.flatten(updates)
    if step_scale is None and rate_scale is None:
      rates = [rate] * len(leaves)
    else:
      specs = _tree.resolve_specs(matrix_specs, updates,
                                  'decoupled_weight_decay')
      per_step = 1.0 if step_scale is None else eta
      rates = [rate * per_step * shape_factor(*s.matrix_shape(x.shape)[1:],
                                              step_scale or rate_scale,
                                              min_side=min_side)
               for x, s in zip(leaves, specs)]

    def leaf(d, w, r):
      decay = w.astype(d.dtype)
      if cautious:
        decay = jnp.where(d * decay <= 0, decay, jnp.zeros_like(decay))
      return (d - r * decay).astype(d.dtype)

    ws = treedef.flatten_up_to(params)
    keep = ([True] * len(leaves) if mask is None
            else _mask_per_leaf(mask(params) if callable(mask) else mask,
                                updates, treedef))
    new = [leaf(d, w, r) if k else d
           for d, w, r, k in zip(leaves, ws, rates, keep)]
    return jax.tree.unflatten(treedef, new), new_state

  return optax.GradientTransformation(init_fn, update_fn)
