"""The benchmark helpers (``orthax.benchmarking``) and ``scripts/bench_ns.py``'s
row selection."""

import importlib.util
import pathlib

import jax.numpy as jnp
import pytest

from orthax import benchmarking as B

HERE = pathlib.Path(__file__).parent


def _bench_ns():
  spec = importlib.util.spec_from_file_location(
      'bench_ns', HERE.parent / 'scripts' / 'bench_ns.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_gpt2_kernels_take_the_width():
  tree = B.gpt2_hidden_kernels(2, d=64)
  assert sorted(tree) == ['h00', 'h01']
  assert tree['h01']['mlp']['c_fc']['kernel'] == (64, 256)
  assert tree['h00']['attn']['c_attn']['kernel'] == (64, 192)
  # 5 quintic steps on 64×192: 5·(4·64²·192 + 2·64³).
  one = {'k': (64, 192)}
  assert B.tree_ns_flops(one, 5) == 5 * (4 * 64 * 64 * 192 + 2 * 64 ** 3)


def test_matmul_peak_is_a_rate():
  rate = B.matmul_peak(64, jnp.float32, chain=2, repeats=2)
  # 2 products of 2·64³ FLOPs take more than a nanosecond and less than
  # a second here.
  assert 2 * 2 * 64 ** 3 < rate < 2 * 2 * 64 ** 3 * 1e9


def test_recipe_rows_select_and_reject():
  mod = _bench_ns()
  every = mod.recipe_rows()
  assert {'muon', 'aro', 'aro/householder', 'fismo/every10'} <= set(every)
  assert mod.recipe_rows(['aro', 'fismo/every10']) == {
      'aro': ('aro', {}), 'fismo/every10': ('fismo',
                                            {'precondition_every': 10})}
  with pytest.raises(ValueError, match=r"no rows named \['aro2'\]"):
    mod.recipe_rows(['aro', 'aro2'])
