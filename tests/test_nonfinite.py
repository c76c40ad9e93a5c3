"""Non-finite gradients on one device: the step is skipped on device, the
state says which leaves, the host raises or counts.

The same on a mesh of 8 fake devices is in ``tests/test_nonfinite_mesh.py``.
"""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import contract
import trees
import orthax

CASES = contract.recipe_cases()


def _poison(tree, path, value=jnp.nan):
  """``tree`` with element 0 of the leaf at ``path`` set to ``value``."""
  def put(p, x):
    name = '/'.join(str(getattr(k, 'key', k)) for k in p)
    return x.reshape(-1).at[0].set(value).reshape(x.shape) if name == path else x
  return jax.tree_util.tree_map_with_path(put, tree)


def _equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('case', CASES, ids=str)
@pytest.mark.parametrize('leaf', ['blocks/0/mlp/kernel', 'embed/embedding'])
def test_a_nonfinite_step_is_a_no_op(case, leaf):
  """Every recipe: zero update, state as before, the leaf named; the next
  finite step equals the one taken without the bad step in between."""
  params = trees.mixed_params()
  grads = trees.grads_for(params, steps=2)
  tx = case.make(contract.LR)
  update = jax.jit(tx.update)
  s0 = tx.init(params)
  _, s1 = update(grads[0], s0, params)
  bad = _poison(grads[1], leaf, jnp.inf if 'embed' in leaf else jnp.nan)
  u_bad, s_bad = update(bad, s1, params)
  for x in jax.tree.leaves(u_bad):
    assert not np.any(np.asarray(x)), 'a skipped step must update nothing'
  assert orthax.nonfinite_leaves(s_bad) == [leaf]
  status = orthax.nonfinite_status(s_bad)
  assert int(status.consecutive) == 1 and int(status.total) == 1
  _equal(status.inner_state, orthax.nonfinite_status(s1).inner_state)
  with pytest.raises(orthax.NonFiniteGradientError, match=f"'{leaf}'"):
    orthax.raise_if_nonfinite(s_bad, step=2)

  u_after, s_after = update(grads[1], s_bad, params)
  u_ref, s_ref = update(grads[1], s1, params)
  _equal(u_after, u_ref)
  _equal(orthax.nonfinite_status(s_after).inner_state,
         orthax.nonfinite_status(s_ref).inner_state)
  assert orthax.nonfinite_leaves(s_after) == []
  assert int(orthax.nonfinite_status(s_after).consecutive) == 0
  assert int(orthax.nonfinite_status(s_after).total) == 1
  orthax.raise_if_nonfinite(s_after)  # nothing to report


def test_eager_equals_jit_and_counts_consecutive_steps():
  params = {'w': jnp.ones((4, 8)), 'b': jnp.ones(8)}
  tx = orthax.muon(0.1)
  bad = {'w': jnp.full((4, 8), jnp.nan), 'b': jnp.full(8, -jnp.inf)}
  s = tx.init(params)
  for i in range(3):
    u, s = tx.update(bad, s, params)
    uj, _ = jax.jit(tx.update)(bad, s, params)
    _equal(u, uj)
    assert int(orthax.nonfinite_status(s).consecutive) == i + 1
  assert sorted(orthax.nonfinite_leaves(s)) == ['b', 'w']
  with pytest.raises(orthax.NonFiniteGradientError, match="'b' and 1 more"):
    orthax.raise_if_nonfinite(s)


def test_guard_wraps_any_optax_transform_and_inject_hyperparams():
  params = {'w': jnp.ones(3)}
  tx = optax.inject_hyperparams(orthax.muon)(learning_rate=0.1)
  s = tx.init({'k': jnp.ones((4, 8))})
  _, s = jax.jit(tx.update)({'k': jnp.full((4, 8), jnp.nan)}, s,
                            {'k': jnp.ones((4, 8))})
  assert orthax.nonfinite_leaves(s) == ['k']  # found inside inject's state

  guarded = orthax.skip_if_nonfinite(optax.adam(0.1))
  s = guarded.init(params)
  u, s = guarded.update({'w': jnp.array([1.0, jnp.nan, 2.0])}, s)
  assert not np.any(np.asarray(u['w']))
  assert int(optax.tree.get(s, 'total')) == 1
  assert orthax.nonfinite_status(optax.adam(0.1).init(params)) is None
  assert orthax.nonfinite_leaves(optax.adam(0.1).init(params)) == []


