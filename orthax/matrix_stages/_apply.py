"""Running a list of matrix stages on a ``[k, fan_in, fan_out]`` stack:
:func:`apply_stages`, and what a plan reads of the stages before it runs
them (:func:`check_norms`, :func:`split_sums`, :func:`stage_norms`)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from orthax.matrix_stages._base import SOURCES
from orthax.matrix_stages._base import Blocks
from orthax.matrix_stages._base import MatrixStage
from orthax.matrix_stages._base import Norm
from orthax.matrix_stages._base import ScalingStage
from orthax.matrix_stages._base import StageShapes
from orthax.matrix_stages._base import map_state
from orthax.matrix_stages._base import root_norm


def check_norms(st: MatrixStage, fan_in: int, fan_out: int
                ) -> tuple[Norm, ...]:
  """The stage's declared norms, checked: known sources, one or both matrix
  axes, and only on a :class:`ScalingStage` (else ``ValueError``).

  Args:
    st: the stage.
    fan_in, fan_out: the matrix's sides, for :meth:`MatrixStage.shapes`.
  """
  out = tuple(st.shapes(fan_in, fan_out).norms)
  if out and not isinstance(st, ScalingStage):
    raise ValueError(
        f'matrix stage {st.name!r} asks for norms but is not a '
        'ScalingStage (only a factor computed from norms can run apart from '
        'the matrices on a mesh).')
  for nm in out:
    axes = tuple(nm.axes)
    if (nm.source not in SOURCES or not axes
        or not set(axes) <= {-2, -1} or len(set(axes)) != len(axes)):
      raise ValueError(
          f'matrix stage {st.name!r}: a Norm needs a source in {SOURCES} '
          f'and axes among (-2, -1), got {nm!r}.')
  return out


def split_sums(st: MatrixStage, fan_in: int, fan_out: int,
               split: int) -> list[int]:
  """The sums :meth:`~MatrixStage.apply` makes across ``split`` (``-2`` or
  ``-1``) when the matrix is held in blocks of that axis, read by tracing
  it (``jax.eval_shape``, nothing runs): one entry per sum, the number of
  values it keeps per matrix (what one all-reduce of a sharding plan
  carries).

  Args:
    st: the stage (traced hyperparameters allowed: it is traced as an
      argument).
    fan_in, fan_out: the whole matrix's sides.
    split: the axis held in blocks, ``-2`` (fan-in) or ``-1`` (fan-out).
  """
  kept: list[int] = []

  def reduce(a):
    kept.append(math.prod(a.shape[1:]))
    return a

  sh = st.shapes(fan_in, fan_out)
  f32 = lambda shape: jax.ShapeDtypeStruct((1,) + tuple(shape), jnp.float32)
  o = f32((fan_in, fan_out))
  state = map_state(f32, sh.state)
  norms = [f32((1 if -2 in nm.axes else fan_in, 1 if -1 in nm.axes
                else fan_out)) for nm in check_norms(st, fan_in, fan_out)]
  blocks = Blocks(fan_in, fan_out, split, reduce)
  # The stage goes in as an argument: its traced hyperparameters (a
  # schedule's value inside jit) are abstract here, not closed over.
  jax.eval_shape(lambda st, o, s, n: st.apply(o, s, blocks, n) if n
                 else st.apply(o, s, blocks), st, o, state, norms)
  return kept


def stage_norms(stages: Sequence[MatrixStage],
                sources: Mapping[str, jax.Array | None],
                fan_in: int, fan_out: int) -> list[list[jax.Array]]:
  """Each stage's declared norms (:attr:`StageShapes.norms`, checked by
  :func:`check_norms`) of whole ``[k, fan_in, fan_out]`` matrices, taken by
  :func:`root_norm`: one list per stage, in the declared order.

  Args:
    stages: the stages, in order.
    sources: ``{'input': ..., 'aux': ...}``, each a ``[k, fan_in,
      fan_out]`` stack or ``None``; a source that a stage asks for and that
      is ``None`` or absent raises ``ValueError``.
    fan_in, fan_out: the matrices' sides.
  """
  out = []
  for st in stages:
    per = []
    for nm in check_norms(st, fan_in, fan_out):
      if sources.get(nm.source) is None:
        hint = ('; pass aux= with the update' if nm.source == 'aux' else
                ' (the matrices entering Newton–Schulz), which this caller '
                'does not pass')
        raise ValueError(f'matrix stage {st.name!r} needs the '
                         f'{nm.source!r} matrices{hint}.')
      per.append(root_norm(sources[nm.source], nm.axes))
    out.append(per)
  return out


def _check_arity(st: MatrixStage, res: Any) -> None:
  """``ValueError`` naming the stage where ``apply`` returned other than
  ``(stack, state)``, or ``(stack, state, output)`` with a declared
  output (it failed unpacking, naming nothing)."""
  want = 3 if st.has_output else 2
  if not isinstance(res, tuple) or len(res) != want:
    got = (f'a tuple of {len(res)}' if isinstance(res, tuple)
           else type(res).__name__)
    form = ('(stack, state, output): shapes() declares an output'
            if want == 3 else '(stack, state): shapes() declares no output')
    raise ValueError(f'{st.name}: apply returned {got}; it returns {form}.')


def _check_output(st: MatrixStage, o: Any, out: Any, blocks: Blocks) -> None:
  """``ValueError`` naming the stage where its output is not ``[k,
  *declared]`` (on whole matrices; under column blocks a vector output is
  held in blocks)."""
  want = (o.shape[0],) + tuple(st.shapes(blocks.fan_in, blocks.fan_out).output)
  shape = tuple(getattr(out, 'shape', ()))
  if blocks.split is None and shape != want:
    raise ValueError(f'{st.name}: apply returned an output shaped {shape}; '
                     f'shapes() declares {want[1:]} per matrix, so {want}.')


def _check_returned(st: MatrixStage, was: tuple[Any, Any],
                    got: tuple[Any, Any]) -> None:
  """Raises ``ValueError`` naming the stage where its ``apply`` returned a
  stack or a state of another shape than it was given (a state that
  changes shape from ``init`` breaks ``lax.scan`` loops, checkpoints and
  the guard's choice between old and new state; a wrong stack failed in a
  reshape that named nothing)."""
  shapes = lambda tree: [tuple(x.shape) for x in jax.tree.leaves(tree)]  # pylint: disable=unnecessary-lambda-assignment
  for what, before, after in (('stack', was[0], got[0]),
                              ('state', was[1], got[1])):
    if (jax.tree.structure(before) != jax.tree.structure(after)
        or shapes(before) != shapes(after)):
      raise ValueError(
          f'{st.name}: apply returned a {what} shaped {shapes(after)} for '
          f'one shaped {shapes(before)}; a stage returns the stack '
          '[k, fan_in, fan_out] and its state as it got them (the state as '
          'shapes() declares it).')


def apply_stages(stages: Sequence[MatrixStage], o: jax.Array,
                 states: Sequence[jax.Array | None], blocks: Blocks,
                 norms: Sequence[Sequence[jax.Array]] | None = None,
                 factors: Sequence[jax.Array | None] | None = None
                 ) -> tuple[jax.Array, list[jax.Array | None],
                            list[jax.Array | None]]:
  """Runs ``stages`` in order on ``o[k, fan_in, fan_out]``; ``states[j]`` is
  stage ``j``'s ``[k, ...]`` state (``None`` if stateless), ``norms[j]`` its
  norms. ``factors[j]``, when given for a :class:`ScalingStage`, is its
  factor ``c`` computed beforehand (:meth:`ScalingStage.scale`): the stage
  then only multiplies, and its state and output are returned as ``None``.
  Returns the stack (in its dtype), the new states and each stage's output
  (``None`` where it has none). A stage whose ``apply`` returns a stack or a
  state of another shape than it got raises ``ValueError``.

  Args:
    stages: the :class:`MatrixStage` objects, run in order.
    o: the stack ``[k, fan_in, fan_out]`` (under column blocks, this
      device's block of it).
    states: one entry per stage: its ``[k, ...]`` state (a dict of them for
      a dict state), ``None`` for a stateless stage.
    blocks: the :class:`Blocks` the stages see.
    norms: one entry per stage: its declared norms of the whole matrices
      (:func:`stage_norms`); ``None`` (default): no norms for any stage.
    factors: one entry per stage: the factor ``c`` of a
      :class:`ScalingStage` computed beforehand, or ``None``; ``None``
      (default): every stage runs its ``apply``.

  Example:
    >>> import jax.numpy as jnp
    >>> from orthax import matrix_stages as ms
    >>> stages = [ms.ScaleToRms(0.2), ms.ScaleByShape('spectral')]
    >>> o, states, outs = ms.apply_stages(stages, jnp.ones((1, 4, 9)),
    ...                                   [None, None], ms.Blocks(4, 9))
    >>> o.shape, round(float(o[0, 0, 0]), 4)  # RMS 0.2, then √(9/4)
    ((1, 4, 9), 0.3)
  """
  norms = [()] * len(stages) if norms is None else norms
  factors = [None] * len(stages) if factors is None else factors
  new, outs = [], []
  for st, s, nm, c in zip(stages, states, norms, factors):
    if c is not None:
      o, s, out = ScalingStage.multiply(o, c), None, None
    else:
      res = st.apply(o, s, blocks, nm) if nm else st.apply(o, s, blocks)
      was = (o, s)
      _check_arity(st, res)
      if st.has_output:
        o, s, out = res
        _check_output(st, o, out, blocks)
      else:
        (o, s), out = res, None
      _check_returned(st, was, (o, s))
      # The state keeps the dtype init gave it (a float64 hyperparameter
      # under jax_enable_x64 promotes it; a changing dtype breaks lax.scan
      # loops and the guard's choice between the old and the new state).
      s = jax.tree.map(lambda new, old: new.astype(old.dtype), s, was[1])
    new.append(s)
    outs.append(out)
  return o, new, outs
