"""Routing rules and the errors bad inputs produce."""

import warnings

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
  with pytest.raises(ValueError, match='Unknown recipe'):
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

FLAX_ATTENTION_RULES = [
    Rule(r'(^|/)(query|key|value)/kernel$', 'matrix',
         MatrixSpec(fan_in=0, fan_out=(1, 2))),
    Rule(r'(^|/)out/kernel$', 'matrix', MatrixSpec(fan_in=(0, 1), fan_out=2)),
]


def _flax_attention_params(kind, qkv_features=32):
  """Flax attention over 32 features with 4 heads of ``qkv_features/4``."""
  # pylint: disable=g-import-not-at-top
  if kind == 'nnx':
    from flax import nnx
    m = nnx.MultiHeadAttention(num_heads=4, in_features=32,
                               qkv_features=qkv_features, decode=False,
                               rngs=nnx.Rngs(0))
    return jax.tree.map(lambda v: v.value, nnx.state(m, nnx.Param),
                        is_leaf=lambda v: isinstance(v, nnx.Variable))
  import flax.linen as nn
  return nn.SelfAttention(num_heads=4, qkv_features=qkv_features).init(
      jax.random.key(0), jnp.ones((1, 5, 32)))


@pytest.mark.parametrize('qkv_features', [32, 64])
@pytest.mark.parametrize('kind', ['nnx', 'linen'])
def test_flax_attention_kernels_are_warned_about_and_the_rule_fixes_them(
    kind, qkv_features):
  """Flax's attention kernels ``(features, heads, head_dim)`` and
  ``(heads, head_dim, features)``: the default 3-D rule reads them as a
  stack of layers (each input row orthogonalized alone), without a word
  before. Now each is warned about, naming the rule that views the whole
  projection; with it, the step is Muon's on the 32×``qkv_features``
  projection (``qkv_features`` 64: heads·head_dim is not the features,
  known from the query and out kernels agreeing)."""
  params = _flax_attention_params(kind, qkv_features)
  with pytest.warns(orthax.MatrixViewWarning) as record:
    orthax.muon().init(params)
  warned = sorted(str(w.message).split("'")[1] for w in record
                  if issubclass(w.category, orthax.MatrixViewWarning))
  assert [p.rsplit('/', 2)[-2] for p in warned] == [
      'key', 'out', 'query', 'value'], warned
  assert any("orthax.Rule('(^|/)(query|key|value)/kernel$', \"matrix\", "
             'orthax.MatrixSpec(fan_in=0, fan_out=(1, 2)))' in str(w.message)
             for w in record)
  router = Router(extra_rules=FLAX_ATTENTION_RULES)
  with warnings.catch_warnings():
    warnings.simplefilter('error', orthax.MatrixViewWarning)
    tx = orthax.muon(router=router, weight_decay=0.0)
    state = tx.init(params)
  grads = jax.tree.map(
      lambda x: jnp.asarray(np.random.default_rng(x.size).standard_normal(
          x.shape), x.dtype), params)
  updates, _ = tx.update(grads, state, params)
  flat = dict((orthax._tree.path_str(p), x) for p, x in  # pylint: disable=protected-access
              jax.tree_util.tree_flatten_with_path(updates)[0])
  gflat = dict((orthax._tree.path_str(p), x) for p, x in  # pylint: disable=protected-access
               jax.tree_util.tree_flatten_with_path(grads)[0])
  ref_tx = orthax.muon(weight_decay=0.0)  # its params are not the same
  for path in warned:
    out = path.split('/')[-2] == 'out'
    shape = (qkv_features, 32) if out else (32, qkv_features)
    g = gflat[path].reshape(shape)
    ref, _ = ref_tx.update({'w': g}, ref_tx.init({'w': g}), {'w': g})
    np.testing.assert_allclose(flat[path].reshape(shape), ref['w'],
                               rtol=1e-5, atol=1e-6)


def test_stacked_gpt_kernels_are_not_warned_about():
  """The trainer's GPT stacks its layers: ``attn/query/kernel`` is
  ``(L, d, d)``, a stack, for any L (one layer: both views are one
  matrix)."""
  z = jnp.zeros
  for layers in (1, 2, 4, 12, 32):  # 32: a cube (32, 32, 32)
    tree = {'blocks': {'attn': {n: {'kernel': z((layers, 32, 32))}
                                for n in ('query', 'key', 'value', 'out')}}}
    assert Router().attention_view_suspects(tree) == []


