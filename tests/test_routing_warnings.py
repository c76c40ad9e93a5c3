"""The routing warnings: a matrix view the default rules may get wrong
(Flax attention kernels read as stacks of layers, scanned stacks of
convolutions read as one; stack axes and weight layouts are
``test_routing_layouts.py``'s) and output layers sent to the matrix
branch; each names the rule that settles it."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import orthax
from orthax import MatrixSpec, Router, Rule


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


@pytest.mark.parametrize('kind', ['nnx', 'linen'])
def test_one_head_attention_is_warned_about_too(kind):
  """``num_heads=1``: query/key/value ``(32, 1, 32)`` read as a stack are
  32 one-row matrices, each normalized alone, without a word before; the
  out kernel ``(1, 32, 32)``, a stack of one, is the projection itself."""
  # pylint: disable=g-import-not-at-top
  if kind == 'nnx':
    from flax import nnx
    m = nnx.MultiHeadAttention(num_heads=1, in_features=32, decode=False,
                               rngs=nnx.Rngs(0))
    params = jax.tree.map(lambda v: v.value, nnx.state(m, nnx.Param),
                          is_leaf=lambda v: isinstance(v, nnx.Variable))
  else:
    import flax.linen as nn
    params = nn.SelfAttention(num_heads=1).init(jax.random.key(0),
                                                jnp.ones((1, 5, 32)))
  suspects = [p for p, _ in Router().attention_view_suspects(params)]
  assert sorted(p.rsplit('/', 2)[-2] for p in suspects) == [
      'key', 'query', 'value'], suspects


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


def test_a_stacked_conv_without_a_bias_is_named_by_its_stacked_norm():
  """ResNet's conv + BatchNorm has no conv bias; stacked with nnx.vmap or a
  named nn.scan, no path segment says "scan": the 5-D kernel was read as
  one convolution across the layers, silently (each layer's step 1/√L of
  its size). The norm beside it, shaped (L, out), says the module is
  stacked; a one-layer module's 1-D norm says nothing."""
  z = jnp.zeros
  tree = {'blocks': {'conv': {'kernel': z((4, 3, 3, 16, 16))},
                     'bn': {'scale': z((4, 16)), 'bias': z((4, 16))}},
          'block3d': {'conv': {'kernel': z((3, 3, 3, 16, 16))},
                      'bn': {'scale': z((16,)), 'bias': z((16,))}},
          'conv_stem': {'kernel': z((3, 3, 3, 16))}}
  suspects = dict(Router().conv_view_suspects(tree))
  assert set(suspects) == {'blocks/conv/kernel'}
  assert "'blocks/bn/bias' in the same module has shape (4, 16)" in suspects[
      'blocks/conv/kernel']
  with warnings.catch_warnings(record=True) as got:
    warnings.simplefilter('always')
    Router().labels(tree)
  assert [issubclass(w.category, orthax.MatrixViewWarning)
          for w in got] == [True]
  # Not evidence: an attention bias (heads, head_dim) beside a conv, a 1×1
  # conv (a window of 1 stacks nothing), a conv with a bias of its own.
  plain = {'attn_block': {
      'conv': {'kernel': z((1, 1, 32, 32))},
      'MultiHeadDotProductAttention_0': {'key': {'bias': z((1, 32))}},
      'norm': {'scale': z((32,))}},
           'hybrid': {'conv': {'kernel': z((3, 3, 16, 48)), 'bias': z((48,))},
                      'attn': {'key': {'bias': z((3, 16))}}},
           'mixed': {'conv': {'kernel': z((3, 3, 3, 16, 16))},
                     'attn': {'key': {'bias': z((3, 16))}}}}
  assert Router().conv_view_suspects(plain) == []


def test_a_conv_kernel_named_otherwise_is_told_the_conv_view():
  """nnx.Sequential's layers/0, a stem or a shortcut: a 4-D kernel whose
  name lacks "conv" has no default view; the error now names the conv view
  that fits it (it named no fix for anything but attention)."""
  params = {'features': {'layers': {'0': {'kernel': jnp.zeros((3, 3, 3, 16))}}}}
  with pytest.raises(ValueError, match=r"orthax\.Rule\('\^features/layers/"
                     r"0/kernel\$', \"matrix\", orthax\.MatrixSpec\.conv\(4\)\)"):
    orthax.muon().init(params)
  fixed = Router(extra_rules=[Rule('^features/layers/0/kernel$', 'matrix',
                                   MatrixSpec.conv(4))])
  orthax.muon(router=fixed).init(params)


def test_position_and_token_type_tables_are_not_the_vocabulary():
  """BERT's 512 positions made every hidden matrix with 512 outputs look
  like an output layer ("its fan-out 512 is the vocabulary size"), and the
  advice would have sent them to AdamW; only the token table is the
  vocabulary."""
  z = jnp.zeros
  emb = {'word_embeddings': {'embedding': z((1000, 64))},
         'position_embeddings': {'embedding': z((512, 64))},
         'token_type_embeddings': {'embedding': z((2, 64))}}
  tree = {'embeddings': emb, 'wpe': {'embedding': z((256, 64))},
          'pos_embed': {'embedding': z((128, 64))},
          'layer': {'intermediate': {'kernel': z((64, 512))},
                    'up': {'kernel': z((64, 256))},
                    'gate': {'kernel': z((64, 128))},
                    'pair': {'kernel': z((64, 2))},
                    'output': {'kernel': z((512, 64))},
                    'w_down': {'kernel': z((256, 64))}},  # the last matrix
          'decoder': {'kernel': z((64, 1000))}}
  suspects = dict(Router().output_layer_suspects(tree))
  assert list(suspects) == ['decoder/kernel'], suspects
  assert 'vocabulary' in suspects['decoder/kernel']


