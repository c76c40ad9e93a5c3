"""The recipe registry: entries, reference modes and aliases, default
learning rates, and a newly registered recipe reaching the trainer."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
from orthax import transforms as T
from orthax.recipes import _common
from orthax.recipes import registry
from reference_helpers import flat, make_tree, run_orthax
from registered_rates import DEFAULT_LEARNING_RATES

REFERENCES = {
    'muon': ('orthax', 'keller', 'moonlight', 'optax'),
    'normuon': ('orthax', 'repo', 'paper', 'modded'),
    'namo': ('orthax', 'repo'),
    'namo_d': ('orthax', 'repo'),
    'lanton': ('orthax', 'paper'),
    'root': ('orthax', 'repo'),
    'auon': ('orthax', 'paper', 'repo'),
    'hybrid_auon': ('orthax', 'paper', 'repo'),
    'spectra': ('orthax', 'repo'),
    'dct_adamw': ('orthax', 'ista'),
    'trion': ('orthax', 'ista'),
    'fismo': (),
    'aro': ('orthax', 'dion'),
}

# Each reference mode's default (matrix, AdamW-branch) rates: its reference
# code's, written out from ALGORITHMS.md and the reference repositories.
# Modes not listed run at the library's (DEFAULT_LEARNING_RATES) rate.
REFERENCE_RATES = {
    ('muon', 'keller'): (0.02, 3e-4),        # Muon lr, aux Adam lr
    ('muon', 'moonlight'): (1e-3, 1e-3),     # toy_train: one lr
    ('normuon', 'repo'): (0.02, 3e-4),
    ('normuon', 'paper'): (0.012, 0.012),    # none published: measured
    ('normuon', 'modded'): (0.023, 0.008),
    ('namo', 'repo'): (0.01, 0.01),          # NAMO class: one lr
    ('namo_d', 'repo'): (0.01, 0.01),
    ('root', 'repo'): (1e-3, 1e-3),          # example_train: one lr
    ('auon', 'paper'): (0.24, 0.024),        # c87b862: AdamW at lr/10
    ('auon', 'repo'): (0.08, 0.008),         # training config: AuON, Adam
    ('hybrid_auon', 'repo'): (0.08, 0.008),
    ('hybrid_auon', 'paper'): (0.04, 3e-3),  # none published: measured
    ('spectra', 'repo'): (2e-3, 2e-3),       # 160M scripts; AdamW base
    ('aro', 'dion'): (0.01, 0.01),           # dion: one lr for all groups
    ('trion', 'ista'): (0.02, 3e-4),         # Trion lr, Adam lr
    ('dct_adamw', 'ista'): (0.0085, 0.0085),  # lr required: unscaled default
}

TOY = 'toy_ortho_sgd'


def test_entries():
  assert orthax.recipe_names() == tuple(sorted(REFERENCES))
  for name, refs in REFERENCES.items():
    entry = orthax.recipes.recipe_entry(name)
    assert entry.name == name
    assert entry.factory is orthax.recipe_factory(name)
    assert entry.factory is getattr(orthax, name)
    assert entry.references == refs == orthax.recipe_references(name)
    assert (entry.learning_rate, entry.adam_learning_rate) == (
        DEFAULT_LEARNING_RATES[name])
    assert orthax.recipes.default_learning_rates(name) == (
        DEFAULT_LEARNING_RATES[name])
    expected = {'namo_repo': 'repo'} if name.startswith('namo') else {}
    assert dict(entry.aliases) == expected
  with pytest.raises(TypeError):
    entry.aliases['x'] = 'repo'  # read-only


@pytest.mark.parametrize('name', sorted(n for n in REFERENCES if REFERENCES[n]))
def test_each_mode_runs_at_its_references_rates(name):
  """A reference mode's default rates are its reference's; the library mode
  (and a mode whose reference publishes none) the registered ones. Both
  branches are read off the built optimizer, and the AdamW branch keeps
  the mode's ratio at another rate."""
  for ref in REFERENCES[name]:
    lr, adam = REFERENCE_RATES.get((name, ref), DEFAULT_LEARNING_RATES[name])
    adam = lr if adam is None else adam  # SPECTRA: one AdamW base
    rates = orthax.recipes.recipe_routing(
        orthax.recipe(name, reference=ref)).learning_rates
    assert rates['matrix'] == pytest.approx(lr, rel=1e-12), ref
    assert rates['adam'] == pytest.approx(adam, rel=1e-12), ref
    rates = orthax.recipes.recipe_routing(
        orthax.recipe(name, reference=ref, learning_rate=2 * lr)
    ).learning_rates
    assert rates['adam'] == pytest.approx(2 * adam, rel=1e-12), ref
  assert orthax.recipes.recipe_entry(name).references[0] == 'orthax'
  assert inspect.signature(orthax.recipe_factory(name)).parameters[
      'reference'].default == 'orthax'


