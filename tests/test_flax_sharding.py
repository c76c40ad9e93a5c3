"""Every recipe in Flax's own sharding workflow, on 8 fake devices
(``tests/flax_sharding_cases.py``): parameters annotated with shardings
(NNX ``out_sharding``, linen logical partitioning). A state that is not
shaped like its parameter (the guard's flag per leaf, NorMuon's and NAMO's
per-neuron or per-matrix statistics, LANTON's noise) took the parameter's
box, and with it a sharding annotation of the wrong rank:
``nnx.Optimizer`` and linen's jitted ``TrainState.create`` failed for every
recipe at its defaults."""

from __future__ import annotations

import pathlib
import sys

import pytest

pytest.importorskip('flax')

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from fake_devices import run_cases  # noqa: E402  pylint: disable=g-import-not-at-top
from versions import FLAX  # noqa: E402  pylint: disable=g-import-not-at-top

import orthax  # noqa: E402


@pytest.fixture(scope='module')
def cases():
  return run_cases('flax_sharding_cases.py', timeout=1500)


def test_every_recipe_and_workflow_ran(cases):
  names = orthax.recipe_names()
  assert {f'nnx-auto-{n}' for n in names} <= set(cases)
  assert {f'linen-{n}' for n in names} <= set(cases)
  if FLAX > (0, 12, 0):  # (flax_sharding_cases.EXPLICIT_MODELS)
    assert {'nnx-explicit-muon', 'nnx-explicit-normuon', 'nnx-explicit-namo',
            'nnx-explicit-lanton'} <= set(cases)


def test_each_trains_with_finite_parameters(cases):
  for case, r in cases.items():
    assert r['finite'], case
    assert len(r['losses']) == 2 and all(map(float.__instancecheck__,
                                             r['losses'])), case
    assert r['all_moved'], case
