"""Recipes with ``distributed=`` on 8 fake CPU devices against one device.

The cases run once, in a subprocess (``XLA_FLAGS`` must be set before JAX
starts), through ``tests/sharding_recipes_cases.py``, which prints JSON;
the plans and the executor's own contracts are ``tests/test_sharding.py``'s.
"""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from fake_devices import run_cases  # noqa: E402  pylint: disable=g-import-not-at-top
import sharding_recipes_cases  # noqa: E402  pylint: disable=g-import-not-at-top


# Recipes with distributed= (subprocess, 8 fake CPU devices) -------------------

RECIPE_KEYS = list(sharding_recipes_cases.RECIPE_KEYS)


@pytest.fixture(scope='module')
def recipe_cases():
  # A recipe that fails is reported per key (the tests assert on it).
  return run_cases('sharding_recipes_cases.py', timeout=1200,
                   check_errors=False)


@pytest.mark.parametrize('key', RECIPE_KEYS)
def test_recipes_distributed_equal_single_device(recipe_cases, key):
  """Two steps of muon/normuon/namo/namo_d with distributed= on Auto and
  Explicit meshes equal the single-device recipe; updates keep the params' sharding.

  f32 on the wire: the only differences are one-ulp rounding differences
  in the sharded elementwise stages (seen at step 2 on a TP-sharded leaf),
  amplified by Newton–Schulz: ≤ 2e-6 of the direction (update / lr)."""
  r = recipe_cases[key]
  assert 'error' not in r, r.get('trace', r['error'])
  assert r['sharding_kept']
  gram = '_gram/' in key
  if key.endswith('f32'):
    assert r['rel_err'] <= 2e-6
    # gram sums c's Gram matrices across devices, a different summation
    # order than one device: ulp-level differences in O, which NAMO's
    # shape factor scales up in the step. NAMO's direction (update / lr)
    # is also about twice Muon's at steps 1–2: its bias corrections give
    # α/lr = √(1-μ₂ᵗ)/(1-μ₁ᵗ)·‖u‖/√v ≈ 1.95, so the same relative
    # precision is twice the bound in these units.
    namo = key.startswith('namo')
    assert r['max_abs_err_over_lr'] <= ((5e-6 if gram else 2e-6)
                                        * (2 if namo else 1))
  else:  # bfloat16 on the wire; Newton–Schulz in float32 (see above)
    assert r['rel_err'] <= 1e-2
  # One all-to-all in and one out per a2a group: on fsdp8 the fan-in-sharded
  # 64×128 stack (a, scan) and the transposed b; on fsdp4×tp2 also c, unless
  # c runs tensor-parallel (gram: all-reduces, no all-to-all).
  groups = 3 if 'fsdp4tp2' in key and not gram else 2
  assert r['all_to_all'] == 2 * groups
  # NorMuon's per-neuron state comes back from the a2a groups by one
  # all-gather each. NAMO's state and weight-decay factor are computed on
  # every device from all-reduced norms: nothing of NAMO's is gathered.
  gathers = ['all-gather'] if key.startswith('normuon/') else []
  namo = key.startswith(('namo/', 'namo_d/'))
  if gram:
    assert r['other_collectives'] == gathers + ['all-reduce']
    return
  assert r['other_collectives'] == gathers + (
      ['all-reduce'] if namo or r['all_reduce_bytes'] else [])
  # Whatever else the step communicates (finiteness flags, NorMuon's state,
  # NAMO's norms) is small next to the matrices themselves,
  assert r['other_bytes'] <= 0.05 * r['a2a_bytes']
  # and f32 on the wire, all of it is the plan's but check_finite's flags
  # (all-reduces of bools: of the gradient, the update and the state).
  assert r['guard'] and 0 < r['flag_bytes'] <= 256
  if key.endswith('/f32'):
    assert abs(r['wire_bytes'] - r['flag_bytes'] - r['plan_bytes']) <= 1e-6
  if not namo:
    # Only check_finite's flags are summed across devices: NorMuon's row
    # statistics, Frobenius restore and the shape scale stay in the body.
    assert r['all_reduce_bytes'] == r['flag_bytes']


OTHER_RECIPE_KEYS = [f'{r}/{m}/f32'
                     for r in sharding_recipes_cases.OTHER_RECIPES
                     for m in ('fsdp8', 'fsdp4tp2')]


