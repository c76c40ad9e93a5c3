"""optax's own contract tests for contributed optimizers
(``optax/contrib/_common_test.py``, from the installed optax), pointed at
every registered orthax recipe.

The harness is read from the installed package and its optimizer table is
replaced by orthax's recipes before it runs, so the checks are optax's, not
a copy: extra-args support, convergence on its targets, ``inject_hyperparams``,
dtype preservation, gradient accumulation, state shape/dtype/sharding
stability and learning-rate schedules.
"""

from __future__ import annotations

import inspect
import pathlib
import types

import optax
import optax.contrib

import orthax

# The documented refusal: a leaf of 3 or more dimensions with no routing rule
# raises a ValueError naming it; the harness has none, so nothing is skipped.
# Convergence targets have their optimum away from zero: recipes whose
# default decoupled weight decay is not 0 (Muon's and Hybrid-AuON's 0.2,
# ...) run without it, as optax's table sets each optimizer's own
# arguments.
_TABLE = '''
_MAIN_OPTIMIZERS_UNDER_TEST = tuple(
    {'opt_name': name,
     'opt_kwargs': dict(learning_rate=_HARNESS_RATE.get(name, 1e-2),
                        **_HARNESS_KWARGS.get(name, {}), **_no_decay(name)),
     'wrapper_name': None, 'wrapper_kwargs': None}
    for name in _orthax.recipe_names())
_ALL_OPTIMIZERS_UNDER_TEST = _MAIN_OPTIMIZERS_UNDER_TEST

'''

_FACTORY = '''

def _get_opt_factory(opt_name):  # orthax's recipes, by registered name
  return _orthax.recipe_factory(opt_name)
'''


# The rate each recipe runs at: 1e-2, except NAMO, Trion and NAMO-D, whose
# default rates (0.226, 0.226, 0.22) are about 4× Muon's: their matrices run
# at 2e-2 and their AdamW branch (at a fixed fraction of the rate, 3e-3 at
# the default) at 7.5e-4, as LANTON's: at their default ratio it would run at
# 1.3e-4 at 1e-2 (2.7e-4 at 2e-2), too slow for the parabola's vector in the
# harness's step budget (Muon's at 1e-2: 5.3e-4). LANTON (default 0.08) would
# run its AdamW branch at 3.8e-4 at 1e-2, and at 2e-2 its matrix step
# overshoots the 2×2 matrix (0.04 off the target's zero entry), so it runs at
# 1e-2 with its AdamW branch at 7.5e-4. DCT-AdamW's rate is per unit of the
# matrix's smaller side: 2e-2 is 1e-2 on the harness's 2×2 matrix; its AdamW
# branch (the vectors) runs at 1e-2, as the others' would at their rate (at
# its default ratio, 0.0085/1.5, it would run at 1.1e-4).
_HARNESS_RATE = {'namo': 2e-2, 'namo_d': 2e-2, 'trion': 2e-2,
                 'dct_adamw': 2e-2}
_HARNESS_KWARGS = {'dct_adamw': dict(adam_learning_rate=1e-2),
                   **{name: dict(adam_learning_rate=7.5e-4)
                      for name in ('lanton', 'trion', 'namo', 'namo_d')}}


def _no_decay(name: str) -> dict[str, float]:
  """``weight_decay=0`` (and ``adam_weight_decay=0``) where the recipe's
  default decays, as the recipe reports it (a mode-dependent default is
  ``None`` in the signature, so the signature cannot say)."""
  params = inspect.signature(orthax.recipe_factory(name)).parameters
  decays = orthax.recipes.recipe_routing(orthax.recipe(name)).weight_decays
  if not any(decays.values()):
    return {}
  return {k: 0.0 for k in ('weight_decay', 'adam_weight_decay')
          if k in params}


def _harness() -> types.ModuleType:
  src = (pathlib.Path(optax.contrib.__file__).parent
         / '_common_test.py').read_text()
  start = src.index('_MAIN_OPTIMIZERS_UNDER_TEST = [')
  end = src.index('def _get_opt_factory(')
  mod = types.ModuleType('optax_contrib_harness_for_orthax')
  mod.__dict__['_orthax'] = orthax
  mod.__dict__['_no_decay'] = _no_decay
  mod.__dict__['_HARNESS_RATE'] = _HARNESS_RATE
  mod.__dict__['_HARNESS_KWARGS'] = _HARNESS_KWARGS
  exec(compile(src[:start] + _TABLE + src[end:] + _FACTORY,  # pylint: disable=exec-used
               'optax/contrib/_common_test.py (orthax table)', 'exec'),
       mod.__dict__)
  return mod


ContribTest = _harness().ContribTest

# The documented refusal: the inject_hyperparams check has a (2, 5, 2) leaf
# and no routing rule can be given through the harness; orthax refuses to
# guess a matrix view for it and raises a ValueError naming it. That is what
# this check asserts for every recipe (tests/contract.py checks
# inject_hyperparams parity for every recipe on trees its router covers).
_REFUSED = 'test_optimizers_can_be_wrapped_in_inject_hyperparams'


def _expect_refusal(check):
  def test(self):
    with self.assertRaisesRegex(
        ValueError, r"no routing rule covers parameter '1' of shape "
        r'\(2, 5, 2\)'):
      check(self)
  return test


for _name in [n for n in dir(ContribTest) if n.startswith(_REFUSED)]:
  setattr(ContribTest, _name, _expect_refusal(getattr(ContribTest, _name)))


def test_every_recipe_takes_the_harness_schedule_check():
  """The harness skips its schedule check for a factory whose
  ``learning_rate`` is not annotated ``optax.ScalarOrSchedule``; a recipe
  whose default is ``None`` (its mode's rate) keeps that annotation, so the
  check runs for every recipe."""
  for name in orthax.recipe_names():
    param = inspect.signature(orthax.recipe_factory(name)).parameters[
        'learning_rate']
    assert param.annotation in (optax.ScalarOrSchedule, optax.Schedule), (
        name, param.annotation)
