"""Each branch's learning rate: the AdamW branch's default follows the
recipe's scale mode, the trainer logs it; leaves that look like output
layers routed to the matrix branch are warned about. What ``describe``
shows: ``tests/test_describe.py``."""

import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
from orthax.recipes import _common
from registered_rates import DEFAULT_LEARNING_RATES

# No recipe's default matrix update has AdamW's RMS (one rate for both
# branches) since ROOT's library mode took Muon's shape scale: each runs
# its AdamW branch at an AdamW-sized rate (the RMS-matched modes below).
WITH_ADAMW_BRANCH = tuple(n for n in orthax.recipe_names() if n != 'spectra')
# Each runs its AdamW branch at its registered rate at its default learning
# rate (tests/registered_rates.py) and scales it with its rate.
ROOT_LR = DEFAULT_LEARNING_RATES['root'][0]
MUON_LR = DEFAULT_LEARNING_RATES['muon'][0]
MUON_RATIO = 3e-3 / MUON_LR  # Muon's AdamW branch per unit of its rate


def _tree():
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {'w': jax.random.normal(k1, (16, 16)), 'b': jnp.zeros(16)}
  grads = {'w': jax.random.normal(k2, (16, 16)),
           'b': jnp.linspace(-1.0, 1.0, 16) + 0.03}
  return params, grads


def _first_bias_step(tx):
  """|update| of the zero bias at step one: AdamW's first step is
  ``-lr·sign(g)`` (bias-corrected moments, tiny eps), so this is its lr."""
  params, grads = _tree()
  updates, _ = tx.update(grads, tx.init(params), params)
  step = np.abs(np.asarray(updates['b']))
  np.testing.assert_allclose(step, step.mean(), rtol=1e-4)
  return float(step.mean())


@pytest.mark.parametrize('name', WITH_ADAMW_BRANCH)
def test_adam_branch_default_follows_scale_mode(name):
  lr = 0.04
  tx = orthax.recipe(name, learning_rate=lr)
  default, adam_default = DEFAULT_LEARNING_RATES[name]
  expected = lr * adam_default / default
  assert _first_bias_step(tx) == pytest.approx(expected, rel=1e-4)
  assert _common.recipe_routing(tx).learning_rates['adam'] == (
      pytest.approx(expected))
  # An explicit rate wins.
  tx = orthax.recipe(name, learning_rate=lr, adam_learning_rate=1e-3)
  assert _first_bias_step(tx) == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize('kwargs, matched, default', [
    (dict(), False, 0.003), (dict(scale='moonlight'), True, MUON_LR),
    # Moonlight's own rate, 1e-3, for both branches.
    (dict(reference='moonlight'), True, 1e-3),
    # KellerJordan's auxiliary Adam: 3e-4 at Muon's 0.02.
    (dict(reference='keller'), False, 3e-4)])
def test_muon_adam_branch_by_scale(kwargs, matched, default):
  tx = orthax.muon(0.02, **kwargs)
  keller = kwargs.get('reference') == 'keller'
  assert _first_bias_step(tx) == pytest.approx(
      0.02 if matched else (3e-4 if keller else 0.02 * MUON_RATIO),
      rel=1e-4)
  assert _first_bias_step(orthax.muon(**kwargs)) == pytest.approx(
      default, rel=1e-4)  # at the mode's default rate


@pytest.mark.parametrize('kwargs, matched, default', [
    (dict(), False, 0.003),
    (dict(scale='moonlight'), True, ROOT_LR),
    # The toy script's one rate, 1e-3, for both branches.
    (dict(reference='repo'), True, 1e-3)])
def test_root_adam_branch_by_scale(kwargs, matched, default):
  """ROOT's library mode scales as Muon (an AdamW-sized branch rate);
  under Moonlight's RMS-matched scale, its reference's, the branches share
  the rate."""
  assert _first_bias_step(orthax.root(0.02, **kwargs)) == pytest.approx(
      0.02 if matched else 0.02 * 3e-3 / ROOT_LR, rel=1e-4)
  assert _first_bias_step(orthax.root(**kwargs)) == pytest.approx(
      default, rel=1e-4)


def test_optax_mode_adam_branch_is_adamw_sized_too():
  """optax.contrib.muon reuses the matrix rate; the 'optax' mode does not
  by default (its NAdam-style first step is not ±lr: compare against the
  same mode given the rate explicitly)."""
  params, grads = _tree()
  def first(tx):
    return tx.update(grads, tx.init(params), params)[0]['b']
  np.testing.assert_allclose(
      first(orthax.muon(0.02, reference='optax')),
      first(orthax.muon(0.02, reference='optax',
                        adam_learning_rate=0.02 * MUON_RATIO)),
      rtol=1e-6)


