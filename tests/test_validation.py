"""Hyperparameters are checked when a recipe or transform is built.

Every registered recipe (``orthax.recipe_names()``, read at collection) and
every public transform is covered: each numeric argument (found from the
signature) must belong to a category below, and a bad value of its category
must raise at construction, naming what the user called and the argument.
Construction only, except two ``inject_hyperparams`` runs.
"""

from __future__ import annotations

import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
from orthax import transforms as T

# What each numeric argument must be (the test's own table, independent of
# orthax._validate's): category -> [(bad value, expected error)].
BAD = {
    'lr': [(-0.1, ValueError), ('0.1', TypeError), (float('nan'), ValueError),
           (jnp.float32(-1e-3), ValueError), (jnp.bfloat16(-1), ValueError)],
    'nonneg': [(-0.1, ValueError), ('1', TypeError),
               (float('inf'), ValueError)],
    'pos': [(0.0, ValueError), (-1e-8, ValueError), ('1e-8', TypeError)],
    'rate': [(1.0, ValueError), (-0.1, ValueError), (1.5, ValueError),
             (np.float32(1.0), ValueError), ('0.9', TypeError)],
    'fraction': [(-0.1, ValueError), (1.5, ValueError), ('0.5', TypeError)],
    'count': [(0, ValueError), (-3, ValueError), (2.5, TypeError),
              ('5', TypeError), (True, TypeError)],
    'count0': [(-1, ValueError), (2.5, TypeError), ('5', TypeError)],
}

CATEGORY = {
    'learning_rate': 'lr', 'adam_learning_rate': 'lr',
    'signum_learning_rate': 'lr',
    'base_learning_rate': 'nonneg', 'weight_decay': 'nonneg',
    'adam_weight_decay': 'nonneg',
    'beta': 'rate', 'beta2': 'rate', 'b1': 'rate', 'b2': 'rate',
    'adam_b1': 'rate', 'adam_b2': 'rate', 'mu2': 'rate', 'signum_beta': 'rate',
    'eps': 'pos', 'adam_eps': 'pos', 'ns_eps': 'pos', 'norm_eps': 'pos',
    'quantile_eps': 'nonneg', 'c': 'pos', 'norm_scale': 'pos',
    'ns_steps': 'count', 'steps': 'count', 'restart_every': 'count0',
    'warmup_steps': 'count0', 'total_steps': 'count0',
    'quantile': 'fraction', 'clip_decay_fraction': 'fraction',
    'decay_fraction': 'fraction',
    'clamp_c': 'nonneg', 'gamma': 'nonneg', 'alpha': 'nonneg',
    'noise_power': 'nonneg',
    'scale_rms': 'nonneg', 'rms': 'nonneg', 'scale_coeff': 'nonneg',
    'clip_final_scale': 'nonneg', 'final_scale': 'nonneg',
    # DCT-AdamW / Trion: rank is an int >= 1 or a fraction in (0, 1].
    'rank': 'pos', 'ell_norm': 'pos', 'update_every': 'count',
    'max_shape': 'count', 'min_side': 'count',
    # FISMO: the damping μ and the eigenvalue floor guard inverse roots.
    'damping': 'pos', 'eig_floor': 'pos', 'precondition_every': 'count',
}
# An eps that divides nothing may be 0: ROOT's clip bound, AuON's r ≥ 1.
OVERRIDE = {('clip_outliers', 'eps'): 'nonneg',
            ('cosh_normalize', 'eps'): 'nonneg',
            ('fismo', 'gamma'): 'rate', ('scale_by_fismo', 'gamma'): 'rate'}
# Arguments that fix the state's shapes or the program: Python numbers.
STATIC = {'rank', 'ell_norm', 'update_every', 'precondition_every',
          'max_shape', 'min_side'}
# Numeric-looking arguments that are tables, not hyperparameters.
EXEMPT = {'coeffs', 'coeffs_for_shape'}

