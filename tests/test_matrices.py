"""Matrix views, grouping, and the transforms that use them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax
from orthax import matrices
from orthax.matrices import MatrixSpec


@pytest.mark.parametrize('shape,spec,expect', [
    ((6, 10), MatrixSpec(), (1, 6, 10)),
    ((4, 6, 10), MatrixSpec(), (4, 6, 10)),
    ((6, 4, 10), MatrixSpec.stacked(1), (4, 6, 10)),
    ((6, 10, 4), MatrixSpec.stacked(2), (4, 6, 10)),
    ((3, 3, 8, 16), MatrixSpec.conv(4), (1, 72, 16)),
    ((8, 4, 5), MatrixSpec.heads(0, 2), (4, 8, 5)),
    ((10, 6), MatrixSpec.torch_linear(), (1, 6, 10)),
])
def test_views_shape_and_roundtrip(shape, spec, expect):
  x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  m = matrices.to_matrices(x, spec)
  assert m.shape == expect
  np.testing.assert_array_equal(matrices.from_matrices(m, spec, shape), x)


@pytest.mark.parametrize('shape,spec', [
    ((6, 10), MatrixSpec()), ((4, 6, 10), MatrixSpec()),
    ((6, 4, 10), MatrixSpec.stacked(1)), ((3, 3, 8, 16), MatrixSpec.conv(4)),
    ((8, 4, 5), MatrixSpec.heads(0, 2)), ((10, 6), MatrixSpec.torch_linear()),
    ((16, 4, 8), MatrixSpec(0, (1, 2))), ((4, 2, 8, 3), MatrixSpec(1, (3, 0)))])
def test_per_matrix_values_laid_out_like_the_leaf(shape, spec):
  """``per_matrix_to_leaf`` and ``matrix_axes`` in the leaf's layout agree
  with the same operations on the matrix view."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape))
  b, fi, _ = spec.matrix_shape(shape)
  m = matrices.to_matrices(x, spec)
  for values, view in ((rng.standard_normal(b), lambda v: v[:, None, None]),
                       (rng.standard_normal((b, fi)), lambda v: v[..., None])):
    got = x * matrices.per_matrix_to_leaf(jnp.asarray(values), spec, shape)
    want = matrices.from_matrices(m * view(values), spec, shape)
    np.testing.assert_array_equal(got, want)
  sums = jnp.sum(x, axis=matrices.matrix_axes(spec, shape))
  np.testing.assert_allclose(sums.reshape(-1), m.sum((-2, -1)), rtol=1e-12)


def test_stacked_view_picks_the_right_matrices():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 4, 10)))
  m = matrices.to_matrices(x, MatrixSpec.stacked(1))
  for layer in range(4):
    np.testing.assert_array_equal(m[layer], x[:, layer, :])


def test_conv_view_flattens_window_and_fan_in():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 8, 16)))
  m = matrices.to_matrices(x, MatrixSpec.conv(4))
  np.testing.assert_array_equal(m[0], x.reshape(72, 16))


def test_bad_spec_names_problem():
  with pytest.raises(ValueError, match='does not fit'):
    MatrixSpec((0,), (5,)).resolve((3, 4))
  with pytest.raises(ValueError, match='twice'):
    MatrixSpec((0,), (0,)).resolve((3, 4))
  # An axis out of range was wrapped (stacked(3) read as stacked(0)).
  for axis in (3, -4):
    with pytest.raises(ValueError, match=f'layer_axis {axis} is not an axis'):
      MatrixSpec.stacked(axis)
  assert MatrixSpec.stacked(-1) == MatrixSpec.stacked(2)
  # NumPy ints are ints; anything else names the argument.
  assert MatrixSpec(np.int64(0), [np.int32(1)]) == MatrixSpec((0,), (1,))
  for bad in ('0', 1.0, [0, 'x'], None, True):
    with pytest.raises(TypeError, match='^MatrixSpec: fan_in must be an int'):
      MatrixSpec(bad, 1)


def test_grouping_merges_orientations_and_keeps_order():
  shapes = [(1, 8, 32), (2, 32, 8), (1, 16, 16), (3, 8, 32)]
  groups = matrices.plan_groups(shapes, [jnp.float32] * 4)
  assert [(g.m, g.n, g.count) for g in groups] == [(8, 32, 6), (16, 16, 1)]
  assert [mb.transposed for mb in groups[0].members] == [False, True, False]