@pytest.mark.parametrize('key', OTHER_RECIPE_KEYS)
def test_every_recipe_accepts_distributed(recipe_cases, key):
  """Every registered recipe takes distributed=: its matrix function
  (Newton–Schulz, SPECTRA's soft clip) runs on whole matrices per device by
  all-to-all, and two steps equal the single-device recipe. AuON has no
  matrix function: nothing moves, the result is still exact."""
  r = recipe_cases[key]
  assert 'error' not in r, r.get('trace', r['error'])
  assert r['sharding_kept']
  assert r['rel_err'] <= 2e-6 and r['max_abs_err_over_lr'] <= 2e-6
  if key.startswith('auon/'):
    assert r['all_to_all'] == 0
  else:
    assert r['all_to_all'] >= 4 and r['all_to_all'] % 2 == 0
  if key.startswith(('root/', 'spectra/', 'hybrid_auon')):
    # What moves is the plan's, plus check_finite's flags: ROOT's quantile
    # is taken in the body, where each matrix is whole (it was an all-gather
    # of every sharded matrix, GSPMD's, outside the plan).
    assert r['a2a_bytes'] == r['plan_bytes']
    assert r['other_bytes'] == r['flag_bytes']
  elif key.startswith('lanton'):
    # LANTON's per-matrix noise norms, one float per matrix, are all-reduced
    # outside the plan.
    assert r['other_bytes'] - r['flag_bytes'] <= 1e-3 * r['a2a_bytes']


@pytest.mark.parametrize('key', ['normuon_inject/explicit_fsdp8/f32',
                                 'namo_inject/explicit_fsdp8/f32',
                                 'root_inject/explicit_fsdp8/f32'])
def test_traced_hyperparameters_reach_the_body(recipe_cases, key):
  """Under optax.inject_hyperparams the stages' hyperparameters (NorMuon's
  β2; NAMO's learning rate, β and μ2, and the step count; ROOT's quantile,
  for the clip before Newton–Schulz) are traced values; they enter the
  shard_map body as replicated arguments (closing over them fails on an
  Explicit mesh). Two steps equal one device."""
  r = recipe_cases[key]
  assert 'error' not in r, r.get('trace', r['error'])
  assert r['sharding_kept']
  assert r['rel_err'] <= 2e-6 and r['max_abs_err_over_lr'] <= 2e-6
  assert r['all_to_all'] == 4


@pytest.mark.parametrize('key', list(sharding_recipes_cases.GRAD_KEYS))
def test_grad_through_a_distributed_update(recipe_cases, key):
  """``jax.grad`` through a distributed step (a meta-gradient) equals the
  single-device one. With f32 on the wire, XLA:CPU's HLO verifier refused
  the reverse all-to-all of a padded group (its cotangent is the padded
  output's, zeros included, which XLA split into per-device operands of
  mixed layouts); NAMO-D's norms summed from pieces and a gram group's
  normalizer came out NaN (the unselected √0 of scale_safe's split
  roots); bf16 differs by its rounding on the wire."""
  r = recipe_cases[key]
  assert 'error' not in r, r.get('trace', r['error'])
  assert r['finite'] and r['ref_norm'] > 0
  assert r['rel_err'] <= (1e-5 if key.endswith('f32') else 2e-2)


@pytest.mark.parametrize('key', list(sharding_recipes_cases.MERGED_KEYS))
def test_views_that_merge_sharded_axes_on_an_explicit_mesh(recipe_cases, key):
  """A conv kernel and an attention kernel whose matrix views merge axes,
  sharded over Explicit axes: NAMO, NAMO-D and LANTON reshaped the leaves
  themselves and JAX refused (``ShardingTypeError``), with and without
  ``distributed=``; two steps now equal one device's and keep each leaf's
  sharding (muon is the control)."""
  r = recipe_cases[key]
  assert 'error' not in r, r.get('trace', r['error'])
  assert r['sharding_kept']
  assert r['rel_err'] <= 2e-6


def test_a_slot_state_from_another_mesh_is_named(recipe_cases):
  """A slot state laid out on fsdp8 given to a step on fsdp4 failed with
  "incompatible shapes for broadcasting" (or, without check_finite, ran
  with each matrix reading another's state); on one device it blamed the
  stage. Both name the layouts now."""
  r = recipe_cases['slot_layout_errors']
  assert 'error' not in r, r.get('trace', r['error'])
  for n, layout in (('4', '4 × 1'), ('1', '1 × 3')):
    assert r[n].startswith("trion: its slot state 'group0'"), r[n]
    assert f'laid out for 8 device(s) × 1 matrices each; this step runs on {layout}' in r[n]
    assert 'another mesh' in r[n]