# Public transforms: name -> (factory, the required arguments).
_mom = lambda: T.momentum(0.9)
TRANSFORMS = {
    'adamw': (T.adamw, lambda: dict(learning_rate=0.1)),
    'scale_by_adam_raw_eps': (T.scale_by_adam_raw_eps, dict),
    'momentum': (T.momentum, dict),
    'decoupled_weight_decay': (T.decoupled_weight_decay,
                               lambda: dict(weight_decay=0.1)),
    'orthogonalize': (T.orthogonalize, dict),
    'scale_by_shape': (T.scale_by_shape, dict),
    'neuron_normalize': (T.neuron_normalize, dict),
    'scale_to_rms': (T.scale_to_rms, dict),
    'clip_outliers': (T.clip_outliers, dict),
    'cosh_normalize': (T.cosh_normalize, dict),
    'spectral_clip': (T.spectral_clip, dict),
    'spectral_preclip': (T.spectral_preclip, dict),
    'scale_by_dct_adam': (T.scale_by_dct_adam, dict),
    'scale_by_trion': (T.scale_by_trion, dict),
    'scale_by_fismo': (T.scale_by_fismo, dict),
    'aro_rotate': (T.aro_rotate, dict),
    'scale_by_aro': (T.scale_by_aro, dict),
    'noise_adapt': (T.noise_adapt, lambda: dict(
        momentum=_mom(), orthogonalize=T.orthogonalize(), learning_rate=0.1)),
    'layerwise_noise_adapt': (T.layerwise_noise_adapt, lambda: dict(
        momentum=_mom(), direction=T.orthogonalize(), learning_rate=0.1)),
    'skip_if_nonfinite': (T.skip_if_nonfinite, lambda: dict(
        inner=T.momentum())),
}

_NUMERIC = re.compile(r'\b(int|float|Array|ScalarOrSchedule)\b')


def numeric_params(fn) -> dict[str, inspect.Parameter]:
  """The arguments of ``fn`` that take numbers (by default or annotation)."""
  out = {}
  for k, p in inspect.signature(fn).parameters.items():
    d = p.default
    if isinstance(d, bool) or k in EXEMPT:
      continue
    if isinstance(d, (int, float)) or (
        (d is None or d is p.empty) and _NUMERIC.search(str(p.annotation))):
      out[k] = p
  return out


def _owners():
  for name in orthax.recipe_names():
    yield name, orthax.recipe_factory(name), dict
  for name, (fn, required) in TRANSFORMS.items():
    yield name, fn, required


OWNERS = list(_owners())
ARGS = [(owner, fn, required, arg, p) for owner, fn, required in OWNERS
        for arg, p in numeric_params(fn).items()]


def test_every_public_transform_is_listed():
  for name in T.__all__:
    fn = getattr(T, name)
    if (inspect.isfunction(fn) and numeric_params(fn) and 'GradientTransf'
        in str(inspect.signature(fn).return_annotation)):
      assert name in TRANSFORMS, f'add {name} to TRANSFORMS'


@pytest.mark.parametrize('owner,fn,required', OWNERS,
                         ids=[o[0] for o in OWNERS])
def test_every_numeric_argument_has_a_category(owner, fn, required):
  del required
  missing = [a for a in numeric_params(fn) if a not in CATEGORY]
  assert not missing, f'{owner}: give {missing} a category (or exempt them)'


@pytest.mark.parametrize('owner,fn,required', OWNERS,
                         ids=[o[0] for o in OWNERS])
def test_defaults_construct(owner, fn, required):
  del owner
  assert isinstance(fn(**required()), optax.GradientTransformation)


@pytest.mark.parametrize('owner,fn,required,arg,param', ARGS,
                         ids=[f'{a[0]}-{a[3]}' for a in ARGS])
