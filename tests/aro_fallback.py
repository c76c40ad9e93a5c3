"""What XLA's cost analysis counts in ARO's stage besides its FLOP model
(shared by ``test_aro_qr.py`` and ``aro_cases.py``): the fallback branches
of :func:`orthax.matrix_stages._qr.product_q`, which the plan leaves out,
and the element-wise work around the rank checks' second QRs."""

import jax
import jax.numpy as jnp

from orthax.matrix_stages import _qr


def _counted(fn, *shapes) -> float:
  ca = jax.jit(fn).lower(*[jax.ShapeDtypeStruct(s, jnp.float32)
                           for s in shapes]).compile().cost_analysis()
  return (ca[0] if isinstance(ca, (list, tuple)) else ca)['flops']


def besides_model(s: int, t: int) -> float:
  """For one matrix whose rotated side is ``s`` (``s ≤ t``): ``W`` by
  Cholesky QR3 of ``Bᵀ`` (``t×s``: Gram products ``6s²t``, and ``81st +
  26s²`` around them, measured) for an ill-conditioned ``F`` block; ``W``
  by two Householder QRs of ``Bᵀ`` for a singular one, and the second QR
  of ``A W`` past its rank (LAPACK calls, uncounted: only the masks,
  gathers and sorts around them, as XLA counts them here)."""
  rebasis = 6 * s * s * t + 81 * s * t + 26 * s * s
  return (rebasis + _counted(_qr._rank_revealing_basis, (t, s))
          + _counted(_qr._rank_completed_q, (s, s)))
