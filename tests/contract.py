"""The optax optimizer contract, as reusable checks.

Every check takes ``make``, a factory ``learning_rate -> GradientTransformation``
(a number, a schedule or a traced array, as ``optax.inject_hyperparams``
passes), and raises ``AssertionError`` when the optimizer breaks the contract:

* :func:`check_jit_matches_eager`  jitted update == eager update;
* :func:`check_no_retrace`         a jitted step traces once over 3 steps;
* :func:`check_dtypes`             updates keep the params' dtype, state leaves
                                   keep theirs (f32 and bf16);
* :func:`check_inject_hyperparams` ``optax.inject_hyperparams`` parity, a live
                                   learning-rate change, named state entries;
* :func:`check_inject_every_hyperparam`  every numeric default of the recipe
                                   factory can be injected;
* :func:`check_multisteps`         ``optax.MultiSteps`` accumulates the mean;
* :func:`check_schedules`          constant schedule == number, warmup from 0;

and ``tests/convergence.py`` checks that the recipes train.

:func:`recipe_cases` lists one case per registered recipe (and one per
reference mode of a recipe that has them), read from
``orthax.recipe_names()`` at collection time, so a newly registered recipe is
covered without touching the tests.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import orthax
from trees import assert_all_nonzero
from trees import assert_all_zero
from trees import assert_finite
from trees import assert_trees_close
from trees import grads_for
from trees import leaves_with_paths
from trees import mixed_params
from trees import random_like

Make = Callable[[Any], optax.GradientTransformation]

LR = 0.01

# State entries every recipe must expose by name (``optax.tree.get``).
REQUIRED_STATE_NAMES: dict[str, tuple[str, ...]] = {
    'spectra': ('base', 'spectral_clip'),  # a wrapper: no momentum stage
    'root': ('momentum', 'orthogonalize'),
    'auon': ('momentum', 'cosh_normalize'),
    'hybrid_auon': ('momentum', 'orthogonalize', 'cosh_normalize'),
    'aro': ('momentum', 'aro_rotate'),  # the rotation runs instead of NS
    'dct_adamw': ('dct_adam',),  # no momentum: Adam on DCT coefficients
    'trion': ('trion',),  # its sum-form buffer is the 'trion' stage's state
    'fismo': ('fismo',),  # momentum in whitened space, inside the stage
}
DEFAULT_STATE_NAMES = ('momentum', 'orthogonalize')



# Cases ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
  """One recipe configuration under test."""
  name: str
  kwargs: tuple[tuple[str, Any], ...] = ()

  @property
  def id(self) -> str:
    if not self.kwargs:
      return self.name
    return self.name + '[' + ','.join(f'{k}={v}' for k, v in self.kwargs) + ']'

  def make(self, learning_rate: Any) -> optax.GradientTransformation:
    return orthax.recipe(self.name, learning_rate=learning_rate,
                         **dict(self.kwargs))


def recipe_cases() -> list[Case]:
  """One case per registered recipe and per reference mode."""
  cases = []
  for name in orthax.recipe_names():
    refs = orthax.recipe_references(name)
    if refs:
      cases.extend(Case(name, (('reference', r),)) for r in refs)
    else:
      cases.append(Case(name))
  return cases


def _state_avals(state):
  """(path, shape, dtype, weak_type) of every array leaf of ``state``."""
  out = []
  for path, x in leaves_with_paths(state):
    if hasattr(x, 'dtype'):
      weak = getattr(x, 'weak_type', False)
      out.append((path, tuple(x.shape), jnp.dtype(x.dtype), bool(weak)))
  return out


@dataclasses.dataclass
class Trajectory:
  """``STEPS`` steps of ``make(LR)`` on :func:`mixed_params` (updates applied).

  ``params[i]``/``grads[i]`` are the inputs of step ``i``; ``states[0]`` is
  ``tx.init(params[0])`` and ``states[i + 1]`` the state after step ``i``;
  ``final_params`` are the params after the last step.
  ``traces`` counts how often the step function was traced.
  """
  params: list
  grads: list
  updates: list
  states: list
  final_params: Any
  traces: int
  step: Callable[..., Any]  # (grads, state, params) -> (updates, state, params)


STEPS = 3
# Eager execution dispatches op by op (most of the contract's time): the
# eager clauses run 2 steps, which still carry a state from one step into
# the next.
EAGER_STEPS = 2


def trajectory(make: Make, dtype: Any = 'float32', jit: bool = True,
               steps: int = STEPS) -> Trajectory:
  """Runs (and caches, per factory) the reference trajectory of ``make``.

  The checks below share it, so one compilation serves the jit, retrace and
  dtype clauses. ``make`` must be hashable (a function or ``Case.make``).
  """
  return _trajectory(make, jnp.dtype(dtype).name, bool(jit), int(steps))


@functools.lru_cache(maxsize=64)
def _trajectory(make, dtype, jit, steps):
  params = mixed_params(jnp.dtype(dtype))
  tx = make(LR)
  traces = []

  def step(grads, state, params):
    traces.append(1)
    updates, state = tx.update(grads, state, params)
    return updates, state, optax.apply_updates(params, updates)

  fn = jax.jit(step) if jit else step
  state = tx.init(params)
  out = Trajectory(params=[], grads=[], updates=[], states=[state],
                   final_params=None, traces=0, step=fn)
  for g in grads_for(params, steps):
    out.params.append(params)
    out.grads.append(g)
    u, state, params = fn(g, state, params)
    out.updates.append(u)
    out.states.append(state)
  out.final_params = params
  out.traces = len(traces)
  return out


def run_steps(tx, params, grads, *, jit: bool = False):
  """Runs ``len(grads)`` steps from ``tx.init(params)``, applying updates;
  returns the updates of every step and the final state."""
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  ups = []
  for g in grads:
    u, state = update(g, state, params)
    ups.append(u)
    params = optax.apply_updates(params, u)
  return ups, state


# Checks -----------------------------------------------------------------------


def check_jit_matches_eager(make: Make, *, rtol: float = 1e-6,
                            atol: float = 1e-6):
  """The jitted update equals the eager update, step by step (the first
  :data:`EAGER_STEPS` steps)."""
  jitted = trajectory(make, jit=True)
  eager = trajectory(make, jit=False, steps=EAGER_STEPS)
  for i, (a, b) in enumerate(zip(jitted.updates, eager.updates)):
    assert_finite(b, f'eager updates, step {i}')
    assert_trees_close(a, b, rtol=rtol, atol=atol,
                       what=f'jit vs eager updates, step {i}')
  assert_trees_close(jitted.states[EAGER_STEPS], eager.states[-1], rtol=rtol,
                     atol=atol, what=f'jit vs eager state after step '
                     f'{EAGER_STEPS - 1}')


def check_no_retrace(make: Make):
  """A jitted train step (update + apply) is traced and compiled once."""
  run = trajectory(make, jit=True)
  avals0, avals = _state_avals(run.states[0]), _state_avals(run.states[-1])
  assert run.traces == 1, (
      f'the step was traced {run.traces} times in {STEPS} steps; the state '
      'returned by update differs from the initial one (shape, dtype or weak '
      f'type):\ninit:  {avals0}\nafter: {avals}')
  assert avals == avals0, f'state avals changed:\ninit:  {avals0}\nafter: {avals}'


def check_dtypes(make: Make, dtype):
  """Updates have the params' dtypes; state leaves keep theirs."""
  dtype = jnp.dtype(dtype)
  run = trajectory(make, dtype.name, jit=True)
  init_dtypes = [(p, jnp.dtype(x.dtype)) for p, x in leaves_with_paths(run.states[0])
                 if hasattr(x, 'dtype')]
  for i, (updates, params) in enumerate(zip(run.updates, run.params)):
    for (path, u), (_, p) in zip(leaves_with_paths(updates), leaves_with_paths(params)):
      assert p.dtype == dtype, f'step {i}: params {path} became {p.dtype}'
      assert u.dtype == p.dtype, (
          f'step {i}: update {path} has dtype {u.dtype}, params {p.dtype}')
      assert u.shape == p.shape, f'step {i}: update {path} has shape {u.shape}'
    assert_finite(updates, f'{dtype} updates, step {i}')
    now = [(p, jnp.dtype(x.dtype)) for p, x in leaves_with_paths(run.states[i + 1])
           if hasattr(x, 'dtype')]
    assert now == init_dtypes, (
        f'step {i}: state dtypes changed:\n'
        + '\n'.join(f'  {a} -> {b}' for a, b in zip(init_dtypes, now)
                    if a != b))