def test_bad_value_raises_naming_owner_and_argument(owner, fn, required, arg,
                                                    param):
  category = OVERRIDE.get((owner, arg), CATEGORY.get(arg))
  bad = list(BAD[category])
  if param.default is not None:  # None is "the default" only where it is
    bad.append((None, TypeError))
  # An array of in-range values that is not a scalar would broadcast
  # against the updates (a (1, 1) rate turns a (4,) update into (1, 4)).
  # (Static arguments, which fix shapes or the program, take no arrays.)
  fine = 3 if category.startswith('count') else 0.5
  error = TypeError if arg in STATIC else ValueError
  bad += [(np.full((2,), fine), error), (np.full((1, 1), fine), error)]
  for value, error in bad:
    with pytest.raises(error) as info:
      fn(**{**required(), arg: value})
    msg = str(info.value)
    assert msg.startswith(f'{owner}: {arg} '), (value, msg)


@pytest.mark.parametrize('name', orthax.recipe_names())
def test_recipe_learning_rate_none_and_string(name):
  """``None`` is every recipe's default rate (its mode's: each reference
  mode its reference's; DCT-AdamW's also by its step scale); FISMO raised a
  TypeError for it before."""
  fn = orthax.recipe_factory(name)
  rates = orthax.recipes.recipe_routing(fn(learning_rate=None))
  assert rates.learning_rates['matrix'] == (
      orthax.recipes.recipe_entry(name).learning_rate)
  with pytest.raises(TypeError, match=f'^{name}: learning_rate .*got .0.02.'):
    fn(learning_rate='0.02')
  with pytest.raises(ValueError, match=f'^{name}: learning_rate must be '
                     '>= 0, got -0.1'):
    fn(learning_rate=-0.1)


@pytest.mark.parametrize('steps', [0, -3, 2.5])
def test_spectra_step_counts(steps):
  for call in (lambda: orthax.spectra(ns_steps=steps),
               lambda: orthax.spectral_clip(steps=steps),
               lambda: orthax.spectral_preclip(steps=steps)):
    with pytest.raises((ValueError, TypeError), match='steps must be an '
                       'integer'):
      call()


@pytest.mark.parametrize('name', orthax.recipe_names())
def test_schedules_concrete_and_traced_values_construct(name):
  fn = orthax.recipe_factory(name)
  fn(learning_rate=optax.linear_schedule(0.0, 0.01, 10))
  fn(learning_rate=jnp.float32(0.01))
  fn(learning_rate=jnp.bfloat16(0.01))
  fn(learning_rate=np.float64(0.01))
  # Traced values are not checked: even a negative one builds under jit.
  jax.make_jaxpr(lambda lr: (fn(learning_rate=lr), lr)[1])(-1.0)
  ints = {k: np.int64(3) for k in ('ns_steps',) if k in
          inspect.signature(fn).parameters}
  fn(**ints)


def test_traced_hyperparameters_of_a_transform_under_jit():
  params = {'w': jnp.ones((4, 6))}

  @jax.jit
  def run(beta, lr, wd):
    tx = optax.chain(orthax.momentum(beta), orthax.orthogonalize(),
                     optax.scale_by_learning_rate(lr),
                     orthax.decoupled_weight_decay(wd, learning_rate=lr))
    return tx.update(params, tx.init(params), params)[0]

  out = run(jnp.float32(0.9), jnp.float32(0.01), jnp.float32(0.1))
  assert np.isfinite(np.asarray(out['w'])).all()


@pytest.mark.parametrize('name,dtype', [
    *[(n, jnp.float32) for n in ('muon', 'normuon', 'fismo', 'aro',
                                 'spectra')],
    # (in 16 bits the others' eps underflow, which they say)
    ('muon', jnp.bfloat16), ('muon', jnp.float16)])