def test_stack_group_round_trips_in_wide_orientation():
  rng = np.random.default_rng(2)
  mats = [jnp.asarray(rng.standard_normal(s), jnp.float32)
          for s in [(1, 8, 32), (2, 32, 8), (1, 16, 16), (3, 8, 32)]]
  groups = matrices.plan_groups([x.shape for x in mats], [jnp.float32] * 4)
  stacks = [matrices.stack_group(g, mats) for g in groups]
  assert [s.shape for s in stacks] == [(6, 8, 32), (1, 16, 16)]
  np.testing.assert_array_equal(stacks[0][1:3], np.swapaxes(mats[1], -1, -2))
  back = {}
  for g, s in zip(groups, stacks):
    back.update(matrices.unstack_group(g, s))
  for i, x in enumerate(mats):
    np.testing.assert_array_equal(back[i], x)


def test_orthogonalize_stacked_and_conv_leaves():
  rng = np.random.default_rng(3)
  tree = {'stack': jnp.asarray(rng.standard_normal((3, 8, 12)), jnp.float32),
          'conv': jnp.asarray(rng.standard_normal((3, 3, 4, 6)), jnp.float32)}
  specs = {'stack': MatrixSpec.stacked(0), 'conv': MatrixSpec.conv(4)}
  tx = orthax.orthogonalize('polar_express_paper', matrix_specs=specs)
  out, _ = tx.update(tree, tx.init(tree))
  for i in range(3):  # each layer orthogonalized on its own
    s = np.linalg.svd(np.asarray(out['stack'][i]), compute_uv=False)
    np.testing.assert_allclose(s, 1, atol=1e-3)
  s = np.linalg.svd(np.asarray(out['conv']).reshape(36, 6), compute_uv=False)
  np.testing.assert_allclose(s, 1, atol=1e-3)


