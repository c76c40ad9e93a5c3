"""NorMuon's per-neuron normalization of an orthogonalized update."""

from __future__ import annotations

import jax
import optax

from orthax import _tree
from orthax import _validate
from orthax import matrix_stages
from orthax.transforms.matrix_stage import NeuronNormalizeState  # re-export
from orthax.transforms.matrix_stage import stage_transform

__all__ = ['NeuronNormalizeState', 'neuron_normalize', 'scale_to_rms']


def neuron_normalize(
    beta2: float | jax.Array = 0.95,
    eps: float | jax.Array = 1e-10,
    *,
    axis: str = 'fan_out',
    eps_placement: str = 'add',
    restore_norm: bool = True,
    matrix_specs: _tree.SpecsLike = None,
) -> optax.GradientTransformation:
  r"""NorMuon: normalizes each neuron (row) of an orthogonalized update.

  Place it after :func:`orthax.orthogonalize`, or give
  :class:`orthax.matrix_stages.NeuronNormalize` to its ``then=`` (same
  result, same pass; on a mesh, inside the distributed body). With ``O`` one matrix of the
  incoming update in PyTorch layout (rows = output neurons; for a Flax kernel
  ``(in, out)`` a row is a kernel *column*):

  .. math::
     v &\leftarrow β_2 v + (1-β_2)\,\mathrm{mean}_{\mathrm{cols}}(O\odot O)
        \quad\text{(one entry per neuron, no bias correction)}\\
     \hat O &= O \oslash d,\qquad d = \sqrt{v} + ε\ (\texttt{add})\ \text{or}\
        \sqrt{\max(v, ε)}\ (\texttt{clamp})\\
     \hat O &\leftarrow \hat O\cdot\|O\|_F / (\|\hat O\|_F + ε)
        \quad\text{(``restore\_norm``; clamp: } \max(\|\hat O\|_F, ε))

  ``axis='fan_out'`` keeps one statistic per output neuron (NorMuon repo,
  Dion); ``axis='longer'`` keeps it along the longer side of the matrix
  (modded-nanogpt, NVIDIA: per output neuron when ``out ≥ in``, else per input
  feature). The Frobenius norm is per matrix (each entry of a stacked leaf).

  State: one vector per matrix — for a kernel ``(in, out)`` a vector of
  shape ``(out,)``, for a stacked ``(L, in, out)`` leaf ``(L, out)`` (float32,
  or the update's dtype if wider).

  Args:
    beta2: EMA rate β2 of the second moment (NorMuon 0.95, modded-nanogpt 0.9).
    eps: ε of the denominator and of the Frobenius restore.
    axis: ``'fan_out'`` or ``'longer'``.
    eps_placement: ``'add'`` (NorMuon repo: ``sqrt(v) + ε``) or ``'clamp'``
      (modded-nanogpt: ``max(v, ε)^{-1/2}``).
    restore_norm: rescale each matrix back to its incoming Frobenius norm
      (repo form); ``False`` for the paper form, followed by
      :func:`scale_to_rms`.
    matrix_specs: as in :func:`orthax.orthogonalize`.

  References: Li et al., *NorMuon: Making Muon more efficient and scalable*
  (arXiv 2510.05491), github.com/zichongli5/NorMuon ``normuon.py`` @ d45c9a4;
  modded-nanogpt ``train_gpt.py`` @ f411b3d
  (``_apply_normuon_variance_reduction``).

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> params = {'w': jnp.ones((8, 16))}     # Flax (in, out): 16 neurons
    >>> o = jnp.ones((8, 16)) * jnp.arange(1.0, 17.0)  # neuron j at size j
    >>> tx = orthax.neuron_normalize()
    >>> u, state = tx.update({'w': o}, tx.init(params))
    >>> state.nu['w'].shape
    (16,)
    >>> bool(jnp.allclose(u['w'], u['w'][0, 0]))  # every neuron alike
    True
    >>> round(float(jnp.linalg.norm(u['w']) / jnp.linalg.norm(o)), 4)
    1.0
  """
  _validate.arguments('neuron_normalize', neuron_normalize, locals())
  stage = matrix_stages.NeuronNormalize(
      beta2, eps, axis=axis, eps_placement=eps_placement,
      restore_norm=restore_norm)
  return stage_transform(stage, matrix_specs, 'neuron_normalize')


def scale_to_rms(
    rms: float | jax.Array = 0.2,
    eps: float | jax.Array = 1e-10,
    *,
    matrix_specs: _tree.SpecsLike = None,
) -> optax.GradientTransformation:
  r"""Rescales each matrix of the update to a fixed RMS.

  .. math:: X \leftarrow X\cdot \frac{\mathrm{rms}\sqrt{mn}}{\|X\|_F + ε}

  so that :math:`\mathrm{RMS}(X) = \mathrm{rms}` (for ``X ≠ 0``; a zero
  matrix stays zero). With :func:`neuron_normalize` (``restore_norm=False``)
  and ``rms = 0.2`` this is the step size
  :math:`\hatη = 0.2\,η\sqrt{mn}/\|\hat O\|_F` of NorMuon's Algorithm 1
  (Li et al., arXiv 2510.05491), which matches AdamW's update RMS.

  Args:
    rms: the target RMS.
    eps: ε added to the Frobenius norm.
    matrix_specs: as in :func:`orthax.orthogonalize`.

  Example:
    >>> import jax.numpy as jnp, orthax
    >>> params = {'w': jnp.ones((8, 16))}
    >>> tx = orthax.scale_to_rms(0.2)
    >>> u, _ = tx.update({'w': 3 * jnp.ones((8, 16))}, tx.init(params))
    >>> round(float(jnp.sqrt(jnp.mean(u['w'] ** 2))), 4)
    0.2
  """
  _validate.arguments('scale_to_rms', scale_to_rms, locals())
  return stage_transform(matrix_stages.ScaleToRms(rms, eps), matrix_specs,
                         'scale_to_rms')
