"""The optax optimizer contract, applied to every registered recipe.

The cases come from ``orthax.recipe_names()`` (see ``tests/contract.py``), so
a recipe registered later is covered without editing this file.
"""

import inspect

import jax
import jax.numpy as jnp
import optax
import pytest

import contract  # tests/contract.py (pytest puts tests/ on sys.path)
import convergence  # tests/convergence.py
import trees  # tests/trees.py
import orthax

CASES = contract.recipe_cases()
IDS = [c.id for c in CASES]
cases = pytest.mark.parametrize('case', CASES, ids=IDS)


def test_every_recipe_is_covered():
  assert orthax.recipe_names(), 'no recipe registered'
  assert {c.name for c in CASES} == set(orthax.recipe_names())
  assert len(set(IDS)) == len(IDS)
  # muon's reference modes are all exercised.
  assert {dict(c.kwargs).get('reference') for c in CASES
          if c.name == 'muon'} >= {'keller', 'moonlight', 'optax'}


@cases
def test_routes_both_branches(case):
  """The mixed tree exercises the matrix and the adam branch of every case."""
  tx = case.make(contract.LR)
  params = trees.mixed_params()
  state = tx.init(params)
  names = contract.REQUIRED_STATE_NAMES.get(case.name,
                                            contract.DEFAULT_STATE_NAMES)
  if case.name == 'spectra':
    pytest.skip('spectra wraps a base optimizer (no matrix/adam partition); '
                'tests/test_spectra.py checks which leaves it clips')
  if 'momentum' not in names:  # a momentum-free matrix branch (DCT-AdamW)
    mats = optax.tree.get(state, names[0])
    assert any(getattr(x, 'ndim', 0) >= 2 for x in jax.tree.leaves(mats)), (
        'no leaf reached the matrix branch')
    adam = optax.tree.get(state, 'adam')
    assert any(getattr(x, 'ndim', 0) >= 1 for x in jax.tree.leaves(adam)), (
        'no leaf reached adam')
    return
  mats = optax.tree.get(state, 'momentum')
  assert mats is not None
  routed = [x for x in jax.tree.leaves(mats.mu)
            if getattr(x, 'ndim', 0) >= 2]
  assert routed, 'no leaf reached the matrix branch'
  assert len(routed) < len(jax.tree.leaves(params)), 'no leaf reached adam'


@cases
def test_none_leaf_is_an_absent_parameter(case):
  """A ``None`` in the parameter tree (a layer without a bias; Equinox's
  ``filter``) is an empty subtree, as in optax: the updates keep it, and the
  other leaves step exactly as in the tree without it."""
  tx = case.make(contract.LR)
  params = trees.mixed_params()
  with_none = {**params, 'absent': None,
               'blocks': {**params['blocks'], '2': {'bias': None}}}
  grads = [trees.random_like(params, seed) for seed in (1, 2)]
  grads_none = [{**g, 'absent': None,
                 'blocks': {**g['blocks'], '2': {'bias': None}}}
                for g in grads]
  ups, _ = contract.run_steps(tx, params, grads, jit=True)
  ups_none, _ = contract.run_steps(tx, with_none, grads_none, jit=True)
  assert ups_none[-1]['absent'] is None
  assert ups_none[-1]['blocks']['2']['bias'] is None
  del ups_none[-1]['absent'], ups_none[-1]['blocks']['2']
  contract.assert_trees_close(ups_none[-1], ups[-1], rtol=0, atol=0,
                              what='updates with and without None leaves')


@cases
def test_update_without_params_says_so(case):
  """Every recipe reads the parameters (weight decay): without them the
  error says what to pass, the same for all (SPECTRA's used to be optax's
  generic message from its AdamW branch)."""
  tx = case.make(contract.LR)
  params = trees.mixed_params()
  state = tx.init(params)
  with pytest.raises(ValueError, match=r'orthax recipes need the current '
                     r'parameters at every step .*call tx.update\(grads, '
                     r'state, params\)'):
    tx.update(trees.random_like(params, 1), state)


@cases
def test_jit_matches_eager(case):
  contract.check_jit_matches_eager(case.make)


@cases
def test_no_recompilation(case):
  contract.check_no_retrace(case.make)


@cases
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16],
                         ids=['f32', 'bf16'])
def test_dtype_kept(case, dtype):
  contract.check_dtypes(case.make, dtype)


