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
  assert orthax.skip_cause(s) is None
  # Asked to raise on a state with nothing to read: not a silent pass.
  with pytest.raises(ValueError, match=r'^raise_if_nonfinite: opt_state '
                     r'holds no finite-check guard'):
    orthax.raise_if_nonfinite(s, step=1)


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


def test_a_finite_gradient_that_overflows_adam_is_skipped_not_frozen():
  """optax.adam squares each entry: a gradient of 1e30 makes ``v`` Inf, and
  that entry's update is 0 for the rest of the run (Inf never decays). The
  guard checks the step's result too: the step is skipped, the state kept,
  and the state leaf named; the next ordinary step is the one taken
  without it."""
  params = {'w': jnp.ones(2)}
  huge, ok = {'w': jnp.array([1.0, 1e30])}, {'w': jnp.array([0.5, -0.5])}
  plain = optax.adam(0.1)
  s = plain.update(huge, plain.init(params))[1]
  for _ in range(5):
    u, s = plain.update(ok, s)
  assert float(u['w'][1]) == 0.0  # frozen for good without the guard

  tx = orthax.skip_if_nonfinite(optax.adam(0.1))
  s0 = tx.update(ok, tx.init(params))[1]
  u, s1 = jax.jit(tx.update)(huge, s0)
  assert not np.any(np.asarray(u['w']))
  _equal(s1.inner_state, s0.inner_state)
  assert orthax.nonfinite_leaves(s1) == []  # the gradient was finite
  assert orthax.nonfinite_leaves(s1, result=True) == ['state:0/nu/w']
  assert orthax.skip_cause(s1) == (
      orthax.transforms.check_finite.RESULT_CAUSE, ['state:0/nu/w'])
  assert int(s1.consecutive) == 1 and int(s1.total) == 1
  with pytest.raises(orthax.NonFiniteUpdateError,
                     match=r"from a finite gradient at step 2 in leaf "
                     r"'state:0/nu/w'.*lower the learning rate or clip"):
    orthax.raise_if_nonfinite(s1, step=2)
  assert issubclass(orthax.NonFiniteUpdateError,
                    orthax.NonFiniteGradientError)
  u_after, s2 = tx.update(ok, s1)
  _equal(u_after, tx.update(ok, s0)[0])
  assert orthax.skip_cause(s2) is None and int(s2.consecutive) == 0


def test_a_nonfinite_update_is_named_by_its_parameter():
  """A finite state but a non-finite update (a scale that overflows): the
  update's leaf is named by its parameter's path; a NaN gradient in the
  same step is reported as the gradient's, not the result's."""
  params = {'a': jnp.ones(2), 'b': jnp.ones(3)}
  tx = orthax.skip_if_nonfinite(optax.scale(1e30))
  s = tx.init(params)
  g = {'a': jnp.ones(2), 'b': jnp.array([1.0, 1e10, 1.0])}
  u, s = tx.update(g, s)
  assert orthax.nonfinite_leaves(s, result=True) == ['b']
  assert not np.any(np.asarray(u['b'])) and not np.any(np.asarray(u['a']))
  u, s = tx.update({'a': jnp.array([jnp.nan, 1.0]), 'b': g['b']}, s)
  assert orthax.skip_cause(s) == (
      orthax.transforms.check_finite.GRADIENT_CAUSE, ['a'])
  assert orthax.nonfinite_leaves(s, result=True) == []
  assert int(s.consecutive) == 2 and int(s.total) == 2


def test_trainer_policy_names_an_overflow(caplog):
  """``train.nonfinite``'s watch, given a step skipped for its result:
  'raise' raises NonFiniteUpdateError, 'skip' logs the cause."""
  from orthax.train import faults  # pylint: disable=g-import-not-at-top
  tx = orthax.skip_if_nonfinite(optax.adam(0.1))
  _, s = tx.update({'w': jnp.array([1e30])}, tx.init({'w': jnp.ones(1)}))
  # The step's metrics hold the guard's flags without its inner state.
  metrics = {'skipped': jnp.int32(1), 'nonfinite': s._replace(inner_state=None)}
  with pytest.raises(orthax.NonFiniteUpdateError,
                     match=r"at step 7 in leaf 'state:#2'"):  # count, mu, nu
    faults.SkipWatch('raise').after(7, metrics, now=True)
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), s)
  with caplog.at_level('WARNING', logger='orthax.train'):
    faults.SkipWatch('skip', opt_state_like=like).after(7, metrics, now=True)
  assert ("step 7 skipped: non-finite update or optimizer state (NaN or Inf) "
          "from a finite gradient in ['state:0/nu/w']") in caplog.text


