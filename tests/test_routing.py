"""Routing rules and the errors bad inputs produce (the warnings:
tests/test_routing_warnings.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import orthax
from orthax import MatrixSpec, Router, Rule


def linen_like_tree():
  z = jnp.zeros
  return {
      'params': {
          'wte': {'embedding': z((50, 16))},
          'wpe': {'embedding': z((8, 16))},
          'h_0': {'ln_1': {'scale': z(16), 'bias': z(16)},
                  'attn': {'c_attn': {'kernel': z((16, 48)), 'bias': z(48)}},
                  'mlp': {'c_fc': {'kernel': z((16, 64))},
                          'c_proj': {'kernel': z((64, 16))}}},
          'blocks': {'mlp': {'kernel': z((4, 16, 64)), 'bias': z((4, 64))},
                     'norm': {'scale': z((4, 16))}},
          'conv1': {'kernel': z((3, 3, 4, 8))},
          # linen's own names for nn.Conv / nn.ConvTranspose (1-D and 3-D).
          'Conv_0': {'kernel': z((3, 4, 8))},
          'ConvTranspose_0': {'kernel': z((2, 2, 2, 8, 4))},
          'ln_f': {'scale': z(16)},
          'lm_head': {'kernel': z((16, 50))},
      }
  }


EXPECTED = {
    'params/wte/embedding': ('adam', None),
    'params/wpe/embedding': ('adam', None),
    'params/h_0/ln_1/scale': ('adam', None),
    'params/h_0/ln_1/bias': ('adam', None),
    'params/h_0/attn/c_attn/kernel': ('matrix', (1, 16, 48)),
    'params/h_0/attn/c_attn/bias': ('adam', None),
    'params/h_0/mlp/c_fc/kernel': ('matrix', (1, 16, 64)),
    'params/h_0/mlp/c_proj/kernel': ('matrix', (1, 64, 16)),
    'params/blocks/mlp/kernel': ('matrix', (4, 16, 64)),
    'params/blocks/mlp/bias': ('adam', None),       # 2-D: optax sends it to Muon
    'params/blocks/norm/scale': ('adam', None),     # 2-D: optax sends it to Muon
    'params/conv1/kernel': ('matrix', (1, 36, 8)),
    'params/Conv_0/kernel': ('matrix', (1, 12, 8)),  # not 3 stacked 4×8
    'params/ConvTranspose_0/kernel': ('matrix', (1, 64, 4)),
    'params/ln_f/scale': ('adam', None),
    'params/lm_head/kernel': ('adam', None),
}


def test_default_rules_route_linen_names():
  tree = linen_like_tree()
  routes = Router().routes(tree)
  flat = {orthax._tree.path_str(p): r for p, r in
          jax.tree_util.tree_flatten_with_path(
              routes, is_leaf=lambda r: isinstance(r, orthax.routing.Route))[0]}
  leaves = {orthax._tree.path_str(p): x for p, x in
            jax.tree_util.tree_flatten_with_path(tree)[0]}
  assert set(flat) == set(EXPECTED)
  for path, (label, view) in EXPECTED.items():
    r = flat[path]
    assert r.label == label, path
    if view is not None:
      assert r.spec.matrix_shape(leaves[path].shape) == view, path


def test_describe_prints_every_leaf(capsys):
  table = orthax.describe(linen_like_tree())
  out = capsys.readouterr().out
  assert table in out
  for path, (label, view) in EXPECTED.items():
    line = next(l for l in table.splitlines() if l.startswith(path + ' '))
    assert label in line
    if view:
      assert ' x '.join(map(str, view)) in line


def test_extra_rules_take_precedence():
  tree = linen_like_tree()
  r = Router(extra_rules=[Rule('lm_head', 'matrix'), Rule('wpe', 'frozen')])
  labels = r.labels(tree)['params']
  assert labels['lm_head']['kernel'] == 'matrix'
  assert labels['wpe']['embedding'] == 'frozen'


def test_max_side_sends_large_matrices_to_adam():
  """A matrix view with a side >= max_side goes to 'adam', named by the
  limit; smaller ones and the other labels are unchanged."""
  tree = linen_like_tree()
  r = Router(max_side=64)
  routes = {k: r.route(k, v.shape) for k, v in
            ((orthax._tree.path_str(p), x) for p, x in
             jax.tree_util.tree_flatten_with_path(tree)[0])}
  for path, (label, view) in EXPECTED.items():
    big = view is not None and max(view[1:]) >= 64
    assert routes[path].label == ('adam' if big else label), path
    if big:
      assert routes[path].rule == 'max_side=64' and routes[path].spec is None
  assert routes['params/h_0/attn/c_attn/kernel'].label == 'matrix'  # 48
  # The output-layer check sees only the matrices left: c_attn is now the
  # last, and nothing consumes its 48 outputs; with conv1 alone, no check.
  assert Router().output_layer_suspects(tree) == []
  assert [p for p, _ in r.output_layer_suspects(tree)] == [
      'params/h_0/attn/c_attn/kernel']
  assert Router(max_side=48).output_layer_suspects(tree) == []
  assert Router(max_side=np.int64(64)).max_side == 64
  # with_max_side: a copy with the smaller limit.
  assert r.with_max_side(48).max_side == 48 and r.max_side == 64
  assert r.with_max_side(128).max_side == 64
  assert Router().with_max_side(32).max_side == 32
  for bad in (0, True, 2.5):
    with pytest.raises(ValueError, match='max_side must be a positive int'):
      Router(max_side=bad)
    with pytest.raises(ValueError, match='max_side must be a positive int'):
      r.with_max_side(bad)


def test_max_side_holds_for_router_subclasses():
  """The limit applies to a subclass's own route_one, and a subclass that
  does not call Router.__init__ routes without one."""
  class EveryKernelIsAMatrix(Router):
    def route_one(self, path, shape):
      if path.endswith('kernel') and len(shape) == 2:
        return orthax.routing.Route('matrix', MatrixSpec(), 'kernel')
      return super().route_one(path, shape)

  class RulesOnly(Router):
    def __init__(self):  # pylint: disable=super-init-not-called
      self.rules = orthax.routing.DEFAULT_RULES

  tree = {'head': {'kernel': jnp.zeros((16, 64))},
          'mlp': {'kernel': jnp.zeros((16, 32))}}
  r = EveryKernelIsAMatrix(max_side=64)
  assert r.labels(tree) == {'head': {'kernel': 'adam'},
                            'mlp': {'kernel': 'matrix'}}
  assert EveryKernelIsAMatrix().labels(tree)['head']['kernel'] == 'matrix'
  assert RulesOnly().labels(tree) == {'head': {'kernel': 'adam'},
                                      'mlp': {'kernel': 'matrix'}}


@pytest.mark.parametrize('name', orthax.recipe_names())
def test_frozen_leaves_get_zero_updates(name):
  """Every recipe, SPECTRA included (no AdamW branch: it stepped frozen
  leaves before)."""
  rng = np.random.default_rng(0)
  params = {'a': {'kernel': jnp.asarray(rng.standard_normal((4, 8)))},
            'emb': {'embedding': jnp.ones((5, 4))}}
  grads = jax.tree.map(lambda x: jnp.asarray(
      rng.standard_normal(x.shape), x.dtype), params)
  tx = orthax.recipe(name, router=Router(extra_rules=[Rule('emb', 'frozen')]))
  u, _ = tx.update(grads, tx.init(params), params)
  assert np.all(np.asarray(u['emb']['embedding']) == 0)
  assert np.any(np.asarray(u['a']['kernel']) != 0)
  assert orthax.recipes.recipe_routing(tx).learning_rates['frozen'] == 0


def test_spectra_frozen_leaf_leaves_the_others_alone():
  params = {'a': {'kernel': jnp.arange(32.).reshape(4, 8) / 32},
            'emb': {'embedding': jnp.ones((5, 4))}}
  grads = jax.tree.map(lambda x: jnp.cos(x + 1.0), params)
  rules = [Rule('emb', 'frozen')]
  tx, plain = (orthax.spectra(router=Router(extra_rules=r))
               for r in (rules, []))
  u, _ = tx.update(grads, tx.init(params), params)
  v, _ = plain.update(grads, plain.init(params), params)
  np.testing.assert_array_equal(np.asarray(u['a']['kernel']),
                                np.asarray(v['a']['kernel']))
  assert np.any(np.asarray(v['emb']['embedding']) != 0)


def test_trailing_value_is_stripped():
  from flax import nnx
  p = nnx.Param(jnp.zeros((4, 8)))
  flat = jax.tree_util.tree_flatten_with_path({'lin': {'kernel': p}})[0]
  assert orthax._tree.path_str(flat[0][0]) == 'lin/kernel'


# Bad inputs --------------------------------------------------------------------


def test_unroutable_leaf_names_its_path():
  r = Router(rules=[Rule(r'kernel$', 'matrix')])
  with pytest.raises(ValueError, match="'layer/bias'"):
    r.labels({'layer': {'kernel': jnp.zeros((2, 2)), 'bias': jnp.zeros(2)}})


def test_4d_kernel_without_view_names_its_path():
  params = {'blocks': {'experts': {'kernel': jnp.zeros((2, 3, 4, 5))}}}
  with pytest.raises(ValueError, match="'blocks/experts/kernel'.*no default"):
    orthax.muon(0.1).init(params)
  # …and a rule with a view fixes it.
  r = Router(extra_rules=[Rule('experts/kernel', 'matrix',
                              MatrixSpec((-2,), (-1,)))])
  tx = orthax.muon(0.1, router=r)
  u, _ = tx.update(params, tx.init(params), params)
  assert u['blocks']['experts']['kernel'].shape == (2, 3, 4, 5)


def test_orthogonalize_3d_leaf_without_spec_names_its_path():
  tx = orthax.orthogonalize()
  g = {'layers': {'w': jnp.ones((2, 3, 4))}}
  with pytest.raises(ValueError, match="'layers/w'.*only 2-D"):
    tx.update(g, tx.init(g))


def test_spec_that_does_not_fit_names_its_path():
  tx = orthax.orthogonalize(matrix_specs=MatrixSpec((0,), (3,)))
  with pytest.raises(ValueError, match="'w'"):
    tx.update({'w': jnp.ones((2, 3))}, None)


def test_bad_rule_label():
  with pytest.raises(ValueError, match='label'):
    Rule('x', 'sgd')


def test_unknown_preset_fails_at_construction():
  with pytest.raises(ValueError, match='Unknown Newton–Schulz preset'):
    orthax.orthogonalize('jordan2')
  with pytest.raises(ValueError, match='Unknown Newton–Schulz preset'):
    orthax.muon(0.1, preset='polarexpress')
  with pytest.raises(ValueError, match='^recipe: name must be a registered '
                     'recipe'):
    orthax.recipe('adamuon')


def test_non_finite_check_can_be_disabled():
  params = {'k': jnp.ones((4, 8))}
  tx = orthax.muon(0.1, check_finite=False)
  u, _ = tx.update({'k': jnp.full((4, 8), jnp.nan)}, tx.init(params), params)
  assert np.all(np.isnan(np.asarray(u['k'])))  # documented: NaN propagates


def test_zero_gradient_gives_zero_update():
  params = {'k': jnp.ones((4, 8)), 's': {'kernel': jnp.ones((2, 4, 8))},
            'bias': jnp.ones(8)}
  for preset in orthax.polar.preset_names():
    tx = orthax.muon(0.1, preset=preset, weight_decay=0.0)
    u, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params),
                              tx.init(params), params)
    for leaf in jax.tree.leaves(u):
      assert np.all(np.asarray(leaf) == 0), preset


# -- Flax attention kernels ----------------------------------------------------

def test_rule_and_router_arguments_are_checked_when_built():
  """Each used to pass construction and fail later (or never): ndims=3 in
  iteration, spec=(0, 1) at the first route, rules='w' as a rule per
  character, one Rule for extra_rules in iteration."""
  assert Rule('w', 'matrix', ndims=3).ndims == (3,)
  assert Rule('w', 'matrix', ndims=[np.int64(2), 3]).ndims == (2, 3)
  for bad in ('3', 2.0, [2, None]):
    with pytest.raises(TypeError, match="^Rule: ndims must be .*'w'"):
      Rule('w', 'matrix', ndims=bad)
  with pytest.raises(TypeError, match='^Rule: spec must be an '
                     "orthax.MatrixSpec.*'w'"):
    Rule('w', 'matrix', spec=(0, 1))
  with pytest.raises(ValueError, match="^Rule: spec is for label 'matrix'"):
    Rule('w', 'adam', spec=MatrixSpec())
  with pytest.raises(TypeError, match='Router: rules must be a sequence of '
                     'orthax.Rule'):
    Router(rules='w')
  with pytest.raises(TypeError, match=r'extra_rules .*\(wrap it in a list\)'):
    Router(extra_rules=Rule('w', 'adam'))
  with pytest.raises(TypeError, match='must hold orthax.Rule objects'):
    Router(extra_rules=[Rule('w', 'adam'), ('b', 'adam')])
  with pytest.raises(ValueError, match='orthogonalize: normalizer must be '
                     "one of .*got 'frobenious'"):
    orthax.orthogonalize(normalizer='frobenious')


def test_spectra_honours_a_labels_callable_router():
  """SPECTRA took a labels callable and clipped every 2-D leaf whatever
  its label ('adam' included), and let a mistyped label pass."""
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.standard_normal((8, 16)), jnp.float32),
            'v': jnp.asarray(rng.standard_normal((8, 16)), jnp.float32),
            'b': jnp.zeros(16)}
  grads = jax.tree.map(lambda p: 10 * jnp.ones_like(p) + p, params)

  def step(router):
    tx = orthax.spectra(router=router)
    return tx.update(grads, tx.init(params), params)[0]

  label = {'w': 'adam', 'v': 'matrix', 'b': 'adam'}
  got = step(lambda p: {k: label[k] for k in p})
  want = step(orthax.Router(extra_rules=[orthax.Rule('^w$', 'adam')]))
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)
  clipped = step(orthax.Router())
  assert not np.allclose(got['w'], clipped['w'])  # the label mattered
  frozen = step(lambda p: dict(label, w='frozen'))
  assert not np.any(np.asarray(frozen['w']))
  with pytest.raises(ValueError, match="^spectra: the router labels 'v' "
                     "'matrx'; the labels are"):
    step(lambda p: dict(label, v='matrx'))


@pytest.mark.parametrize('recipe', ['muon', 'namo', 'lanton', 'dct_adamw'])
def test_a_labels_callable_is_checked_naming_the_recipe_leaf_and_label(
    recipe):
  """A ``params -> labels`` router with an unknown label, or not shaped
  like the parameters, met optax's "Some parameters have no corresponding
  transformation" or a bare pytree structure error. A label for a whole
  subtree works, as in optax.partition."""
  params = {'blk': {'kernel': jnp.ones((8, 16)), 'bias': jnp.ones(16)}}
  make = getattr(orthax, recipe)
  bad = [(lambda p: jax.tree.map(lambda _: 'adamw', p),
          rf"^{recipe}: router labelled leaf 'blk/bias' as 'adamw'; the "
          r"labels are \('matrix', 'adam', 'frozen'"),
         (lambda p: None, rf'^{recipe}: router returned labels not shaped '
          r'like the parameters')]
  for router, message in bad:
    tx = make(0.01, router=router)
    with pytest.raises(ValueError, match=message):
      tx.init(params)
  updates = []
  for router in (lambda p: {'blk': 'adam'},
                 lambda p: jax.tree.map(lambda _: 'adam', p)):
    tx = make(0.01, router=router)
    updates.append(tx.update(params, tx.init(params), params)[0])
  for a, b in zip(jax.tree.leaves(updates[0]), jax.tree.leaves(updates[1])):
    np.testing.assert_array_equal(a, b)