@pytest.mark.parametrize('name, kwargs', [
    ('aro', dict(scale='update_rms')), ('trion', dict(scaling='kimi')),
    ('fismo', dict(scale='moonlight')), ('normuon', dict(reference='paper'))])
def test_rms_matched_modes_share_the_rate(name, kwargs):
  tx = orthax.recipe(name, learning_rate=0.01, **kwargs)
  assert _first_bias_step(tx) == pytest.approx(0.01, rel=1e-4)


def test_default_follows_a_schedule_and_injected_rate():
  sched = optax.linear_schedule(0.02, 0.0, 10)
  params, grads = _tree()
  tx = orthax.muon(sched)
  state = tx.init(params)
  for t in range(3):
    updates, state = tx.update(grads, state, params)
  # Step 3 runs at MUON_RATIO·sched(2); AdamW's later steps are not ±lr
  # exactly, so compare against AdamW at that rate on the same gradients.
  ref = orthax.transforms.adamw(lambda c: MUON_RATIO * sched(c), b1=0.9,
                                b2=0.95, eps=1e-10)
  rstate = ref.init(params['b'])
  for t in range(3):
    rupd, rstate = ref.update(grads['b'], rstate, params['b'])
  np.testing.assert_allclose(updates['b'], rupd, rtol=1e-5)

  injected = optax.inject_hyperparams(orthax.muon)(learning_rate=0.08)
  assert _first_bias_step(injected) == pytest.approx(0.08 * MUON_RATIO,
                                                     rel=1e-4)


def _mlp(num_layers=11, classes=10):
  z = jnp.zeros
  tree = {f'Dense_{i}': {'kernel': z((32, 32)), 'bias': z(32)}
          for i in range(num_layers - 1)}
  tree['Dense_0']['kernel'] = z((784, 32))
  tree[f'Dense_{num_layers - 1}'] = {'kernel': z((32, classes)),
                                     'bias': z(classes)}
  return tree


def _warnings(fn):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    fn()
  return [str(w.message) for w in caught
          if issubclass(w.category, orthax.OutputLayerWarning)]


def test_classifier_of_a_linen_mlp_is_flagged():
  tree = _mlp()
  # Natural order: Dense_10 is last, though 'Dense_10' < 'Dense_2' as text.
  assert orthax.Router().output_layer_suspects(tree) == [
      ('Dense_10/kernel', 'it is the last matrix of the tree and its 10 '
                          'outputs feed no other matrix')]
  msgs = _warnings(lambda: orthax.muon(0.02).init(tree))
  assert len(msgs) == 1 and "'Dense_10/kernel'" in msgs[0]
  assert "orthax.Rule('^Dense_10/kernel$', \"adam\")" in msgs[0]


def test_the_suggested_rules_route_it_and_silence_the_warning():
  tree = _mlp()
  for label in ('adam', 'matrix'):
    router = orthax.Router(extra_rules=[orthax.Rule(r'^Dense_10/kernel$',
                                                    label)])
    assert _warnings(lambda: orthax.muon(0.02, router=router).init(tree)) == []
    assert router.labels(tree)['Dense_10']['kernel'] == label


def test_fan_out_equal_to_vocabulary_is_flagged():
  z = jnp.zeros
  tree = {'tok_embed': {'embedding': z((100, 16))},
          'blocks': {'attn': {'kernel': z((16, 16))},
                     'mlp': {'kernel': z((16, 16))}},
          'out_proj': {'kernel': z((16, 100))},
          'zz_adapter': {'kernel': z((16, 16))}}
  (path, reason), = orthax.Router().output_layer_suspects(tree)
  assert path == 'out_proj/kernel' and 'vocabulary size' in reason
  assert 'note: ' in orthax.Router().describe(tree)


@pytest.mark.parametrize('tree', [
    {'w': jnp.zeros((8, 3))},                            # one matrix
    {'w1': jnp.zeros((8, 16)), 'w2': jnp.zeros((16, 8))},  # output feeds w1
    {'embed': jnp.zeros((100, 16)), 'w': jnp.zeros((16, 16)),
     'lm_head': {'kernel': jnp.zeros((16, 100))}},       # head is AdamW's
    # A dense layer whose 12 outputs a conv reads as input channels (its
    # fan-in is 3·12 = 36): not an output layer.
    {'conv': {'kernel': jnp.zeros((3, 12, 8))},
     'lin1': {'kernel': jnp.zeros((8, 12))}},
])
def test_no_warning_without_an_output_layer(tree):
  assert orthax.Router().output_layer_suspects(tree) == []
  assert _warnings(lambda: orthax.muon(0.02).init(tree)) == []


