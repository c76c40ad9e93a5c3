"""The suite's compile flags (``tests/conftest.py``: ``FAST_COMPILE_FLAGS``)
change how XLA generates code, not what it computes: the contract's jitted
trajectories (3 steps) of Muon (Newton–Schulz, the AdamW branch), ARO
(Cholesky, triangular solves, the per-matrix fallbacks' ``lax.map`` of
``cond``\\ s, Sinkhorn) and FISMO (``eigh``) equal those of a subprocess
that compiles with XLA's defaults, as users' programs do, to float32's own
accuracy: against the float64 trajectory, each leaf of the suite's is within
twice the defaults' error (plus 4e-7 of its largest entry). The two differ by
rounding (ARO's kernels by up to 5.7e-7 of their largest entry, FISMO's by up
to 3.6e-6, where both are 1.5e-6 to 2.8e-6 from float64: its inverse roots
amplify float32's rounding whatever the compiler does).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import conftest
import contract

HERE = pathlib.Path(__file__).resolve().parent
CASES = [c for c in contract.recipe_cases()
         if c.id in ('muon[reference=keller]', 'aro[reference=orthax]', 'fismo')]

_SCRIPT = '''
import sys
import numpy as np
import jax
import contract
out = {}
for c in contract.recipe_cases():
  if c.id in sys.argv[2:]:
    run = contract.trajectory(c.make, jit=True)
    for i, u in enumerate(run.updates):
      for path, x in contract.leaves_with_paths(u):
        out[f'{c.id} {i} {path}'] = np.asarray(x)
np.savez(sys.argv[1], **out)
'''


def _default_flags_env():
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if f.split('=')[0] not in
           {g.split('=')[0] for g in conftest.FAST_COMPILE_FLAGS}]
  env['XLA_FLAGS'] = ' '.join(flags)
  env['PYTHONPATH'] = os.pathsep.join(
      [str(HERE), str(HERE.parent)]
      + [p for p in [env.get('PYTHONPATH')] if p])
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def test_fast_compile_flags_are_as_accurate_as_the_default_compile(
    tmp_path, x64):
  if not conftest.FAST_COMPILE_FLAGS[0] in os.environ.get('XLA_FLAGS', ''):
    pytest.skip('the suite compiles with the defaults '
                '(ORTHAX_TEST_DEFAULT_COMPILE=1)')
  del x64  # float64 trajectories below
  out = tmp_path / 'default.npz'
  env = _default_flags_env()
  assert not any(f in env['XLA_FLAGS'] for f in conftest.FAST_COMPILE_FLAGS)
  proc = subprocess.run(
      [sys.executable, '-c', _SCRIPT, str(out)] + [c.id for c in CASES],
      env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  default = np.load(out)
  compared = 0
  for c in CASES:
    run = contract.trajectory(c.make, 'float32', jit=True)
    exact = contract.trajectory(c.make, 'float64', jit=True)
    for i, (u, u64) in enumerate(zip(run.updates, exact.updates)):
      for (path, x), (_, z) in zip(contract.leaves_with_paths(u),
                                   contract.leaves_with_paths(u64)):
        ref = default[f'{c.id} {i} {path}']
        assert (x.dtype, ref.dtype, z.dtype) == (np.float32,) * 2 + (
            np.float64,)
        x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
        z = np.asarray(z)
        scale = max(np.max(np.abs(z)), 1e-30)
        ours = np.max(np.abs(x - z)) / scale
        theirs = np.max(np.abs(ref - z)) / scale
        assert ours <= 2 * theirs + 4e-7, (
            f'{c.id} step {i} {path}: {ours:.2e} from float64 with the '
            f'suite\'s flags, {theirs:.2e} with XLA\'s defaults')
        compared += 1
  assert len(CASES) == 3 and compared == len(default.files) > 3 * len(CASES)