# The library mode's arithmetic is that of this reference mode.
SAME_ARITHMETIC = {'muon': 'keller', 'normuon': 'repo', 'root': 'repo',
                   'auon': 'paper', 'hybrid_auon': 'repo', 'trion': 'ista'}
# ... once the library mode's own settings are set to the reference's
# (Trion's library mode looks ahead, test_trion.py covers that step; ROOT's
# scales its step as Muon, test_root.py).
REFERENCE_SETTINGS = {'trion': dict(nesterov=False, fraction_scale=False),
                      'root': dict(scale='moonlight')}


@pytest.mark.parametrize('name', sorted(SAME_ARITHMETIC))
def test_library_mode_is_its_references_arithmetic(name):
  """At the same rates and decay, ``reference='orthax'`` steps exactly as
  the mode whose arithmetic it runs (its default decay may differ: NorMuon's
  is the sweep's 0.1, Muon's, Hybrid-AuON's and ROOT's 0.2, their
  references' 0, 0 and 0.1; Trion's library mode also looks ahead and
  scales a rounded-up rank, here with ``nesterov=False`` and
  ``fraction_scale=False``, and ROOT's takes Muon's shape scale, here the
  reference's Moonlight scale)."""
  shapes = {'blocks/mlp/kernel': (3, 8, 6), 'blocks/mlp/bias': (3, 6),
            'attn/kernel': (6, 10)}
  params = jax.tree.map(jnp.asarray, make_tree(0, shapes, np.float32))
  grads = [jax.tree.map(jnp.asarray, make_tree(s, shapes, np.float32))
           for s in (1, 2, 3)]
  rates = dict(learning_rate=0.03, adam_learning_rate=2e-3,
               weight_decay=0.05)
  ours = run_orthax(orthax.recipe(
      name, **rates, **REFERENCE_SETTINGS.get(name, {})), params, grads)
  theirs = run_orthax(orthax.recipe(
      name, reference=SAME_ARITHMETIC[name], **rates), params, grads)
  for a, b in zip(ours, theirs):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# Each mode's default matrix decay: the sweep's for the library mode, the
# reference's own for the others.
MODE_DECAY = [('muon', 'orthax', 0.2), ('muon', 'keller', 0.0),
              ('muon', 'moonlight', 0.1), ('muon', 'optax', 0.0),
              ('normuon', 'orthax', 0.2), ('normuon', 'repo', 0.0),
              ('normuon', 'paper', 0.0), ('normuon', 'modded', 0.0),
              ('hybrid_auon', 'orthax', 0.2), ('hybrid_auon', 'repo', 0.0),
              ('hybrid_auon', 'paper', 0.0), ('auon', 'orthax', 0.0),
              ('auon', 'repo', 0.0), ('aro', 'orthax', 0.2),
              ('aro', 'dion', 0.01), ('root', 'orthax', 0.2),
              ('root', 'repo', 0.1), ('fismo', None, 0.2),
              ('lanton', 'orthax', 0.4), ('lanton', 'paper', 0.0),
              ('namo', 'orthax', 0.4), ('namo', 'repo', 0.1),
              ('namo_d', 'orthax', 0.4), ('namo_d', 'repo', 0.1),
              ('trion', 'orthax', 0.2),
              ('trion', 'ista', 0.0)]