def check_inject_hyperparams(make: Make, *, state_names=DEFAULT_STATE_NAMES):
  """``inject_hyperparams`` gives the same updates as the plain recipe, a
  changed ``hyperparams['learning_rate']`` takes effect, and state entries
  are reachable by name."""
  plain = trajectory(make, jit=True)
  injected = optax.inject_hyperparams(make)(learning_rate=LR)
  s_inj = injected.init(plain.params[0])
  inj_traces = []

  def inj_update(*args):
    inj_traces.append(1)
    return injected.update(*args)

  upd_inj = jax.jit(inj_update)
  for i, (g, p) in enumerate(zip(plain.grads, plain.params)):
    u_inj, s_inj = upd_inj(g, s_inj, p)
    assert_trees_close(u_inj, plain.updates[i], rtol=1e-6, atol=1e-7,
                       what=f'inject_hyperparams vs plain, step {i}')
  s_plain = plain.states[-1]
  assert_trees_close(s_inj.inner_state, s_plain, rtol=1e-6, atol=1e-7,
                     what='inject_hyperparams inner state vs plain state')

  # The learning rate is reachable by name and equals the injected value.
  lr = _get(s_inj, 'learning_rate', 'injected')
  assert lr is not None, "optax.tree.get(state, 'learning_rate') found nothing"
  np.testing.assert_allclose(np.asarray(lr), LR, rtol=1e-7)
  # Named stages of the chain are reachable (and unique) in both states.
  for name in state_names:
    for which, st in (('plain', s_plain), ('injected', s_inj)):
      assert _get(st, name, which) is not None, (
          f'optax.tree.get({which} state, {name!r}) found nothing')

  # A live change of the learning rate: from the same state, the next update
  # is twice the update at the old rate (both branches scale with it).
  p = plain.final_params
  g = random_like(p, 999)
  u_old, _ = upd_inj(g, s_inj, p)
  # (of the injected value's dtype: a weakly typed scalar would be a new
  # signature, and the step would compile again)
  s_inj.hyperparams['learning_rate'] = jnp.asarray(
      2 * LR, s_inj.hyperparams['learning_rate'].dtype)
  u_new, s_new = upd_inj(g, s_inj, p)
  # (counted by the traces: the jit cache's size can read 0 in a worker
  # that has cleared caches)
  assert len(inj_traces) == 1, (
      'changing the injected learning rate traced the step again')
  assert_all_nonzero(u_old, 'update before the learning-rate change')
  for (path, a), (_, b) in zip(leaves_with_paths(u_new), leaves_with_paths(u_old)):
    np.testing.assert_allclose(
        np.asarray(a), 2 * np.asarray(b), rtol=1e-5, atol=1e-7,
        err_msg=f'learning_rate 0.02 should double the update ({path})')
  np.testing.assert_allclose(np.asarray(s_new.hyperparams['learning_rate']),
                             2 * LR, rtol=1e-7)