def test_injected_defaults_are_not_taken_as_given(name, dtype):
  """An injected hyperparameter at its default, rounded to the injected
  dtype (0.2 in float32 or bfloat16), is the default: with NumPy 1.x
  (float32 compared in float64) muon's ``scale_rms`` and NorMuon's,
  FISMO's, ARO's and SPECTRA's defaults raised "applies with ... only",
  and a first fix did so for bfloat16 (ml_dtypes' kind 'V')."""
  from orthax import _validate  # pylint: disable=g-import-not-at-top
  assert not _validate.differs(jnp.asarray(0.2, dtype), 0.2)
  assert _validate.differs(jnp.asarray(0.3, dtype), 0.2)
  assert not _validate.differs(np.float32(3), 3)
  tx = optax.inject_hyperparams(orthax.recipe_factory(name),
                                hyperparam_dtype=dtype)(learning_rate=0.02)
  tx.init({'w': jnp.ones((8, 12)), 'b': jnp.ones((12,))})


@pytest.mark.parametrize('name', ['muon', 'spectra'])
def test_inject_hyperparams_still_works(name):
  params = {'w': jnp.ones((8, 12)), 'b': jnp.ones((12,))}
  tx = optax.inject_hyperparams(orthax.recipe_factory(name))(
      learning_rate=0.02)
  state = tx.init(params)
  for _ in range(2):
    updates, state = jax.jit(tx.update)(params, state, params)
  assert all(np.isfinite(np.asarray(u)).all()
             for u in jax.tree.leaves(updates))
  # An injected value is checked when the factory sees it concretely.
  state.hyperparams['learning_rate'] = jnp.asarray(-1.0)
  with pytest.raises(ValueError, match=f'^{name}: learning_rate'):
    tx.update(params, state, params)


@pytest.mark.parametrize('owner,fn,required', [
    o for o in OWNERS if 'distributed' in inspect.signature(o[1]).parameters],
    ids=lambda o: o if isinstance(o, str) else '')
def test_distributed_must_be_a_distributed(owner, fn, required):
  """A mistyped ``distributed=`` was accepted by every recipe but AuON's and
  failed at ``init`` on a missing ``param_specs`` attribute."""
  for bad in ('x', {'fsdp': 8}):
    with pytest.raises(TypeError, match=f'^{owner}: distributed must be an '
                       'orthax.sharding.Distributed or None, got'):
      fn(**required(), distributed=bad)


@pytest.mark.parametrize('owner,fn', [
    (owner, fn) for owner, fn, _ in OWNERS
    if 'ns_dtype' in inspect.signature(fn).parameters])
def test_ns_dtype_must_be_a_float_dtype(owner, fn):
  for bad in (jnp.int32, 'nope', 3):
    with pytest.raises(TypeError, match=f'{owner}: ns_dtype must be a '
                       'floating-point dtype'):
      fn(**{'ns_dtype': bad})
  fn(ns_dtype=jnp.bfloat16)
  fn(ns_dtype='float32')


@pytest.mark.parametrize('owner,fn,required,arg', [
    (owner, fn, required, arg) for owner, fn, required in OWNERS
    for arg in ('mu_dtype', 'accumulator_dtype')
    if arg in inspect.signature(fn).parameters])
def test_accumulator_dtypes_must_be_float_dtypes(owner, fn, required, arg):
  """A misspelt dtype raised numpy's TypeError naming neither."""
  for bad in ('float7', jnp.int32):
    with pytest.raises(TypeError, match=f'{owner}: {arg} must be a '
                       'floating-point dtype'):
      fn(**required(), **{arg: bad})
  fn(**required(), **{arg: jnp.bfloat16})


@pytest.mark.parametrize('name', orthax.recipe_names())
def test_router_must_be_a_router_or_a_callable(name):
  """A string was a one-label prefix tree for eleven recipes and a
  'str is not callable' for LANTON and DCT-AdamW."""
  with pytest.raises(ValueError, match=f"^{name}: router must be an "
                     r"orthax.Router or a params -> labels callable .*got "
                     "'adam'"):
    orthax.recipe(name, router='adam')


