"""Per-matrix stages that run right after Newton–Schulz, on whole matrices.

A *matrix stage* maps a stack of orthogonalized matrices ``[k, fan_in,
fan_out]`` (and, for a stateful stage, one small state array per matrix, e.g.
a vector of per-neuron statistics) to a new stack and state. NorMuon's neuron
normalization, the shape scale and the fixed-RMS rescale are stages.
:func:`orthax.orthogonalize` runs them in the same pass as Newton–Schulz
(``then=``); on a mesh they therefore run inside the same ``shard_map`` body,
on the device that holds the whole matrix, so that their row statistics and
Frobenius norms are those of the whole matrix (DESIGN.md §4).

Pure ``jax.numpy``; nothing here knows of optax or meshes. The one concession
to distribution is :class:`Blocks`: a stage sums through
:meth:`Blocks.sum`, which adds up partial sums across devices when a matrix
is held in column blocks (tensor-parallel Newton–Schulz); otherwise it is
``jnp.sum``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

SCALE_MODES = ('keller', 'moonlight', 'spectral', 'none')
NEURON_AXES = ('fan_out', 'longer')
EPS_PLACEMENTS = ('add', 'clamp')


class Blocks(NamedTuple):
  """How a stage sees its ``[k, fan_in, fan_out]`` stack.

  ``fan_in``/``fan_out`` are the whole matrix's sizes. ``split`` is ``None``
  when each matrix is whole, else the axis (``-2`` or ``-1``) held in blocks,
  whose partial sums ``reduce`` adds up across the blocks.
  """
  fan_in: int
  fan_out: int
  split: int | None = None
  reduce: Callable[[jax.Array], jax.Array] | None = None

  def sum(self, x: jax.Array, axis: int | Sequence[int]) -> jax.Array:
    """``jnp.sum(x, axis, keepdims=True)`` over the whole matrix."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    axes = tuple(a - x.ndim if a >= 0 else a for a in axes)
    s = jnp.sum(x, axis=axes, keepdims=True)
    if self.split is not None and self.split in axes:
      s = self.reduce(s)
    return s


def wide(dtype) -> Any:
  """The dtype stage statistics are kept in: float32 or the update's, if
  wider."""
  return jnp.promote_types(dtype, jnp.float32)


class MatrixStage:
  """Base class. Subclasses set ``name`` and override :meth:`apply`; a
  stateful one also overrides :meth:`state_shape` and :meth:`state_axis`."""

  name: str = 'stage'

  def state_shape(self, fan_in: int, fan_out: int) -> tuple[int, ...] | None:
    """The per-matrix state's shape (``None``: stateless)."""
    del fan_in, fan_out
    return None

  def state_axis(self, fan_in: int, fan_out: int) -> int | None:
    """The matrix axis (``-2``: fan-in, ``-1``: fan-out) the per-matrix state
    vector runs along, or ``None`` (per-matrix scalars, or stateless)."""
    del fan_in, fan_out
    return None

  def apply(self, o: jax.Array, state: jax.Array | None,
            blocks: Blocks) -> tuple[jax.Array, jax.Array | None]:
    """``(o[k, fan_in, fan_out], state[k, ...]) -> (o', state')``."""
    raise NotImplementedError

  def sums(self, fan_in: int, fan_out: int) -> tuple[tuple[int, ...], ...]:
    """The axes of each :meth:`Blocks.sum` :meth:`apply` makes, in order
    (what a sharding plan counts as collectives when matrices are split)."""
    del fan_in, fan_out
    return ()

  @property
  def stateful(self) -> bool:
    return self.state_shape(2, 3) is not None


# Shape scale ----------------------------------------------------------------


def shape_factor(fan_in: int, fan_out: int, mode: str,
                 rms: float = 0.2) -> float:
  """The shape scale of one ``fan_in × fan_out`` matrix (see
  :func:`orthax.scale_by_shape`)."""
  if mode == 'keller':
    return math.sqrt(max(1.0, fan_out / fan_in))
  if mode == 'moonlight':
    return rms * math.sqrt(max(fan_in, fan_out))
  if mode == 'spectral':
    return math.sqrt(fan_out / fan_in)
  if mode == 'none':
    return 1.0
  raise ValueError(f'scale mode must be one of {SCALE_MODES}, got {mode!r}.')


class ScaleByShape(MatrixStage):
  """``O ← O·shape_factor(fan_in, fan_out, mode)``."""

  name = 'scale_by_shape'

  def __init__(self, mode: str = 'keller', rms: float = 0.2):
    if mode not in SCALE_MODES:
      raise ValueError(f'scale mode must be one of {SCALE_MODES}, got '
                       f'{mode!r}.')
    self.mode, self.rms = mode, rms

  def apply(self, o, state, blocks):
    if self.mode == 'none':
      return o, state
    f = shape_factor(blocks.fan_in, blocks.fan_out, self.mode, self.rms)
    return (o * f).astype(o.dtype), state


class ScaleToRms(MatrixStage):
  """``O ← O·rms·√(mn) / (‖O‖_F + ε)`` (a zero matrix stays zero)."""

  name = 'scale_to_rms'

  def __init__(self, rms: Any = 0.2, eps: Any = 1e-10):
    self.rms, self.eps = rms, eps

  def apply(self, o, state, blocks):
    x = o.astype(wide(o.dtype))
    norm = jnp.sqrt(blocks.sum(x * x, (-2, -1)))
    size = (blocks.fan_in * blocks.fan_out) ** 0.5
    return (x * (self.rms * size / (norm + self.eps))).astype(o.dtype), state

  def sums(self, fan_in, fan_out):
    return ((-2, -1),)


# NorMuon ----------------------------------------------------------------------