@pytest.mark.parametrize('wrap', ['partition', 'masked'])
def test_a_spec_tree_works_inside_partition_and_masked(wrap):
  """``router.specs(params)``, the whole tree, given to a transform that
  optax.partition / optax.masked hands a ``MaskedNode`` for every leaf of
  another branch: the specs are matched by path (they were counted, and
  the extra ones made an error that asked for what had been given)."""
  rng = np.random.default_rng(5)
  params = {'b': jnp.zeros(12),
            'w': jnp.asarray(rng.standard_normal((8, 12)), jnp.float32),
            'stack': {'kernel': jnp.asarray(rng.standard_normal((3, 12, 8)),
                                            jnp.float32)}}
  router = orthax.Router()
  labels = router.quiet_labels(params)

  def run(specs):
    tx = orthax.orthogonalize(matrix_specs=specs)
    if wrap == 'partition':
      tx = optax.partition({'matrix': tx, 'adam': optax.sgd(1.0)}, labels)
    else:
      tx = optax.masked(tx, jax.tree.map(lambda l: l == 'matrix', labels))
    return tx.update(params, tx.init(params), params)[0]

  by_tree, by_callable = run(router.specs(params)), run(router.specs)
  for a, b in zip(jax.tree.leaves(by_tree), jax.tree.leaves(by_callable)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for i in range(3):  # the stack as three layers
    s = np.linalg.svd(np.asarray(by_tree['stack']['kernel'][i]),
                      compute_uv=False)
    assert np.all(np.abs(s - 1) < 0.35), s


def test_orthogonalize_group_flag_is_numerically_neutral():
  rng = np.random.default_rng(4)
  tree = {'a': jnp.asarray(rng.standard_normal((16, 48)), jnp.float32),
          'b': jnp.asarray(rng.standard_normal((48, 16)), jnp.float32)}
  outs = []
  for group in (True, False):
    tx = orthax.orthogonalize(group=group)
    outs.append(tx.update(tree, tx.init(tree))[0])
  for k in tree:
    np.testing.assert_allclose(outs[0][k], outs[1][k], atol=2e-6)


@pytest.mark.parametrize('mode,factor', [
    ('keller', np.sqrt(48 / 16)), ('moonlight', 0.2 * np.sqrt(48)),
    ('spectral', np.sqrt(48 / 16)), ('inverse_side', 1 / 16),
    ('none', 1.0)])
def test_scale_by_shape_modes(mode, factor):
  tree = {'k': jnp.ones((16, 48))}  # Flax kernel: in=16, out=48
  tx = orthax.scale_by_shape(mode)
  out, _ = tx.update(tree, tx.init(tree))
  np.testing.assert_allclose(out['k'], factor, rtol=1e-6)
  wide = {'k': jnp.ones((48, 16))}
  out, _ = tx.update(wide, tx.init(wide))
  expect = {'keller': 1.0, 'moonlight': 0.2 * np.sqrt(48),
            'spectral': np.sqrt(16 / 48), 'inverse_side': 1 / 16,
            'none': 1.0}[mode]
  np.testing.assert_allclose(out['k'], expect, rtol=1e-6)


def test_inverse_side_counts_small_sides_as_min_side():
  tx = orthax.scale_by_shape('inverse_side', min_side=32)
  for shape, factor in (((16, 48), 1 / 32), ((48, 64), 1 / 48),
                        ((64, 1), 1 / 32)):
    tree = {'k': jnp.ones(shape)}
    out, _ = tx.update(tree, tx.init(tree))
    np.testing.assert_allclose(out['k'], factor, rtol=1e-6)
  for bad, error in ((0, ValueError), (2.5, TypeError), (True, TypeError)):
    with pytest.raises(error, match='scale_by_shape: min_side must be'):
      orthax.scale_by_shape('inverse_side', min_side=bad)


@pytest.mark.parametrize('form,nesterov', [('ema', True), ('ema', False),
                                           ('sum', True), ('sum', False)])
def test_momentum_forms(form, nesterov):
  beta = 0.9
  gs = [np.random.default_rng(t).standard_normal(5) for t in range(4)]
  tx = orthax.momentum(beta, form=form, nesterov=nesterov)
  s = tx.init(jnp.zeros(5))
  m = np.zeros(5)
  keep = 1.0 if form == 'sum' else 1 - beta
  for g in gs:
    u, s = tx.update(jnp.asarray(g, jnp.float32), s)
    m = beta * m + keep * g
    ref = keep * g + beta * m if nesterov else m
    np.testing.assert_allclose(u, ref, rtol=1e-5)


def test_momentum_accumulator_dtype():
  tx = orthax.momentum(accumulator_dtype=jnp.float32)
  p = jnp.ones(3, jnp.bfloat16)
  u, s = tx.update(p, tx.init(p))
  assert s.mu.dtype == jnp.float32 and u.dtype == jnp.bfloat16


def test_momentum_bias_correction_needs_ema():
  with pytest.raises(ValueError, match='EMA'):
    orthax.momentum(form='sum', bias_correction=True)


@pytest.mark.parametrize('cautious', [False, True])
def test_decoupled_weight_decay(cautious):
  w = jnp.array([1.0, -1.0, 2.0, -2.0])
  d = jnp.array([-0.1, -0.1, 0.1, 0.1])  # shrinks, grows, grows, shrinks |w|
  sched = optax.linear_schedule(0.5, 0.25, 1)
  tx = orthax.decoupled_weight_decay(0.1, learning_rate=sched, cautious=cautious)
  s = tx.init(w)
  out, s = tx.update(d, s, w)
  mask = np.array([1, 0, 0, 1]) if cautious else 1
  np.testing.assert_allclose(out, d - 0.1 * 0.5 * w * mask, rtol=1e-6)
  out, s = tx.update(d, s, w)  # schedule advanced to 0.25
  np.testing.assert_allclose(out, d - 0.1 * 0.25 * w * mask, rtol=1e-6)
  with pytest.raises(ValueError, match='needs params'):
    tx.update(d, s)


def test_weight_decay_masks_may_be_prefixes_as_in_optax():
  """A mask with one boolean per subtree (optax's masks may be a prefix of
  the parameters) decays the same leaves as ``optax.add_decayed_weights``
  (whose sign convention is the gradient's); it was a raw structure error."""
  params = {'b': jnp.ones(3), 'w': jnp.full((2, 3), 2.0),
            'mlp': {'kernel': jnp.full((3, 2), 4.0), 'bias': jnp.ones(2)}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  prefix = {'b': False, 'w': True, 'mlp': True}
  full = {'b': False, 'w': True, 'mlp': {'kernel': True, 'bias': True}}
  ours = [orthax.decoupled_weight_decay(0.5, mask=m) for m in
          (prefix, full, lambda p: prefix)]
  theirs = optax.add_decayed_weights(0.5, mask=prefix)
  want = theirs.update(zeros, theirs.init(params), params)[0]
  for tx in ours:
    got = tx.update(zeros, tx.init(params), params)[0]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), -np.asarray(b))
  with pytest.raises(ValueError, match='decoupled_weight_decay: mask must '
                     'be a tree of booleans shaped like the parameters'):
    tx = orthax.decoupled_weight_decay(0.5, mask={'b': True, 'x': True})
    tx.update(zeros, tx.init(params), params)
  # A string counted as True: refused, naming the leaf.
  for bad in ('no', {'b': False, 'w': 'no', 'mlp': True}):
    tx = orthax.decoupled_weight_decay(0.5, mask=bad)
    with pytest.raises(ValueError, match=r"^decoupled_weight_decay: mask "
                       r"must hold booleans, got 'no' at '(b|w)'"):
      tx.update(zeros, tx.init(params), params)


