"""A NaN gradient on a mesh of 8 fake CPU devices, Auto and Explicit axes,
with and without ``distributed=``: the process exits normally, the step is
skipped on every device, and the error the host raises names the leaf.

(The cases run in a subprocess, ``tests/nonfinite_cases.py``: the device
count must be set before JAX starts. Before the on-device guard, a host
callback raised on one device while the others waited in a collective; the
process died with SIGABRT about 40 s later.)
"""

from __future__ import annotations

import pytest

import fake_devices
import nonfinite_cases


@pytest.fixture(scope='module')
def results():
  return fake_devices.run_cases('nonfinite_cases.py', timeout=1200)


@pytest.mark.parametrize('case', list(nonfinite_cases.CASES))
def test_nan_on_a_mesh_is_skipped_and_named(results, case):
  r = results[case]
  leaf = nonfinite_cases.BAD_LEAF
  assert r['skipped_update_max'] == 0.0
  assert r['leaves'] == [leaf]
  assert r['consecutive'] == 1
  assert r['message'] is not None and f"'{leaf}'" in r['message']
  assert 'at step 1' in r['message']
  # The state was kept: the next finite step is the one taken without the
  # skipped step in between.
  assert r['next_step_finite']
  assert r['next_step_max_diff'] == 0.0
