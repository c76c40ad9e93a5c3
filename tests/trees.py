"""Test trees and the assertions the contract and the recipe tests share:
a transformer-like parameter tree, random trees like it, and leaf-naming
comparisons."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def mixed_params(dtype=jnp.float32, seed: int = 0) -> dict:
  """A transformer-like tree: hidden kernels (2-D and stacked), biases, norm
  scales (1-D and stacked), an embedding table and an LM head."""
  shapes = {
      'blocks': {
          '0': {'mlp': {'kernel': (16, 32), 'bias': (32,)}},
          '1': {'mlp': {'kernel': (32, 16), 'bias': (16,)}},
      },
      'layers': {
          'attn': {'kernel': (3, 16, 24), 'bias': (3, 24)},
          'ln': {'scale': (3, 16)},
      },
      'ln_f': {'scale': (16,)},
      'embed': {'embedding': (32, 16)},
      'lm_head': {'kernel': (16, 32)},
  }
  return random_like(shapes, seed, dtype, is_shape=True)


def random_like(tree, seed: int, dtype=None, is_shape: bool = False):
  """Standard-normal leaves shaped like ``tree`` (or like its shape tuples)."""
  if is_shape:
    is_leaf = lambda x: isinstance(x, tuple)
    leaves, treedef = jax.tree.flatten(tree, is_leaf=is_leaf)
    shapes, dtypes = leaves, [dtype or jnp.float32] * len(leaves)
  else:
    leaves, treedef = jax.tree.flatten(tree)
    shapes = [x.shape for x in leaves]
    dtypes = [dtype or x.dtype for x in leaves]
  rng = np.random.default_rng(seed)  # numpy: no per-shape XLA compile
  return jax.tree.unflatten(treedef, [
      jnp.asarray(rng.standard_normal(s, np.float32).astype(d))
      for s, d in zip(shapes, dtypes)])


def grads_for(params, steps: int = 3, seed: int = 100) -> list:
  return [random_like(params, seed + i) for i in range(steps)]


# Assertions -------------------------------------------------------------------


def leaves_with_paths(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(p), x) for p, x in flat]


def assert_trees_close(got, want, *, rtol=1e-6, atol=1e-6, what=''):
  """Same structure and allclose leaves; the message names the leaf."""
  assert jax.tree.structure(got) == jax.tree.structure(want), (
      f'{what}: tree structures differ:\n{jax.tree.structure(got)}\n'
      f'{jax.tree.structure(want)}')
  for (path, a), (_, b) in zip(leaves_with_paths(got), leaves_with_paths(want)):
    a = np.asarray(a).astype(np.float32) if is_float(a) else np.asarray(a)
    b = np.asarray(b).astype(np.float32) if is_float(b) else np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol,
                               err_msg=f'{what}: leaf {path}')


def is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def assert_all_zero(tree, what=''):
  for path, x in leaves_with_paths(tree):
    assert not np.any(np.asarray(x, np.float32)), (
        f'{what}: leaf {path} is not zero (max |x| = '
        f'{float(np.max(np.abs(np.asarray(x, np.float32))))}).')


def assert_all_nonzero(tree, what=''):
  for path, x in leaves_with_paths(tree):
    assert np.any(np.asarray(x, np.float32)), f'{what}: leaf {path} is zero.'


def assert_finite(tree, what=''):
  for path, x in leaves_with_paths(tree):
    if is_float(x):
      assert np.all(np.isfinite(np.asarray(x, np.float32))), (
          f'{what}: leaf {path} is not finite.')