def test_scanned_attention_error_names_the_rule_that_views_it():
  """``nn.scan`` over Flax attention gives 4-D kernels, which no default
  rule views: the error named no spec. It now names the rules, for the
  projections in and the one out at once (the out kernel was the next
  error), and the router they make (evaluated from either message) views
  one matrix per layer."""
  z = jnp.zeros
  tree = {'ScanBlock_0': {'attn': {'query': {'kernel': z((3, 16, 4, 4))},
                                   'out': {'kernel': z((3, 4, 4, 16))}}}}
  routers = []
  for path in ('query', 'out'):
    with pytest.raises(ValueError, match='scanned Flax attention') as e:
      Router().route_one(f'ScanBlock_0/attn/{path}/kernel',
                         tree['ScanBlock_0']['attn'][path]['kernel'].shape)
    text = str(e.value)
    routers.append(eval(text[text.index('orthax.Router('):-1],  # pylint: disable=eval-used
                        {'orthax': orthax}))
  assert routers[0].rules == routers[1].rules
  router = routers[0]
  assert router.route_one('a/query/kernel', (3, 16, 4, 4)).spec.matrix_shape(
      (3, 16, 4, 4)) == (3, 16, 16)
  assert router.route_one('a/out/kernel', (3, 4, 4, 16)).spec.matrix_shape(
      (3, 4, 4, 16)) == (3, 16, 16)
  orthax.muon(router=router).init(tree)  # every leaf has a view


def test_a_head_after_a_scanned_stack_is_warned_about():
  """Linen's ``nn.scan`` names its stack ``ScanBlock_0``, which sorts after
  the head ``Dense_1`` in path order: the last matrix was the 3-D stack,
  and the head (16 → 10 classes, outputs no matrix reads) went to the
  matrix branch unwarned, where the same model unscanned is warned."""
  z = jnp.zeros
  tree = {'Dense_0': {'kernel': z((8, 16))},
          'ScanBlock_0': {'Dense_0': {'kernel': z((3, 16, 64))},
                          'Dense_1': {'kernel': z((3, 64, 16))}},
          'Dense_1': {'kernel': z((16, 10))}}
  suspects = dict(Router().output_layer_suspects(tree))
  assert list(suspects) == ['Dense_1/kernel'], suspects
  assert 'feed no other matrix' in suspects['Dense_1/kernel']
  # Its outputs read by a matrix of the stack: not an output layer.
  tree['Dense_1'] = {'kernel': z((16, 64))}
  assert Router().output_layer_suspects(tree) == []


@pytest.mark.parametrize('shape, matrices', [((3, 16, 32), (3, 16, 32)),
                                             ((2, 3, 16, 32), (6, 16, 32))])
def test_the_spec_a_missing_view_names_views_the_stacked_matrices(shape,
                                                                  matrices):
  """A leaf of 3 or more axes without a view: the error's example spec,
  evaluated, views its last two axes as the matrices. For 4-D it named
  ``MatrixSpec.stacked(0)``, which on ``(2, 3, 16, 32)`` views 64
  matrices of 3×16 without an error."""
  x = {'experts': jnp.ones(shape)}
  tx = orthax.orthogonalize()
  with pytest.raises(ValueError, match="leaf 'experts' has shape") as e:
    tx.update(x, tx.init(x))
  text = str(e.value)
  start = text.index('orthax.MatrixSpec')
  spec = eval(text[start:text.index(' for ', start)])  # pylint: disable=eval-used
  assert spec.matrix_shape(shape) == matrices
  with pytest.raises(ValueError, match='is no matrix: route it'):
    tx.update({'b': jnp.ones(4)}, tx.init({'b': jnp.ones(4)}))


def test_a_tree_of_low_rank_adapters_has_no_output_layer():
  """Fine-tuning adapters alone (nnx.Optimizer(model, tx,
  wrt=nnx.LoRAParam)): the last lora_b's outputs feed no other matrix of
  the tree, which made it look like an output layer, wrongly."""
  z = jnp.zeros
  tree = {'l1': {'lora': {'lora_a': z((16, 4)), 'lora_b': z((4, 32))}},
          'l2': {'lora': {'lora_a': z((32, 4)), 'lora_b': z((4, 8))}}}
  assert Router().output_layer_suspects(tree) == []
  # A classifier head after them is still found.
  tree['proj'] = {'kernel': z((32, 10))}
  assert [p for p, _ in Router().output_layer_suspects(tree)] == [
      'proj/kernel']


def test_a_five_axis_kernel_named_otherwise_is_told_both_readings():
  params = {'layers': {'0': {'kernel': jnp.zeros((4, 3, 3, 16, 32))}}}
  with pytest.raises(ValueError) as e:
    orthax.muon().init(params)
  assert 'orthax.MatrixSpec.conv(5)' in str(e.value)
  assert 'orthax.MatrixSpec(fan_in=(1, 2, 3), fan_out=4)' in str(e.value)
