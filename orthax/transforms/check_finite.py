"""Non-finite gradients, and finite gradients that the optimizer's
arithmetic overflows: a step that is skipped on device, and flags that say
which leaves were at fault.

The decision is made inside the compiled step, on every device alike, so a
NaN on a mesh never leaves some devices waiting in a collective for others
that stopped; the host reads the outcome from the optimizer state
afterwards (:func:`nonfinite_status`, :func:`nonfinite_leaves`,
:func:`raise_if_nonfinite`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from orthax import _tree
from orthax import _validate
from orthax import engine


class NonFiniteGradientError(ValueError):
  """A gradient leaf holds NaN or Inf."""


class NonFiniteUpdateError(NonFiniteGradientError):
  """The gradient was finite, but the update or the new optimizer state
  computed from it was not (float32 overflow: a momentum that sums a huge
  gradient, a second moment that squares it). A subclass of
  :class:`NonFiniteGradientError`, so one handler serves both."""


class SkipIfNonfiniteState(NamedTuple):
  """State of :func:`skip_if_nonfinite`.

  Attributes:
    inner_state: the wrapped transformation's state (kept as it was by a
      skipped step).
    nonfinite: a tree shaped like the gradients, one bool scalar per leaf:
      True where that leaf held NaN or Inf at the last step.
    consecutive: skipped steps in a row up to the last one (0 after a step
      that was applied).
    total: skipped steps since ``init``.
    nonfinite_updates: a tree shaped like the gradients, one bool scalar
      per leaf: True where every gradient was finite but that leaf's update
      was not, at the last step.
    nonfinite_state: a bool vector, one entry per leaf of ``inner_state``
      in its flatten order (one array, not a copy of its tree:
      ``optax.tree.get(state, 'count')``, ``tree_set`` of injected
      hyperparameters and ``optax.tree_utils.tree_map_params`` must find
      only the real leaves): True where every gradient was finite but an
      entry of that leaf that was finite became NaN or Inf (always False for
      integer leaves), at the last step.
  """
  inner_state: Any
  nonfinite: Any
  consecutive: jax.Array
  total: jax.Array
  nonfinite_updates: Any
  nonfinite_state: Any


def _flags(tree: Any) -> Any:
  """One bool per leaf of ``tree``: True where it holds NaN or Inf (a
  plain tree: no Flax box, with its sharding annotation, around a
  flag)."""
  def flag(x):
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
      return jnp.zeros([], jnp.bool_)
    return ~jnp.all(jnp.isfinite(x))
  return jax.tree.map(flag, _tree.unboxed(tree))


def _state_flags(new: Any, old: Any) -> Any:
  """One bool per leaf of the state ``new``: True where an entry that was
  finite in ``old`` is not (an Inf kept from ``init`` on purpose, such as
  ``optax.contrib.reduce_on_plateau``'s best value, is not a fault)."""
  def flag(x, y):
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
      return jnp.zeros([], jnp.bool_)
    return jnp.any(~jnp.isfinite(x) & jnp.isfinite(y))
  new, old = jax.tree.leaves(new), jax.tree.leaves(old)
  if len(new) != len(old):
    raise ValueError(f'skip_if_nonfinite: the guarded state has {len(new)} '
                     f'leaves after the step, {len(old)} before; its flags '
                     'pair them one to one.')
  flags = list(map(flag, new, old))
  return jnp.stack(flags) if flags else jnp.zeros([0], jnp.bool_)


def _once(always: jax.Array, flag: Callable[[], jax.Array]) -> jax.Array:
  """``flag()``, a reduction over every leaf, computed once: behind a
  ``lax.cond`` on ``always`` (true at run time, not known to the compiler).
  As a plain value, XLA copied its chain over all N leaves into each of the
  N per-leaf selects that read it, and the compiled program (and its
  compile time) grew as N²: 557 s for a 400-leaf Muon on CPU. The selects
  themselves stay per leaf and fused (a ``lax.cond`` over the whole tree
  kept one update-sized buffer more alive)."""
  return jax.lax.cond(always, flag, lambda: jnp.bool_(False))


def _any(flags: Any) -> jax.Array:
  leaves = jax.tree.leaves(flags)
  return jnp.any(jnp.stack(leaves)) if leaves else jnp.bool_(False)


def skip_if_nonfinite(
    inner: optax.GradientTransformation,
    check_result: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Applies ``inner`` only when the gradient and its result are finite.

  With :math:`(\hat u, \hat s) = \mathrm{inner}(g, s)` and
  :math:`\mathrm{ok} = \mathrm{finite}(g) \wedge \mathrm{finite}(\hat u)
  \wedge \mathrm{finite}(\hat s \mid s)` (every entry of every leaf; for the
  state, every entry that was finite in :math:`s`: an Inf kept from
  ``init`` on purpose is not a fault),

  .. math::
     (u, s') = \begin{cases} (\hat u, \hat s) & \mathrm{ok} \\
                             (0, s) & \text{otherwise,} \end{cases}

  as ``optax.apply_if_finite`` does for the gradient, but with no limit on
  skipped steps and with the outcome kept per leaf in the state, so that
  the caller can name the leaves at fault. The result is checked too: a
  finite gradient near the float32 limit can overflow the optimizer's own
  arithmetic (a momentum summing it, a second moment squaring it), and an
  infinite second moment would silently freeze its parameter for the rest
  of the run. On a skipped step ``inner`` sees zeros instead of a
  non-finite gradient (its result is discarded; nothing in it can loop on a
  NaN). The flags are reductions of the (possibly sharded) arrays, computed
  alike on every device: no host callback, nothing that can hang a mesh.

  Reading the outcome in your own loop (the trainer does this for you,
  with ``train.nonfinite`` = ``'raise'`` or ``'skip'``)::

    updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
    orthax.raise_if_nonfinite(opt_state, step)   # or:
    if orthax.nonfinite_status(opt_state).consecutive > 0:
      print('skipped; bad leaves:', orthax.nonfinite_leaves(opt_state))

  Args:
    inner: the transformation to guard (every orthax recipe is wrapped
      with it by ``check_finite=True``, its default).
    check_result: also check the update and the new state (default). The
      check reads them once more and selects after the whole step, where
      the gradient's select fuses into it: on CPU a guarded AdamW step over
      8M parameters took about 2× as long as with ``False``
      (``scripts/bench_guard.py``); Newton–Schulz recipes barely notice. ``False``
      checks the gradient only, as before 2026-12-06.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`SkipIfNonfiniteState`.

  Example:
    >>> import jax.numpy as jnp, optax, orthax
    >>> tx = orthax.skip_if_nonfinite(optax.sgd(0.1))
    >>> params = {'w': jnp.ones(2)}
    >>> u, s = tx.update({'w': jnp.array([1.0, jnp.nan])}, tx.init(params))
    >>> u['w'].tolist(), orthax.nonfinite_leaves(s)
    ([0.0, 0.0], ['w'])
    >>> tx = orthax.skip_if_nonfinite(optax.adam(0.1))  # g² overflows
    >>> u, s = tx.update({'w': jnp.array([1.0, 1e30])}, tx.init(params))
    >>> u['w'].tolist(), orthax.nonfinite_leaves(s, result=True)
    ([0.0, 0.0], ['state:0/nu/w'])
  """
  _validate.arguments('skip_if_nonfinite', skip_if_nonfinite, locals(),
                      inner=_validate.transformation)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    inner_state = inner.init(params)
    no = lambda _: jnp.zeros([], jnp.bool_)  # pylint: disable=unnecessary-lambda-assignment
    plain = _tree.unboxed(params)
    return SkipIfNonfiniteState(
        inner_state=inner_state,
        nonfinite=jax.tree.map(no, plain),
        consecutive=jnp.zeros([], jnp.int32),
        total=jnp.zeros([], jnp.int32),
        nonfinite_updates=jax.tree.map(no, plain),
        nonfinite_state=jnp.zeros([len(jax.tree.leaves(inner_state))],
                                  jnp.bool_))

  def update_fn(updates, state, params=None, **extra_args):
    flags = _flags(updates)
    # ``always`` is true at run time, unknown to the compiler: see _once.
    always = state.total >= 0
    grads_ok = _once(always, lambda: ~_any(flags))
    safe = jax.tree.map(lambda g: jnp.where(grads_ok, g, jnp.zeros_like(g)),
                        updates)
    new, inner_state = inner.update(safe, state.inner_state, params,
                                    **extra_args)
    # A result's flags count only where the gradient was finite (else the
    # step is skipped for the gradient, and named for it).
    if check_result:
      new_flags = jax.tree.map(lambda f: f & grads_ok, _flags(new))
      state_flags = _state_flags(inner_state, state.inner_state) & grads_ok
      result_ok = _once(always, lambda: ~_any(new_flags)
                        & ~jnp.any(state_flags))
    else:
      new_flags = jax.tree.map(lambda _: jnp.zeros([], jnp.bool_),
                               _tree.unboxed(new))
      state_flags = jnp.zeros(state.nonfinite_state.shape, jnp.bool_)
      result_ok = jnp.bool_(True)
    ok = grads_ok & result_ok
    new = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new)
    # On Explicit mesh axes the two must agree in sharding: the new state
    # takes the incoming one's (a state placed otherwise than init's, e.g.
    # restored replicated, met a ShardingTypeError here).
    inner_state = jax.tree.map(
        lambda a, b: jnp.where(ok, a, b),
        engine.reshard_like(inner_state, state.inner_state),
        state.inner_state)
    skipped = (~ok).astype(jnp.int32)
    return new, SkipIfNonfiniteState(
        inner_state=inner_state, nonfinite=flags,
        consecutive=(state.consecutive + 1) * skipped,
        total=state.total + skipped, nonfinite_updates=new_flags,
        nonfinite_state=state_flags)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find(state: Any) -> SkipIfNonfiniteState | None:
  if isinstance(state, SkipIfNonfiniteState):
    return state
  if isinstance(state, (tuple, list)):
    children = state
  elif isinstance(state, dict):
    children = state.values()
  else:
    return None
  for child in children:
    found = _find(child)
    if found is not None:
      return found
  return None


def nonfinite_status(opt_state: Any) -> SkipIfNonfiniteState | None:
  """The :func:`skip_if_nonfinite` state inside ``opt_state`` (searched
  through chains, partitions and ``optax.inject_hyperparams``), or ``None``
  when the optimizer has no such guard. Works on traced and host values.

  Args:
    opt_state: an optimizer state, e.g. an orthax recipe's (searched
      through its tuples, lists and dicts, named tuples included).

  Returns:
    The first :class:`SkipIfNonfiniteState` found (its ``consecutive`` and
    ``total`` count skipped steps), or ``None``.
  """
  return _find(opt_state)


def _flagged(flags: Any, prefix: str = '') -> list[str]:
  paths, values, _ = _tree.leaves_with_paths(flags)
  values = jax.device_get(values)
  return [prefix + p for p, f in zip(paths, values) if bool(np.asarray(f))]


def nonfinite_leaves(opt_state: Any, result: bool = False) -> list[str]:
  """Paths (``'a/b/kernel'``) of the leaves whose gradient was not finite
  at the last step; ``[]`` when it was applied or there is no guard.

  With ``result=True``: where the gradient was finite but the step's result
  was not, the update leaves (by their parameter's path) and then the new
  state's leaves, as ``'state:'`` plus their path inside the guarded
  transformation's state (``'state:0/nu/w'``: optax.adam's second moment of
  ``w``; ``'state:#i'``, the i-th leaf, where ``opt_state`` holds the guard's
  flags without its inner state).

  Args:
    opt_state: the optimizer state after the step (its guard found by
      :func:`nonfinite_status`).
    result: ``False`` (default): the leaves of a non-finite gradient;
      ``True``: those of a non-finite result from a finite gradient.

  Returns:
    A list of path strings, in the trees' flatten order.
  """
  _validate.flag('nonfinite_leaves', 'result', result)
  status = nonfinite_status(opt_state)
  if status is None:
    return []
  if not result:
    return _flagged(status.nonfinite)
  flags = np.asarray(jax.device_get(status.nonfinite_state))
  if status.inner_state is None:
    paths = [f'#{i}' for i in range(len(flags))]
  else:
    paths = _tree.leaves_with_paths(status.inner_state)[0]
  return (_flagged(status.nonfinite_updates)
          + [f'state:{p}' for p, f in zip(paths, flags) if bool(f)])


GRADIENT_CAUSE = 'non-finite gradient (NaN or Inf)'
RESULT_CAUSE = ('non-finite update or optimizer state (NaN or Inf) from a '
                'finite gradient')


def skip_cause(opt_state: Any) -> tuple[str, list[str]] | None:
  """Why the last step was skipped, ``(what, leaves)``: ``what`` is
  :data:`GRADIENT_CAUSE` or :data:`RESULT_CAUSE` (a finite gradient whose
  update or new state was not), ``leaves`` as :func:`nonfinite_leaves`
  gives them; ``None`` when the step was applied or there is no guard.

  Args:
    opt_state: the optimizer state after the step (its guard found by
      :func:`nonfinite_status`).

  Returns:
    ``(what, leaves)`` or ``None``.
  """
  names = nonfinite_leaves(opt_state)
  if names:
    return GRADIENT_CAUSE, names
  names = nonfinite_leaves(opt_state, result=True)
  if names:
    return RESULT_CAUSE, names
  return None


def raise_if_nonfinite(opt_state: Any, step: int | None = None) -> None:
  """Raises :class:`NonFiniteGradientError` naming the leaves when the last
  step was skipped for a non-finite gradient, or its subclass
  :class:`NonFiniteUpdateError` when the gradient was finite but the update
  or the new state was not (host side: it reads the flags back from the
  devices).

  Args:
    opt_state: the optimizer state after the step (its guard found by
      :func:`nonfinite_status`).
    step: the step's number, quoted in the message (default: none).

  Raises:
    NonFiniteGradientError: the last step was skipped for its gradient.
    NonFiniteUpdateError: it was skipped for its update or new state.
    ValueError: ``opt_state`` holds no :func:`skip_if_nonfinite` guard
      (a recipe built with ``check_finite=False``, a plain optax state):
      there is nothing to read, and a non-finite step went through.
  """
  if nonfinite_status(opt_state) is None:
    raise ValueError(
        'raise_if_nonfinite: opt_state holds no finite-check guard, so a '
        'non-finite step is neither skipped nor seen: build the recipe with '
        'check_finite=True (the default) or wrap the optimizer in '
        f'orthax.skip_if_nonfinite(...); got a {type(opt_state).__name__}.')
  cause = skip_cause(opt_state)
  if cause is None:
    return
  what, names = cause
  at = '' if step is None else f' at step {step}'
  more = len(names) - 1
  if what == GRADIENT_CAUSE:
    error, fix = NonFiniteGradientError, 'fix the loss'
  else:
    error, fix = NonFiniteUpdateError, (
        'lower the learning rate or clip the gradients (entries near the '
        'float32 limit, 3.4e38, overflow the optimizer\'s arithmetic)')
  raise error(
      f'{what}{at} in leaf {names[0]!r}'
      + (f' and {more} more: {names[1:]}' if more else '')
      + '. The step was skipped (parameters and optimizer state unchanged); '
      f"{fix}, or skip such steps with the trainer's "
      "train.nonfinite='skip'.")