def test_routing_warnings_are_shown_once_per_message():
  """``optax.partition`` labels the tree at ``init`` and again at each
  ``update``; under Python's default filter each warning showed at both."""
  params = dict(_flax_attention_params('linen', 32)['params'],
                embed={'embedding': jnp.zeros((10, 32))},
                decoder={'kernel': jnp.zeros((32, 10))})  # fan-out: vocab
  grads = jax.tree.map(jnp.ones_like, params)
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter('default')
    tx = orthax.muon()
    state = tx.init(params)
    for _ in range(2):
      _, state = tx.update(grads, state, params)
  messages = [str(w.message) for w in record
              if issubclass(w.category, (orthax.OutputLayerWarning,
                                         orthax.MatrixViewWarning))]
  assert len(messages) == len(set(messages)), messages
  kinds = {w.category for w in record}
  assert {orthax.OutputLayerWarning, orthax.MatrixViewWarning} <= kinds, kinds


def test_rule_and_router_arguments_are_checked_when_built():
  """Each used to pass construction and fail later (or never): ndims=3 in
  iteration, spec=(0, 1) at the first route, rules='w' as a rule per
  character, one Rule for extra_rules in iteration."""
  assert Rule('w', 'matrix', ndims=3).ndims == (3,)
  assert Rule('w', 'matrix', ndims=[np.int64(2), 3]).ndims == (2, 3)
  for bad in ('3', 2.0, [2, None]):
    with pytest.raises(TypeError, match="Rule 'w': ndims must be"):
      Rule('w', 'matrix', ndims=bad)
  with pytest.raises(TypeError, match="Rule 'w': spec must be an "
                     'orthax.MatrixSpec'):
    Rule('w', 'matrix', spec=(0, 1))
  with pytest.raises(ValueError, match="a spec is for label 'matrix'"):
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


def test_scanned_conv_stacks_are_warned_about_with_a_rule_that_fixes_them():
  """A stack of L convolutions (L, *window, in, out) has the shape of one
  convolution with a window of one more dimension: the default conv rule
  read it as one matrix across all layers, silently. A bias shaped
  (L, out) beside it, or a scanned module on its path, is evidence
  enough to warn, naming the rule for each reading."""
  z = jnp.zeros
  tree = {'blocks': {'conv': {'kernel': z((6, 3, 3, 8, 8)),
                              'bias': z((6, 8))}},
          'ScanBlock_0': {'Conv_0': {'kernel': z((4, 3, 3, 8, 8))}},
          'conv3d': {'kernel': z((3, 3, 3, 8, 8)), 'bias': z((8,))},
          'stem': {'conv': {'kernel': z((3, 3, 4, 8))}}}
  suspects = dict(Router().conv_view_suspects(tree))
  assert set(suspects) == {'blocks/conv/kernel', 'ScanBlock_0/Conv_0/kernel'}
  assert "its bias 'blocks/conv/bias' has shape (6, 8)" in suspects[
      'blocks/conv/kernel']
  with warnings.catch_warnings(record=True) as got:
    warnings.simplefilter('always')
    Router().labels(tree)
  assert sum(issubclass(w.category, orthax.MatrixViewWarning)
             for w in got) == 2
  # The rule the message gives reads six 72×8 matrices, and is quiet.
  fix = Rule('^blocks/conv/kernel$', 'matrix',
             MatrixSpec(fan_in=(1, 2, 3), fan_out=4))
  assert "MatrixSpec(fan_in=(1, 2, 3), fan_out=4)" in suspects[
      'blocks/conv/kernel']
  r = Router(extra_rules=[fix])
  assert r.route('blocks/conv/kernel', (6, 3, 3, 8, 8)).spec.matrix_shape(
      (6, 3, 3, 8, 8)) == (6, 72, 8)
  assert 'blocks/conv/kernel' not in dict(r.conv_view_suspects(tree))
  assert 'note: parameter' in Router().describe(tree)
