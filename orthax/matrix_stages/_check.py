"""Checks that an object can run as a matrix stage (:func:`check_stage`),
made where a stage is handed to a transform: a stage written by hand that
breaks the protocol is named there, with what to change, rather than
failing deep inside JAX at the first step (or only on a mesh)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np

from orthax.matrix_stages._base import MatrixStage
from orthax.matrix_stages._base import Norm
from orthax.matrix_stages._base import StageShapes
from orthax.matrix_stages._base import is_number


def _is_shape(s: Any) -> bool:
  return isinstance(s, (tuple, list)) and all(
      isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0
      for d in s)


def check_declaration(st: MatrixStage, owner: str, fan_in: int = 2,
                      fan_out: int = 3) -> None:
  """``ValueError`` naming ``owner`` and the stage where ``st.shapes(fan_in,
  fan_out)`` is not a :class:`StageShapes` of the documented kinds: a
  state of ``None``, a shape or a dict of shapes; ``axis`` ``None``, ``-2``
  or ``-1``; an output of ``None`` or a shape; ``norms`` a tuple of
  :class:`Norm`.

  Args:
    st: the stage.
    owner: the transform it was given to.
    fan_in, fan_out: the matrix sides it is asked about.
  """
  sh = st.shapes(fan_in, fan_out)
  where = f'{owner}: stage {st.name!r}: shapes({fan_in}, {fan_out})'
  if not isinstance(sh, StageShapes):
    raise ValueError(f'{where} returned {sh!r}; it must return an '
                     'orthax.matrix_stages.StageShapes.')
  state_ok = sh.state is None or _is_shape(sh.state) or (
      isinstance(sh.state, Mapping) and all(_is_shape(v)
                                            for v in sh.state.values()))
  problems = [
      (state_ok, 'state', 'None, a shape (a tuple of ints) or a dict of '
       'shapes'),
      (sh.axis in (None, -2, -1), 'axis', 'None, -2 (fan-in) or -1 '
       '(fan-out)'),
      (sh.output is None or _is_shape(sh.output), 'output',
       'None or a shape (a tuple of ints)'),
      (isinstance(sh.norms, (tuple, list))
       and all(isinstance(n, Norm) for n in sh.norms), 'norms',
       'a tuple of orthax.matrix_stages.Norm'),
  ]
  for ok, field, want in problems:
    if not ok:
      raise ValueError(f'{where}.{field} must be {want}, got '
                       f'{getattr(sh, field)!r}.')


def check_stage(st: Any, owner: str, arg: str = 'stages') -> None:
  """``ValueError`` naming ``owner`` where ``st`` cannot run as a stage:
  not a :class:`MatrixStage`, a class not made with the ``@stage``
  decorator (no pytree: it fails on a mesh), a hyperparameter field holding
  something other than a number or an array (a mode declared without
  ``static()``: it fails on a mesh), or a :meth:`~MatrixStage.shapes`
  declaration of the wrong kind (:func:`check_declaration`).

  Args:
    st: the object given as a stage.
    owner: the transform it was given to.
    arg: the argument it came in (``'then'``), named in the error for an
      object that is no stage.
  """
  if not isinstance(st, MatrixStage):
    raise ValueError(
        f'{owner}: {arg} must hold orthax.matrix_stages.MatrixStage objects '
        f'(e.g. NeuronNormalize(), ClipOutliers()), got {st!r}.')
  leaves = jax.tree.leaves(st)
  if not dataclasses.is_dataclass(st) or (len(leaves) == 1
                                          and leaves[0] is st):
    raise ValueError(
        f'{owner}: stage {type(st).__name__} is not a registered pytree: '
        'decorate its class with @orthax.matrix_stages.stage (its '
        'hyperparameters must flow into a mesh\'s shard_map body).')
  for f in dataclasses.fields(st):
    if f.metadata.get('static'):
      continue
    for leaf in jax.tree.leaves(getattr(st, f.name)):
      if not (is_number(leaf) or isinstance(leaf, jax.core.Tracer)):
        raise ValueError(
            f'{owner}: stage {st.name!r} field {f.name!r} holds {leaf!r}, '
            'which is not a number or an array: declare a mode with '
            "orthax.matrix_stages.static(default=...) (a hyperparameter "
            'field is traced, and enters a mesh\'s body as an array).')
  check_declaration(st, owner)
