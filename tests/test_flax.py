"""Flax integration: routing of NNX/linen parameter trees and jitted steps."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import orthax

nnx = pytest.importorskip('flax.nnx')
linen = pytest.importorskip('flax.linen')
train_state = pytest.importorskip('flax.training.train_state')

L, D, V, T = 3, 16, 32, 8  # layers, width, vocabulary, sequence length


def _path(key_path) -> str:
  names = []
  for k in key_path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
  if names and names[-1] == 'value':  # an NNX Variable's payload
    names = names[:-1]
  return '/'.join(names)


def _by_path(tree) -> dict:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path(p): x for p, x in flat}


def _task(seed=0, batch=8):
  """Next-token prediction where the next token is ``(token + 1) % V``."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.integers(0, V, (batch, T)), jnp.int32)
  return x, (x + 1) % V


def _assert_finite(tree):
  for path, x in _by_path(tree).items():
    assert np.all(np.isfinite(np.asarray(x, np.float32))), path


# NNX ----------------------------------------------------------------------------


class Block(nnx.Module):

  def __init__(self, d, rngs):
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.fc1 = nnx.Linear(d, 2 * d, rngs=rngs)
    self.fc2 = nnx.Linear(2 * d, d, rngs=rngs)

  def __call__(self, x):
    return x + self.fc2(jax.nn.gelu(self.fc1(self.ln(x))))


