"""Routing of stacks and layouts: which axis of a 3-D kernel stacks the
layers (a bias of one layer's shape, a bias or neighbours stacked on the
middle axis), PyTorch's and Equinox's ``(out, in)`` weights, and the
default rules for stacked biases, short embedding names and learned
tokens; each warning names the rule that settles it."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import orthax
from orthax import MatrixSpec, Router, Rule


def test_a_3d_kernel_with_one_layers_bias_is_warned_about():
  """A 1-D convolution whose name lacks "conv" (an NNX attribute
  ``mixer``) was read as a stack of its window's taps, each orthogonalized
  on its own, silently. A bias shaped ``(out,)`` beside it says one layer:
  it is warned about, and the rule named makes it one matrix."""
  z = jnp.zeros
  tree = {'mixer': {'kernel': z((5, 8, 8)), 'bias': z((8,))},
          'stack': {'kernel': z((4, 8, 8)), 'bias': z((4, 8))},  # L layers
          'nobias': {'kernel': z((4, 8, 8))},
          'conv1d': {'kernel': z((5, 8, 8)), 'bias': z((8,))}}  # conv rule
  suspects = dict(Router().stack_view_suspects(tree))
  assert list(suspects) == ['mixer/kernel'], suspects
  message = suspects['mixer/kernel']
  assert "its bias 'mixer/bias' has shape (8,)" in message
  assert 'orthax.MatrixSpec.conv(3)' in message
  router = Router(extra_rules=[Rule('^mixer/kernel$', 'matrix',
                                    MatrixSpec.conv(3))])
  assert router.stack_view_suspects(tree) == []
  assert router.route_one('mixer/kernel', (5, 8, 8)).spec.matrix_shape(
      (5, 8, 8)) == (1, 40, 8)
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter('always')
    orthax.muon().init(tree)
  assert any('mixer/kernel' in str(w.message) for w in record
             if issubclass(w.category, orthax.MatrixViewWarning))


def test_a_stack_on_the_middle_axis_is_warned_about():
  """Linen's ``nn.scan(variable_axes={'params': 1})`` stacks a Dense
  kernel as ``(in, L, out)`` and its bias as ``(out, L)``: the 3-D rule
  read ``in`` matrices of ``L x out``, silently. The bias is evidence: it
  is warned about, and the rule named makes ``L`` matrices of
  ``in x out``."""
  nn = pytest.importorskip('flax.linen')

  class Block(nn.Module):

    @nn.compact
    def __call__(self, x, _):
      return nn.Dense(16)(x), None

  scan = nn.scan(Block, variable_axes={'params': 1},
                 split_rngs={'params': True}, length=3)
  tree = scan().init(jax.random.key(0), jnp.ones((2, 16)), None)['params']
  kernel = tree['Dense_0']['kernel']
  assert kernel.shape == (16, 3, 16)
  suspects = dict(Router().stack_view_suspects(tree))
  assert list(suspects) == ['Dense_0/kernel'], suspects
  message = suspects['Dense_0/kernel']
  assert "its bias 'Dense_0/bias' has shape (16, 3)" in message
  assert 'orthax.MatrixSpec.stacked(1)' in message
  router = Router(extra_rules=[Rule('^Dense_0/kernel$', 'matrix',
                                    MatrixSpec.stacked(1))])
  assert router.stack_view_suspects(tree) == []
  assert router.route('Dense_0/kernel', kernel.shape).spec.matrix_shape(
      kernel.shape) == (3, 16, 16)
  # A stack on the leading axis ((L, out) bias) and a cube are not warned.
  z = jnp.zeros
  quiet = {'lead': {'kernel': z((3, 16, 8)), 'bias': z((3, 8))},
           'cube': {'kernel': z((4, 4, 4)), 'bias': z((4, 4))}}
  assert Router().stack_view_suspects(quiet) == []


def test_a_bias_free_stack_on_the_middle_axis_is_named_by_its_neighbours():
  """Without biases (MaxText's ``param_scan_axis=1``; linen's ``nn.scan``
  over bias-free Dense layers), the kernels of the scanned module sharing
  their middle axis and not their leading one, and its norms ending with
  it, are the evidence. Before, nothing was said, and each "matrix" mixed
  the stacked layers (layer 0's update moved by 0.69 when only the other
  layers' gradients changed)."""
  nn = pytest.importorskip('flax.linen')

  class Block(nn.Module):

    @nn.compact
    def __call__(self, x, _):
      h = nn.Dense(64, use_bias=False)(nn.LayerNorm()(x))
      return x + nn.Dense(16, use_bias=False)(h), None

  scan = nn.scan(Block, variable_axes={'params': 1},
                 split_rngs={'params': True}, length=4)
  tree = {'layers': scan().init(jax.random.key(0), jnp.ones((2, 16)),
                                None)['params']}
  suspects = dict(Router().stack_view_suspects(tree))
  assert sorted(suspects) == ['layers/Dense_0/kernel', 'layers/Dense_1/kernel']
  message = suspects['layers/Dense_0/kernel']
  assert ("the 2 3-D kernels under 'layers/' share their middle axis, 4, "
          'not their leading one, and its 2 2-D norm scales and biases end '
          'with it') in message
  assert 'orthax.MatrixSpec.stacked(1)' in message
  # MaxText's layout: the norms sit beside the MLP module, the kernels
  # alone decide.
  z = jnp.zeros
  maxtext = {'decoder': {'layers': {
      'mlp': {'wi_0': {'kernel': z((16, 4, 64))},
              'wo': {'kernel': z((64, 4, 16))}},
      'pre_norm': {'scale': z((16, 4))}}}}
  assert sorted(dict(Router().stack_view_suspects(maxtext))) == [
      'decoder/layers/mlp/wi_0/kernel', 'decoder/layers/mlp/wo/kernel']
  # Leading-axis stacks (nnx.vmap, nn.scan over axis 0) say nothing, nor
  # does a module where both readings fit or neither does.
  quiet = {
      'lead': {'fc1': {'kernel': z((4, 16, 64))},
               'fc2': {'kernel': z((4, 64, 16))},
               'ln': {'scale': z((4, 16))}},
      'one': {'fc': {'kernel': z((4, 16, 16))}, 'ln': {'scale': z((4, 16))}},
      'mixed': {'a': {'kernel': z((4, 8, 16))}, 'b': {'kernel': z((6, 5, 8))}},
  }
  assert Router().stack_view_suspects(quiet) == []
  # A scan's parameters at the top of the tree are found too; stacks of
  # other depths side by side, each fitting both readings, are left alone
  # however deep the tree wraps them.
  top = {'Dense_0': {'kernel': z((16, 4, 64))},
         'Dense_1': {'kernel': z((64, 4, 16))},
         'LayerNorm_0': {'scale': z((16, 4))}}
  assert sorted(dict(Router().stack_view_suspects(top))) == [
      'Dense_0/kernel', 'Dense_1/kernel']
  depths = {'params': {
      'encoder': {'fc': {'kernel': z((6, 32, 32))},
                  'ln': {'scale': z((6, 32))}},
      'decoder': {'fc': {'kernel': z((4, 32, 32))},
                  'ln': {'scale': z((4, 32))}}}}
  assert Router().stack_view_suspects(depths) == []


def test_a_pytorch_layout_weight_is_warned_about():
  """Equinox's and PyTorch's ``weight`` is ``(out, in)``, its bias
  ``(out,)``: read as Flax's ``(in, out)`` the shape scale and NorMuon's
  per-neuron statistics were taken on the wrong sides, silently (NorMuon's
  per-output RMS spread 78× instead of 1×). The bias is evidence; the
  rule named views the weight as ``(out, in)``."""
  z = jnp.zeros
  tree = {'layers': {'0': {'weight': z((64, 16)), 'bias': z(64)},
                     '2': {'weight': z((16, 64)), 'bias': z(16)}},
          'stack': {'weight': z((3, 32, 8)), 'bias': z((3, 32))}}
  suspects = dict(Router().layout_view_suspects(tree))
  assert sorted(suspects) == ['layers/0/weight', 'layers/2/weight',
                              'stack/weight']
  message = suspects['layers/0/weight']
  assert ("its bias 'layers/0/bias' has 64 outputs, the size of its first "
          'matrix axis') in message
  assert 'orthax.MatrixSpec.torch_linear()' in message
  with pytest.warns(orthax.MatrixViewWarning, match='PyTorch or Equinox'):
    Router().labels(tree)
  router = Router(layout='torch')
  assert router.layout_view_suspects(tree) == []
  assert router.route('layers/0/weight', (64, 16)).spec.matrix_shape(
      (64, 16)) == (1, 16, 64)
  assert router.route('stack/weight', (3, 32, 8)).spec.matrix_shape(
      (3, 32, 8)) == (3, 8, 32)
  assert router.route('layers/0/bias', (64,)).label == 'adam'
  with pytest.raises(ValueError, match="Router: layout must be one of "
                     r"\('flax', 'torch'\), got 'pytorch'"):
    Router(layout='pytorch')
  # NorMuon then steps the (out, in) weight as it steps its transpose, the
  # Flax kernel, in Flax's view (its per-neuron statistics on the outputs).
  g = {'w': jax.random.normal(jax.random.key(0), (64, 16))}
  tx = orthax.normuon(router=router)
  u, _ = tx.update(g, tx.init(g), g)
  gt = {'w': g['w'].T}
  flax_tx = orthax.normuon()
  ut, _ = flax_tx.update(gt, flax_tx.init(gt), gt)
  np.testing.assert_allclose(u['w'], ut['w'].T, rtol=1e-5, atol=1e-7)
  wrong, _ = flax_tx.update(g, flax_tx.init(g), g)
  assert np.abs(np.asarray(wrong['w']) - np.asarray(u['w'])).max() > 1e-3
  # Flax's layout (bias of the last axis), a square weight, a weight
  # without a bias, Equinox's depthwise 1-D conv (out, 1, window) with its
  # (out, 1) bias, and a linen scan on the middle axis of square layers
  # ((in, L, out) with bias (out, L)) say nothing.
  quiet = {'flax': {'kernel': z((16, 64)), 'bias': z(64)},
           'square': {'weight': z((16, 16)), 'bias': z(16)},
           'alone': {'weight': z((64, 16))},
           'depthwise': {'weight': z((32, 1, 4)), 'bias': z((32, 1))},
           'scan': {'kernel': z((16, 3, 16)), 'bias': z((16, 3))}}
  assert Router().layout_view_suspects(quiet) == []


def test_stacked_biases_tokens_and_short_embedding_names_go_to_adamw():
  """Haiku's bias is ``b``: stacked (``hk.layer_stack``, ``nnx.vmap``) it
  is 2-D and went to the matrix branch with weight decay, while one
  layer's went to AdamW. Positional tables named ``pos_emb`` and a ViT's
  ``cls_token`` went to the matrix branch and to an error."""
  z = jnp.zeros
  tree = {'stack': {'linear': {'w': z((4, 16, 32)), 'b': z((4, 32))}},
          'pos_emb': z((10, 16)), 'tok_emb': z((100, 16)),
          'cls_token': z((1, 1, 16)), 'register_tokens': z((4, 16)),
          'head': {'w': z((16, 100))},
          # Modules so named hold matrices: MLP-Mixer's token-mixing MLP,
          # a diffusion model's time-embedding MLP.
          'mlp_tokens': {'fc1': {'kernel': z((16, 32))}},
          'time_emb': {'dense': {'kernel': z((16, 32))}},
          'b_proj': {'kernel': z((16, 32))},
          # A toy tree's top-level b is a matrix ({'a': ..., 'b': ...}).
          'b': z((16, 32))}
  labels = dict((orthax._tree.path_str(p), x) for p, x in
                jax.tree_util.tree_flatten_with_path(
                    Router().quiet_labels(tree))[0])
  assert labels == {'stack/linear/w': 'matrix', 'stack/linear/b': 'adam',
                    'pos_emb': 'adam', 'tok_emb': 'adam', 'cls_token': 'adam',
                    'register_tokens': 'adam', 'head/w': 'adam',
                    'mlp_tokens/fc1/kernel': 'matrix',
                    'time_emb/dense/kernel': 'matrix',
                    'b_proj/kernel': 'matrix', 'b': 'matrix'}
  # A learned token's rows are no vocabulary: a 4-output matrix is not
  # taken for an output layer because of them; tok_emb's 100 rows are.
  mlp = {'tok_emb': z((100, 16)), 'register_tokens': z((4, 16)),
         'fc1': {'kernel': z((16, 4))}, 'fc2': {'kernel': z((4, 100))},
         'fc3': {'kernel': z((100, 16))}}
  reasons = dict(Router().output_layer_suspects(mlp))
  assert list(reasons) == ['fc2/kernel'], reasons
  assert 'vocabulary' in reasons['fc2/kernel']
  # A table named embed_tokens is the vocabulary (LLaMA's name).
  llama = {'embed_tokens': z((100, 16)), 'fc1': {'kernel': z((16, 100))},
           'zz': {'kernel': z((100, 16))}}
  assert 'vocabulary' in dict(Router().output_layer_suspects(llama)).get(
      'fc1/kernel', '')
