"""Case script (8 fake devices, run by tests/test_flax_sharding.py): every
recipe in Flax's own sharding workflow. NNX: a model whose parameters carry
``out_sharding`` metadata, ``nnx.Optimizer`` and two updates, on an Auto
and an Explicit mesh. Linen: ``TrainState.create`` jitted with the
shardings ``nn.get_partition_spec`` reads from the logical annotations,
then two jitted ``apply_gradients``. Prints ``{case: result}`` as JSON."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import flax.linen as nn
from flax.training import train_state

import orthax
from fake_devices import guarded  # pylint: disable=g-import-not-at-top
from versions import FLAX  # pylint: disable=g-import-not-at-top

# flax 0.12.0's nnx.with_partitioning asserts inside flax on Explicit mesh
# axes (core/spmd.py, before orthax is reached); 0.12.8 builds the model.
EXPLICIT_MODELS = FLAX > (0, 12, 0)

warnings.simplefilter('ignore')
X = jnp.asarray(np.random.default_rng(0).standard_normal((8, 64)), jnp.float32)


class NnxModel(nnx.Module):

  def __init__(self, rngs):
    kernel = nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                   ('fsdp', None))
    self.fc = nnx.Linear(64, 128, kernel_init=kernel, rngs=rngs)
    self.head = nnx.Linear(128, 16, kernel_init=kernel, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.fc(x)))


def nnx_case(name, axis_type):
  mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(axis_type,))
  with jax.set_mesh(mesh):
    model = NnxModel(nnx.Rngs(0))
    opt = nnx.Optimizer(model, orthax.recipe(name), wrt=nnx.Param)
    before = nnx.state(model, nnx.Param)
    before = jax.tree.map(np.asarray, before)
    loss = lambda m: jnp.mean(jnp.square(m(X)))

    # One program per step, as training runs it: eager, each operation was
    # a program of its own with its collectives, and on 8 CPU threads under
    # load two of them in flight waited on each other (a rendezvous abort).
    @nnx.jit
    def step(model, opt):
      value, grads = nnx.value_and_grad(loss)(model)
      opt.update(model, grads)
      return value

    losses = [float(step(model, opt)) for _ in range(2)]
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    moved = [bool(np.any(a != b)) for a, b in
             zip(jax.tree.leaves(after), jax.tree.leaves(before))]
    return {'losses': losses, 'all_moved': all(moved),
            'finite': all(np.all(np.isfinite(a))
                          for a in jax.tree.leaves(after))}


class LinenModel(nn.Module):

  @nn.compact
  def __call__(self, x):
    kernel = nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                          ('embed', 'mlp'))
    x = jax.nn.relu(nn.Dense(128, kernel_init=kernel)(x))
    return nn.Dense(16, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ('mlp', 'embed')))(x)


def linen_case(name):
  mesh = jax.make_mesh((8,), ('fsdp',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  rules = (('embed', 'fsdp'), ('mlp', None))
  tx = orthax.recipe(name)

  def init(rng):
    params = LinenModel().init(rng, X)['params']
    return train_state.TrainState.create(apply_fn=LinenModel().apply,
                                         params=params, tx=tx)

  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract),
                                          mesh, rules)
  state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
  before = [np.asarray(a) for a in jax.tree.leaves(nn.unbox(state.params))]

  @jax.jit
  def step(state):
    def loss(params):
      return jnp.mean(jnp.square(state.apply_fn({'params': params}, X)))
    value, grads = jax.value_and_grad(loss)(state.params)
    return state.apply_gradients(grads=grads), value

  losses = []
  for _ in range(2):
    state, value = step(state)
    losses.append(float(value))
  after = [np.asarray(a) for a in jax.tree.leaves(nn.unbox(state.params))]
  return {'losses': losses,
          'all_moved': all(bool(np.any(a != b)) for a, b in zip(after, before)),
          'finite': all(bool(np.all(np.isfinite(a))) for a in after)}


def main():
  out = {}
  explicit = (('muon', 'normuon', 'namo', 'lanton')  # one per state kind
              if EXPLICIT_MODELS else ())
  for name in orthax.recipe_names():
    out[f'nnx-auto-{name}'] = guarded(
        lambda n=name: nnx_case(n, jax.sharding.AxisType.Auto))
    if name in explicit:
      out[f'nnx-explicit-{name}'] = guarded(
          lambda n=name: nnx_case(n, jax.sharding.AxisType.Explicit))
    out[f'linen-{name}'] = guarded(lambda n=name: linen_case(n))
  print(json.dumps(out))


if __name__ == '__main__':
  main()
