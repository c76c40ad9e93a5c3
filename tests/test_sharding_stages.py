"""Matrix stages (NorMuon's statistics, Frobenius restore, shape and RMS
scales; NAMO's and NAMO-D's step with its norms) inside the shard_map body
on 8 fake CPU devices: numerics and state equal one device, and the
compiled step's collectives and bytes are the plan's
(tests/sharding_stages_cases.py, in a subprocess)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))
from fake_devices import run_cases  # noqa: E402  pylint: disable=g-import-not-at-top
from sharding_stages_cases import CASES  # noqa: E402
from sharding_stages_cases import BF16_STEPS  # noqa: E402
from sharding_stages_cases import NAMO  # noqa: E402

GRAM_CASES = [n for n in CASES if 'gram' in n]
WHOLE_CASES = [n for n in CASES if n not in GRAM_CASES]


@pytest.fixture(scope='module')
def cases():
  return run_cases('sharding_stages_cases.py', timeout=1200)


@pytest.mark.parametrize('name', list(CASES))
def test_stages_equal_single_device(cases, name):
  """Two steps: updates and the stages' state (NorMuon's; NAMO's, with the
  momentum) equal one device, f32 on the wire, and bf16 for the cases in
  BF16_STEPS (the others vary a stage's options or the mesh's axis type, not
  the wire). f32: the Newton–Schulz stage alone already
  differs by up to 1.3e-6 (relative) on fsdp4×tp2 (XLA fuses the re-tiled
  stack differently); the stages add nothing measurable on top."""
  r = cases[name]
  assert r['f32_out_specs_ok']
  assert r['f32_max_rel_err'] <= 2e-6
  assert r['f32_state_max_rel_err'] <= 2e-6
  assert ('bf16_max_rel_err' in r) == (name in BF16_STEPS)
  if name in BF16_STEPS:
    assert r['bf16_out_specs_ok']
    # The wire's bfloat16 roundings only (Newton–Schulz iterates in
    # float32 between: in bfloat16 it was 1.2–1.4%).
    assert r['bf16_max_rel_err'] <= 1e-2
    assert r['bf16_state_max_rel_err'] <= 1e-2


@pytest.mark.parametrize('name', WHOLE_CASES)
def test_stages_add_one_state_gather_and_one_norm_all_reduce(cases, name):
  """Whole matrices per device: the statistics are computed where the
  matrix is; NorMuon's per-matrix states leave in one all-gather per group
  that moves matrices (a2a, replicated). NAMO's step is a scaling stage: the
  norms of the gradient's and the momentum's pieces are summed in one
  float32 all-reduce per a2a group (none elsewhere: replicated and local
  groups hold whole matrices), every device computes the step from them,
  and nothing of NAMO's is gathered. Still exactly 2 all-to-alls per a2a
  group. XLA:CPU combines the small all-reduces when it compiles (f32 is
  read from the compiled program): at most the lowered count, which is the
  plan's."""
  r = cases[name]
  n = {s: sum(g['strategy'] == s for g in r['groups'])
       for s in ('a2a', 'replicated', 'local')}
  assert n['a2a'] >= 3
  stages = CASES[name][4]
  norms = stages in NAMO
  moving = stages != 'namo' and stages != 'namo_d'  # NorMuon's state
  want = {'all-to-all': 2 * n['a2a'],
          'all-gather': n['a2a'] * moving + n['replicated'] * (1 + moving)}
  if norms:
    want['all-reduce'] = n['a2a']
  want = {k: v for k, v in want.items() if v}
  for wire in ('f32', 'bf16'):
    got = dict(r[f'{wire}_collectives'])
    if wire == 'f32' and norms:
      assert 1 <= got.pop('all-reduce') <= n['a2a']
      assert got == {k: v for k, v in want.items() if k != 'all-reduce'}
    else:
      assert got == want, wire
    assert r[f'{wire}_plan_collectives'] == sum(want.values())
    plan, got_bytes = r[f'{wire}_plan_bytes'], r[f'{wire}_wire_bytes']
    assert abs(got_bytes - plan) <= 0.05 * plan, (wire, got_bytes, plan)
  # One orientation per group: a stage sees [fan_in, fan_out].
  assert all(len(set(g['transposed'])) == 1 for g in r['groups'])


@pytest.mark.parametrize('name', GRAM_CASES)
def test_gram_stage_sums_are_all_reduces_the_plan_counts(cases, name):
  """Column blocks: each stage sum across the split axis is one all-reduce
  the plan predicts (XLA:CPU merges some when it compiles; the lowered
  program has exactly the plan's); bytes as planned."""
  r = cases[name]
  assert {g['strategy'] for g in r['groups']} == {'gram'}
  assert r['bf16_collectives'] == {'all-reduce': r['bf16_plan_collectives']}
  assert set(r['f32_collectives']) == {'all-reduce'}
  assert r['f32_collectives']['all-reduce'] <= r['f32_plan_collectives']
  for wire in ('f32', 'bf16'):
    plan, got = r[f'{wire}_plan_bytes'], r[f'{wire}_wire_bytes']
    assert abs(got - plan) <= 0.05 * plan, (wire, got, plan)


def test_bench_stage_rows_match_plan():
  """scripts/bench_sharding.py's fsdp8_normuon and fsdp8_namo rows (GPT-2
  small, the figures in docs/distributed.md). NorMuon: 8 all-to-alls and one state
  all-gather per group. NAMO's step in the body: 8 all-to-alls and the
  norms' all-reduces (XLA:CPU combines the 4 groups' into one), no
  all-gather, and no more bytes than the step applied after the body. MiB
  sent (f32 compiled, bf16 lowered) equal to the plan's."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, str(HERE.parent / 'scripts' / 'bench_sharding.py'),
       'fsdp8_normuon', 'fsdp8_namo', '--no-optax', '--no-scaling'],
      env=env, capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {}
  for line in proc.stdout.splitlines():
    if line.startswith('| fsdp8_'):
      cells = [c.strip() for c in line.strip('|').split('|')]
      rows[(cells[0], 'after' in cells[1])] = cells
  cells = rows[('fsdp8_normuon', False)]
  assert 'neuron_normalize+scale_by_shape' in cells[1]
  assert cells[4] == 'all-gather×4, all-to-all×8'
  assert cells[7] == f'{cells[5]}/{cells[6]}'  # plan f32/bf16 = measured
  body, after = rows[('fsdp8_namo', False)], rows[('fsdp8_namo', True)]
  assert 'in the body' in body[1]
  assert body[4] in ('all-reduce×1, all-to-all×8', 'all-reduce×4, all-to-all×8')
  assert body[7] == f'{body[5]}/{body[6]}'
  assert float(body[5]) <= float(after[5]) and float(body[6]) <= float(
      after[6])
