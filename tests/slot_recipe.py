"""A recipe with its own per-matrix stateful step, written as a user would:
only the stage, the recipe and its registration (used by
``tests/test_slot_stages.py`` on one device and by ``slot_cases.py`` on 8
fake devices).

The stage keeps an ``m×m`` matrix per matrix (``m`` = fan-in): an EMA of
the orthogonalized update's row Gram matrix, and mixes it back,

.. math:: S \\leftarrow βS + (1-β)\\,OO^\\top/n,\\qquad O \\leftarrow O + αSO,

its state in slots: on a mesh each device keeps the state of the matrices it
orthogonalizes, and it never travels.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

import orthax
from orthax import matrix_stages as MS
from orthax import transforms as T

NAME = 'gram_ema_muon'


@MS.stage
class GramEMA(MS.MatrixStage):
  """``S ← βS + (1-β)OOᵀ/n``, ``O ← O + αSO`` (state ``{'gram': m×m}``,
  slots: a dict state, as a stage with several arrays keeps it)."""

  name = 'gram_ema'
  beta: Any = 0.9
  alpha: Any = 0.5

  def shapes(self, fan_in, fan_out):
    return MS.StageShapes(state={'gram': (fan_in, fan_in)}, slots=True)

  def flops(self, fan_in, fan_out):
    return 4 * fan_in * fan_in * fan_out  # O Oᵀ and S O

  def apply(self, o, state, blocks, norms=()):
    x = o.astype(state['gram'].dtype)
    gram = jnp.einsum('kij,klj->kil', x, x) / blocks.fan_out
    s = self.beta * state['gram'] + (1 - self.beta) * gram
    return (x + self.alpha * jnp.einsum('kil,klj->kij', s, x)).astype(
        o.dtype), {'gram': s}


def gram_ema_muon(learning_rate: optax.ScalarOrSchedule = 0.02, *,
                  beta: float = 0.95, gram_beta: float = 0.9,
                  alpha: float = 0.5, weight_decay: float = 0.0,
                  adam_learning_rate: optax.ScalarOrSchedule | None = None,
                  router=None, distributed=None, check_finite: bool = True):
  """Muon whose orthogonalized step is mixed with its Gram EMA."""
  router, specs = orthax.recipes.route(router)
  matrix = optax.named_chain(
      ('momentum', T.momentum(beta, nesterov=True)),
      ('orthogonalize', T.orthogonalize(
          matrix_specs=specs, distributed=distributed,
          then=[GramEMA(gram_beta, alpha)])),
      *orthax.recipes.step_stages(learning_rate, weight_decay))
  return orthax.recipes.assemble_with_adamw(
      matrix, router, check_finite, learning_rate=learning_rate,
      adam_learning_rate=adam_learning_rate, rms_matched=False,
      matrix_weight_decay=weight_decay)


def register():
  """Registers the recipe (idempotent); returns its name."""
  if NAME not in orthax.recipe_names():
    orthax.recipes.register(NAME, learning_rate=0.02,
                            adam_learning_rate=3e-3)(gram_ema_muon)
  return NAME
