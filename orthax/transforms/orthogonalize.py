"""Orthogonalize every matrix of the update by Newton–Schulz."""

from __future__ import annotations

import functools
import numbers
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import numpy as np
import optax

from orthax import _tree
from orthax import _validate
from orthax import engine
from orthax import matrix_stages
from orthax import polar
from orthax import sharding
from orthax.polar import gram
from orthax.transforms import matrix_stage


class OrthogonalizeState(NamedTuple):
  """State of :func:`orthogonalize` with ``then`` stages: each stage's state
  under its name (``optax.tree.get(state, 'neuron_normalize')`` finds it)."""
  stages: dict[str, Any]


class OrthogonalizeTransformation(optax.GradientTransformationExtraArgs):
  """What :func:`orthogonalize` returns: an optax transformation that can
  also run extra matrix stages for one call (:meth:`update_with_stages`),
  which is how a combinator such as :func:`orthax.noise_adapt` puts its step
  into the same pass, and on a mesh into the same ``shard_map`` body."""

  def update_with_stages(self, updates, state, stages, stage_states,
                         aux=None):
    """``update(updates, state)``, with ``stages`` run after the ``then=``
    stages. ``stage_states[j]``: per leaf (flatten order) stage ``j``'s state
    (``None`` when stateless); ``aux``: a tree like ``updates`` for the
    stages' ``Norm('aux', ...)``. Returns ``(updates, state, new
    stage_states, outputs)``, the last two per stage and leaf, like
    ``stage_states`` (an output is ``batch + per-matrix``)."""
    return self.update(updates, state,
                       _with_stages=(tuple(stages), stage_states, aux))

  def init_extra_stage(self, params, stage):
    """Per leaf of ``params`` (flatten order), ``stage``'s initial state
    (``None`` where it keeps none), placed as :meth:`update_with_stages`
    returns it when ``stage`` runs after the ``then=`` stages: on a mesh,
    where the step leaves it, so no step gathers it."""
    return self.init(params, _extra_stage=stage)


def _stage_list(arg: str, value: Any) -> tuple[matrix_stages.MatrixStage, ...]:
  """``then=``/``before=`` as a tuple; a single stage is named as one (it
  was a ``TypeError``: not iterable)."""
  if isinstance(value, matrix_stages.MatrixStage):
    raise ValueError(f'orthogonalize: {arg} takes a list of stages, got the '
                     f'stage {value.name!r} alone: write {arg}=[...].')
  return tuple(value or ())


def _check_stages(then) -> tuple[matrix_stages.MatrixStage, ...]:
  stages = _stage_list('then', then)
  names = []
  for st in stages:
    matrix_stages.check_stage(st, 'orthogonalize', 'then')
    if st.name in names:
      raise ValueError(f'orthogonalize: then has two stages named '
                       f'{st.name!r}.')
    names.append(st.name)
  return stages


def _check_before(before) -> tuple[matrix_stages.MatrixStage, ...]:
  """The ``before=`` stages, checked: stateless, transpose-invariant
  stages without outputs or norms (they run on the wide stack)."""
  stages = _stage_list('before', before)
  for st in stages:
    matrix_stages.check_stage(st, 'orthogonalize', 'before')
    if (st.stateful or st.has_output or st.shapes(2, 3).norms
        or not st.transpose_invariant):
      raise ValueError(
          f'orthogonalize: before has stage {st.name!r}, which cannot run '
          'before Newton–Schulz: a stage there is stateless, has no output '
          'or norms, and its result does not depend on the matrix\'s '
          'orientation (transpose_invariant; e.g. ClipOutliers). Pass it '
          'in then= or as a transform of its own.')
  return stages