def test_inject_hyperparams_schedules_stay_in_step_when_guarded_outside():
  """The recipe's guard sits inside optax.inject_hyperparams, whose own
  count (what a schedule given as a hyperparameter reads) a skipped step
  still advances; guarding the injected recipe from outside keeps it, as
  docs/failures.md says."""
  p = {'k': jnp.ones((4, 8))}
  good = {'k': jnp.cos(jnp.arange(32.0)).reshape(4, 8)}
  bad = {'k': jnp.full((4, 8), jnp.nan)}
  sched = optax.linear_schedule(0.1, 0.0, 4)
  inside = optax.inject_hyperparams(orthax.muon)(learning_rate=sched)
  outside = orthax.skip_if_nonfinite(optax.inject_hyperparams(orthax.muon)(
      learning_rate=sched, check_finite=False))
  clean = optax.inject_hyperparams(orthax.muon)(learning_rate=sched)
  finals = {}
  for name, tx, grads in (('inside', inside, (good, bad, good)),
                          ('outside', outside, (good, bad, good)),
                          ('clean', clean, (good, good))):
    s = tx.init(p)
    for g in grads:
      u, s = tx.update(g, s, p)
    finals[name] = np.asarray(u['k'])
  np.testing.assert_allclose(finals['outside'], finals['clean'], rtol=1e-6)
  assert not np.allclose(finals['inside'], finals['clean'])  # a step ahead


def test_guard_does_not_recompile_and_keeps_state_structure():
  params = {'w': jnp.ones((4, 8))}
  tx = orthax.normuon(0.02)
  traces = []

  def step(g, s):
    traces.append(1)
    return tx.update(g, s, params)

  step = jax.jit(step)
  s = tx.init(params)
  nan = jnp.full((4, 8), jnp.nan, jnp.float32)  # not weak-typed
  for g in (jnp.ones((4, 8)), nan, jnp.ones((4, 8))):
    _, s2 = step({'w': g}, s)
    assert jax.tree.structure(s2) == jax.tree.structure(s)
    s = s2
  assert len(traces) == 1


def test_disabled_check_lets_nan_through():
  params = {'k': jnp.ones((4, 8))}
  tx = orthax.muon(0.1, check_finite=False)
  u, s = tx.update({'k': jnp.full((4, 8), jnp.nan)}, tx.init(params), params)
  assert np.all(np.isnan(np.asarray(u['k'])))  # documented: NaN propagates
  assert orthax.nonfinite_status(s) is None


def test_docstring_example_runs():
  from orthax.transforms import check_finite as module  # pylint: disable=g-import-not-at-top
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= 5 and result.failed == 0, result


def test_multisteps_drops_a_nan_micro_batch_with_skip_not_finite():
  """The recipe sees MultiSteps' sum, which one NaN micro-batch makes NaN
  for good (every later window skipped); ``optax.skip_not_finite`` keeps
  it out of the sum (docs/failures.md)."""
  params = {'w': jnp.ones((8, 16)) + jnp.arange(16.)}
  ones, nan = {'w': jnp.ones((8, 16))}, {'w': jnp.full((8, 16), jnp.nan)}
  windows = []
  for skip in (None, optax.skip_not_finite):
    tx = optax.MultiSteps(orthax.muon(), every_k_schedule=2,
                          should_skip_update_fn=skip)
    state = tx.init(params)
    steps = []
    for g in [nan, ones, ones, ones, ones]:
      u, state = tx.update(g, state, params)
      steps.append(float(jnp.abs(u['w']).max()))
    windows.append(steps)
  assert all(np.isfinite(windows[0])) and max(windows[0]) == 0, windows[0]
  assert windows[1][2] > 0 and windows[1][4] > 0, windows[1]