def test_an_inf_kept_from_init_is_not_a_fault():
  """optax.contrib.reduce_on_plateau starts its best value at Inf: a state
  entry that was not finite before is not flagged, so the guard still
  applies every step (and flags an entry that turns Inf)."""
  params = {'w': jnp.ones(3)}
  tx = orthax.skip_if_nonfinite(optax.chain(
      optax.adam(0.1), optax.contrib.reduce_on_plateau()))
  s = tx.init(params)
  assert not np.all(np.isfinite(
      [np.asarray(x) for x in jax.tree.leaves(s.inner_state[1])
       if jnp.issubdtype(x.dtype, jnp.floating)]))
  for _ in range(3):
    u, s = tx.update({'w': jnp.ones(3)}, s, params, value=jnp.float32(1.0))
    assert np.all(np.asarray(u['w']) != 0) and int(s.total) == 0
  _, s = tx.update({'w': jnp.array([1.0, 1e30, 1.0])}, s, params,
                   value=jnp.float32(1.0))
  assert orthax.nonfinite_leaves(s, result=True) == ['state:0/0/nu/w']


def test_the_result_flags_leave_tree_get_and_tree_set_alone():
  """The state's flags are one bool vector, not a copy of the inner
  state's tree:
  ``optax.tree.get`` finds one ``count`` and ``tree_set`` of an injected
  hyperparameter sets only the hyperparameter."""
  params = {'w': jnp.ones((4, 8)), 'b': jnp.ones(8)}
  tx = optax.inject_hyperparams(orthax.muon)(learning_rate=0.02)
  s = tx.init(params)
  assert len(optax.tree.get_all_with_path(s, 'learning_rate')) == 1
  s = optax.tree_utils.tree_set(s, learning_rate=0.5)
  assert float(optax.tree.get(s, 'learning_rate')) == 0.5
  _, s = tx.update(jax.tree.map(jnp.ones_like, params), s, params)
  assert float(optax.tree.get(s, 'learning_rate')) == 0.5


def test_check_result_false_checks_the_gradient_only():
  """The opt-out of the result check (its cost: docs/failures.md): an
  overflowing second moment is kept, as before, and a NaN gradient is
  still skipped."""
  params = {'w': jnp.ones(2)}
  tx = orthax.skip_if_nonfinite(optax.adam(0.1), check_result=False)
  _, s = tx.update({'w': jnp.array([1.0, 1e30])}, tx.init(params))
  assert int(s.total) == 0 and orthax.skip_cause(s) is None
  assert not np.isfinite(np.asarray(s.inner_state[0].nu['w'])[1])
  _, s = tx.update({'w': jnp.array([1.0, jnp.nan])}, s)
  assert orthax.skip_cause(s) == (
      orthax.transforms.check_finite.GRADIENT_CAUSE, ['w'])
  with pytest.raises(TypeError, match='check_result must be True or False'):
    orthax.skip_if_nonfinite(optax.adam(0.1), check_result='no')


def test_the_guards_program_grows_linearly_with_the_leaves():
  """Each all-leaf flag is computed once (behind a lax.cond): as a plain
  value XLA copied its reduction into each of the N per-leaf selects, so
  the compiled program (and XLA's compile time) grew as N²: 48M characters
  of HLO and 53 s of compile at 200 leaves, 557 s for a 400-leaf Muon."""
  def hlo_size(n):
    params = {f'w{i:03d}': jax.ShapeDtypeStruct((8, 8), jnp.float32)
              for i in range(n)}
    tx = orthax.skip_if_nonfinite(optax.sgd(0.1))
    state = jax.eval_shape(tx.init, params)
    return len(jax.jit(tx.update).lower(params, state, params).compile()
               .as_text())
  small, large = hlo_size(20), hlo_size(80)
  assert large / small < 6, (small, large)  # 4 when linear, 16 if N²


@pytest.mark.parametrize('case', CASES, ids=str)
@pytest.mark.parametrize('frozen', ['blocks/0/mlp/kernel', 'embed/embedding'])
def test_a_nan_in_a_frozen_leaf_skips_nothing(case, frozen):
  """A frozen leaf's gradient is never used: a NaN there (a frozen table's
  unused row, say) must not skip the step; every recipe steps as if that
  gradient were clean, and no leaf is flagged."""
  router = orthax.Router(extra_rules=[orthax.Rule(frozen, 'frozen')])
  params = trees.mixed_params()
  grads = trees.grads_for(params, steps=2)
  tx = orthax.recipe(case.name, learning_rate=contract.LR, router=router,
                     **dict(case.kwargs))
  update = jax.jit(tx.update)
  s1 = update(grads[0], tx.init(params), params)[1]
  u_clean, s_clean = update(grads[1], s1, params)
  u_nan, s_nan = update(_poison(grads[1], frozen), s1, params)
  assert orthax.nonfinite_leaves(s_nan) == []
  assert int(orthax.nonfinite_status(s_nan).total) == 0
  flat_clean = jax.tree_util.tree_leaves_with_path(u_clean)
  for (path, a), b in zip(flat_clean, jax.tree.leaves(u_nan)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6,
                               atol=1e-7, err_msg=str(path))
  assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(u_nan))
  for x in jax.tree.leaves(s_nan):
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
      assert np.all(np.isfinite(np.asarray(x)))