def _init(stages, matrix_specs, ns, distributed, plan_kw):
  """:func:`orthogonalize`'s ``init``: each ``then=`` stage's state, placed
  where the step that runs ``ns`` and ``stages`` leaves it; with
  ``_extra_stage`` (:meth:`OrthogonalizeTransformation.init_extra_stage`),
  that stage's per-leaf states, as if it ran after ``stages``."""

  def init_fn(params, *, _extra_stage=None):
    if _extra_stage is None and not stages:
      return optax.EmptyState()
    specs = _tree.resolve_specs(matrix_specs, params, 'orthogonalize')
    kw = dict(fn=ns, distributed=distributed, plan_kw=plan_kw)
    if _extra_stage is not None:
      paths, leaves, _ = _tree.leaves_with_paths(params)
      return engine.init_stage_states(
          _extra_stage, leaves, specs, stages=stages + (_extra_stage,),
          paths=paths, **kw)
    return OrthogonalizeState({st.name: matrix_stage.init_state(
        st, params, specs, stages=stages, **kw) for st in stages})

  return init_fn


def _with_before(ns, stages):
  """``ns`` preceded by the ``before=`` stages, which enter as arguments
  (``(stack, *their arrays)``: on a mesh, replicated into the body, so a
  traced hyperparameter is never closed over). It takes no ``col_reduce``:
  a plan keeps these matrices whole (no column blocks)."""
  leaves, treedef = jax.tree.flatten(stages)

  def run(x, *args):
    blocks = matrix_stages.Blocks(x.shape[-2], x.shape[-1])
    for st in treedef.unflatten(args):
      x = st.apply(x, None, blocks)[0]
    return ns(x)

  return run, leaves


def _check_iteration(preset, coeffs, normalizer, method,
                     restart_every) -> int:
  """Fails at construction on an unknown preset, normalizer or method, a
  coefficient table of the wrong shape or a ``restart_every`` that is not
  a Python int; returns ``restart_every`` (``None``: the default period)."""
  if restart_every is None:
    restart_every = gram.DEFAULT_RESTART_EVERY
  elif isinstance(restart_every, bool) or not isinstance(
      restart_every, numbers.Integral):
    raise TypeError(f'orthogonalize: restart_every must be an int, got '
                    f'{restart_every!r} (a static value: pass it in '
                    'static_args of optax.inject_hyperparams).')
  polar.get_preset(preset)
  if coeffs is not None:
    try:
      polar.coefficient_table(coeffs, owner='orthogonalize')
    except TypeError as e:  # a ValueError here, as ever
      raise ValueError(str(e)) from None
  if normalizer is not None and normalizer not in polar.NORMALIZERS:
    raise ValueError(f'orthogonalize: normalizer must be one of '
                     f'{polar.NORMALIZERS}, got {normalizer!r}.')
  polar.choose_method(1, 1, 1, 'float32', method, owner='orthogonalize')
  return restart_every


def _per_shape(ns, table):
  """``ns`` with the coefficients of ``table`` (keyed by ``(min(m, n),
  max(m, n))``, a column-block stack by its whole matrix's shape) where it
  has the stack's shape."""

  def run(x, **kw):
    m, n = x.shape[-2], x.shape[-1] * kw.get('col_shards', 1)
    key = (min(m, n), max(m, n))
    if key not in table:
      return ns(x, **kw)
    return ns(x, coeffs=table[key], **kw)

  return run


def _flop_model(preset, steps, method, restart_every, ns_dtype,
                normalizer=None) -> dict:
  """The plan's FLOP model (``plan_kw``) for what this transform runs; a
  traced step count (``inject_hyperparams``) counts as the preset's, with
  the plain iteration ``auto`` then takes."""
  if steps is not None and not isinstance(steps, (int, np.integer)):
    steps, method = None, 'standard' if method == 'auto' else method
  if steps is None:
    steps = polar.get_preset(preset).steps
  kw = dict(steps=int(steps), method=method, restart_every=restart_every)
  normalizer = normalizer or polar.get_preset(preset).normalizer
  if normalizer != 'frobenius':
    kw['normalizer'] = normalizer
  return kw if ns_dtype is None else dict(kw, ns_dtype=ns_dtype)


