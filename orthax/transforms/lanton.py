"""Layerwise noise-adaptive learning rates on top of an LMO step (LANTON,
a labelled reconstruction)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from orthax import _tree
from orthax import _validate
from orthax import engine
from orthax import matrices
from orthax import polar
from orthax.matrix_stages import SCALE_MODES
from orthax.matrix_stages import shape_factor
from orthax.polar import lapack
from orthax.polar.scale_safe import scale_of_max
from orthax.polar.scale_safe import root_ema

DUAL_NORMS = ('nuclear', 'l1')
DIFFERENCES = ('previous', 'momentum')
NORMALIZATIONS = ('group_max', 'absolute')
NUCLEAR = ('ns', 'svd', 'frobenius')
# The rules of the arguments that take one of a set of names, for
# _validate.arguments (orthax.lanton checks its own with them too).
OPTIONS = dict(dual_norm=_validate.choice(DUAL_NORMS),
               difference=_validate.choice(DIFFERENCES),
               normalization=_validate.choice(NORMALIZATIONS),
               nuclear=_validate.choice(NUCLEAR),
               scale=_validate.choice(SCALE_MODES))


class LayerwiseNoiseState(NamedTuple):
  """``noise`` holds the root ``√H`` of each noise EMA, not ``H``: ``H`` of
  a 64×64 gradient of 10¹⁹ (≈10⁴¹) does not fit in float32. (Checkpoints
  written before this held ``H``.)"""
  count: jax.Array   # int32 step counter t
  momentum: Any      # the wrapped momentum stage's state
  direction: Any     # the wrapped direction (LMO) stage's state
  noise: Any         # per leaf: √H (not H), one entry per matrix
  prev_grad: Any     # G_{t-1} per leaf ('previous'), else EmptyState


def _wide(dtype) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def layerwise_noise_adapt(
    momentum: optax.GradientTransformation,
    direction: optax.GradientTransformation,
    *,
    learning_rate: optax.ScalarOrSchedule,
    beta2: float | jax.Array = 0.99,
    eps: float | jax.Array = 1e-8,
    dual_norm: str = 'nuclear',
    difference: str = 'previous',
    normalization: str = 'group_max',
    alpha: float | jax.Array = 1.0,
    noise_power: float | jax.Array = 1.0,
    nuclear: str = 'ns',
    ns_preset: str = 'polar_express',
    scale: str = 'spectral',
    weight_decay: float | jax.Array = 0.0,
    matrix_specs: _tree.SpecsLike = None,
) -> optax.GradientTransformation:
  r"""Noise-adaptive layerwise rates within one group (LANTON, reconstructed).

  **This is a reconstruction, not the paper's algorithm box**, which could
  not be read (Hao, Gong, Xu, Wang, Liu, *Noise-Adaptive Layerwise Learning
  Rates*, arXiv 2510.14009; no public code). What is established (from the paper's
  text): the step is the Scion/Gluon LMO step
  ``X_ℓ ← X_ℓ + η_ℓ·LMO_ℓ(B_ℓ)`` with EMA momentum
  ``B ← β1 B + (1-β1) G``; each layer's gradient noise is measured in the dual
  norm of its LMO norm and smoothed by an EMA; noisier layers get smaller
  rates within their group. The noise statistic and the noise→rate map below
  are the reconstruction, with each piece selectable.

  A **combinator** (the library's one mechanism for a stage that needs an
  earlier signal): it wraps ``momentum`` and ``direction``, calls their
  ``init``/``update`` itself, and reads the raw gradient ``G_t`` and the
  momentum output ``B_t`` on the way. Since the rates are per layer it takes
  ``learning_rate`` (and ``weight_decay``) and emits the **final** step.

  Per matrix ℓ of the group (every matrix of every leaf this transform sees;
  each entry of a stacked leaf is its own layer):

  .. math::
     X_ℓ &= G_t - G_{t-1}\ (\texttt{previous})\quad\text{or}\quad
            G_t - B_t\ (\texttt{momentum})\\
     H_ℓ &\leftarrow β_2 H_ℓ + (1-β_2)\,\|X_ℓ\|_{ℓ,*}^2,\qquad
     \hat H_ℓ = H_ℓ/(1-β_2^k)\quad(k = \text{differences seen})\\
     η_ℓ &= η_t\cdot\Big(\frac{r_ℓ}{\max_{j} r_j}\Big)^p,\
        r_ℓ = (\hat H_ℓ+ε)^{-1/2}
        \ (\texttt{group\_max})\quad\text{or}\quad
        η_t\,α\,r_ℓ^p\ (\texttt{absolute})\\
     Δ_ℓ &= -η_ℓ\,(D_ℓ + λ W_ℓ),\qquad D = \mathrm{direction}(B)

  Until a difference has been seen (step 1 with ``previous``) every layer
  gets ``η_t``. The bias correction cancels in ``group_max``, whose maximum
  runs over the layers with noise (``H_ℓ > 0``). A layer without noise (a
  matrix with no entries, or one whose gradient has never changed) steps at
  ``η_t`` under either normalization and does not set the others' rates. A
  layer whose gradient stopped changing later keeps a noise that decays
  towards 0 and, while above it, sets the ``group_max`` floor ever lower:
  route such a layer out of the group (a ``'frozen'`` label).
  Dual norms: ``'nuclear'`` — the dual of the operator norm whose LMO is
  ``-c·UVᵀ``, i.e. ``c·‖X‖_*``, with ``c`` the shape factor of ``scale``
  (:func:`orthax.scale_by_shape`; ``'spectral'``: ``c = sqrt(d_out/d_in)``,
  the RMS→RMS norm's; pass the ``direction``'s own scale), with ``‖X‖_*``
  from an exact SVD (``nuclear='svd'``), from ``⟨X, NS(X)⟩`` with the
  Newton–Schulz preset ``ns_preset`` (``'ns'``, one extra orthogonalization
  per step) or from the bound ``sqrt(min(m, n))·‖X‖_F`` (``'frobenius'``,
  cheapest); ``'l1'`` — the dual of ℓ1→ℓ∞ (Signum's LMO ``-sign``), the
  entrywise ``Σ|X|`` of the whole leaf (embeddings, LM head). Scale-safe:
  the matrix norms are taken of ``X·2⁻ᵉ``
  (:func:`orthax.polar.scale_safe.huge_scale`, exactly ``X`` below
  ``2³²``) and ``H`` is kept as its root, with the EMA taken as
  ``√H ← hypot(√β₂·√H, √(1-β₂)·‖X‖)``, so a gradient of 10¹⁹ gets the rates
  of the unscaled one (under ``group_max``: ``absolute`` rates follow the
  gradient's scale by design). A second
  minibatch's gradient as the difference partner (the paper's other estimator
  option, per the summaries) is not implemented: it needs a second backward
  pass per step.

  Args:
    momentum: the wrapped momentum stage (e.g. ``orthax.momentum(β1,
      nesterov=False)``; :func:`orthax.lanton` passes its ``nesterov``);
      ``difference='momentum'`` uses its output as ``B_t`` (with Nesterov,
      the look-ahead).
    direction: the LMO direction (positive sign), e.g.
      ``named_chain(('orthogonalize', orthax.orthogonalize()),
      ('scale_by_shape', orthax.scale_by_shape('spectral')))`` or
      ``optax.scale_by_sign()``.
    learning_rate: the group rate η (number or schedule).
    beta2: EMA rate of the noise statistic.
    eps: ε in ``(Ĥ + ε)^{-1/2}``.
    dual_norm: ``'nuclear'`` (hidden matrices) or ``'l1'`` (Signum layers).
    difference: ``'previous'`` or ``'momentum'``.
    normalization: ``'group_max'`` (no layer exceeds η) or ``'absolute'``.
    alpha: α of the ``absolute`` normalization.
    noise_power: ``p``, the exponent of the noise→rate map: 1 (default)
      the inverse noise level, 0 every layer at the group rate (D-Muon's
      and Scion's fixed rate), in between a tempered map
      (:func:`orthax.lanton`: 0.25 in its library mode, 1 under
      ``reference='paper'``); meant for ``[0, 1]``.
    nuclear: ``'ns'``, ``'svd'`` or ``'frobenius'``.
    ns_preset: Newton–Schulz preset of ``nuclear='ns'``.
    scale: the shape factor ``c`` of the ``'nuclear'`` dual norm, a
      :func:`orthax.scale_by_shape` mode (default ``'spectral'``).
    weight_decay: λ, decoupled, applied with the layer's rate η_ℓ.
    matrix_specs: as in :func:`orthax.orthogonalize` (``'nuclear'`` only).

  Example:
    >>> import jax, jax.numpy as jnp, optax, orthax
    >>> params = {'a': jnp.ones((8, 16)), 'b': jnp.ones((16, 8))}
    >>> tx = orthax.layerwise_noise_adapt(
    ...     orthax.momentum(0.9, nesterov=False), optax.scale_by_sign(),
    ...     learning_rate=0.01, dual_norm='l1')   # Signum layers
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> u, state = tx.update(grads, tx.init(params), params)
    >>> round(float(u['a'][0, 0]), 6)  # step 1: no difference yet, -η·sign
    -0.01
  """
  _validate.arguments('layerwise_noise_adapt', layerwise_noise_adapt,
                      locals(), momentum=_validate.transformation,
                      direction=_validate.transformation, **OPTIONS)
  ns = functools.partial(polar.orthogonalize_stack, preset=ns_preset)

  def specs_of(tree):
    if dual_norm == 'l1':
      return [None] * len(jax.tree.leaves(tree))
    return _tree.resolve_specs(matrix_specs, tree, 'layerwise_noise_adapt')

  def init_fn(params):
    noise = _tree.plain_structure(params).unflatten([
        jnp.zeros(_stat_shape(x, s), _wide(x.dtype))
        for x, s in zip(jax.tree.leaves(params), specs_of(params))])
    prev = (jax.tree.map(jnp.zeros_like, params) if difference == 'previous'
            else optax.EmptyState())
    return LayerwiseNoiseState(jnp.zeros([], jnp.int32), momentum.init(params),
                               direction.init(params), noise, prev)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('layerwise_noise_adapt needs params: call '
                       'update(grads, state, params).')
    specs = specs_of(updates)
    b, mom_state = momentum.update(updates, state.momentum, params)
    d, dir_state = direction.update(b, state.direction, params)
    lr = learning_rate(state.count) if callable(learning_rate) else (
        learning_rate)
    count = optax.safe_increment(state.count)
    g_l, treedef = jax.tree.flatten(updates)
    flat = treedef.flatten_up_to
    per_leaf = _tree.plain_structure(updates)  # noise's, without Flax boxes
    if difference == 'previous':
      partner, seen = flat(state.prev_grad), count - 1
      prev = updates
    else:
      partner, seen = flat(b), count
      prev = state.prev_grad
    diffs = [g.astype(_wide(g.dtype)) - p.astype(_wide(g.dtype))
             for g, p in zip(g_l, partner)]
    norms = _dual_norms(diffs, specs, dual_norm, nuclear, ns, scale)
    valid = seen > 0
    hs, rates = _noise_rates(per_leaf.flatten_up_to(state.noise), norms,
                             seen, valid, beta2,
                             eps, alpha, noise_power, normalization)
    out = [_scaled_step(g, dd, w, lr * r, weight_decay, s) for g, dd, w, r, s
           in zip(g_l, flat(d), flat(params), rates, specs)]
    new_state = LayerwiseNoiseState(
        count, mom_state, dir_state, per_leaf.unflatten(hs),
        jax.tree.map(lambda p, o: p.astype(o.dtype), prev, state.prev_grad)
        if difference == 'previous' else prev)
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _stat_shape(x, spec):
  """The noise statistic's shape: one per matrix (the batch shape), or a
  scalar for a leaf without a matrix view."""
  if spec is None:
    return ()
  batch, _, _ = spec.resolve(x.shape)
  return tuple(x.shape[a] for a in batch)


def _dual_norms(xs, specs, dual_norm, nuclear, ns, scale):
  """The dual norm of every matrix: a list of arrays shaped like H.
  Reductions run over each leaf's matrix axes in its own layout (no
  reshape, which an Explicit sharding may refuse), except for the exact
  SVD, which needs the matrices (there a leaf sharded over Explicit axes
  is gathered)."""
  if dual_norm == 'l1':
    return [jnp.sum(jnp.abs(x.astype(_wide(x.dtype)))) for x in xs]
  wide = [x.astype(_wide(x.dtype)) for x in xs]
  axes = [matrices.matrix_axes(s, x.shape) for x, s in zip(xs, specs)]
  # Each matrix scaled by a power of two when huge (exact: 1 below 2³²),
  # the norm unscaled after: ‖X‖² of a huge X would overflow.
  fs = [scale_of_max(jnp.max(jnp.abs(x), axis=a, keepdims=True, initial=0)
                     ).astype(x.dtype) for x, a in zip(wide, axes)]
  scaled = [x * f for x, f in zip(wide, fs)]
  if nuclear == 'svd':
    nuc = [jnp.sum(lapack.per_matrix(
        lambda m: jnp.linalg.svd(m, compute_uv=False),
        matrices.to_matrices(engine.replicated(x), s)), axis=-1)
           for x, s in zip(scaled, specs)]
  elif nuclear == 'ns':  # NS is scale-invariant (and scale-safe)
    polars = engine.map_matrices(ns, wide, specs).leaves
    nuc = [jnp.sum(x * p, axis=a) for x, p, a in zip(scaled, polars, axes)]
  else:
    nuc = [jnp.sqrt(min(s.matrix_shape(x.shape)[1:])
                    * jnp.sum(x * x, axis=a))
           for x, s, a in zip(scaled, specs, axes)]
  out = []
  for x, s, n, f, a in zip(xs, specs, nuc, fs, axes):
    n = n.reshape(_stat_shape(x, s)) / jnp.squeeze(f, a)
    _, fi, fo = s.matrix_shape(x.shape)
    out.append(n * shape_factor(max(fi, 1), fo, scale))
  return out


def _noise_rates(noise, norms, seen, valid, beta2, eps, alpha, power,
                 normalization):
  """The new noise EMAs, kept as roots ``R = √H`` (``jnp.hypot`` factors
  out the larger term: no square is formed), and each layer's rate factor
  from ``√(Ĥ + ε) = hypot(R/√(1-β₂ᵏ), √ε)``."""
  rs, roots = [], []
  # A norm per matrix of a leaf sharded on its layer axis carries that
  # sharding (Explicit axes): the EMA keeps the state's own.
  norms = engine.reshard_like(list(norms), list(noise))
  for r, n in zip(noise, norms):
    k = seen.astype(r.dtype)
    new = jnp.where(valid, root_ema(r, n, beta2), r)
    rs.append(new)
    corr = jnp.where(valid, 1 - beta2 ** jnp.maximum(k, 1.0), 1.0)
    roots.append(jnp.hypot(jnp.where(valid, new / jnp.sqrt(corr), 0.0),
                           jnp.sqrt(eps)))
  # The floor is the least noisy layer's. A layer whose noise is exactly 0
  # (a matrix with no entries, or a gradient that never changed: a frozen or
  # unused layer) has none to compare with and is left out: at √ε it would
  # shrink every other layer's rate by (√ε/q)^p, 0.03× at 1e-8. Its own
  # factor is capped at 1, as every factor is (no layer exceeds η).
  lows = [jnp.min(jnp.where(r > 0, q, jnp.inf), initial=jnp.inf)
          for r, q in zip(rs, roots) if q.size]
  if normalization == 'group_max' and lows:
    # A lax.cond, so that the minimum over all N layers is computed once:
    # as a value its scalar min-chain was copied into each of the N rates,
    # and XLA's compile time grew as N² (97 s at 200 layers on CPU).
    floor = jax.lax.cond(valid, lambda: jnp.min(jnp.stack(lows)),
                         lambda: jnp.ones((), lows[0].dtype))
    measured = valid & jnp.isfinite(floor)  # no measured layer: all at η
    return rs, [jnp.where(measured, jnp.minimum((floor / q) ** power, 1.0),
                          1.0) for q in roots]
  # 'absolute' (or no leaf at all: no rate to normalize); a layer without
  # noise at η_t, not at α/√ε^p (10⁴·α at p = 1, which its decay would take).
  return rs, [jnp.where(valid & (r > 0), alpha / q ** power, 1.0)
              for r, q in zip(rs, roots)]


def _scaled_step(g, d, w, rate, weight_decay, spec):
  """``-rate·(d + λw)``: one rate for a leaf without a matrix view, one per
  matrix (``rate`` has the batch shape) otherwise."""
  dt = _wide(g.dtype)
  step = d.astype(dt) + weight_decay * w.astype(dt)
  if spec is None:
    return (-rate * step).astype(g.dtype)
  r = matrices.per_matrix_to_leaf(engine.replicated(rate).reshape(-1), spec,
                                 g.shape)
  return (-r * step).astype(g.dtype)
