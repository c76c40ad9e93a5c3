r"""SPECTRA: soft spectral clipping of any optimizer's update (post-clip) or of
the raw gradients (pre-clip).

Jiang, Semenov, Stich, *Enhancing LLM Training via Spectral Clipping*
(arXiv 2603.14315, ICML 2026); reference code ``mlolab/llm-spectral-clipping``
@ ed9df11 (``src/optim/spectra.py``, ``src/optim/post_process.py``). The matrix function is
:func:`orthax.polar.soft_clip_matrix`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from orthax import _tree
from orthax import _validate
from orthax import engine
from orthax import sharding
from orthax.matrices import MatrixSpec
from orthax.polar import spectral as _spectral
from orthax.transforms.clip_schedule import check_decay
from orthax.transforms.clip_schedule import check_warmup
from orthax.transforms.clip_schedule import clip_threshold

APPLY_TO = ('2d', 'all')
_validate.register(('apply_to',), _validate.choice(APPLY_TO))


class SpectralClipState(NamedTuple):
  count: jax.Array  # steps taken (for the threshold and lr schedules)


def resolve_clip_specs(matrix_specs: _tree.SpecsLike, tree: Any,
                       what: str) -> list[MatrixSpec | None]:
  """One ``MatrixSpec`` (a batch of matrices) or ``None`` (a vector: the
  whole leaf is one vector) per leaf.

  ``matrix_specs=None``: leaves of rank ≥ 2 are ``MatrixSpec()`` (last two
  axes ``(in, out)``, leading axes a batch: stacked Flax layers), the rest are
  vectors; one ``MatrixSpec``: used for every leaf of rank ≥ 2; a tree (or a
  callable returning one): ``None`` entries mark vectors. Errors name the leaf.
  """
  paths, leaves, treedef = _tree.leaves_with_paths(tree)
  if callable(matrix_specs) and not isinstance(matrix_specs, MatrixSpec):
    matrix_specs = matrix_specs(tree)
  if matrix_specs is None or isinstance(matrix_specs, MatrixSpec):
    spec = matrix_specs or MatrixSpec()
    per_leaf = [spec if len(getattr(x, 'shape', ())) >= 2 else None
                for x in leaves]
  else:
    per_leaf = _tree.specs_per_leaf(matrix_specs, treedef, len(leaves), what,
                                    ' (or None for a vector)')
  for path, x, spec in zip(paths, leaves, per_leaf):
    if spec is not None:
      _tree.check_real_floating(path, x, what)
      try:
        spec.resolve(getattr(x, 'shape', ()))
      except ValueError as e:
        raise ValueError(f'{what}: leaf {path!r}: {e}') from None
  return per_leaf


def _threshold_dtype(leaves) -> Any:
  """The widest of float32 and the floating array leaves' dtypes."""
  dtypes = [getattr(x, 'dtype', None) for x in leaves]
  return functools.reduce(
      jnp.promote_types,
      [d for d in dtypes if d is not None and jnp.issubdtype(d, jnp.floating)],
      jnp.dtype(jnp.float32))


def soft_clip_flops(steps: int) -> Any:
  """``(m, n, dtype) -> FLOPs`` of :func:`orthax.polar.soft_clip_matrix`
  with at most ``steps`` steps: ``XXᵀ`` and the final ``ZX`` (``4m²n``,
  ``m ≤ n``) plus three ``m×m`` products per step (``6m³``)."""
  def flops(m, n, dtype):
    del dtype
    m, n = min(m, n), max(m, n)
    return 4 * m * m * n + steps * 6 * m ** 3
  return flops


def _clip_leaves(leaves, specs, c_t, apply_to, steps, step_rule, shared_bound,
                 group, distributed=None, paths=None):
  """``H_c`` on every matrix leaf, the vector rule (``apply_to='all'``) on the
  others; ``None`` where a leaf is left alone. Returns (clipped, processed).
  The threshold (and a traced step count) enter the engine as arguments of
  the stack function, so on a mesh they are passed into the body."""
  traced_steps = isinstance(steps, jax.Array)

  def clip(x, c, *maybe_steps):
    return _spectral.soft_clip_matrix(
        x, c, steps=maybe_steps[0] if traced_steps else steps,
        step_rule=step_rule, shared_bound=shared_bound)

  out: list[Any] = [None] * len(leaves)
  mat_idx = [i for i, s in enumerate(specs) if s is not None]
  pick = lambda seq: None if seq is None else [seq[i] for i in mat_idx]
  done = engine.map_matrices(
      clip, pick(leaves), pick(specs),
      # Per-matrix bounds: stacking is exact; a shared bound is per leaf.
      group=group and not shared_bound,
      fn_args=(c_t,) + ((steps,) if traced_steps else ()),
      distributed=distributed, paths=pick(paths),
      plan_kw=dict(matrix_flops=soft_clip_flops(
          _spectral.DEFAULT_STEPS if traced_steps else steps)))
  for i, y in zip(mat_idx, done.leaves):
    out[i] = y
  if apply_to == 'all':
    for i, s in enumerate(specs):
      if s is None:
        out[i] = _spectral.soft_clip_vector(leaves[i], c_t)
  return out