class NNXModel(nnx.Module):
  """Embedding, ``L`` blocks stacked by ``nnx.vmap`` (run by ``nnx.scan``),
  final norm and an LM head."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return Block(D, rngs)

    self.blocks = make_blocks(rngs)
    self.ln_f = nnx.LayerNorm(D, rngs=rngs)
    self.lm_head = nnx.Linear(D, V, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x)

    return self.lm_head(self.ln_f(run(x, self.blocks)))


# Expected routes of the NNX model: label and (for matrices) the view.
NNX_ROUTES = {
    'embed/embedding': ('adam', None),
    'blocks/fc1/kernel': ('matrix', (L, D, 2 * D)),
    'blocks/fc2/kernel': ('matrix', (L, 2 * D, D)),
    'blocks/fc1/bias': ('adam', None),
    'blocks/fc2/bias': ('adam', None),
    'blocks/ln/scale': ('adam', None),
    'blocks/ln/bias': ('adam', None),
    'ln_f/scale': ('adam', None),
    'ln_f/bias': ('adam', None),
    'lm_head/kernel': ('adam', None),
    'lm_head/bias': ('adam', None),
}


@pytest.fixture(scope='module')
def nnx_params():
  return nnx.state(NNXModel(nnx.Rngs(0)), nnx.Param)


def test_nnx_stacked_model_shapes(nnx_params):
  shapes = {p: tuple(x.shape) for p, x in _by_path(nnx_params).items()}
  assert set(shapes) == set(NNX_ROUTES)
  assert shapes['blocks/fc1/kernel'] == (L, D, 2 * D)
  assert shapes['blocks/fc1/bias'] == (L, 2 * D)
  assert shapes['blocks/ln/scale'] == (L, D)
  assert shapes['embed/embedding'] == (V, D)
  # The point of routing by name: optax's ndim == 2 rule would send stacked
  # biases and norm scales to Muon and the stacked kernels to Adam.
  ndim2 = {p for p, s in shapes.items() if len(s) == 2}
  assert {'blocks/fc1/bias', 'blocks/ln/scale', 'embed/embedding',
          'lm_head/kernel'} <= ndim2
  assert 'blocks/fc1/kernel' not in ndim2


def test_nnx_routing_labels(nnx_params):
  router = orthax.Router()
  labels = _by_path(router.labels(nnx_params))
  assert labels == {p: lab for p, (lab, _) in NNX_ROUTES.items()}
  specs = _by_path(router.specs(nnx_params))
  shapes = {p: x.shape for p, x in _by_path(nnx_params).items()}
  for path, (label, view) in NNX_ROUTES.items():
    if label == 'matrix':
      assert specs[path].matrix_shape(shapes[path]) == view, path


def test_nnx_describe(nnx_params, capsys):
  table = orthax.describe(nnx_params)
  assert capsys.readouterr().out.strip() == table.strip()
  rows = {line.split()[0]: line for line in table.splitlines()[2:]}
  assert set(rows) == set(NNX_ROUTES)
  for path, (label, view) in NNX_ROUTES.items():
    cells = rows[path].split()
    assert label in cells, rows[path]
    if view is not None:
      assert ' x '.join(map(str, view)) in rows[path], rows[path]


def test_describe_an_nnx_module_lists_its_params_only():
  """Its BatchNorm statistics were listed as AdamW-trained; nnx.Optimizer
  steps the ``nnx.Param`` state only."""

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.lin = nnx.Linear(8, 16, rngs=rngs)
      self.bn = nnx.BatchNorm(16, rngs=rngs)

  model = Net(nnx.Rngs(0))
  table = orthax.describe(model)
  paths = {line.split()[0] for line in table.splitlines()[2:]}
  assert paths == {'lin/kernel', 'lin/bias', 'bn/scale', 'bn/bias'}, table


def train_nnx(model, optimizer, steps):
  """Runs ``steps`` jitted next-token steps; returns (losses, times traced)."""
  traces = []

  @nnx.jit
  def train_step(model, optimizer, x, y):
    traces.append(1)

    def loss_fn(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  x, y = _task()
  losses = [float(train_step(model, optimizer, x, y)) for _ in range(steps)]
  return losses, len(traces)


def test_nnx_optimizer_step():
  model = NNXModel(nnx.Rngs(1))
  optimizer = nnx.Optimizer(model, orthax.muon(learning_rate=0.02),
                            wrt=nnx.Param)
  before = _by_path(nnx.state(model, nnx.Param))
  losses, traces = train_nnx(model, optimizer, 3)
  assert traces == 1, f'train step traced {traces} times'
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses
  params = nnx.state(model, nnx.Param)
  _assert_finite(params)
  after = _by_path(params)
  for path in NNX_ROUTES:  # every parameter, in both branches, moved
    assert not np.allclose(np.asarray(after[path]), np.asarray(before[path])), (
        path)
  # The stacked kernels were updated through the matrix branch's momentum.
  mu = _by_path(optax.tree.get(optimizer.opt_state, 'momentum').mu)
  assert mu['blocks/fc1/kernel'].shape == (L, D, 2 * D)


# linen --------------------------------------------------------------------------


class LinenModel(linen.Module):

  @linen.compact
  def __call__(self, tokens):
    x = linen.Embed(V, D)(tokens)
    h = linen.LayerNorm()(x)
    h = linen.Dense(2 * D)(h)
    x = x + linen.Dense(D)(jax.nn.gelu(h))
    x = linen.LayerNorm()(x)
    return linen.Dense(V, name='lm_head')(x)


def test_linen_routing():
  model = LinenModel()
  x, _ = _task()
  params = model.init(jax.random.PRNGKey(0), x)['params']
  labels = _by_path(orthax.Router().labels(params))
  assert labels == {
      'Embed_0/embedding': 'adam',
      'LayerNorm_0/scale': 'adam', 'LayerNorm_0/bias': 'adam',
      'LayerNorm_1/scale': 'adam', 'LayerNorm_1/bias': 'adam',
      'Dense_0/kernel': 'matrix', 'Dense_0/bias': 'adam',
      'Dense_1/kernel': 'matrix', 'Dense_1/bias': 'adam',
      'lm_head/kernel': 'adam', 'lm_head/bias': 'adam',
  }


def test_linen_train_state_step():
  model = LinenModel()
  x, y = _task()
  params = model.init(jax.random.PRNGKey(0), x)['params']
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=orthax.muon(learning_rate=0.02))
  traces = []

  @jax.jit
  def train_step(state, x, y):
    traces.append(1)

    def loss_fn(params):
      logits = state.apply_fn({'params': params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for _ in range(3):
    state, loss = train_step(state, x, y)
    losses.append(float(loss))
  assert len(traces) == 1, f'train step traced {len(traces)} times'
  assert int(state.step) == 3
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses
  _assert_finite(state.params)
  before, after = _by_path(params), _by_path(state.params)
  assert set(after) == set(before)
  for path in before:  # every parameter, in both branches, moved
    assert not np.allclose(np.asarray(after[path]), np.asarray(before[path])), (
        path)


@pytest.mark.parametrize('name', orthax.recipe_names())
def test_state_round_trips_through_flax_msgpack(name):
  """``flax.serialization.to_bytes`` (a linen ``TrainState``'s checkpoint
  format) writes every recipe's state, and the state read back steps as the
  original does. It refused optax.named_chain's ``OrderedDict`` before."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.standard_normal((8, 16)), jnp.float32),
            'b': jnp.zeros(16)}
  grads = [jax.tree.map(lambda p, s=s: jnp.asarray(
      np.random.default_rng(s).standard_normal(p.shape), p.dtype), params)
           for s in (1, 2)]
  tx = orthax.recipe(name)
  _, state = tx.update(grads[0], tx.init(params), params)
  restored = serialization.from_bytes(tx.init(params),
                                      serialization.to_bytes(state))
  assert (jax.tree.structure(restored) == jax.tree.structure(state))
  want, _ = tx.update(grads[1], state, params)
  got, _ = tx.update(grads[1], restored, params)
  for path, x in _by_path(want).items():
    np.testing.assert_array_equal(np.asarray(_by_path(got)[path]),
                                  np.asarray(x), err_msg=path)
