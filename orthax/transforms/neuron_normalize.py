"""NorMuon's per-neuron normalization of an orthogonalized update."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from orthax import _tree
from orthax import matrices

AXES = ('fan_out', 'longer')
EPS_PLACEMENTS = ('add', 'clamp')


class NeuronNormalizeState(NamedTuple):
  nu: Any  # per leaf: batch shape + (neurons,), float32 or wider


def _stat_axis(fan_in: int, fan_out: int, axis: str) -> int:
  """Axis of the ``[batch, fan_in, fan_out]`` view that the statistic keeps
  (-1: one entry per fan-out unit, -2: per fan-in unit)."""
  if axis == 'fan_out':
    return -1
  # modded-nanogpt: torch rows (= fan_out) >= cols (= fan_in) -> per row.
  return -1 if fan_out >= fan_in else -2


def _stat_shape(shape, spec: matrices.MatrixSpec, axis: str):
  batch, _, _ = spec.resolve(shape)
  _, fi, fo = spec.matrix_shape(shape)
  n = fo if _stat_axis(fi, fo, axis) == -1 else fi
  return tuple(shape[a] for a in batch) + (n,)


def _wide(dtype) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


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

  Place it after :func:`orthax.orthogonalize`. With ``O`` one matrix of the
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
  """
  if axis not in AXES:
    raise ValueError(f'neuron_normalize axis must be one of {AXES}, got '
                     f'{axis!r}.')
  if eps_placement not in EPS_PLACEMENTS:
    raise ValueError(f'neuron_normalize eps_placement must be one of '
                     f'{EPS_PLACEMENTS}, got {eps_placement!r}.')

  def init_fn(params):
    specs = _tree.resolve_specs(matrix_specs, params, 'neuron_normalize')
    leaves, treedef = jax.tree.flatten(params)
    return NeuronNormalizeState(nu=jax.tree.unflatten(treedef, [
        jnp.zeros(_stat_shape(x.shape, s, axis), _wide(x.dtype))
        for x, s in zip(leaves, specs)]))

  def leaf(x, v, spec):
    b, fi, fo = spec.matrix_shape(x.shape)
    keep = _stat_axis(fi, fo, axis)
    red = -2 if keep == -1 else -1
    o = matrices.to_matrices(x, spec).astype(v.dtype)
    v2 = v.reshape(b, -1)
    v2 = beta2 * v2 + (1 - beta2) * jnp.mean(o * o, axis=red)
    if eps_placement == 'add':
      d = jnp.sqrt(v2) + eps
    else:
      d = jnp.sqrt(jnp.maximum(v2, eps))
    out = o / jnp.expand_dims(d, red)
    if restore_norm:
      n_in = jnp.sqrt(jnp.sum(o * o, axis=(-2, -1), keepdims=True))
      n_out = jnp.sqrt(jnp.sum(out * out, axis=(-2, -1), keepdims=True))
      n_out = n_out + eps if eps_placement == 'add' else jnp.maximum(n_out,
                                                                     eps)
      out = out * (n_in / n_out)
    new = matrices.from_matrices(out, spec, x.shape).astype(x.dtype)
    return new, v2.reshape(v.shape)

  def update_fn(updates, state, params=None):
    del params
    specs = _tree.resolve_specs(matrix_specs, updates, 'neuron_normalize')
    leaves, treedef = jax.tree.flatten(updates)
    nus = treedef.flatten_up_to(state.nu)
    pairs = [leaf(x, v, s) for x, v, s in zip(leaves, nus, specs)]
    return (jax.tree.unflatten(treedef, [p[0] for p in pairs]),
            NeuronNormalizeState(
                nu=jax.tree.unflatten(treedef, [p[1] for p in pairs])))

  return optax.GradientTransformation(init_fn, update_fn)


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
  """

  def update_fn(updates, state, params=None):
    del params
    specs = _tree.resolve_specs(matrix_specs, updates, 'scale_to_rms')
    leaves, treedef = jax.tree.flatten(updates)
    out = []
    for x, s in zip(leaves, specs):
      b, fi, fo = s.matrix_shape(x.shape)
      o = matrices.to_matrices(x, s).astype(_wide(x.dtype))
      norm = jnp.sqrt(jnp.sum(o * o, axis=(-2, -1), keepdims=True))
      o = o * (rms * (fi * fo) ** 0.5 / (norm + eps))
      out.append(matrices.from_matrices(o, s, x.shape).astype(x.dtype))
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)
