"""Argument checks of the matrix functions (``orthax.polar``): a bad value
is a ``ValueError``/``TypeError`` naming the function and the argument, not
a silently wrong result."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthax import polar
from orthax.polar import spectral as S


@pytest.mark.parametrize('fn', ['newton_schulz', 'gram_newton_schulz',
                                'orthogonalize_stack'])
@pytest.mark.parametrize('kwargs,match', [
    (dict(norm_scale=-1.0), 'norm_scale must be > 0'),  # returned -UVᵀ
    (dict(norm_scale=0.0), 'norm_scale must be > 0'),   # returned NaN
    (dict(eps=float('nan')), 'eps must be finite'),     # returned NaN
    (dict(eps=-1.0), 'eps must be > 0'),
])
def test_normalizer_overrides_are_checked(fn, kwargs, match):
  with pytest.raises(ValueError, match=match):
    getattr(polar, fn)(jnp.ones((4, 8)), **kwargs)


@pytest.mark.parametrize('x,kwargs,error,match', [
    # An IndexError, numpy's "not inexact" naming no argument, and a
    # ZeroDivisionError later (gram_flops).
    (jnp.ones(4), {}, ValueError,
     r'^orthogonalize_stack: x must have shape \[..., m, n\]'),
    (jnp.ones((2, 3), jnp.int32), {}, TypeError, 'x must be a floating'),
    (jnp.ones((2, 3)), dict(dtype=jnp.int32), TypeError,
     'dtype must be a floating'),
    (jnp.ones((2, 3)), dict(col_shards=0), ValueError,
     'col_shards must be an int >= 1'),
])
def test_orthogonalize_stack_names_bad_arguments(x, kwargs, error, match):
  with pytest.raises(error, match=match):
    polar.orthogonalize_stack(x, **kwargs)


@pytest.mark.parametrize('method', ['auto', 'standard', 'gram'])
@pytest.mark.parametrize('restart_every', [-1, 'x', 1.5, True])
def test_choose_method_checks_restart_every_for_every_method(method,
                                                             restart_every):
  # Checked only where 'auto' compared the methods' FLOPs: an explicit
  # method, a bf16 iteration or a traced step count let any value through.
  for steps, dtype in ((5, jnp.float32), (5, jnp.bfloat16)):
    with pytest.raises(ValueError, match='^choose_method: restart_every'):
      polar.choose_method(64, 16, steps, dtype, method,
                          restart_every=restart_every)


@pytest.mark.parametrize('kwargs,error,match', [
    # steps=0, -3 or a NaN tol returned the input scaled (35% off), 2.5 a
    # coarser result: silently.
    (dict(steps=0), ValueError, 'steps must be an integer >= 1'),
    (dict(steps=-3), ValueError, 'steps must be an integer >= 1'),
    (dict(steps=2.5), TypeError, 'steps must be an integer'),
    (dict(tol=float('nan')), ValueError, 'tol must be finite'),
])
def test_soft_clip_matrix_checks_its_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    S.soft_clip_matrix(jnp.ones((4, 8)), 1.0, **kwargs)
  with pytest.raises(TypeError, match='x must hold real floating-point'):
    S.soft_clip_matrix(jnp.ones((2, 3), jnp.int32), 1.0)  # was zeros


def test_soft_clip_svd_takes_half_precision():
  x = jax.random.normal(jax.random.key(0), (4, 8))
  for dtype in (jnp.bfloat16, jnp.float16):
    got = S.soft_clip_svd(x.astype(dtype), 1.0)
    assert got.dtype == dtype
    want = S.soft_clip_svd(x.astype(dtype).astype(jnp.float32), 1.0)
    np.testing.assert_allclose(np.asarray(got, np.float32), want,
                               rtol=2e-2, atol=2e-2)