# Other mode-dependent defaults, (recipe, mode, keyword, value).
MODE_DEFAULTS = [(n, r, 'weight_decay', v) for n, r, v in MODE_DECAY] + [
    ('spectra', 'orthax', 'c', 2.0), ('spectra', 'repo', 'c', 10.0)]


@pytest.mark.parametrize('name,reference,keyword,value', MODE_DEFAULTS)
def test_default_of_each_mode(name, reference, keyword, value):
  """The default steps exactly as the value passed explicitly, and not as
  another (so the value is in effect)."""
  shapes = {'mlp/kernel': (8, 6), 'mlp/bias': (6,)}  # 2-D: optax's rule
  params = jax.tree.map(jnp.asarray, make_tree(0, shapes, np.float32))
  grads = [jax.tree.map(jnp.asarray, make_tree(s, shapes, np.float32))
           for s in (1, 2)]
  mode = {} if reference is None else {'reference': reference}  # one mode
  run = lambda **kw: run_orthax(orthax.recipe(  # noqa: E731
      name, **mode, learning_rate=0.03, **kw), params, grads)
  default, same, other = run(), run(**{keyword: value}), run(
      **{keyword: value + 0.5})
  for a, b, c in zip(default, same, other):
    np.testing.assert_array_equal(a['mlp/kernel'], b['mlp/kernel'])
    assert not np.array_equal(a['mlp/kernel'], c['mlp/kernel'])


def test_mode_rates_name_reference_modes():
  with pytest.raises(ValueError, match="mode_rates .*'nosuch'"):
    registry.RecipeEntry('bad', _toy, ('orthax', 'a'),
                         mode_rates={'nosuch': (0.1, None)})
  with pytest.raises(ValueError, match="not the library mode 'orthax'"):
    registry.RecipeEntry('bad', _toy, ('orthax', 'a'),
                         mode_rates={'orthax': (0.1, None)})


def test_reference_resolution():
  for name, refs in REFERENCES.items():
    for ref in refs:
      assert registry.resolve_reference(name, ref) == ref
  for name in ('namo', 'namo_d'):
    assert registry.resolve_reference(name, 'namo_repo') == 'repo'


@pytest.mark.parametrize('name', ['namo', 'namo_d'])
def test_alias_gives_the_same_updates(name):
  shapes = {'blocks/mlp/kernel': (3, 8, 6), 'blocks/mlp/bias': (3, 6),
            'head/kernel': (6, 10)}
  params = jax.tree.map(jnp.asarray, make_tree(0, shapes, np.float32))
  grads = [jax.tree.map(jnp.asarray, make_tree(s, shapes, np.float32))
           for s in (1, 2, 3)]
  new = run_orthax(orthax.recipe(name, reference='repo'), params, grads)
  old = run_orthax(orthax.recipe(name, reference='namo_repo'), params, grads)
  # The repository's factor and coefficient, at its rate and its decay on
  # both branches.
  spelled = run_orthax(orthax.recipe(
      name, shape='moonlight', scale_coeff=0.2, learning_rate=0.01,
      adam_learning_rate=0.01, weight_decay=0.1, adam_weight_decay=0.1),
      params, grads)
  for a, b, c in zip(new, old, spelled):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
      np.testing.assert_array_equal(a[k], c[k], err_msg=k)


@pytest.mark.parametrize('name', [n for n, r in REFERENCES.items() if r])
def test_bad_reference_names_recipe_value_and_modes(name):
  with pytest.raises(ValueError) as err:
    orthax.recipe(name, reference='nosuch')
  msg = str(err.value)
  assert msg.startswith(f'{name}: reference must be one of'), msg
  assert "'nosuch'" in msg
  for ref in REFERENCES[name]:
    assert repr(ref) in msg
  if name.startswith('namo'):
    assert "'namo_repo'" in msg