def orthogonalize(
    preset: str | polar.Preset = 'jordan',
    *,
    steps: int | None = None,
    coeffs: Sequence[Sequence[float]] | None = None,
    normalizer: str | None = None,
    norm_scale: float | None = None,
    eps: float | None = None,
    ns_dtype: Any = None,
    matrix_specs: _tree.SpecsLike = None,
    group: bool = True,
    method: str = 'auto',
    restart_every: int | None = None,
    coeffs_for_shape: str | Mapping[tuple[int, int], Any] | None = None,
    distributed: sharding.Distributed | None = None,
    then: Sequence[matrix_stages.MatrixStage] = (),
    before: Sequence[matrix_stages.MatrixStage] = (),
) -> optax.GradientTransformation:
  r"""Replaces each matrix ``U`` of the update by ``NS(U) ≈ polar(U)``.

  .. math::
     U = \sum_i \sigma_i u_i v_i^\top \;\mapsto\; \sum_i p^{(k)}(\sigma_i/\nu)
     u_i v_i^\top \approx U_{\mathrm{polar}} = \sum_i u_i v_i^\top,

  where ``ν`` is the preset's normalizer and ``p^{(k)}`` the composition of the
  preset's quintics (see :func:`orthax.polar.newton_schulz`). Each leaf is seen
  as ``[batch, fan_in, fan_out]`` through its :class:`~orthax.MatrixSpec`;
  with ``group=True`` all matrices of the same shape (either orientation) and
  dtype, from all leaves, are stacked and orthogonalized in one call.

  Args:
    preset: Newton–Schulz preset (``'jordan'``, ``'polar_express'``, …).
    steps: number of steps (default: the preset's).
    coeffs: override the preset's coefficient table.
    normalizer: override the preset's normalizer.
    norm_scale: override the Frobenius normalizer's scale.
    eps: override the normalizer's epsilon.
    ns_dtype: dtype of the iteration, e.g. ``jnp.bfloat16`` (default: the
      update's dtype); the output keeps the update's dtype.
    matrix_specs: ``None`` (2-D leaves only), a ``MatrixSpec``, a tree of them
      or a callable ``updates -> tree`` (as routing provides).
    group: stack same-shape matrices across leaves into one call.
    method: ``'standard'``, ``'gram'`` (Gram Newton–Schulz: iterate on the
      small Gram matrix, fewer FLOPs for rectangular matrices, equal in exact
      arithmetic) or ``'auto'`` (Gram where it saves FLOPs and the iteration
      is float32 or wider; see :func:`orthax.polar.choose_method`).
    restart_every: Gram Newton–Schulz restart period (its stability fix):
      ``None`` (default) 2, ``0`` never restarts (``orthax.polar``'s
      functions read ``None`` as never: here it is the default, so that
      ``optax.inject_hyperparams`` has no number to inject). A Python int
      (it fixes the program: with ``optax.inject_hyperparams`` pass it in
      ``static_args``).
    coeffs_for_shape: per-shape coefficient tables, ``'root'`` (ROOT's
      AdaNewton table, :data:`orthax.polar.ROOT_TABLE`) or a mapping
      ``(min(m, n), max(m, n)) -> row or rows``; a matrix whose shape (either
      orientation) is not a key uses ``coeffs`` or the preset's table.
    distributed: an :class:`orthax.sharding.Distributed` (mesh, parameter
      partition specs, strategy): each device orthogonalizes whole matrices
      (one fused all-to-all in and out per group for FSDP/TP-sharded
      matrices, none for matrices whose own axes are unsharded; a matrix
      larger than ``max_local_matrix_bytes`` runs tensor-parallel,
      ``gram``), and the result comes back in the parameters' sharding.
      Always grouped.
    then: :class:`orthax.matrix_stages.MatrixStage`\\ s applied, in order, to
      each orthogonalized matrix in the same pass, e.g.
      ``[NeuronNormalize(), ScaleByShape('keller')]`` (NorMuon). Each gives
      the result the matching transform (``neuron_normalize``,
      ``scale_by_shape``, …) chained after this one would; with
      ``distributed`` they run on the device that holds the whole matrix,
      inside the same ``shard_map`` body, so their row statistics and norms
      are the whole matrix's. The state is then an
      :class:`OrthogonalizeState` with each stage's state under its name.
    before: stateless :class:`~orthax.matrix_stages.MatrixStage`\\ s applied,
      in order, to each matrix just before Newton–Schulz, in the same pass:
      those whose result does not depend on the matrix's orientation
      (:attr:`~orthax.matrix_stages.MatrixStage.transpose_invariant`), such
      as ROOT's :class:`~orthax.matrix_stages.ClipOutliers`. The result is
      the matching transform chained before this one; with ``distributed``
      they run on the device that holds the whole matrix (after the
      all-to-all in), so a statistic of the whole matrix gathers nothing,
      and the matrices are never split in column blocks (``gram``).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, orthax
    >>> g = {'w': jax.random.normal(jax.random.key(0), (64, 32))}
    >>> tx = orthax.orthogonalize('polar_express_paper')
    >>> u, _ = tx.update(g, tx.init(g))
    >>> s = np.linalg.svd(np.asarray(u['w']), compute_uv=False)
    >>> bool(np.all(np.abs(s - 1) < 1e-3))   # U Vᵀ: singular values 1
    True

  References: K. Jordan, *Muon* (2024); Amsel et al. arXiv 2505.16932;
  Zhang, Amsel, Chen, Dao, *Gram Newton–Schulz* (Dao AI Lab blog, 2026).
  """
  _validate.arguments('orthogonalize', orthogonalize, locals())
  restart_every = _check_iteration(preset, coeffs, normalizer, method,
                                   restart_every)
  stages = _check_stages(then)
  before = _check_before(before)
  ns = functools.partial(
      polar.orthogonalize_stack, preset=preset, steps=steps, coeffs=coeffs,
      normalizer=normalizer, norm_scale=norm_scale, eps=eps, dtype=ns_dtype,
      method=method, restart_every=restart_every)
  if coeffs_for_shape is not None:
    ns = _per_shape(ns, polar.resolve_shape_table(coeffs_for_shape))
  plan_kw = _flop_model(preset, steps, method, restart_every, ns_dtype,
                        normalizer)
  fn_args = ()
  if before:
    ns, fn_args = _with_before(ns, before)

  init_fn = _init(stages, matrix_specs, ns, distributed, plan_kw)

  def update_fn(updates, state, params=None, *, _with_stages=None,
                **extra_args):
    del params, extra_args
    extra, extra_states, aux = _with_stages or ((), [], None)
    run = stages + tuple(extra)
    if before and any(nm.source == 'input' for st in run
                      for nm in st.shapes(2, 3).norms):
      raise ValueError(
          'orthogonalize: before stages cannot run with a stage that takes '
          "the norms of the matrix entering Newton–Schulz (Norm('input')): "
          'it would see the matrix before them.')
    paths, leaves, treedef = _tree.leaves_with_paths(updates)
    states = [matrix_stage.leaf_states(st, state.stages[st.name], updates)
              for st in stages] + [list(x) if x is not None else
                                   [None] * len(leaves) for x in extra_states]
    res = engine.map_matrices(
        ns, leaves, _tree.resolve_specs(matrix_specs, updates,
                                        'orthogonalize'),
        stages=run, states=states,
        aux=None if aux is None else treedef.flatten_up_to(aux),
        group=group, fn_args=fn_args, distributed=distributed,
        paths=paths, plan_kw=plan_kw)
    new_tree = jax.tree.unflatten(treedef, res.leaves)
    new_state = state
    if stages:
      new_state = OrthogonalizeState({
          st.name: matrix_stage.with_leaf_states(
              st, state.stages[st.name], updates, news)
          for st, news in zip(stages, res.states)})
    if _with_stages is None:
      return new_tree, new_state
    k = len(stages)
    return new_tree, new_state, res.states[k:], res.outputs[k:]

  return OrthogonalizeTransformation(init_fn, update_fn)
