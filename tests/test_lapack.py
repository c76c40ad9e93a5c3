"""orthax.polar.lapack.per_matrix: stacks of matrices reach jaxlib's CPU
LAPACK kernels one matrix per call (a batched call can deadlock two
concurrent kernels on a small thread pool; it hung FISMO's eigh and ARO's
Cholesky in the trainer), with the batched results.

Each optimizer step that decomposes matrices is compiled on a stack of 3
and its LAPACK calls are read from the HLO.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthax import matrix_stages as MS
from orthax import polar
from orthax.matrix_stages import _fisher
from orthax.matrix_stages import _qr
from orthax.matrices import MatrixSpec
from orthax.polar import lapack
from orthax.transforms import lanton


def lapack_operands(fn, *args) -> list[tuple[str, list[str]]]:
  """``(target, operand shapes)`` of every LAPACK custom call of
  ``jit(fn)(*args)`` compiled for this (CPU) backend."""
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  calls = []
  for line in hlo.splitlines():
    m = re.search(r'custom_call_target="(lapack_[a-z0-9_]+)"', line)
    if m:
      calls.append((m.group(1), re.findall(r'f32\[([0-9,]*)\]', line)))
  return calls


def assert_one_matrix_per_call(calls):
  assert calls, 'no LAPACK call found: the test no longer sees the kernels'
  for target, shapes in calls:
    assert all(s.count(',') <= 1 for s in shapes), (target, shapes)


def _stack(k=3, m=16, n=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (k, m, n), jnp.float32)


def test_results_equal_the_batched_kernels():
  a = np.random.default_rng(0).standard_normal((3, 2, 8, 8))
  x = jnp.asarray(a @ a.swapaxes(-1, -2) + 8 * np.eye(8), jnp.float32)
  for fn in (jnp.linalg.eigh, jnp.linalg.cholesky,
             lambda m: jnp.linalg.qr(m)[0],
             lambda m: jnp.linalg.svd(m, compute_uv=False)):
    got = jax.jit(lambda x, fn=fn: lapack.per_matrix(fn, x))(x)
    want = fn(x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert g.shape == w.shape
      np.testing.assert_allclose(np.abs(g), np.abs(w), rtol=2e-5, atol=2e-5)


def test_a_single_matrix_is_passed_through():
  x = jnp.eye(4)
  assert lapack.per_matrix(lambda m: m * 2, x).shape == (4, 4)


def test_stacks_must_share_leading_axes():
  with pytest.raises(ValueError, match='leading axes'):
    lapack.per_matrix(lambda a, b: a, jnp.zeros((2, 3, 3)),
                      jnp.zeros((3, 3, 3)))


@pytest.mark.parametrize('kw', [{}, {'qr': 'shifted_cholesky'},
                                {'qr': 'householder'},
                                {'stable': False}, {'rotate': 'fan_out'}])
def test_aro_rotation(kw):
  st = MS.AroRotate(**kw)
  o = _stack()
  r = jnp.broadcast_to(st.initial_state(16, 32, jnp.float32),
                       (3,) + st.shapes(16, 32).state)
  calls = lapack_operands(lambda o, r: st.apply(o, r, MS.Blocks(16, 32)),
                          o, r)
  assert_one_matrix_per_call(calls)


def test_aro_q_functions():
  c = _stack(m=16, n=16)
  for fn in (_qr.householder_q, _qr.shifted_cholesky_q,
             _qr.cholesky_qr3_q):
    assert_one_matrix_per_call(lapack_operands(fn, c))
  for qr in ('householder', 'cholesky_qr3'):
    assert_one_matrix_per_call(lapack_operands(
        functools.partial(_qr.product_q, qr=qr), _stack(),
        _stack(seed=1)))


def test_fismo_eigh():
  x = _stack(m=8, n=8)
  x = x @ jnp.swapaxes(x, -1, -2) + 8 * jnp.eye(8)
  assert_one_matrix_per_call(lapack_operands(_fisher.symmetric_eigh, x))


def test_svd_references_and_lanton_nuclear_norm():
  x = _stack()
  assert_one_matrix_per_call(lapack_operands(polar.polar_svd, x))
  assert_one_matrix_per_call(lapack_operands(
      lambda x: polar.soft_clip_svd(x, 1.0), x))
  spec = [MatrixSpec()]
  assert_one_matrix_per_call(lapack_operands(
      lambda x: lanton._dual_norms([x], spec, 'nuclear', 'svd', None,
                                   'spectral')[0], x))



def test_docstring_example_runs():
  import doctest  # pylint: disable=g-import-not-at-top
  result = doctest.testmod(lapack, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= 3 and result.failed == 0, result