def test_unknown_recipe():
  for fn in (orthax.recipe, orthax.recipe_factory, orthax.recipe_references,
             orthax.recipes.recipe_entry,
             orthax.recipes.default_learning_rates):
    with pytest.raises(ValueError, match=fr"^{fn.__name__}: name must be a "
                       r"registered recipe.*muon.*got 'nosuch'"):
      fn('nosuch')
  with pytest.raises(ValueError, match="^resolve_reference: name must be a "
                     "registered recipe.*got 'nosuch'"):
    registry.resolve_reference('nosuch', 'repo')


def test_bad_alias_is_refused():
  with pytest.raises(ValueError, match="alias 'old'"):
    registry.register('bad', references=('a',), aliases={'old': 'b'})(
        lambda: None)
  with pytest.raises(ValueError, match="alias 'a'"):
    registry.register('bad', references=('a', 'b'), aliases={'a': 'b'})(
        lambda: None)
  assert 'bad' not in orthax.recipe_names()


def _toy(learning_rate=0.05, *, reference='plain', beta=0.9,
         weight_decay=0.0, adam_learning_rate=None, router=None,
         check_finite=True):
  """Momentum + Newton–Schulz from the shared parts, AdamW for the rest."""
  registry.resolve_reference(TOY, reference)
  router, specs = _common.route(router)
  matrix = optax.named_chain(
      ('momentum', T.momentum(beta, form='ema', nesterov=False)),
      ('orthogonalize', T.orthogonalize(matrix_specs=specs)),
      *_common.step_stages(learning_rate, weight_decay))
  return _common.assemble_with_adamw(
      matrix, router, check_finite, learning_rate=learning_rate,
      adam_learning_rate=adam_learning_rate, rms_matched=False,
      matrix_weight_decay=weight_decay)


@pytest.fixture
def toy():
  registry.register(TOY, references=('plain',), aliases={'old': 'plain'},
                    learning_rate=0.04, adam_learning_rate=2e-3)(_toy)
  try:
    yield TOY
  finally:
    registry.unregister(TOY)
  assert TOY not in orthax.recipe_names()


def test_new_recipe_builds_and_resolves_aliases(toy):
  assert toy in orthax.recipe_names()
  assert orthax.recipes.default_learning_rates(toy) == (0.04, 2e-3)
  params = {'w': jnp.ones((4, 3)), 'b': jnp.ones((3,))}
  grads = {'w': jnp.arange(12.0).reshape(4, 3), 'b': jnp.ones((3,))}
  a = run_orthax(orthax.recipe(toy, reference='old'), params, [grads])
  b = run_orthax(orthax.recipe(toy), params, [grads])
  for k in a[0]:
    np.testing.assert_array_equal(a[0][k], b[0][k])
  assert set(flat(params)) == set(a[0])
  with pytest.raises(ValueError, match=f"^{toy}: reference .*'plain'"):
    orthax.recipe(toy, reference='fancy')


def test_learning_rate_defaults_to_the_factory_default():
  registry.register(TOY)(_toy)
  try:
    assert orthax.recipes.default_learning_rates(TOY) == (0.05, None)
  finally:
    registry.unregister(TOY)


def test_trainer_configs_read_the_registry(toy):
  configs = pytest.importorskip('orthax.train.configs')
  for name, lrs in DEFAULT_LEARNING_RATES.items():
    opt = configs.optimizer(name)
    assert (opt.learning_rate, opt.adam_learning_rate) == lrs
  assert toy in configs.optimizer_names()
  assert configs.LEARNING_RATES == {**DEFAULT_LEARNING_RATES, toy: (0.04, 2e-3)}
  opt = configs.optimizer(toy)
  assert (opt.name, opt.learning_rate, opt.adam_learning_rate) == (
      toy, 0.04, 2e-3)
  assert configs.optimizer(toy, learning_rate=0.1).learning_rate == 0.1
  with pytest.raises(ValueError, match='unknown optimizer'):
    configs.optimizer('nosuch')
  with pytest.raises(TypeError):
    configs.LEARNING_RATES['nosuch'] = (1.0, None)  # read-only


