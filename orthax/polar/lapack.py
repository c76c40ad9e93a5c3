"""Decompositions of matrix stacks that cannot deadlock on CPU.

jaxlib's CPU kernels for ``eigh``, ``qr``, ``cholesky``, ``svd`` and the
triangular solve split a batch of matrices over the intra-op thread pool
they run on and block until the pieces finish. Two such kernels that XLA
runs at the same time can take every thread of a small pool (2 threads on a
2-core machine) and wait on each other forever, at 0% CPU: it hung FISMO's
``eigh`` and ARO's ``cholesky`` in the trainer's GPT, whose scanned layers
make every matrix a stack. A kernel given one matrix never splits, so
:func:`per_matrix` walks a stack one matrix per call on CPU (``lax.map``);
GPUs and TPUs keep the batched kernels.

Every decomposition in the optimizer's step goes through :func:`per_matrix`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax


def per_matrix(fn: Callable[..., Any], *stacks: jax.Array) -> Any:
  """``fn(*stacks)`` for arrays ``[..., a, b]`` with the same leading axes;
  on CPU ``fn`` sees one matrix at a time.

  ``fn`` must take one matrix per argument (``[a, b]``, on CPU) and
  stacks of them (``[k, a, b]``, elsewhere) and return arrays with the same
  leading axis (any pytree of them). Without leading axes ``fn`` is called
  directly.

  Example:
    >>> import jax.numpy as jnp
    >>> from orthax.polar import lapack
    >>> x = jnp.stack([jnp.eye(3), 2 * jnp.eye(3)])
    >>> w, _ = lapack.per_matrix(jnp.linalg.eigh, x)
    >>> w.tolist()
    [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
  """
  lead = stacks[0].shape[:-2]
  for x in stacks:
    if x.shape[:-2] != lead:
      raise ValueError('per_matrix: stacks must share their leading axes, '
                       f'got {[s.shape for s in stacks]}.')
  if not lead:
    return fn(*stacks)
  flat = [x.reshape((-1,) + x.shape[-2:]) for x in stacks]
  out = jax.lax.platform_dependent(
      *flat, cpu=lambda *f: jax.lax.map(lambda xs: fn(*xs), f),
      default=fn)
  return jax.tree.map(lambda y: y.reshape(lead + y.shape[1:]), out)


__all__ = ['per_matrix']
