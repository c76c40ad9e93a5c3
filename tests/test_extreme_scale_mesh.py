"""A 1e19-scale gradient with ``distributed=`` on 8 fake CPU devices gives
the unscaled update: the norms summed from each device's pieces (``a2a``:
NAMO-D's; ``gram``: also Newton–Schulz's Frobenius normalizer) are summed
scale-safely (``orthax.polar.scale_safe.split_squares``). Before, their
float32 sums of squares overflowed.

(The cases run in a subprocess, ``tests/extreme_scale_mesh_cases.py``: the
device count must be set before JAX starts.)
"""

from __future__ import annotations

import pytest

import extreme_scale_mesh_cases
import fake_devices


@pytest.fixture(scope='module')
def results():
  return fake_devices.run_cases('extreme_scale_mesh_cases.py', timeout=600)


@pytest.mark.parametrize('case', list(extreme_scale_mesh_cases.CASES))
def test_huge_gradient_on_a_mesh_has_the_unscaled_update(results, case):
  r = results[case]
  assert ('gram' in r['strategies']) == ('gram' in case)
  assert 'a2a' in r['strategies']
  assert r['finite']
  assert r['rel_err'] < 1e-5, r['errs']