def test_trainer_refuses_the_default_modes_rate_in_another_mode():
  """DCT-AdamW's registered 1.5 is per unit of the matrix side; with its
  unscaled step (reference='ista', scale='none') the trainer asks for a
  rate instead of running at 1.5."""
  pytest.importorskip('ml_collections')
  from orthax.train import configs  # pylint: disable=g-import-not-at-top
  from orthax.train import optim  # pylint: disable=g-import-not-at-top
  shape = optim.schedule_shape(10, warmup_steps=2)
  for kw in (dict(reference='ista'), dict(scale='none')):
    with pytest.raises(ValueError, match=r'its default is 0\.0085 \(AdamW '
                       r'branch 0\.0085\): set optimizer\.learning_rate'):
      optim.build(configs.optimizer('dct_adamw', **kw), shape)
    opt = configs.optimizer('dct_adamw', learning_rate=0.0085, **kw)
    _, branches = optim.build(opt, shape)
    np.testing.assert_allclose(branches['matrix'](5), 0.0085 * shape(5))
  # Its default mode, and a kwarg that keeps it, build at the default.
  for kw in (dict(), dict(scale='inverse_side'), dict(rank=0.5)):
    optim.build(configs.optimizer('dct_adamw', **kw), shape)
  # A reference mode: its reference's rates, both named.
  with pytest.raises(ValueError, match=(
      r"kwargs \{'reference': 'moonlight'\} its default is 0\.001 \(AdamW "
      r'branch 0\.001\).*learning_rate=0\.001 --config\.optimizer\.'
      r'adam_learning_rate=0\.001')):
    optim.build(configs.optimizer('muon', reference='moonlight'), shape)
  # The matrix rate set, the AdamW branch's left at the library's: refused
  # too, naming the mode's AdamW rate at that matrix rate (Keller's 0.015×).
  with pytest.raises(ValueError, match=(
      r'optimizer\.adam_learning_rate=0\.003 .* at learning_rate 0\.04 its '
      r"AdamW branch's default is 0\.0006")):
    optim.build(configs.optimizer('muon', learning_rate=0.04,
                                  reference='keller'), shape)
  opt = configs.optimizer('muon', learning_rate=1e-3, adam_learning_rate=1e-3,
                          reference='moonlight')
  _, branches = optim.build(opt, shape)
  np.testing.assert_allclose(branches['adam'](5), 1e-3 * shape(5))
  # The library mode, spelled out, and a mode without rates of its own.
  for kw in (dict(reference='orthax'), dict(reference='optax')):
    optim.build(configs.optimizer('muon', **kw), shape)


def test_trainer_builds_a_new_recipe(toy):
  pytest.importorskip('ml_collections')
  pytest.importorskip('orbax.checkpoint')
  from orthax.train import configs  # pylint: disable=g-import-not-at-top
  from orthax.train import optim  # pylint: disable=g-import-not-at-top
  from orthax.train import trainer  # pylint: disable=g-import-not-at-top
  shape = optim.schedule_shape(10, warmup_steps=2)
  opt = configs.optimizer(toy, beta=0.8)
  tx, branches = optim.build(opt, shape)
  assert sorted(branches) == ['adam', 'matrix']
  np.testing.assert_allclose(branches['matrix'](5), 0.04 * shape(5))
  np.testing.assert_allclose(branches['adam'](5), 2e-3 * shape(5))
  params = {'blocks': {'w': jnp.ones((4, 3))}, 'b': jnp.ones((3,))}
  u, _ = tx.update(params, tx.init(params), params)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(u))
  c = configs.base_config(toy)
  c.model.update(d_model=32, num_layers=2, num_heads=2, seq_len=32)
  c.data.batch_size = 8
  setup = trainer.build(c, 256, abstract=True)
  assert setup is not None