def test_rule_pattern_must_be_a_regex():
  with pytest.raises(ValueError, match=r"^Rule: pattern '\(' is not a regular "
                     'expression: missing \\)'):
    orthax.Rule('(', 'adam')


def test_static_dct_arguments_under_inject_hyperparams_say_so():
  p = {'w': jnp.ones((8, 8))}
  with pytest.raises(TypeError, match='update_every must be an int, got '
                     'Array.*pass it in static_args'):
    optax.inject_hyperparams(orthax.dct_adamw)(update_every=10).init(p)
  # max_shape's init and eager update ran; the first jitted step failed on
  # int() of a tracer.
  with pytest.raises(TypeError, match='max_shape must be an int, got '
                     'Array.*pass it in static_args'):
    optax.inject_hyperparams(orthax.dct_adamw)(max_shape=24).init(p)
  with pytest.raises(TypeError, match='min_side must be an int, got '
                     'Array.*pass it in static_args'):
    optax.inject_hyperparams(orthax.dct_adamw)(min_side=16).init(p)
  tx = optax.inject_hyperparams(orthax.dct_adamw, static_args=(
      'update_every', 'max_shape', 'min_side'))(update_every=10,
                                                max_shape=24, min_side=16)
  jax.jit(tx.update)(p, tx.init(p), p)


@pytest.mark.parametrize('name', sorted(TRANSFORMS))
def test_every_transform_runs_under_inject_hyperparams_with_its_defaults(
    name):
  """optax injects every numeric default: none may be a value that fixes
  the program (``orthogonalize``'s ``restart_every=2`` was, and failed
  under ``jit``); such arguments default to ``None``."""
  fn, required = TRANSFORMS[name]
  params = {'w': jax.random.normal(jax.random.key(0), (8, 12))}
  tx = optax.inject_hyperparams(fn)(**required())
  state = tx.init(params)
  for update in (tx.update, jax.jit(tx.update)):  # concrete, then traced
    updates, _ = update(params, state, params)
    assert np.isfinite(np.asarray(updates['w'])).all()


def test_injected_step_counts_run_eagerly_and_under_jit():
  """optax.inject_hyperparams passes an injected ns_steps as a 0-d array
  outside jit: a step count, not a float or a bool."""
  params = {'w': jax.random.normal(jax.random.key(0), (8, 12))}
  for tx in (optax.inject_hyperparams(orthax.muon)(learning_rate=0.02,
                                                   ns_steps=5),
             optax.inject_hyperparams(orthax.orthogonalize)(steps=5)):
    state = tx.init(params)
    eager, _ = tx.update(params, state, params)
    jitted, _ = jax.jit(tx.update)(params, state, params)
    np.testing.assert_allclose(np.asarray(eager['w']), np.asarray(jitted['w']),
                               rtol=1e-5, atol=1e-6)
  x = params['w']
  np.testing.assert_array_equal(
      np.asarray(orthax.polar.newton_schulz(x, steps=jnp.asarray(5))),
      np.asarray(orthax.polar.newton_schulz(x, steps=5)))
  for bad in (True, jnp.asarray(5.0), jnp.asarray([5])):
    with pytest.raises(TypeError, match='steps must be an int'):
      orthax.polar.newton_schulz(x, steps=bad)


def test_orthogonalize_restart_every_is_static():
  with pytest.raises(TypeError, match='restart_every must be an int.*'
                     'static_args'):
    orthax.orthogonalize(restart_every=np.asarray(2))
  g = {'w': jax.random.normal(jax.random.key(0), (8, 32))}
  run = lambda **kw: orthax.orthogonalize(method='gram', **kw).update(
      g, optax.EmptyState())[0]['w']
  np.testing.assert_array_equal(run(), run(restart_every=2))
  assert not np.array_equal(run(), run(restart_every=0))  # never restarts