def factory(name: str) -> Callable[..., optax.GradientTransformation]:
  """The registered factory of recipe ``name`` (its own signature, which
  ``optax.inject_hyperparams`` inspects)."""
  return orthax.recipe_factory(name)


def check_inject_every_hyperparam(make: Make, fn, kwargs=None):
  """``optax.inject_hyperparams(fn)`` injects every numeric default of the
  recipe factory ``fn`` (momentum, weight decay, Adam betas, ...) and still
  gives the plain recipe's update: no hyperparameter must be a Python-only
  number (used in ``range``, ``if`` ...) or a callable it would mistake for a
  schedule."""
  plain = trajectory(make, jit=True)
  tx = optax.inject_hyperparams(fn)(learning_rate=LR, **(kwargs or {}))
  state = tx.init(plain.params[0])
  injected = sorted(state.hyperparams)
  assert 'learning_rate' in injected, injected
  # Each injected value is the one state entry of its name: optax's
  # tree_get / tree_set(state, weight_decay=...) (how a decay is scheduled
  # by hand) must not reach a stage of the chain that shares the name.
  # (Hyperparameters that default to None are injected only when given.)
  given = {k: 0.1 for k in ('weight_decay', 'adam_weight_decay')
           if inspect.signature(fn).parameters.get(k) is not None}
  for st in (state, optax.inject_hyperparams(fn)(
      learning_rate=LR, **(kwargs or {}), **given).init(plain.params[0])):
    treedef = jax.tree.structure(st)
    for name in st.hyperparams:
      np.testing.assert_array_equal(
          np.asarray(_get(st, name, 'injected')),
          np.asarray(st.hyperparams[name]), err_msg=name)
      same = optax.tree.set(st, **{name: st.hyperparams[name]})
      assert jax.tree.structure(same) == treedef, (
          f'optax.tree.set(state, {name}=...) changed the state\'s structure')
  u, state = tx.update(plain.grads[0], state, plain.params[0])  # eager: cheap
  assert_trees_close(u, plain.updates[0], rtol=1e-6, atol=1e-6,
                     what=f'inject_hyperparams(recipe) injecting {injected}')