def test_weight_decay_rate_scale_per_matrix():
  """rate_scale multiplies each matrix's λη by its shape factor;
  step_scale by η·factor; the two are exclusive."""
  w = {'k': jnp.ones((8, 32)), 'v': 2 * jnp.ones((32, 4))}
  d = {'k': jnp.zeros((8, 32)), 'v': jnp.zeros((32, 4))}
  tx = orthax.decoupled_weight_decay(0.1, learning_rate=0.5,
                                     rate_scale='inverse_side')
  out, _ = tx.update(d, tx.init(w), w)
  np.testing.assert_allclose(out['k'], -0.1 * 0.5 / 8, rtol=1e-6)
  np.testing.assert_allclose(out['v'], -2 * 0.1 * 0.5 / 4, rtol=1e-6)
  tx = orthax.decoupled_weight_decay(0.1, learning_rate=0.5,
                                     step_scale='inverse_side')
  out, _ = tx.update(d, tx.init(w), w)
  np.testing.assert_allclose(out['k'], -0.1 * 0.5 * 0.5 / 8, rtol=1e-6)
  # min_side: sides below it count as it (k's 8 as 16; v's 4 as 16)
  tx = orthax.decoupled_weight_decay(0.1, learning_rate=0.5,
                                     rate_scale='inverse_side', min_side=16)
  out, _ = tx.update(d, tx.init(w), w)
  np.testing.assert_allclose(out['k'], -0.1 * 0.5 / 16, rtol=1e-6)
  np.testing.assert_allclose(out['v'], -2 * 0.1 * 0.5 / 16, rtol=1e-6)
  with pytest.raises(ValueError, match='not both'):
    orthax.decoupled_weight_decay(0.1, learning_rate=0.5, step_scale='keller',
                                  rate_scale='keller')
  with pytest.raises(ValueError, match='decoupled_weight_decay: rate_scale must be one of'):
    orthax.decoupled_weight_decay(0.1, rate_scale='wide')
  with pytest.raises(ValueError, match='scale_by_shape: mode must be one of'):
    orthax.scale_by_shape('wide')


def test_weight_decay_independent_of_lr():
  tx = orthax.decoupled_weight_decay(0.01)
  w = jnp.ones(3)
  out, _ = tx.update(jnp.zeros(3), tx.init(w), w)
  np.testing.assert_allclose(out, -0.01)


def test_choose_method():
  choose = orthax.polar.choose_method
  assert choose(768, 3072, 5, jnp.float32) == 'gram'
  assert choose(3072, 768, 5, jnp.float32) == 'gram'
  assert choose(768, 768, 5, jnp.float32) == 'standard'
  assert choose(768, 3072, 5, jnp.bfloat16) == 'standard'  # half: opt-in only
  assert choose(768, 3072, 5, jnp.bfloat16, 'gram') == 'gram'
  assert choose(768, 3072, jnp.asarray(5), jnp.float32) == 'standard'
  with pytest.raises(ValueError, match='method'):
    choose(4, 4, 5, jnp.float32, 'fast')
  with pytest.raises(ValueError, match='method'):
    orthax.orthogonalize(method='fast')