def neuron_axis(fan_in: int, fan_out: int, axis: str) -> int:
  """The ``[fan_in, fan_out]`` axis NorMuon keeps one statistic along
  (``-1``: per fan-out unit, ``-2``: per fan-in unit)."""
  if axis == 'fan_out':
    return -1
  # modded-nanogpt: torch rows (= fan_out) >= cols (= fan_in) -> per row.
  return -1 if fan_out >= fan_in else -2


class NeuronNormalize(MatrixStage):
  r"""NorMuon's per-neuron normalization of ``O`` (one statistic per neuron
  ``i`` along :func:`neuron_axis`; details in
  :func:`orthax.neuron_normalize`):

  .. math::
     v_i \leftarrow β_2 v_i + (1-β_2)\,\mathrm{mean}_j O_{ij}^2,\qquad
     \hat O = \frac{O}{\sqrt v + ε}\cdot
        \frac{\|O\|_F}{\|O/(\sqrt v + ε)\|_F + ε}\ (\texttt{restore\_norm})

  References: Li et al., arXiv 2510.05491; zichongli5/NorMuon @ d45c9a4.
  """

  name = 'neuron_normalize'

  def __init__(self, beta2: Any = 0.95, eps: Any = 1e-10, *,
               axis: str = 'fan_out', eps_placement: str = 'add',
               restore_norm: bool = True):
    if axis not in NEURON_AXES:
      raise ValueError(f'neuron_normalize axis must be one of {NEURON_AXES}, '
                       f'got {axis!r}.')
    if eps_placement not in EPS_PLACEMENTS:
      raise ValueError(f'neuron_normalize eps_placement must be one of '
                       f'{EPS_PLACEMENTS}, got {eps_placement!r}.')
    self.beta2, self.eps, self.axis = beta2, eps, axis
    self.eps_placement, self.restore_norm = eps_placement, restore_norm

  def state_axis(self, fan_in, fan_out):
    return neuron_axis(fan_in, fan_out, self.axis)

  def state_shape(self, fan_in, fan_out):
    return (fan_out if self.state_axis(fan_in, fan_out) == -1 else fan_in,)

  def sums(self, fan_in, fan_out):
    red = -2 if self.state_axis(fan_in, fan_out) == -1 else -1
    return ((red,),) + (((-2, -1), (-2, -1)) if self.restore_norm else ())

  def apply(self, o, state, blocks):
    keep = self.state_axis(blocks.fan_in, blocks.fan_out)
    red = -2 if keep == -1 else -1
    n_red = blocks.fan_in if red == -2 else blocks.fan_out
    x = o.astype(state.dtype)
    mean_sq = jnp.squeeze(blocks.sum(x * x, red), red) / n_red
    v = self.beta2 * state + (1 - self.beta2) * mean_sq
    if self.eps_placement == 'add':
      d = jnp.sqrt(v) + self.eps
    else:
      d = jnp.sqrt(jnp.maximum(v, self.eps))
    out = x / jnp.expand_dims(d, red)
    if self.restore_norm:
      n_in = jnp.sqrt(blocks.sum(x * x, (-2, -1)))
      n_out = jnp.sqrt(blocks.sum(out * out, (-2, -1)))
      n_out = (n_out + self.eps if self.eps_placement == 'add'
               else jnp.maximum(n_out, self.eps))
      out = out * (n_in / n_out)
    return out.astype(o.dtype), v


# AuON ---------------------------------------------------------------------------

BRAKE_INPUTS = ('normalized', 'raw')


class CoshNormalize(MatrixStage):
  r"""AuON's cosh brake (modes in :func:`orthax.cosh_normalize`): with
  ``X = G/(‖G‖_F + ε_n)`` and ``B = X`` or ``G``,

  .. math:: U = (X \text{ or } G)\,/\,\big(\sqrt{\mathrm{mean}\,\cosh(γB)^2}
     + ε\big)

  Reference: Maity, arXiv 2509.24320; ryyzn9/AuON @ bba2e82.
  """

  name = 'cosh_normalize'

  def __init__(self, gamma: Any = 1.0, *, normalize: bool = True,
               brake_input: str = 'normalized', norm_eps: Any = 1e-7,
               eps: Any = 1e-8):
    if brake_input not in BRAKE_INPUTS:
      raise ValueError(f'brake_input must be one of {BRAKE_INPUTS}, got '
                       f'{brake_input!r}.')
    self.gamma, self.normalize, self.brake_input = gamma, normalize, brake_input
    self.norm_eps, self.eps = norm_eps, eps

  def sums(self, fan_in, fan_out):
    return ((-2, -1), (-2, -1))

  def apply(self, o, state, blocks):
    g = o.astype(wide(o.dtype))
    norm = jnp.sqrt(blocks.sum(jnp.square(g), (-2, -1)))
    xn = g / (norm + self.norm_eps)
    b = xn if self.brake_input == 'normalized' else g
    size = blocks.fan_in * blocks.fan_out
    r = jnp.sqrt(blocks.sum(jnp.square(jnp.cosh(self.gamma * b)), (-2, -1))
                 / size)
    return ((xn if self.normalize else g) / (r + self.eps)).astype(
        o.dtype), state


# Applying stages to [k, fan_in, fan_out] stacks -------------------------------


def apply_stages(stages: Sequence[MatrixStage], o: jax.Array,
                 states: Sequence[jax.Array | None],
                 blocks: Blocks) -> tuple[jax.Array, list[jax.Array | None]]:
  """Runs ``stages`` in order on ``o[k, fan_in, fan_out]``; ``states[j]`` is
  stage ``j``'s ``[k, ...]`` state (``None`` if stateless). The stack keeps
  its dtype between stages."""
  new = []
  for st, s in zip(stages, states):
    o, s = st.apply(o, s, blocks)
    new.append(s)
  return o, new