def test_a_conv_window_size_does_not_hide_an_output_layer():
  """Only a conv's input channels count as consuming a layer's outputs,
  not its window: three classes after 3×3 convolutions are still an
  output layer."""
  z = jnp.zeros
  tree = {'bconv_0': {'kernel': z((3, 3, 1, 16))},
          'bconv_1': {'kernel': z((3, 3, 16, 32))},
          'dense_0': {'kernel': z((512, 64))}, 'dense_1': {'kernel': z((64, 3))}}
  assert [p for p, _ in orthax.Router().output_layer_suspects(tree)] == [
      'dense_1/kernel']


def test_trainer_model_has_no_suspect_and_logs_branch_rates(caplog):
  from orthax.train import configs, trainer  # pylint: disable=g-import-not-at-top
  cfg = configs.base_config('muon')
  cfg.optimizer.adam_learning_rate = None  # the recipe's own default
  cfg.train.steps, cfg.train.eval_every = 2, 0
  cfg.model.d_model, cfg.model.num_layers = 32, 1
  cfg.schedule.warmup_steps = 0
  setup = trainer.build(trainer.as_dict(cfg), 64, abstract=True)
  assert orthax.Router().output_layer_suspects(setup.abstract_params) == []
  assert setup.schedules['adam'].peak == pytest.approx(
      MUON_RATIO * cfg.optimizer.learning_rate)
  summary = trainer.startup_summary(setup)
  lr = cfg.optimizer.learning_rate
  assert f'matrix {lr:.4g}, adam {MUON_RATIO * lr:.4g}' in summary
  assert 'weight decay matrix 0.2, adam 0;' in summary
  cfg.optimizer.kwargs = {'reference': 'moonlight'}
  cfg.optimizer.learning_rate, cfg.optimizer.adam_learning_rate = 1e-3, 1e-3
  moonlight = trainer.build(trainer.as_dict(cfg), 64, abstract=True)
  assert 'weight decay matrix 0.1, adam 0.1;' in trainer.startup_summary(
      moonlight)
  adamw = configs.base_config('adamw')
  adamw.optimizer.weight_decay = 0.05
  adamw.model.d_model, adamw.model.num_layers = 32, 1
  adamw = trainer.build(trainer.as_dict(adamw), 64, abstract=True)
  assert 'weight decay adam 0.05;' in trainer.startup_summary(adamw)
  cfg.optimizer.kwargs = {}
  cfg.optimizer.learning_rate, cfg.optimizer.adam_learning_rate = lr, None
  with caplog.at_level(logging.INFO, logger='orthax.train'):
    trainer.train(cfg, progress=False)
  assert any('peak learning rate matrix' in r.getMessage()
             for r in caplog.records)


def test_adam_rate_ratio_is_the_registered_pair():
  assert orthax.recipes.adam_rate_ratio('muon') == pytest.approx(
      3e-3 / 0.05656)
  assert orthax.recipes.adam_rate_ratio('aro') == pytest.approx(3e-3 / 0.08)
  assert orthax.recipes.adam_rate_ratio('dct_adamw') == pytest.approx(
      0.0085 / 1.5)
  # No pair registered (or not a recipe): the Keller-scaled Muon ratio.
  for name in (None, 'spectra', 'not_a_recipe'):
    assert orthax.recipes.adam_rate_ratio(name) == 0.15


@pytest.mark.parametrize('name', WITH_ADAMW_BRANCH + ('spectra',))
def test_trainer_default_section_steps_as_the_library_default(name):
  """The trainer's default ``optimizer`` section builds the recipe the
  library's ``orthax.<name>()`` is, weight decays and AdamW-branch rate
  included: before, the trainer ran every recipe at weight decay 0 (NAMO's
  default was then 0.1) and ROOT's AdamW branch at 3e-3 (not the library's
  rate), so the learning-rate sweep measured neither default."""
  # pylint: disable=g-import-not-at-top
  from orthax.train import configs
  from orthax.train import optim
  section = configs.optimizer(name).to_dict()
  tx, _ = optim.build(section, lambda step: 1.0)
  ref = orthax.recipe(name)
  k1, k2 = jax.random.split(jax.random.key(1))
  params = {'blocks': {'mlp': {'kernel': jax.random.normal(k1, (16, 32))}},
            'embed': {'embedding': jax.random.normal(k2, (32, 16))},
            'ln': {'scale': jnp.ones(16)}}
  grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
  s, r = tx.init(params), ref.init(params)
  for _ in range(2):
    u, s = tx.update(grads, s, params)
    v, r = ref.update(grads, r, params)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
