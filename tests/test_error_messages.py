"""Every argument error starts ``'{owner}: {arg} '``: the function or class
the user called (not an inner helper it reached) and the argument. Each row
was a message without one or naming another owner (``'muon reference must
be'``, ``'noise_adapt shape'`` from ``namo``, ``'layerwise_noise_adapt:'``
from ``lanton``, ``'method must be one of'``, ...)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import optax
import pytest

import orthax
import orthax.flax
from orthax import benchmarking
from orthax import matrix_stages as MS
from orthax import polar
from orthax import sharding
from orthax import transforms as T
from orthax.matrix_stages import _rotate
from orthax.polar import remez

X = jnp.ones((4, 6))


def _mesh():
  return jax.make_mesh((1,), ('fsdp',))


def _noise_adapt(**kw):
  return T.noise_adapt(T.momentum(), T.orthogonalize(), learning_rate=0.1,
                       **kw)


def _layerwise(**kw):
  return T.layerwise_noise_adapt(T.momentum(), T.orthogonalize(),
                                 learning_rate=0.1, **kw)


# (id, callable, owner, argument)
CASES = [
    # Recipes: reference=, router= and the options each passes down.
    ('muon-reference', lambda: orthax.muon(reference='bogus'), 'muon',
     'reference'),
    ('namo-reference', lambda: orthax.recipe('namo', reference='bogus'),
     'namo', 'reference'),
    ('muon-router', lambda: orthax.muon(router='bogus'), 'muon', 'router'),
    ('aro-router', lambda: orthax.aro(router=3), 'aro', 'router'),
    ('muon-scale', lambda: orthax.muon(scale='foo'), 'muon', 'scale'),
    ('fismo-scale', lambda: orthax.fismo(scale='foo'), 'fismo', 'scale'),
    ('namo-shape', lambda: orthax.namo(shape='bogus'), 'namo', 'shape'),
    ('namo_d-shape', lambda: orthax.namo_d(shape='bogus'), 'namo_d',
     'shape'),
    ('lanton-difference', lambda: orthax.lanton(difference='bogus'),
     'lanton', 'difference'),
    ('lanton-normalization', lambda: orthax.lanton(normalization='bogus'),
     'lanton', 'normalization'),
    ('lanton-nuclear', lambda: orthax.lanton(nuclear='bogus'), 'lanton',
     'nuclear'),
    ('aro-qr', lambda: orthax.aro(qr='bogus'), 'aro', 'qr'),
    ('recipe-name', lambda: orthax.recipe('nosuch'), 'recipe', 'name'),
    ('recipe_factory-name', lambda: orthax.recipe_factory('nosuch'),
     'recipe_factory', 'name'),
    ('register-aliases',
     lambda: orthax.recipes.register('bad', references=('a',),
                                     aliases={'old': 'b'})(lambda: None),
     'register', 'aliases'),
    # Transforms.
    ('momentum-form', lambda: T.momentum(form='bogus'), 'momentum', 'form'),
    ('momentum-bias_correction',
     lambda: T.momentum(form='sum', bias_correction=True), 'momentum',
     'bias_correction'),
    ('neuron_normalize-axis', lambda: orthax.neuron_normalize(axis='bogus'),
     'neuron_normalize', 'axis'),
    ('neuron_normalize-eps_placement',
     lambda: orthax.neuron_normalize(eps_placement='bogus'),
     'neuron_normalize', 'eps_placement'),
    ('noise_adapt-mode', lambda: _noise_adapt(mode='bogus'), 'noise_adapt',
     'mode'),
    ('noise_adapt-shape', lambda: _noise_adapt(shape='bogus'), 'noise_adapt',
     'shape'),
    ('layerwise_noise_adapt-difference',
     lambda: _layerwise(difference='bogus'), 'layerwise_noise_adapt',
     'difference'),
    ('aro_rotate-qr', lambda: T.aro_rotate(qr='bogus'), 'aro_rotate', 'qr'),
    ('scale_by_aro-qr', lambda: T.scale_by_aro(qr='bogus'), 'scale_by_aro',
     'qr'),
    ('scale_by_aro-scale', lambda: T.scale_by_aro(scale='bogus'),
     'scale_by_aro', 'scale'),
    ('scale_by_fismo-scale', lambda: T.scale_by_fismo(scale='foo'),
     'scale_by_fismo', 'scale'),
    ('scale_by_fismo-scale_invariant',
     lambda: T.scale_by_fismo(scale_invariant='x'), 'scale_by_fismo',
     'scale_invariant'),
    ('orthogonalize-then', lambda: orthax.orthogonalize(then=[1]),
     'orthogonalize', 'then'),
    ('orthogonalize-before', lambda: orthax.orthogonalize(before=[1]),
     'orthogonalize', 'before'),
    ('orthogonalize-method', lambda: orthax.orthogonalize(method='bogus'),
     'orthogonalize', 'method'),
    ('orthogonalize-coeffs', lambda: orthax.orthogonalize(coeffs='abc'),
     'orthogonalize', 'coeffs'),
    ('adamw-eps_placement', lambda: T.adamw(0.1, eps_placement='bogus'),
     'adamw', 'eps_placement'),
    ('adamw-nesterov', lambda: T.adamw(0.1, eps_placement='raw',
                                       nesterov=True), 'adamw', 'nesterov'),
    ('cosh_normalize-brake_input',
     lambda: orthax.cosh_normalize(brake_input='bogus'), 'cosh_normalize',
     'brake_input'),
    ('shape_factor-mode', lambda: T.shape_factor(2, 3, 'foo'),
     'shape_factor', 'mode'),
    ('decoupled_weight_decay-step_scale',
     lambda: orthax.decoupled_weight_decay(0.1, step_scale='keller'),
     'decoupled_weight_decay', 'step_scale'),
    # Stages built directly: their names.
    ('ScaleByShape-mode', lambda: MS.ScaleByShape('foo'), 'scale_by_shape',
     'mode'),
    ('ScaleToSpectralNorm-iters', lambda: MS.ScaleToSpectralNorm(iters=0),
     'scale_to_spectral_norm', 'iters'),
    ('AroRotate-qr', lambda: MS.AroRotate(qr='bogus'), 'aro_rotate', 'qr'),
    ('FismoStep-ns_method', lambda: MS.FismoStep(ns_method='bogus'), 'fismo',
     'ns_method'),
    ('NoiseAdaptStep-shape',
     lambda: MS.NoiseAdaptStep('scalar', 0.1, 0, shape='bogus'),
     'noise_adapt', 'shape'),
    ('aro_flops-rotate', lambda: _rotate.aro_flops(2, 3, rotate='bogus'),
     'aro_flops', 'rotate'),
    # Routing and matrix views.
    ('Rule-label', lambda: orthax.Rule('x', 'bogus'), 'Rule', 'label'),
    ('Rule-pattern', lambda: orthax.Rule('[', 'adam'), 'Rule', 'pattern'),
    ('Rule-spec', lambda: orthax.Rule('x', 'matrix', spec=3), 'Rule', 'spec'),
    ('MatrixSpec-fan_in', lambda: orthax.MatrixSpec(fan_in='a'), 'MatrixSpec',
     'fan_in'),
    ('MatrixSpec.stacked-layer_axis',
     lambda: orthax.MatrixSpec.stacked(layer_axis=5), 'MatrixSpec.stacked',
     'layer_axis'),
    ('MatrixSpec.heads-fan_in', lambda: orthax.MatrixSpec.heads('a', 1),
     'MatrixSpec.heads', 'fan_in'),
    ('Distributed-comm_dtype',
     lambda: sharding.Distributed(_mesh(), comm_dtype=jnp.float16),
     'Distributed', 'comm_dtype'),
    ('Distributed-strategy',
     lambda: sharding.Distributed(_mesh(), strategy='fast'), 'Distributed',
     'strategy'),
    ('skip_if_nonfinite-inner', lambda: orthax.skip_if_nonfinite('x'),
     'skip_if_nonfinite', 'inner'),
    ('in_float32-inner', lambda: T.in_float32(optax.adamw), 'in_float32',
     'inner'),
    ('named_chain-stage', lambda: T.named_chain(('a', 3)), 'named_chain',
     "stage 'a'"),
    ('named_chain-stages', lambda: T.named_chain(optax.sgd(0.1)),
     'named_chain', 'stages'),
    ('noise_adapt-momentum',
     lambda: T.noise_adapt('x', T.orthogonalize(), learning_rate=0.1),
     'noise_adapt', 'momentum'),
    ('layerwise_noise_adapt-direction',
     lambda: T.layerwise_noise_adapt(T.momentum(), 'y', learning_rate=0.1),
     'layerwise_noise_adapt', 'direction'),
    ('muon-scale_rms', lambda: orthax.muon(scale_rms=0.3), 'muon',
     'scale_rms'),
    ('fismo-scale_rms', lambda: orthax.fismo(scale_rms=0.3), 'fismo',
     'scale_rms'),
    ('aro-scale_rms', lambda: orthax.aro(scale='muon', scale_rms=0.3), 'aro',
     'scale_rms'),
    ('normuon-scale_rms', lambda: orthax.normuon(scale_rms=0.3), 'normuon',
     'scale_rms'),
    ('muon-schedule_arity', lambda: orthax.muon(learning_rate=lambda: 0.1),
     'muon', 'learning_rate'),
    # Callables that optax.inject_hyperparams takes for schedules: the
    # message says to pass them in static_args.
    ('muon-injected_router', lambda: optax.inject_hyperparams(orthax.muon)(
        router=lambda p: jax.tree.map(lambda _: 'adam', p)).init(
            {'w': jnp.ones((4, 8))}), 'muon', 'router'),
    ('muon-injected_mu_dtype', lambda: optax.inject_hyperparams(orthax.muon)(
        mu_dtype=jnp.bfloat16).init({'w': jnp.ones((4, 8))}), 'muon',
     'mu_dtype'),
    ('trion-adam_schedule_arity',
     lambda: orthax.trion(adam_learning_rate=lambda step, scale: 0.1),
     'trion', 'adam_learning_rate'),
    ('scale_by_shape-rms', lambda: T.scale_by_shape('keller', rms=5.0),
     'scale_by_shape', 'rms'),
    ('scale_by_shape-min_side', lambda: T.scale_by_shape('keller', min_side=8),
     'scale_by_shape', 'min_side'),
    ('decoupled_weight_decay-min_side',
     lambda: T.decoupled_weight_decay(0.1, learning_rate=0.1, min_side=8),
     'decoupled_weight_decay', 'min_side'),
    ('dct_adamw-min_side', lambda: orthax.dct_adamw(scale='none',
                                                    min_side=64),
     'dct_adamw', 'min_side'),
    ('spectral_clip-warmup_steps',
     lambda: orthax.spectral_clip(warmup_steps=10), 'spectral_clip',
     'warmup_steps'),
    ('spectra-base_learning_rate',
     lambda: orthax.spectra(base_learning_rate=0.1), 'spectra',
     'base_learning_rate'),
    ('spectra-warmup_steps_constant_rate',
     lambda: orthax.spectra(warmup_steps=10), 'spectra', 'warmup_steps'),
    ('clip_threshold-warmup_steps',
     lambda: T.clip_threshold(2.0, jnp.asarray(0), learning_rate=0.1,
                              warmup_steps=3), 'clip_threshold',
     'warmup_steps'),
    ('abs_quantile-q', lambda: T.abs_quantile(jnp.ones((2, 3)), 1.5),
     'abs_quantile', 'q'),
    ('shape_factor-fan_in', lambda: T.shape_factor(-1, 32, 'keller'),
     'shape_factor', 'fan_in'),
    ('shape_factor-rms', lambda: T.shape_factor(16, 32, 'moonlight', rms=-1),
     'shape_factor', 'rms'),
    ('polar_svd-x', lambda: polar.polar_svd(jnp.ones(8)), 'polar_svd', 'x'),
    ('gaussian_sample_singular_values-count',
     lambda: polar.gaussian_sample_singular_values(4, 4, count=0),
     'gaussian_sample_singular_values', 'count'),
    ('Distributed-mesh', lambda: sharding.Distributed('fsdp'), 'Distributed',
     'mesh'),
    ('Distributed-max_local_matrix_bytes',
     lambda: sharding.Distributed(_mesh(), max_local_matrix_bytes=-1),
     'Distributed', 'max_local_matrix_bytes'),
    ('Distributed-overrides',
     lambda: sharding.Distributed(_mesh(), overrides=[('x', 'nope')]),
     'Distributed', 'overrides'),
    ('logical_to_spec-rules',
     lambda: orthax.flax.logical_to_spec(('embed',), {}), 'logical_to_spec',
     'rules'),
    ('param_specs-rules',
     lambda: orthax.flax.param_specs({'w': ('embed',)}, {}), 'param_specs',
     'rules'),
    ('spec_per_param-specs',
     lambda: orthax.flax.spec_per_param({'w': X}, {'w': 'fsdp'}),
     'spec_per_param', 'specs'),
    ('recipe_rows-only', lambda: benchmarking.recipe_rows(['nosuch']),
     'recipe_rows', 'only'),
    # orthax.polar: the function called, not the one it reached.
    ('newton_schulz-steps', lambda: polar.newton_schulz(X, steps=0),
     'newton_schulz', 'steps'),
    ('newton_schulz-normalizer',
     lambda: polar.newton_schulz(X, normalizer='bogus'), 'newton_schulz',
     'normalizer'),
    ('newton_schulz-preset', lambda: polar.newton_schulz(X, 'bogus'),
     'newton_schulz', 'preset'),
    ('newton_schulz-x', lambda: polar.newton_schulz(jnp.ones(3)),
     'newton_schulz', 'x'),
    ('gram_newton_schulz-restart_every',
     lambda: polar.gram_newton_schulz(X, restart_every=-1),
     'gram_newton_schulz', 'restart_every'),
    ('orthogonalize_stack-method',
     lambda: polar.orthogonalize_stack(X, method='bogus'),
     'orthogonalize_stack', 'method'),
    ('orthogonalize_stack-steps',
     lambda: polar.orthogonalize_stack(X, steps=0), 'orthogonalize_stack',
     'steps'),
    ('orthogonalize_stack-coeffs',
     lambda: polar.orthogonalize_stack(X, coeffs=[[1.0, 2.0]]),
     'orthogonalize_stack', 'coeffs'),
    ('choose_method-method',
     lambda: polar.choose_method(4, 6, 5, 'float32', 'bogus'),
     'choose_method', 'method'),
    ('polar_express_coefficients-steps',
     lambda: polar.polar_express_coefficients(0), 'polar_express_coefficients',
     'steps'),
    ('polar_express_coefficients-lower',
     lambda: polar.polar_express_coefficients(3, lower=2.0),
     'polar_express_coefficients', 'lower'),
    ('optimal_quintic-lower', lambda: polar.optimal_quintic(0.0, 1.0),
     'optimal_quintic', 'lower'),
    ('table-name', lambda: remez.table('D'), 'table', 'name'),
]


@pytest.mark.parametrize('make,owner,arg', [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_message_starts_with_owner_and_argument(make, owner, arg):
  with pytest.raises((ValueError, TypeError),
                     match=f'^{re.escape(owner)}: {re.escape(arg)} '):
    make()


@pytest.mark.parametrize('spec, message', [
    (('fsdp', None, None), r'has more entries than the leaf has dimensions'),
    (('fsdp', 'fsdp'), r"shards along mesh axis 'fsdp' twice"),
])
def test_a_bad_param_spec_names_the_leaf(spec, message):
  """A spec longer than its leaf said ``': PartitionSpec ...'`` (no leaf),
  a mesh axis used twice raised JAX's DuplicateSpecError from deep inside
  the step."""
  from jax.sharding import PartitionSpec  # pylint: disable=g-import-not-at-top
  params = {'a': {'kernel': jnp.ones((16, 32))}}
  tx = T.orthogonalize(distributed=sharding.Distributed(
      _mesh(), {'a': {'kernel': PartitionSpec(*spec)}}))
  with pytest.raises(ValueError, match=r"^Distributed: param_specs at "
                     r"'a/kernel': PartitionSpec .*" + message):
    tx.update(params, tx.init(params), params)


def test_scale_rms_is_taken_where_its_scale_applies():
  """``scale_rms`` beside a scale that reads no RMS changed nothing: now
  refused (above); where the scale reads it, or at its default, it is
  taken, and under ``inject_hyperparams`` (a traced value) too."""
  params = {'w': jnp.ones((4, 8))}
  for tx in (orthax.muon(scale='moonlight', scale_rms=0.3),
             orthax.muon(scale_rms=0.2), orthax.fismo(scale='moonlight',
                                                      scale_rms=0.3),
             orthax.aro(scale='update_rms', scale_rms=0.3),
             orthax.normuon(reference='paper', scale_rms=0.3),
             optax.inject_hyperparams(orthax.muon)(scale='moonlight',
                                                   scale_rms=0.3)):
    tx.update(params, tx.init(params), params)
  a, b = (orthax.muon(scale='moonlight', scale_rms=r, weight_decay=0.0)
          for r in (0.2, 0.4))
  ua = a.update(params, a.init(params), params)[0]['w']
  ub = b.update(params, b.init(params), params)[0]['w']
  assert float(jnp.linalg.norm(ub)) > 1.9 * float(jnp.linalg.norm(ua))


def test_schedules_of_one_argument_are_taken():
  """A schedule is called with the step count: optax's schedules, lambdas
  with defaults or ``*args`` after it, and callables without a readable
  signature (a ``jnp`` ufunc) are taken."""
  params = {'w': jnp.ones((4, 8)), 'b': jnp.zeros(8)}
  for lr in (optax.cosine_decay_schedule(0.05, 10), lambda c, k=1: 0.05,
             lambda c, *rest: 0.05, jnp.cos):
    tx = orthax.muon(learning_rate=lr, adam_learning_rate=lr)
    tx.update(params, tx.init(params), params)


def test_a_wrapped_schedule_is_read_by_the_signature_called():
  """``functools.wraps`` gives a one-argument schedule the signature of the
  function it wraps; the schedule is taken if either signature takes the
  step count."""
  def with_peak(peak):
    def wrap(f):
      @functools.wraps(f)
      def schedule(count):
        return f(count, peak)
      return schedule
    return wrap

  @with_peak(0.02)
  def warm(count, peak):
    return peak * jnp.minimum(1.0, count / 10)

  params = {'w': jnp.ones((4, 8))}
  tx = orthax.muon(learning_rate=warm)
  tx.update(params, tx.init(params), params)


@pytest.mark.parametrize('kwargs', [
    dict(router=lambda p: jax.tree.map(lambda _: 'adam', p)),
    dict(mu_dtype=jnp.bfloat16), dict(ns_dtype=jnp.bfloat16)])
def test_an_injected_callable_names_static_args(kwargs):
  """optax.inject_hyperparams calls any callable argument with the step
  count (a labels function gave ``'adam'``, ``jnp.bfloat16`` an array); the
  message says where it went wrong, and ``static_args`` works."""
  params = {'w': jnp.ones((4, 8)), 'b': jnp.zeros(8)}
  with pytest.raises((ValueError, TypeError), match='static_args'):
    optax.inject_hyperparams(orthax.muon)(**kwargs).init(params)
  tx = optax.inject_hyperparams(orthax.muon, static_args=tuple(kwargs))(
      **kwargs)
  tx.update(params, tx.init(params), params)
