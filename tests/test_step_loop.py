"""orthax.polar.step_loop.run_steps: rolled on CPU, unrolled on other
platforms for static bounds, rolled everywhere for traced ones; the unrolled
iterations compute what the rolled ones do."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import orthax
from orthax import benchmarking as B
from orthax import polar
from orthax.polar.step_loop import run_steps


def _lowered(fn, *args, platform):
  return jax.jit(fn).trace(*args).lower(
      lowering_platforms=(platform,)).as_text()


def test_static_bounds_unroll_off_cpu_only():
  body = lambda k, c: (c[0] @ c[0] * k, c[1] + 1)
  fn = lambda x: run_steps(0, 6, body, (x, jnp.int32(0)))
  x = jnp.eye(4)
  for platform, dots, loops in (('cpu', 1, 1), ('cuda', 6, 0),
                                ('tpu', 6, 0)):
    text = _lowered(fn, x, platform=platform)
    assert text.count('stablehlo.dot_general') == dots, platform
    assert text.count('stablehlo.while') == loops, platform


def test_traced_bounds_stay_rolled():
  fn = lambda x, n: run_steps(0, n, lambda k, c: c @ c, x)
  text = _lowered(fn, jnp.eye(4), jnp.int32(3), platform='cuda')
  assert text.count('stablehlo.while') == 1


def test_numpy_integer_bounds_are_static():
  text = _lowered(lambda x: run_steps(np.int64(1), np.int32(4),
                                      lambda k, c: c @ c, x),
                  jnp.eye(4), platform='cuda')
  assert text.count('stablehlo.dot_general') == 3


@pytest.mark.parametrize('method', ['standard', 'gram'])
@pytest.mark.parametrize('preset', ['jordan', 'polar_express'])
def test_unrolled_iteration_equals_rolled(monkeypatch, method, preset):
  """The GPU/TPU branch, run here by making every platform take the
  default: the same Newton–Schulz iterates (Gram restarts chosen while
  tracing, per-step coefficient rows indexed statically)."""
  x = jax.random.normal(jax.random.key(0), (3, 24, 64), jnp.float32)
  fn = lambda x: polar.orthogonalize_stack(x, preset, steps=6, method=method)
  rolled = jax.jit(fn)(x)
  monkeypatch.setattr(jax.lax, 'platform_dependent',
                      lambda *args, default, **_: default(*args))
  unrolled_fn = jax.jit(lambda x: fn(x))  # a new function: a new trace
  assert 'stablehlo.while' not in unrolled_fn.lower(x).as_text()
  np.testing.assert_allclose(np.asarray(unrolled_fn(x)), np.asarray(rolled),
                             rtol=0, atol=2e-6)


def test_every_recipe_lowers_for_gpu_and_tpu():
  """Every registered recipe's update lowers for a GPU and a TPU from this
  CPU-only machine; Muon's has no rolled loop left there."""
  shapes = B.gpt2_hidden_kernels(1, 32)
  params = B.random_tree(shapes, jax.random.key(0))
  grads = B.random_tree(shapes, jax.random.key(1))
  for name in orthax.recipe_names():
    tx = orthax.recipe(name, learning_rate=0.02)
    traced = jax.jit(tx.update).trace(grads, tx.init(params), params)
    for platform in ('cuda', 'tpu'):
      text = traced.lower(lowering_platforms=(platform,)).as_text()
      if name == 'muon':
        assert 'stablehlo.while' not in text, platform
