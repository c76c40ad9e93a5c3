r"""AuON's cosh "brake": a linear-time normalization of each matrix update.

D. Maity, *A Survey For Linear-time Orthogonal Optimizer* (AuON, arXiv
2509.24320); reference ``ryyzn9/AuON`` (``auon/optimizer.py`` @ bba2e82,
Jan 2026; original ``Auon_Adam_train.py`` @ c87b862, Oct 2025).
"""

from __future__ import annotations

import jax
import optax

from orthax import _tree
from orthax import _validate
from orthax import matrix_stages
from orthax.transforms.matrix_stage import stage_transform


def cosh_normalize(
    gamma: float | jax.Array = 1.0,
    *,
    normalize: bool = True,
    brake_input: str = 'normalized',
    norm_eps: float | jax.Array = 1e-7,
    eps: float | jax.Array = 1e-8,
    matrix_specs: _tree.SpecsLike = None,
) -> optax.GradientTransformation:
  r"""Divides each matrix ``G`` by the RMS of ``cosh`` of its entries.

  With ``X = G/(‖G‖_F + ε_n)`` (per matrix of the leaf's view):

  .. math::
     r = \sqrt{\mathrm{mean}\,\cosh(γB)^2},\qquad
     U = \frac{X \text{ or } G}{r + ε},\qquad
     B = X \;(\texttt{brake\_input='normalized'})\;\text{or}\; G\;(\texttt{'raw'}),

  the output being ``X`` when ``normalize`` else ``G``. The modes used by
  :func:`orthax.recipes.auon`:

  ====================  =========  ===========  =====  ========================
  form                  normalize  brake_input  γ      source
  ====================  =========  ===========  =====  ========================
  AuON, paper           True       normalized   1      arXiv 2509.24320
  Hybrid, paper         False      raw          1      (after one NS step)
  AuON / Hybrid, repo   False      normalized   1.5    ``auon/optimizer.py``
  ====================  =========  ===========  =====  ========================

  In the paper form ``r`` is close to 1 for realistic sizes (entries of ``X``
  are ``O(1/\sqrt N)``, so ``r - 1 ≈ γ²/2N``): AuON is essentially normalized
  momentum. It is linear-time: a norm, an elementwise ``cosh`` and a mean.
  The Jan 2026 repo divides the *raw* momentum ``G`` (not ``X``) by ``r`` —
  its updates scale with the gradient, and its learning rates are not the
  paper's. A zero matrix gives a zero update (the repo skips the step).

  Args:
    gamma: ``γ`` inside the cosh (repo 1.5; the paper has none, γ = 1).
    normalize: output ``X`` (paper AuON) instead of ``G``.
    brake_input: ``'normalized'`` (cosh of ``X``) or ``'raw'`` (cosh of ``G``,
      the paper's Hybrid-AuON after Newton–Schulz).
    norm_eps: ``ε_n`` of the Frobenius normalization (1e-7 in both).
    eps: ``ε`` added to ``r`` (1e-8 in both).
    matrix_specs: as in :func:`orthax.orthogonalize`.

  After Newton–Schulz (Hybrid-AuON) the same brake runs in the
  orthogonalize pass as ``then=[orthax.matrix_stages.CoshNormalize(...)]``.

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> params = {'w': jnp.ones((8, 16))}
    >>> tx = orthax.cosh_normalize()          # the paper's AuON
    >>> u, _ = tx.update({'w': 3 * jnp.ones((8, 16))}, tx.init(params))
    >>> round(float(jnp.linalg.norm(u['w'])), 3)  # 1/cosh(1/√128)
    0.996
  """
  # eps is added to r >= 1 (cosh >= 1): 0 cannot divide by zero.
  _validate.arguments('cosh_normalize', cosh_normalize, locals(),
                      eps=_validate.nonnegative)
  return stage_transform(
      matrix_stages.CoshNormalize(gamma, normalize=normalize,
                                  brake_input=brake_input, norm_eps=norm_eps,
                                  eps=eps),
      matrix_specs, 'cosh_normalize')
