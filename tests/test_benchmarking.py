"""The benchmark helpers (``orthax.benchmarking``): workloads, the peak,
the row selection of ``scripts/bench_ns.py`` and the profile reader."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from orthax import benchmarking as B

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from versions import JAXLIB  # noqa: E402  pylint: disable=g-import-not-at-top

# jaxlib 0.7.1's CPU traces carry no operation names (op_times raises).
NAMED_OPS = pytest.mark.skipif(
    JAXLIB < (0, 7, 2), reason='CPU traces name operations from jaxlib 0.7.2')


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
  every = B.recipe_rows()
  assert {'muon', 'aro', 'aro/householder', 'fismo/every10'} <= set(every)
  assert B.recipe_rows(['aro', 'fismo/every10']) == {
      'aro': ('aro', {}), 'fismo/every10': ('fismo',
                                            {'precondition_every': 10})}
  with pytest.raises(ValueError, match=r"no rows named \['aro2'\]"):
    B.recipe_rows(['aro', 'aro2'])


@NAMED_OPS
def test_op_times_finds_the_product():
  x = jnp.ones((192, 192))
  f = jax.jit(lambda x: jnp.tanh(x @ x.T) @ x)
  rows = B.op_times(lambda: f(x), repeats=2)
  assert rows, 'no operation read back from the trace'
  assert [r.seconds for r in rows] == sorted((r.seconds for r in rows),
                                             reverse=True)
  assert all(r.seconds > 0 and r.launches >= 1 for r in rows)
  # Two 192³ products dominate a tanh of 192² values.
  text = f.lower(x).compile().as_text()
  assert rows[0].op in text


@NAMED_OPS
def test_op_times_counts_a_loop_body_once():
  """On CPU a ``while`` runs its body's operations inside its own trace
  event: only the innermost operations count (no row for the loop, whose
  time would count its body twice), and the body's product once per
  iteration. (Not against a wall time measured apart: with the other
  worker's compiles beside it, the two differed by 1.8× in a run.)"""
  x = jnp.ones((256, 256))
  f = jax.jit(lambda x: jax.lax.fori_loop(0, 4, lambda _, y: y @ x / 256, x))
  rows = B.op_times(lambda: f(x), repeats=2)
  assert not any(r.op.startswith('while') for r in rows), rows
  product = max(rows, key=lambda r: r.seconds)
  assert product.launches == 4, rows


@NAMED_OPS
def test_profile_script_prints_kinds_and_operations():
  """``scripts/profile_update.py`` on a small tree: the header, a time per
  kind that includes the products, and the operations table. (Its rows are
  by time: at ``--top 5`` a product was once outranked on a loaded
  machine; 40 rows hold every product of this small step.)"""
  root = pathlib.Path(__file__).parent.parent
  proc = subprocess.run(
      [sys.executable, 'scripts/profile_update.py', '--row', 'aro',
       '--layers', '1', '--d_model', '64', '--later', '--top', '40'],
      cwd=root, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert lines[0].startswith('backend=cpu row=aro step=later'), lines[0]
  kinds = {line.split()[0] for line in lines[1:6]}
  assert 'matmul' in kinds and 'cholesky' in kinds, lines[:8]
  assert sum(1 for line in lines if 'ynn_fusion' in line or 'dot' in line) >= 1


@pytest.mark.skipif(JAXLIB >= (0, 7, 2), reason='their traces name them')
def test_op_times_says_when_the_trace_names_no_operation():
  f, x = jax.jit(lambda x: x @ x), jnp.ones((8, 8))
  with pytest.raises(RuntimeError, match='names no compiled operation'):
    B.op_times(lambda: f(x), repeats=1)


def test_bench_sharding_refuses_an_unknown_scenario_or_option():
  """A typo (``fsdp9``, ``--no-optx``) ran the ``scan_local`` scenario,
  labelled with the typo."""
  script = pathlib.Path(__file__).parent.parent / 'scripts' / 'bench_sharding.py'
  for args in (['fsdp9'], ['fsdp8', '--no-optx']):
    proc = subprocess.run([sys.executable, str(script), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"unknown ['{args[-1]}']" in proc.stderr, proc.stderr[-2000:]


def test_bench_ns_refuses_counts_below_one():
  """``--repeats 0`` ended in a StatisticsError, ``--layers 0`` printed a
  table of zeros and NaN errors."""
  script = pathlib.Path(__file__).parent.parent / 'scripts' / 'bench_ns.py'
  for flag in ('--repeats', '--layers', '--steps'):
    proc = subprocess.run([sys.executable, str(script), flag, '0'],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f'{flag} must be >= 1, got 0' in proc.stderr, proc.stderr[-2000:]