def test_orthogonalize_methods_agree():
  rng = np.random.default_rng(5)
  tree = {'a': jnp.asarray(rng.standard_normal((64, 256)), jnp.float32),
          'b': jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)}
  outs = {}
  for method in ('standard', 'gram', 'auto'):
    tx = orthax.orthogonalize('polar_express', method=method)
    outs[method] = tx.update(tree, tx.init(tree))[0]
  for k in tree:
    ref = np.asarray(outs['standard'][k])
    for method in ('gram', 'auto'):
      rel = np.linalg.norm(np.asarray(outs[method][k]) - ref) / np.linalg.norm(ref)
      assert rel < 1e-5, (method, k, rel)


def test_a_spec_tree_with_a_mistyped_key_is_refused_naming_it():
  """A spec tree whose paths miss a leaf was applied by position: 'mlp'
  took the spec written under 'zattn' (the default view) and its own
  (torch_linear) went to 'attn'."""
  g = {'attn': jnp.ones((4, 16)), 'mlp': jnp.ones((16, 4))}
  specs = {'zattn': orthax.MatrixSpec(),
           'mlp': orthax.MatrixSpec.torch_linear()}
  tx = orthax.scale_by_shape('keller', matrix_specs=specs)
  with pytest.raises(ValueError, match=r"^scale_by_shape: the matrix_specs "
                     r"tree has no spec at 'attn'; its paths that no leaf "
                     r"has: \['zattn'\]"):
    tx.update(g, tx.init(g))
  specs = {'attn': orthax.MatrixSpec(),
           'mlp': orthax.MatrixSpec.torch_linear()}
  tx = orthax.scale_by_shape('keller', matrix_specs=specs)
  u, _ = tx.update(g, tx.init(g))
  assert float(u['attn'][0, 0]) == float(u['mlp'][0, 0]) == 2.0


def test_a_spec_tree_with_a_stray_key_is_refused_naming_it():
  """A spec at a path the updates lack (a mistyped or stale key beside the
  right ones) is refused; a spec where the updates hold an empty node (a
  leaf masked out by optax.masked, an absent bias) is not."""
  g = {'attn': jnp.ones((4, 16)), 'mlp': jnp.ones((16, 4))}
  specs = {'attn': orthax.MatrixSpec(), 'mlp': orthax.MatrixSpec(),
           'mlpp': orthax.MatrixSpec.torch_linear()}
  tx = orthax.scale_by_shape('keller', matrix_specs=specs)
  with pytest.raises(ValueError, match=r"^scale_by_shape: the matrix_specs "
                     r"tree has a spec at 'mlpp', where the updates have no "
                     r"leaf"):
    tx.update(g, tx.init(g))
  masked = optax.masked(
      orthax.scale_by_shape('keller', matrix_specs=specs),
      {'attn': True, 'mlp': True, 'mlpp': False})
  g3 = dict(g, mlpp=jnp.ones((16, 4)))
  u, _ = masked.update(g3, masked.init(g3))
  assert float(u['attn'][0, 0]) == 2.0 and float(u['mlpp'][0, 0]) == 1.0


def test_a_spec_tree_holding_a_non_spec_names_its_path():
  """A string (or a subtree) where a spec belongs said only "the
  matrix_specs tree has 1 leaves but the updates have 2"."""
  g = {'a': {'kernel': jnp.ones((4, 8))}, 'b': {'kernel': jnp.ones((8, 4))}}
  for bad, shown in (('bogus', "'bogus'"), ({'x': orthax.MatrixSpec()},
                                             r"\{'x': MatrixSpec")):
    tx = orthax.scale_by_shape('keller', matrix_specs={
        'a': {'kernel': bad}, 'b': {'kernel': orthax.MatrixSpec()}})
    with pytest.raises(ValueError, match=r'^scale_by_shape: the matrix_specs '
                       rf"tree holds {shown}.* at 'a/kernel', not an "
                       r'orthax.MatrixSpec'):
      tx.update(g, tx.init(g))
