"""The trainer on fake multi-device meshes (subprocesses; see
tests/train_mesh_cases.py): numerics equal one device, and every config in
orthax/configs/ passes its dry run."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from orthax import configs

pytest.importorskip('ml_collections')
pytest.importorskip('orbax.checkpoint')

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent
CONFIGS = list(configs.names())  # orthax/configs/*.py


def _run(devices: int, what: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  if 'ORTHAX_TEST_XLA_FLAGS' in env:  # the suite's compile flags (conftest)
    env['XLA_FLAGS'] = env['ORTHAX_TEST_XLA_FLAGS']
  proc = subprocess.run(
      [sys.executable, str(HERE / 'train_mesh_cases.py'), str(devices), what],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_mesh_training_equals_one_device():
  """data×fsdp×tensor (every optimizer) and fsdp×tensor (muon) meshes, f32
  on the wire, follow the single-device loss curve; replicas compute
  redundantly."""
  out = _run(8, 'numerics')
  assert set(out) == {'muon', 'normuon', 'namo', 'adamw'}
  assert set(out['muon']) == {'1x1x1', '2x2x2', '1x4x2'}
  for name, curves in out.items():
    assert '2x2x2' in curves and len(curves['1x1x1']) == 4, (name, curves)
    ref = np.asarray(curves['1x1x1'])
    for mesh, losses in curves.items():
      np.testing.assert_allclose(losses, ref, rtol=2e-5, atol=2e-5,
                                 err_msg=f'{name} on mesh {mesh}')


def test_a_forced_resume_on_another_mesh_moves_the_slot_state():
  """ARO and DCT-AdamW keep each matrix's state on its owner device. Saved
  on one mesh and resumed with --force on another (fsdp4×tensor2 →
  data2×fsdp2×tensor2, fsdp8 → one device, one device → fsdp8; the last
  two change the number of slot groups as well), the run goes on as one
  without a break would: within float32 noise for DCT-AdamW; for ARO,
  whose trajectory already differs between meshes (QR and Sinkhorn on f32
  reductions in another order), within twice that difference between the
  two meshes' runs. The first two losses come from the saved run."""
  out = _run(8, 'resume')
  assert len(out) == 3, out
  for key, r in out.items():
    resumed, whole, first = (np.asarray(r[k]) for k in
                             ('resumed', 'whole', 'first_mesh'))
    assert len(resumed) == 4, (key, r)
    np.testing.assert_array_equal(resumed[:2], first[:2], err_msg=key)
    spread = np.abs(whole - first)[2:]
    tol = np.maximum(2 * spread, 2e-5 * np.abs(whole[2:]))
    assert np.all(np.abs(resumed[2:] - whole[2:]) <= tol), (key, r)
  dct = out['dct_adamw/1x1x1->1x8x1']
  np.testing.assert_allclose(dct['resumed'], dct['whole'], rtol=2e-5)


def test_nonfinite_gradient_on_a_mesh_raises_naming_the_leaf():
  """fsdp=2, a NaN gradient at step 2, train.nonfinite='raise': a
  NonFiniteGradientError naming the step and leaf, and a normal exit (the
  guard decides on device; no host callback that aborts a mesh)."""
  out = _run(2, 'nonfinite')
  assert out['error'] == 'NonFiniteGradientError', out
  assert ("non-finite gradient (NaN or Inf) at step 2 in leaf '"
          in out['message']), out


def test_every_config_passes_its_dry_run():
  """Each config compiles its full train step on fake devices shaped like
  its mesh, at its real size (scanned layers keep compile time flat)."""
  assert {'lm_cpu', 'gpt2_124m', 'gpt2_350m', 'gpt_1b'} <= set(CONFIGS)
  out = _run(32, ','.join(CONFIGS))
  for name in CONFIGS:
    r = out[name]
    assert r['devices'] >= 1 and 'per device' in r['text'], r
    assert r['param_bytes'] > 0 and r['opt_state_bytes'] > 0
    assert r['temp_bytes'] is not None and r['model_flops'] > 0
    if r['devices'] > 1:
      kinds = r['collectives']
      # Newton–Schulz goes through all-to-alls (orthax's plan), not
      # per-iteration all-gathers of whole matrices.
      assert kinds.get('all-to-all', {}).get('count', 0) >= 2, (name, kinds)
      assert 'orthax sharding plan' in r['text'], name  # the predicted plan
  big = out['gpt2_124m']
  assert big['params'] > 120e6 and big['devices'] == 16
  # Parameters are sharded 16 ways: per device ≈ total / 16.
  assert big['param_bytes'] < big['params'] * 4 / 16 * 1.05


def test_train_script_dry_run_cli():
  proc = subprocess.run(
      [sys.executable, 'scripts/train.py', '--config=lm_cpu:namo',
       '--dry_run', '--config.mesh.fsdp=2', '--config.mesh.tensor=2'],
      capture_output=True, text=True, cwd=ROOT, timeout=600,
      env={k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 2}  (4 devices)" in proc.stdout
  assert 'all-to-all' in proc.stdout
  assert 'orthax sharding plan: ' in proc.stdout and 'a2a' in proc.stdout