@cases
def test_dtype_kept_with_f32_accumulator(case):
  """bf16 params with ``mu_dtype=float32``: the accumulators are f32, the
  updates still bf16 (in both branches)."""
  if 'mu_dtype' not in inspect.signature(
      contract.factory(case.name)).parameters:
    pytest.skip(f'{case.name} has no mu_dtype argument')
  wide = contract.Case(case.name, case.kwargs + (('mu_dtype', jnp.float32),))
  run = contract.trajectory(wide.make, jnp.bfloat16)
  mu = optax.tree.get(run.states[-1], 'momentum').mu
  assert {x.dtype for x in jax.tree.leaves(mu)} == {jnp.dtype(jnp.float32)}
  contract.check_dtypes(wide.make, jnp.bfloat16)


@cases
def test_inject_hyperparams(case):
  names = contract.REQUIRED_STATE_NAMES.get(case.name,
                                            contract.DEFAULT_STATE_NAMES)
  contract.check_inject_hyperparams(case.make, state_names=names)


@cases
def test_inject_every_numeric_hyperparam(case):
  contract.check_inject_every_hyperparam(
      case.make, contract.factory(case.name), dict(case.kwargs))


@cases
def test_multisteps(case):
  contract.check_multisteps(case.make)


@cases
def test_schedules(case):
  contract.check_schedules(case.make)


@cases
def test_converges_on_quadratic(case):
  case, cfg = _conv(case, 'quadratic')
  convergence.check_quadratic(case.make, **cfg)


@cases
def test_converges_on_least_squares(case):
  case, cfg = _conv(case, 'least_squares')
  convergence.check_least_squares(case.make, **cfg)


def _conv(case, problem):
  """The case with the problem's extra keywords, and its schedule."""
  cfg = convergence.convergence_config(case.name,
                                      dict(case.kwargs).get('reference'))
  case = contract.Case(case.name, case.kwargs + cfg[f'{problem}_kwargs'])
  return case, dict(peak_lr=cfg['peak_lr'], steps=cfg['steps'])


# The harness itself: each check rejects an optimizer that breaks its clause.


def _stateful(update, init=None):
  init = init or (lambda p: {'count': jnp.zeros([], jnp.int32)})
  return optax.GradientTransformation(init, update)


def _sgd(learning_rate):
  return optax.sgd(learning_rate)


def _traced_differs(learning_rate):
  def update(u, s, p=None):
    k = 1.1 if isinstance(jax.tree.leaves(u)[0], jax.core.Tracer) else 1.0
    return jax.tree.map(lambda x: -learning_rate * k * x, u), s
  return _stateful(update)


def _retraces(learning_rate):
  def update(u, s, p=None):
    return (jax.tree.map(lambda x: -learning_rate * x, u),
            {'count': s['count'] + 1.0})  # int32 -> float32: a new signature
  return _stateful(update)


def _upcasts(learning_rate):
  return optax.chain(optax.sgd(learning_rate),
                     optax.stateless(lambda u, p=None: jax.tree.map(
                         lambda x: x.astype(jnp.float32), u)))


def _ignores_lr(learning_rate):
  del learning_rate
  return optax.sgd(0.01)


_CALLS = []


def _impure(learning_rate):
  def update(u, s, p=None):  # depends on how often any instance was traced
    _CALLS.append(1)
    return jax.tree.map(lambda x: -learning_rate * len(_CALLS) * x, u), s
  return _stateful(update)


def _off_by_one_schedule(learning_rate):
  sched = (learning_rate if callable(learning_rate)
           else optax.constant_schedule(learning_rate))
  return optax.chain(optax.scale_by_schedule(lambda c: -sched(c + 1)))


def _frozen(learning_rate):
  del learning_rate
  return optax.set_to_zero()


@pytest.mark.parametrize('check,bad', [
    (contract.check_jit_matches_eager, _traced_differs),
    (contract.check_no_retrace, _retraces),
    (lambda m: contract.check_dtypes(m, jnp.bfloat16), _upcasts),
    (lambda m: contract.check_inject_hyperparams(m, state_names=()),
     _ignores_lr),
    (contract.check_multisteps, _impure),
    (contract.check_schedules, _off_by_one_schedule),
    (convergence.check_quadratic, _frozen),
    (convergence.check_least_squares, _frozen),
], ids=['jit', 'retrace', 'dtype', 'inject', 'multisteps', 'schedules',
        'quadratic', 'least_squares'])
def test_harness_rejects_a_broken_optimizer(check, bad):
  with pytest.raises(AssertionError):
    check(bad)


@pytest.mark.parametrize('check', [
    contract.check_jit_matches_eager, contract.check_no_retrace,
    lambda m: contract.check_dtypes(m, jnp.bfloat16),
    contract.check_multisteps, contract.check_schedules,
    convergence.check_least_squares,
], ids=['jit', 'retrace', 'dtype', 'multisteps', 'schedules', 'least_squares'])
def test_harness_accepts_sgd(check):
  check(_sgd)