def _get(state, name, which):
  """``optax.tree.get`` with a short message when ``name`` is ambiguous."""
  try:
    return optax.tree.get(state, name)
  except KeyError:
    found = optax.tree.get_all_with_path(state, name)
    paths = [jax.tree_util.keystr(p) for p, _ in found]
    raise AssertionError(
        f'optax.tree.get({which} state, {name!r}) is ambiguous: '
        f'{len(found)} entries are named {name!r}: {paths}') from None


def check_multisteps(make: Make, *, rtol=1e-5, atol=1e-6):
  """``MultiSteps(tx, 2)``: zero update, then ``tx.update(mean of grads)``."""
  run = trajectory(make, jit=True)  # its compiled step gives the reference
  params, (g1, g2) = run.params[0], run.grads[:2]
  ms = optax.MultiSteps(make(LR), every_k_schedule=2)
  state = ms.init(params)
  update = jax.jit(ms.update)
  u1, state = update(g1, state, params)
  assert_all_zero(u1, 'MultiSteps first micro-step')
  u2, state = update(g2, state, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  ref, ref_state, _ = run.step(mean, run.states[0], params)
  assert_all_nonzero(u2, 'MultiSteps second micro-step')
  assert_trees_close(u2, ref, rtol=rtol, atol=atol,
                     what='MultiSteps(k=2) vs update on the mean gradient')
  assert_trees_close(state.inner_opt_state, ref_state, rtol=rtol, atol=atol,
                     what='MultiSteps inner state')


def check_schedules(make: Make):
  """A constant schedule equals the number; a warmup from 0 gives a zero
  first update in every branch and a nonzero second one."""
  eager = trajectory(make, jit=False, steps=EAGER_STEPS)
  params = eager.params[0]
  u_sched, _ = run_steps(make(optax.constant_schedule(LR)), params,
                         eager.grads)
  for i, (a, b) in enumerate(zip(u_sched, eager.updates)):
    assert_trees_close(a, b, rtol=1e-7, atol=0.0,
                       what=f'constant_schedule vs float, step {i}')

  warmup = optax.linear_schedule(0.0, LR, transition_steps=4)
  ups, _ = run_steps(make(warmup), params, eager.grads[:2])
  assert_all_zero(ups[0], 'warmup schedule, step 0')
  assert_all_nonzero(ups[1], 'warmup schedule, step 1')