def _base_directions(leaves, ws, specs, lr, weight_decay, apply_to):
  """Recovers ``U = -Δ/η - λW`` for each leaf to clip (``None`` elsewhere).

  A zero ``η`` divides by one instead; the caller keeps the base step there.
  """
  safe_lr = jnp.where(lr != 0, lr, 1.0)

  def direction(d, w):
    u = -d.astype(jnp.promote_types(d.dtype, jnp.float32)) / safe_lr
    return u if w is None else u - weight_decay * w.astype(u.dtype)

  return [direction(d, w) if (s is not None or apply_to == 'all') else None
          for d, w, s in zip(leaves, ws, specs)]


def _clipped_step(h, w, spec, shape, lr, weight_decay, aspect_scale):
  """``Δ' = -η α H_c(U) - η λ W`` with ``α = √max(1, rows/cols)`` (1 for
  vectors, and without ``aspect_scale``)."""
  alpha = 1.0
  if spec is not None and aspect_scale:
    _, fan_in, fan_out = spec.matrix_shape(shape)
    alpha = math.sqrt(max(1.0, fan_out / max(fan_in, 1)))
  new = -lr * alpha * h
  if w is not None:
    new = new - lr * weight_decay * w.astype(new.dtype)
  return new


def spectral_clip(
    c: float | jax.Array = 10.0,
    *,
    learning_rate: optax.ScalarOrSchedule | None = None,
    weight_decay: float | jax.Array = 0.0,
    steps: int | jax.Array = _spectral.DEFAULT_STEPS,
    step_rule: str = 'scaled',
    shared_bound: bool = False,
    apply_to: str = '2d',
    warmup_steps: int | jax.Array = 0,
    base_learning_rate: float | jax.Array | None = None,
    decay: str = 'constant',
    decay_fraction: float | jax.Array = 0.1,
    final_scale: float | jax.Array = 0.0,
    total_steps: int | jax.Array = 0,
    matrix_specs: _tree.SpecsLike = None,
    group: bool = True,
    distributed: sharding.Distributed | None = None,
    aspect_scale: bool = True,
) -> optax.GradientTransformation:
  r"""SPECTRA post-clip: soft-clips the direction of *any* optimizer's step.

  Chain it after a base optimizer with decoupled weight decay, giving it the
  same ``learning_rate`` (number or schedule) and ``weight_decay``::

    optax.chain(optax.adamw(lr, weight_decay=wd),
                orthax.spectral_clip(10.0, learning_rate=lr, weight_decay=wd))

  The incoming update is the base step ``Δ = -η_t(U + λW)``; with ``W`` the
  current params each processed leaf becomes

  .. math::
     U = -Δ/η_t - λW,\qquad
     Δ' = -η_tλW - η_t\,α\,H_{c_t}(U),\qquad
     α = \sqrt{\max(1, \mathrm{rows}/\mathrm{cols})},

  with ``rows = fan_out``, ``cols = fan_in`` (PyTorch layout; a Flax kernel is
  ``(in, out)``) and ``α = 1`` for vectors. ``α`` is the reference's: it
  makes the step of a matrix with more outputs than inputs larger than the
  base optimizer's (2× on a 768→3072 kernel, even where nothing is
  clipped); ``aspect_scale=False`` sets ``α = 1``, leaving the base step's
  size alone (a pure clip). ``H_c`` is
  :func:`orthax.polar.soft_clip_matrix`; vectors (``apply_to='all'``) get the
  reference's (discontinuous) :func:`orthax.polar.soft_clip_vector`. A step
  with ``η_t = 0`` keeps the base update, as the reference does.
  ``c_t`` follows :func:`clip_threshold` (warm-up keeps ``c·η`` constant;
  optional decay phase).

  Args:
    c: clipping threshold (reference default 10; 5 in its 160M scripts).
    learning_rate: the base optimizer's η (number or schedule); ``None`` means
      the update is already a direction (``η = 1``, ``λ = 0``): it is
      clipped as it is (and multiplied by ``α`` unless
      ``aspect_scale=False``).
    weight_decay: the base optimizer's decoupled λ.
    steps: coupled Newton–Schulz steps (default 12, accurate to 1e-6 up to
      ``σ_max/c = 1e3``; the reference uses 10).
    step_rule: ``'scaled'`` (default) or ``'plain'`` (the reference's).
    shared_bound: one ``λ_max`` bound per leaf over its batch of matrices
      (the reference) instead of one per matrix.
    apply_to: ``'2d'`` (matrix leaves only) or ``'all'`` (vectors too).
    warmup_steps: steps of the threshold's warm-up, during which
      ``c_t = c·η_base/η_t`` (default 0, none; needs a ``learning_rate``
      schedule, or a ``learning_rate`` and a ``base_learning_rate``:
      otherwise ``c_t`` would stay ``c``, and it is refused).
    base_learning_rate: ``η_base`` of the warm-up (default: the schedule's
      value at ``warmup_steps``; required with a constant
      ``learning_rate``; only with a warm-up).
    decay: the threshold's decay over the last steps of the run:
      ``'constant'`` (default, none), ``'linear'``, ``'sqrt'``,
      ``'cosine'``, ``'exp'`` or ``'square'``
      (:func:`orthax.transforms.clip_threshold`).
    decay_fraction: the decay takes the last
      ``⌊decay_fraction·total_steps⌋`` steps (default 0.1).
    final_scale: the decay ends at ``c·final_scale`` (default 0; a
      threshold of 0 clips the direction to zero).
    total_steps: the run's length (needed, ``> 0``, with a decay;
      ``decay_fraction``, ``final_scale`` and ``total_steps`` without one
      raise ``ValueError``).
    matrix_specs: see :func:`resolve_clip_specs` (default: every leaf of rank
      ≥ 2 is a batch of ``(in, out)`` matrices).
    group: clip same-shape matrices from all leaves in one stacked call.
    distributed: an :class:`orthax.sharding.Distributed`: the clip runs on
      whole matrices per device, planned and moved as Newton–Schulz is
      (``a2a``/``local``/``replicated``; ``H_c(Xᵀ) = H_c(X)ᵀ`` and
      ``H_c(0) = 0`` keep the transposes and the zero padding exact). With
      :func:`orthax.polar.soft_clip_matrix`'s default tolerance each
      device stops when *its* matrices are
      certified converged, so results match one device to that tolerance.
      Not with ``shared_bound`` (one bound over a leaf's whole batch) nor
      the ``gram`` strategy.
    aspect_scale: multiply the clipped direction by ``α`` (the reference's;
      default) or not (``False``: ``α = 1``).

  Example:
    >>> import jax, jax.numpy as jnp, optax, orthax
    >>> params = {'w': jnp.ones((8, 16)), 'b': jnp.zeros(16)}
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> tx = optax.chain(
    ...     optax.adamw(1e-3, weight_decay=0.1),
    ...     orthax.spectral_clip(10.0, learning_rate=1e-3, weight_decay=0.1))
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> updates['w'].shape
    (8, 16)
    >>> clip = orthax.spectral_clip(1.0, aspect_scale=False)  # a pure clip
    >>> u, _ = clip.update(grads, clip.init(params))
    >>> round(float(jnp.linalg.norm(u['w'], 2)), 3)  # σ = √128 → σ/√(1+σ²)
    0.996
    >>> bool(jnp.all(u['b'] == grads['b']))  # apply_to='2d': vectors kept
    True
  """
  _validate.arguments('spectral_clip', spectral_clip, locals())
  if distributed is not None and shared_bound:
    raise ValueError('spectral_clip: shared_bound=True takes one bound over '
                     "each leaf's whole batch of matrices, which "
                     'distributed= splits across devices; use '
                     'shared_bound=False.')
  check_decay('spectral_clip', decay, decay_fraction, final_scale,
              total_steps)
  check_warmup('spectral_clip', learning_rate, warmup_steps,
               base_learning_rate)

  def init_fn(params):
    del params
    return SpectralClipState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    count = state.count
    new_state = SpectralClipState(count=optax.safe_increment(count))
    paths, leaves, treedef = _tree.leaves_with_paths(updates)
    specs = resolve_clip_specs(matrix_specs, updates, 'spectral_clip')
    c_t = clip_threshold(
        c, count, learning_rate=learning_rate,
        base_learning_rate=base_learning_rate, warmup_steps=warmup_steps,
        decay=decay, decay_fraction=decay_fraction, final_scale=final_scale,
        total_steps=total_steps, dtype=_threshold_dtype(leaves))
    if learning_rate is None:
      lr = jnp.ones([], jnp.float32)
    elif callable(learning_rate):
      lr = learning_rate(count)
    else:
      lr = learning_rate
    lr = jnp.asarray(lr)
    decays = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)
    if decays:
      if params is None:
        raise ValueError('spectral_clip with weight_decay needs params: call '
                         'update(updates, state, params).')
      ws = jax.tree.leaves(params)
    else:
      ws = [None] * len(leaves)
    live = lr != 0
    dirs = _base_directions(leaves, ws, specs, lr, weight_decay, apply_to)
    todo = [i for i, u in enumerate(dirs) if u is not None]
    clipped = _clip_leaves(
        [dirs[i] for i in todo], [specs[i] for i in todo], c_t, apply_to,
        steps, step_rule, shared_bound, group, distributed,
        paths=[paths[i] for i in todo])
    out = list(leaves)
    for i, h in zip(todo, clipped):
      new = _clipped_step(h, ws[i], specs[i], leaves[i].shape, lr,
                          weight_decay, aspect_scale)
      out[i] = jnp.where(live, new, leaves[i].astype(new.dtype)
                         ).astype(leaves[i].dtype)
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def spectral_preclip(
    c: float | jax.Array = 0.1,
    *,
    learning_rate: optax.ScalarOrSchedule | None = None,
    steps: int | jax.Array = _spectral.DEFAULT_STEPS,
    step_rule: str = 'scaled',
    shared_bound: bool = False,
    apply_to: str = '2d',
    warmup_steps: int | jax.Array = 0,
    base_learning_rate: float | jax.Array | None = None,
    decay: str = 'constant',
    decay_fraction: float | jax.Array = 0.1,
    final_scale: float | jax.Array = 0.0,
    total_steps: int | jax.Array = 0,
    matrix_specs: _tree.SpecsLike = None,
    group: bool = True,
) -> optax.GradientTransformation:
  r"""SPECTRA pre-clip: ``G ← H_{c_t}(G)`` on the raw gradients.

  Place it first, before any global-norm clipping and the optimizer (as the
  reference's ``spectral_grad_clip_c``, default 0.1; the README does not
  recommend it together with the post-clip). ``c_t`` follows
  :func:`clip_threshold`; ``learning_rate`` is only needed for the warm-up
  rule ``c_t·η_t = const``. Other arguments as in :func:`spectral_clip`.

  Args:
    c: clipping threshold (default 0.1, the reference's).
    learning_rate: the optimizer's η (number or schedule), only for the
      warm-up (``warmup_steps``); default ``None``.
    steps, step_rule, shared_bound, apply_to: the clip, as in
      :func:`orthax.spectral_clip` (default 12 ``'scaled'`` steps, one
      bound per matrix, matrix leaves only).
    warmup_steps, base_learning_rate: the threshold's warm-up, as in
      :func:`orthax.spectral_clip` (default none).
    decay, decay_fraction, final_scale, total_steps: the threshold's decay
      (:func:`orthax.transforms.clip_threshold`; default ``'constant'``).
    matrix_specs: see :func:`resolve_clip_specs` (default: every leaf of rank
      ≥ 2 is a batch of ``(in, out)`` matrices).
    group: clip same-shape matrices from all leaves in one stacked call.

  Example:
    >>> import jax, jax.numpy as jnp, orthax
    >>> params = {'w': jnp.ones((8, 16)), 'b': jnp.zeros(16)}
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> tx = orthax.spectral_preclip()       # c = 0.1
    >>> g, state = tx.update(grads, tx.init(params))
    >>> round(float(jnp.linalg.norm(g['w'], 2)), 3)  # σ = √128 clipped to ≈ c
    0.1
  """
  _validate.arguments('spectral_preclip', spectral_preclip, locals())
  check_decay('spectral_preclip', decay, decay_fraction, final_scale,
              total_steps)
  check_warmup('spectral_preclip', learning_rate, warmup_steps,
               base_learning_rate)

  def init_fn(params):
    del params
    return SpectralClipState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    specs = resolve_clip_specs(matrix_specs, updates, 'spectral_preclip')
    c_t = clip_threshold(
        c, state.count, learning_rate=learning_rate,
        base_learning_rate=base_learning_rate, warmup_steps=warmup_steps,
        decay=decay, decay_fraction=decay_fraction, final_scale=final_scale,
        total_steps=total_steps, dtype=_threshold_dtype(leaves))
    clipped = _clip_leaves(leaves, specs, c_t, apply_to, steps, step_rule,
                           shared_bound, group)
    out = [x if h is None else h.astype(x.dtype)
           for x, h in zip(leaves, clipped)]
    return (jax.tree.unflatten(treedef, out),
            SpectralClipState(count=optax.safe_increment(state.count)))

  return optax.GradientTransformation(init_fn, update_fn)
