"""On/off switches and arguments that take one of a set of names, for every
public function, recipe and stage: a truthy stand-in (the string
``'False'``) or a name out of its set is refused naming the argument. The
owners and their required arguments are ``tests/test_validation.py``'s."""

from __future__ import annotations

import inspect
import pathlib
import re
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import orthax
from orthax import transforms as T

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_validation import OWNERS  # noqa: E402  pylint: disable=g-import-not-at-top
from test_validation import TRANSFORMS  # noqa: E402  pylint: disable=g-import-not-at-top


def _switches():
  """Every argument with a ``bool`` default of every public function of
  ``orthax``, ``orthax.transforms``, ``orthax.polar`` and
  ``orthax.sharding``, and every ``bool`` field of the built-in stages, with
  the function's required arguments (``None`` for those outside
  :data:`TRANSFORMS`: the switch is checked first)."""
  found = {}
  for module in (orthax, T, orthax.polar, orthax.sharding,
                 orthax.matrix_stages):
    for name in dir(module):
      fn = getattr(module, name)
      if name.startswith('_') or not callable(fn) or (
          inspect.isclass(fn)
          and not issubclass(fn, orthax.matrix_stages.MatrixStage)):
        continue
      try:
        params = inspect.signature(fn).parameters.values()
      except (TypeError, ValueError):
        continue
      required = TRANSFORMS.get(name, (None, None))[1] or (lambda p=params: {
          q.name: None for q in p if q.default is q.empty
          and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)})
      for p in params:
        if isinstance(p.default, bool):
          found[(name, p.name)] = (fn, required)
  return [(fn, required, arg) for (_, arg), (fn, required)
          in sorted(found.items())]


SWITCHES = _switches()


def test_the_switch_list_covers_each_kind():
  names = {arg for _, _, arg in SWITCHES}
  assert {'nesterov', 'cautious_weight_decay', 'restore_norm', 'normalize',
          'bias_correction', 'symmetrize', 'result', 'column_blocks',
          'stable', 'remap'} <= names, names


@pytest.mark.parametrize('make,required,arg', SWITCHES,
                         ids=[f'{f.__name__}-{a}' for f, _, a in SWITCHES])
def test_switches_must_be_bools(make, required, arg):
  """A switch picks a program: the string 'False' (truthy) or a number is
  refused, naming the argument (``muon(cautious_weight_decay='False')``,
  ``neuron_normalize(restore_norm='False')`` and a dozen more took it as
  True)."""
  for bad in ('False', 0, None):
    with pytest.raises(TypeError, match=f'{arg} must be True or False'):
      make(**required(), **{arg: bad})
  for good in (False, np.bool_(True)):  # not refused (other errors may come)
    try:
      make(**required(), **{arg: good})
    except TypeError as e:
      assert 'must be True or False' not in str(e), e
    except (ValueError, AttributeError):
      pass  # the dummy required arguments


@pytest.mark.parametrize('name', orthax.recipe_names())
def test_check_finite_must_be_a_bool(name):
  """``check_finite='False'`` (truthy) turned the check on without a word."""
  for bad in ('False', 0, None):
    with pytest.raises(TypeError, match=f'^{name}: check_finite must be '
                       'True or False'):
      orthax.recipe(name, check_finite=bad)
  orthax.recipe(name, check_finite=np.bool_(False))


def test_a_stage_declaring_slots_as_a_string_is_named():
  @orthax.matrix_stages.stage
  class Keep(orthax.matrix_stages.MatrixStage):
    name = 'keep'

    def shapes(self, fan_in, fan_out):
      return orthax.matrix_stages.StageShapes(state=(fan_in,), slots='False')

    def apply(self, o, state, blocks):
      return o, state

  with pytest.raises(TypeError, match=r'^keep.shapes\(\): StageShapes.slots '
                     'must be True or False'):
    T.orthogonalize(then=[Keep()]).init({'w': jnp.ones((4, 8))})


def _named_choices():
  """Every argument of a recipe or transform that takes one of a set of
  names (a string default or a ``str`` annotation), but the LANTON pattern
  (any regular expression)."""
  for owner, fn, required in OWNERS:
    for arg, p in inspect.signature(fn).parameters.items():
      if arg != 'signum_pattern' and (isinstance(p.default, str)
                                      or 'str' in str(p.annotation)):
        yield owner, fn, required, arg


CHOICES = list(_named_choices())


def test_the_choice_list_covers_each_kind():
  names = {arg for _, _, _, arg in CHOICES}
  assert {'reference', 'ns_method', 'preset', 'noise_ns_preset', 'clip_decay',
          'step_rule', 'coeffs_for_shape', 'scaling', 'qr'} <= names, names


@pytest.mark.parametrize('owner,fn,required,arg', CHOICES,
                         ids=[f'{o}-{a}' for o, _, _, a in CHOICES])
def test_a_name_out_of_its_set_is_refused_naming_the_argument(
    owner, fn, required, arg):
  """``muon(ns_method='bogus')`` said 'method must be one of',
  ``muon(reference=['keller'])`` 'unhashable type', ``root(coeffs_for_shape=3)``
  'int is not iterable'; ``lanton(noise_ns_preset='bogus')`` and
  ``spectral_preclip(step_rule='bogus')`` were accepted."""
  for bad in ('bogus', 3, ['x']):
    with pytest.raises((ValueError, TypeError), match=re.escape(arg)):
      fn(**required(), **{arg: bad})


def test_the_signum_pattern_must_be_a_regular_expression():
  for bad in (1, '('):
    with pytest.raises(ValueError, match='^lanton: signum_pattern must be a '
                       'regular expression'):
      orthax.lanton(signum_pattern=bad)
