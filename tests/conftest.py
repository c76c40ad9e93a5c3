"""Fixtures shared by the test files, how the suite compiles, and how its
tests are spread over the pytest workers.

Most of this suite's time is XLA compiling small programs on the CPU, so,
unless ``ORTHAX_TEST_DEFAULT_COMPILE=1`` is set:

* every process of the run compiles with the flags in
  ``FAST_COMPILE_FLAGS``: the same optimized HLO, lowered by LLVM without its
  optimization passes (``--xla_backend_optimization_level=0``), by XLA's
  elemental IR emitters in place of its MLIR fusion emitters
  (``--xla_cpu_use_fusion_emitters=false``), in one LLVM module per program
  (``--xla_cpu_parallel_codegen_split_count=1``: the two workers already
  fill the two cores). IEEE arithmetic is unchanged (XLA's CPU backend does
  not enable fast math); programs compile faster and run slower, which the
  tests' small matrices do not notice. Compiling the contract's jitted step
  and ``MultiSteps`` step of muon, aro, normuon and fismo took 89 CPU-s at
  XLA's defaults, 49 at ``-O0`` and 25 with the fusion emitters off too; of
  six recipes (those and namo_d, trion), 54–62 CPU-s at ``-O0`` and 22–25
  with all three flags (one process per setting, 2026-12-04).
  ``tests/test_compile_flags.py`` checks that the flags cost no accuracy:
  Muon's, ARO's and FISMO's updates are as close to float64 as with XLA's
  defaults. The flags stay in ``XLA_FLAGS``, so the subprocesses tests start (fake-device case
  scripts, notebook kernels, the command-line tools) inherit them. A test
  that builds a subprocess's environment from scratch takes the flags from
  ``ORTHAX_TEST_XLA_FLAGS``.
* the pytest processes (not the subprocesses) share a persistent
  compilation cache in a temporary directory (its path travels in
  ``ORTHAX_TEST_JAX_CACHE``) that is removed when the run ends: a program
  that several tests compile is compiled once. The fake-device scripts do
  not use it: with the shared cache, an all-reduce of
  ``sharding_stages_cases.py`` deadlocked in two full runs (3 of 4 device
  threads arrived, even given 600 s).

Every process of the run, subprocesses included, uses one OpenBLAS thread
(``OPENBLAS_NUM_THREADS=1`` unless set): two pytest workers fill the two
cores, and OpenBLAS's own threads, waiting for work beside XLA's, made NumPy's
SVDs 15× slower in a notebook kernel (notebook 02's smoke run: 125 s with
OpenBLAS's default threads, 20 s with one).
"""

import os
import shutil
import tempfile

os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')  # before NumPy loads

_ENABLED = os.environ.get('ORTHAX_TEST_DEFAULT_COMPILE') != '1'
_OWN_CACHE_DIR = None
FAST_COMPILE_FLAGS = ('--xla_backend_optimization_level=0',
                      '--xla_cpu_use_fusion_emitters=false',
                      '--xla_cpu_parallel_codegen_split_count=1')
if _ENABLED:
  for _flag in FAST_COMPILE_FLAGS:  # the workers inherit them
    if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
      os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' '
                                 + _flag).strip()
  if 'ORTHAX_TEST_JAX_CACHE' not in os.environ:  # the controller (or -n 0)
    _OWN_CACHE_DIR = tempfile.mkdtemp(prefix='orthax-test-jax-cache-')
    os.environ['ORTHAX_TEST_JAX_CACHE'] = _OWN_CACHE_DIR

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import pytest

if _ENABLED:
  # For a test that builds a subprocess's environment from scratch.
  os.environ['ORTHAX_TEST_XLA_FLAGS'] = os.environ['XLA_FLAGS']
  jax.config.update('jax_compilation_cache_dir',
                    os.environ['ORTHAX_TEST_JAX_CACHE'])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.05)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


# Files whose tests share a fixture of module scope (a fake-device case
# script's results, a built wheel, executed notebooks): each runs whole on one
# worker, so the fixture runs once. The tests of every other file are spread
# over the workers by parameter (all tests of ``[muon]`` together: they share
# cached trajectories), and compiles they repeat hit the compilation cache.
# The check in ``pytest_collection_modifyitems`` keeps this list complete.
WHOLE_FILES = frozenset({
    'test_aro.py', 'test_cli.py', 'test_dct_adamw.py', 'test_defaults.py',
    'test_engine.py',
    'test_extreme_scale_mesh.py', 'test_fismo.py', 'test_flax.py',
    'test_flax_sharding.py',
    'test_nonfinite_mesh.py', 'test_notebooks.py', 'test_optax_harness.py',
    'test_packaging.py', 'test_prepare.py', 'test_sharding.py',
    'test_sharding_recipes.py',
    'test_sharding_stages.py', 'test_slot_layout.py', 'test_slot_stages.py',
    'test_train_checkpoints.py',
    'test_trion.py'})


def xdist_scope(nodeid: str) -> str:
  """The unit of work ``nodeid`` is sent to a worker with."""
  path, _, rest = nodeid.partition('::')
  if os.path.basename(path) in WHOLE_FILES:
    return path
  _, bracket, param = rest.partition('[')
  return f'{path}[{param}' if bracket else nodeid


def pytest_xdist_make_scheduler(config, log):
  """``--dist loadscope`` with :func:`xdist_scope` as the scope (the biggest
  units first, as xdist orders them)."""
  if config.getvalue('dist') != 'loadscope':
    return None
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top

  class Scheduling(LoadScopeScheduling):

    def _split_scope(self, nodeid):
      return xdist_scope(nodeid)

  return Scheduling(config, log)


_UNLISTED = {}


def pytest_collection_modifyitems(config, items):
  """Finds files outside :data:`WHOLE_FILES` with a test that uses a fixture
  of module scope or wider defined in the tests (it would run once per worker,
  and the workers would race on what it makes); their tests fail, saying so."""
  del config
  for item in items:
    info = getattr(item, '_fixtureinfo', None)
    for defs in (info.name2fixturedefs.values() if info else ()):
      for d in defs:
        if (d.scope != 'function' and d.baseid.startswith('tests')
            and item.path.name not in WHOLE_FILES):
          _UNLISTED[item.nodeid] = (f'{item.path.name} shares fixture '
                                    f'{d.argname!r}: add it to WHOLE_FILES '
                                    'in tests/conftest.py')


def pytest_runtest_setup(item):
  if item.nodeid in _UNLISTED:
    pytest.fail(_UNLISTED[item.nodeid], pytrace=False)


def pytest_unconfigure(config):
  """Removes the compilation cache this process made (the controller's)."""
  del config
  if _OWN_CACHE_DIR is not None:
    shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


@pytest.fixture
def x64():
  """Enables ``jax_enable_x64`` for one test and restores the previous value."""
  old = jax.config.read('jax_enable_x64')
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', old)
