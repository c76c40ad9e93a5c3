r"""FISMO's Kronecker-factored Fisher trust-region step, as a slot stage.

For one matrix with PyTorch-layout gradient ``G`` (``m×n``, ``m`` = fan-out,
``n`` = fan-in) and state ``P`` (``m×m``), ``Q`` (``n×n``), ``M`` (``m×n``),
one step (Gauss–Seidel order: ``P`` first, with the old ``Q``):

.. math::
   L &= G Q^{-1} G^\top / n + μ\,\mathrm{tr}(P)/m\,I_m,\quad
   P \leftarrow \mathrm{sym}\bigl(m\,\tilde P/\mathrm{tr}\tilde P\bigr),\
   \tilde P = γP + (1-γ)L \\
   R &= G^\top P^{-1} G / m + μ\,\mathrm{tr}(Q)/n\,I_n,\quad
   Q \leftarrow \mathrm{sym}\bigl(n\,\tilde Q/\mathrm{tr}\tilde Q\bigr),\
   \tilde Q = γQ + (1-γ)R \\
   M &\leftarrow βM + (1-β)\,\tilde G,\quad \tilde G = P^{-1/2} G Q^{-1/2},
   \qquad ΔW = c\,P^{-1/2}\,\mathrm{Polar}(V)\,Q^{-1/2}

(``sym(X) = (X + Xᵀ)/2``; ``Polar`` by Newton–Schulz; ``V = M``, or the
Nesterov look-ahead ``V = βM + (1-β)G̃`` with ``nesterov``; ``c`` a
Muon-style shape scale). A stage sees the Flax kernel ``K = Gᵀ``
(``[k, fan_in, fan_out]``), so it computes the transposed quantities:
``Kᵀ Q⁻¹ K``, ``K P⁻¹ Kᵀ``, ``Q^{-1/2} K P^{-1/2}`` and keeps ``M`` as
``fan_in × fan_out``.
Inverses and inverse square roots come from ``jnp.linalg.eigh`` with the
eigenvalues clamped at ``eig_floor`` (the factors have mean eigenvalue 1).

Pure ``jax.numpy``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from orthax import _validate
from orthax.matrix_stages._base import MatrixStage
from orthax.matrix_stages._base import StageShapes
from orthax.matrix_stages._base import stage
from orthax.matrix_stages._base import static
from orthax.matrix_stages._scale import check_scale_mode
from orthax.matrix_stages._scale import shape_factor
from orthax.polar import dispatch as _dispatch
from orthax.polar import gram as _gram
from orthax.polar import lapack
from orthax.polar import presets as _presets
from orthax.polar.scale_safe import huge_scale

# FLOPs of one symmetric eigendecomposition of a k×k matrix, per k³ (the
# usual estimate for tridiagonalisation plus eigenvectors).
EIGH_FLOPS_PER_CUBE = 9


def symmetric_eigh(x: Any) -> tuple[Any, Any]:
  """``jnp.linalg.eigh`` of symmetric ``x[..., k, k]``, one matrix per
  kernel call on CPU (:func:`orthax.polar.lapack.per_matrix`)."""
  return lapack.per_matrix(jnp.linalg.eigh, x)


def eig_power(x: Any, power: float, floor: Any) -> Any:
  """``V·diag(max(λ, floor)^p)·Vᵀ`` of symmetric ``x[..., k, k]``, with
  ``p = power``, from one ``eigh``."""
  w, v = symmetric_eigh(x)
  w = jnp.maximum(w, jnp.asarray(floor, w.dtype))
  return jnp.einsum('...ij,...j,...lj->...il', v, w ** power, v)


def _trace(x):
  return jnp.trace(x, axis1=-2, axis2=-1)[..., None, None]


def damped_ema(old, stat, gamma, damping, scale_invariant=False):
  """``sym(k·X/tr X)`` with ``X = γ·old + (1-γ)(stat + μ·tr(old)/k·I)``;
  ``scale_invariant``: ``X = γ·old + (1-γ)(k·stat/tr(stat) + μ·I)``, the
  statistic at mean eigenvalue 1 like ``old`` (0 where it is 0)."""
  size = old.shape[-1]
  eye = jnp.eye(size, dtype=old.dtype)
  if scale_invariant:
    tr = _trace(stat)
    stat = jnp.where(tr > 0, stat * (size / jnp.where(tr > 0, tr, 1)), 0)
    x = gamma * old + (1 - gamma) * (stat + damping * eye)
  else:
    x = gamma * old + (1 - gamma) * (stat + damping * _trace(old) / size
                                     * eye)
  # (X + Xᵀ) first and the scalar after: a multiply right before the sum
  # could be contracted into an FMA on one side only, and the factor would
  # not be exactly symmetric.
  return (x + jnp.swapaxes(x, -1, -2)) * (0.5 * size / _trace(x))


@stage
class FismoStep(MatrixStage):
  """FISMO's whitened, orthogonalized step (module docstring) on the raw
  gradient; runs instead of Newton–Schulz (it orthogonalizes itself).

  State per matrix (slots, float32 or wider): ``{'p': fan_out×fan_out,
  'q': fan_in×fan_in, 'm': fan_in×fan_out, 'q_isqrt': fan_in×fan_in}``,
  starting at ``P = I``, ``Q = I``, ``M = 0``, ``Q^{-1/2} = I``.
  ``q_isqrt`` is the last step's ``Q^{-1/2}``: two ``eigh`` per step
  instead of three, the same numbers.

  Only inverse square roots are formed: with ``Z = Q_old^{-1/2}·Gᵀ`` and
  ``Y = P^{-1/2}·G``, ``G·Q_old⁻¹·Gᵀ = ZᵀZ``, ``Gᵀ·P⁻¹·G = YᵀY`` and the
  whitened gradient is ``Y·Q^{-1/2}``: the module docstring's products in
  exact arithmetic (the eigenvalue floor included, since
  ``max(λ, f)^{-1/2}`` squared is ``max(λ, f)⁻¹``), with one ``k×k``
  product per factor and one whitening product fewer, and ``L``, ``R``
  symmetric positive semidefinite by construction.

  ``precondition_every = k > 1`` (Shampoo's amortisation, not in the
  paper): ``P`` and ``Q`` are still updated every step, but their inverse
  roots only on steps ``1, 1+k, 1+2k, …`` (``count``, the 1-based step, says
  which); between refreshes the cached ``P^{-1/2}`` and ``Q^{-1/2}`` are
  used, kept as ``'p_isqrt'`` and ``'q_isqrt'``. So ``L`` of a refresh
  step, too, is formed with the ``Q^{-1/2}`` of the last refresh (``k``
  steps old), not the last step's; and between refreshes, where fan-out
  is the shorter side, the whitened gradient is ``P^{-1/2}·(G·Q^{-1/2})``,
  reusing ``Z``, a product with the smaller factor.

  Scale: ``L`` and ``R`` grow with ``‖G‖²`` and overflow float32 for a
  gradient near ``1e19``. They are formed from ``G·2⁻ᵉ``, the exact power of
  two of :func:`orthax.polar.scale_safe.huge_scale` (``e = 0``, nothing
  changes, unless ``max|G| > 2³²``); the whitening divides the power of two
  back out, so the momentum sees ``G`` itself. For such a huge gradient the damping ``μ`` therefore acts as
  ``μ·2²ᵉ`` relative to the true ``GQ⁻¹Gᵀ``: FISMO is not invariant to the
  gradient's scale (its damping is absolute), and at that scale it takes the
  step of a gradient of entries ``≤ 1``, finite, not the unscaled one's.
  With ``scale_invariant`` ``L`` and ``R`` enter the averages at mean
  eigenvalue 1 (:func:`damped_ema`), ``μ`` relative to that: the step is
  the same for ``G`` and ``c·G``.

  The stage of :func:`orthax.transforms.scale_by_fismo` (and
  :func:`orthax.fismo`), which builds it each step; the defaults below are
  the stage's.

  Args:
    beta: ``β`` of the whitened momentum ``M`` (EMA, no bias correction;
      default 0.95).
    gamma: ``γ``, the EMA rate of the factors ``P`` and ``Q`` (default
      0.95).
    damping: ``μ`` (default 1e-3): absolute, relative to unit-mean ``L``
      and ``R`` with ``scale_invariant``.
    eig_floor: the floor of the factors' eigenvalues before their inverse
      square roots (default 1e-6; their mean is 1).
    ns_steps: Newton–Schulz steps (default ``None``: the preset's).
    ns_eps: the Newton–Schulz normalizer's epsilon (default ``None``: the
      preset's).
    scale_rms: the RMS target of the ``'moonlight'`` scale (default 0.2).
    count: the 1-based step, set by the transform each step (traced); read
      only with ``precondition_every > 1``, to find the refresh steps
      (default ``None``).
    preset: static: the Newton–Schulz preset, a name or an
      :class:`orthax.polar.Preset` (default ``'jordan'``).
    ns_method: static: ``'auto'`` (default), ``'standard'`` or ``'gram'``,
      as in :func:`orthax.orthogonalize`.
    scale: static: the shape scale ``c``, one of
      :data:`~orthax.matrix_stages.SCALE_MODES` (default ``'keller'``;
      :func:`~orthax.matrix_stages.shape_factor`).
    precondition_every: static: ``k``, the steps between refreshes of the
      inverse roots (default 1: every step).
    nesterov: static: orthogonalize the look-ahead ``βM + (1-β)G̃``
      instead of ``M`` (default ``False``).
    scale_invariant: static: ``L`` and ``R`` enter at mean eigenvalue 1
      (default ``False``).
  """

  name = 'fismo'
  checks = {'beta': _validate.unit_interval, 'gamma': _validate.unit_interval,
            'damping': _validate.positive, 'eig_floor': _validate.positive,
            'ns_steps': _validate.count, 'ns_eps': _validate.positive,
            'scale_rms': _validate.nonnegative,
            'precondition_every': _validate.count}
  beta: Any = 0.95
  gamma: Any = 0.95
  damping: Any = 1e-3
  eig_floor: Any = 1e-6
  ns_steps: Any = None
  ns_eps: Any = None
  scale_rms: Any = 0.2
  count: Any = None
  preset: Any = static(default='jordan')
  ns_method: str = static(default='auto')
  scale: str = static(default='keller')
  precondition_every: int = static(default=1)
  nesterov: bool = static(default=False)
  scale_invariant: bool = static(default=False)

  def __post_init__(self):
    check_scale_mode(self.scale, f'{self.name}: scale')
    _validate.choice(_dispatch.METHODS)(self.name, 'ns_method',
                                        self.ns_method)
    _presets.check_preset(self.name, 'preset', self.preset)

  def _square_names(self) -> dict[str, str]:
    """The square state entries, each with its side (``'out'``/``'in'``)."""
    names = {'p': 'out', 'q': 'in', 'q_isqrt': 'in'}
    if self.precondition_every > 1:
      names.update(p_isqrt='out')
    return names

  def shapes(self, fan_in, fan_out):
    side = {'out': (fan_out, fan_out), 'in': (fan_in, fan_in)}
    state = {k: side[v] for k, v in self._square_names().items()}
    return StageShapes(state=dict(state, m=(fan_in, fan_out)), slots=True)

  def initial_state(self, fan_in, fan_out, dtype):
    side = {'out': fan_out, 'in': fan_in}
    state = {k: jnp.eye(side[v], dtype=dtype)
             for k, v in self._square_names().items()}
    return dict(state, m=jnp.zeros((fan_in, fan_out), dtype))

  def _steps(self) -> int:
    if isinstance(self.ns_steps, (int, np.integer)):
      return int(self.ns_steps)
    return _presets.get_preset(self.preset).steps

  def flops(self, fan_in, fan_out):
    """``6(m²n + mn²)`` (``m`` = fan-out) for ``GQ⁻¹Gᵀ``, ``GᵀP⁻¹G`` and
    unwhitening, and ``2mn²`` for whitening (which reuses ``P^{-1/2}G``;
    between refreshes, where ``m < n``, ``2m²n``: :meth:`_whiten`); two
    ``eigh`` (new ``P``, new ``Q``: ``9k³`` each, an estimate: XLA's cost
    analysis does not count them) and the two ``k×k`` products forming
    their inverse roots (``2k³`` each), that part averaged over the
    ``precondition_every`` steps it serves; Newton–Schulz as
    :func:`orthax.polar.orthogonalize_stack` would run it in float32."""
    n, m = fan_in, fan_out
    e = EIGH_FLOPS_PER_CUBE
    steps = self._steps()
    meth = _dispatch.choose_method(n, m, steps, jnp.float32, self.ns_method)
    ns = (_gram.gram_flops(n, m, steps) if meth == 'gram'
          else _gram.standard_flops(n, m, steps))
    every = self.precondition_every
    roots = (e + 2) * (m ** 3 + n ** 3) // every
    white = 2 * m * n * n
    if m < n:  # k - 1 of every k steps whiten with P^{-1/2}
      white = (white + (every - 1) * 2 * m * m * n) // every
    return 6 * (m * m * n + m * n * n) + white + roots + ns

  def _refresh_due(self):
    """Whether this step refreshes the inverse roots (``None``: every step
    does)."""
    if self.precondition_every == 1:
      return None
    return (jnp.asarray(self.count) - 1) % self.precondition_every == 0

  def _inverse_root(self, x, state, name, due):
    """``x^{-1/2}``: fresh from one ``eigh``, or, between refreshes of
    ``precondition_every``, the cached ``state[name]``."""
    def fresh(x):
      return eig_power(x, -0.5, self.eig_floor)
    if due is None:
      return fresh(x)
    return jax.lax.cond(due, fresh, lambda _: state[name], x)

  @staticmethod
  def _whiten(z, y, p_isqrt, q_isqrt, due):
    """``Q^{-1/2}·K·P^{-1/2}`` as ``Q^{-1/2}·y``. Between refreshes
    ``Q^{-1/2}`` is the cached root ``z = Q^{-1/2}K`` was formed with, so
    where fan-out is the shorter side ``z·P^{-1/2}`` is the same product
    with the smaller factor (``2nm²`` FLOPs against ``2n²m``)."""
    n, m = y.shape[-2], y.shape[-1]
    by_q = lambda: jnp.einsum('bij,bja->bia', q_isqrt, y)
    if due is None or m >= n:
      return by_q()
    return jax.lax.cond(due, by_q,
                        lambda: jnp.einsum('bia,bac->bic', z, p_isqrt))

  def apply(self, o, state, blocks):
    if blocks.split is not None:
      raise ValueError('matrix stage fismo needs whole matrices (not column '
                       'blocks).')
    dt = state['m'].dtype
    n, m = blocks.fan_in, blocks.fan_out
    k = o.astype(dt)
    unit = huge_scale(k).astype(dt)  # 2⁻ᵉ: 1 below 2³²
    ks = k * unit
    z = jnp.einsum('bij,bja->bia', state['q_isqrt'], ks)   # Q_old^{-1/2} Gᵀ
    left = jnp.einsum('bia,bic->bac', z, z) / n
    p = damped_ema(state['p'], left, self.gamma, self.damping,
                   self.scale_invariant)
    due = self._refresh_due()
    p_isqrt = self._inverse_root(p, state, 'p_isqrt', due)
    y = jnp.einsum('bia,bac->bic', ks, p_isqrt)             # (P^{-1/2} G)ᵀ
    right = jnp.einsum('bia,bja->bij', y, y) / m
    q = damped_ema(state['q'], right, self.gamma, self.damping,
                   self.scale_invariant)
    q_isqrt = self._inverse_root(q, state, 'q_isqrt', due)
    white = self._whiten(z, y, p_isqrt, q_isqrt, due) / unit
    mom = self.beta * state['m'] + (1 - self.beta) * white
    look = (self.beta * mom + (1 - self.beta) * white if self.nesterov
            else mom)
    pol = _dispatch.orthogonalize_stack(
        look, self.preset, steps=self.ns_steps, eps=self.ns_eps,
        method=self.ns_method)
    out = jnp.einsum('bij,bja,bac->bic', q_isqrt, pol, p_isqrt)
    out = out * shape_factor(n, m, self.scale, self.scale_rms)
    new = {'p': p, 'q': q, 'm': mom, 'p_isqrt': p_isqrt, 'q_isqrt': q_isqrt}
    return out.astype(o.dtype), {k: new[k] for k in state}
