"""The package around the code: its distribution name, version, license,
typing marker and what type checkers read, the message that names a missing
extra, and the notebooks' install cells.

The install cells are executed (in a subprocess, since they rewrite
``sys.modules``) against a fake ``orthax`` on ``sys.path`` that, like the
unrelated ``orthax`` on the package index, has no ``muon``; ``pip`` is
replaced by a recorder.
"""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import re
import subprocess
import sys
import textwrap
import tomllib

import pytest

import orthax

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIST = 'orthax-optim'
NOTEBOOKS = sorted((ROOT / 'notebooks').glob('0*.py'))


@pytest.fixture(scope='module')
def pyproject():
  return tomllib.loads((ROOT / 'pyproject.toml').read_text())


def test_distribution_name_is_not_the_unrelated_orthax(pyproject):
  assert pyproject['project']['name'] == DIST
  extras = pyproject['project']['optional-dependencies']
  for name, reqs in extras.items():
    for req in reqs:
      # A self-reference by the old name would install the other project.
      assert not re.match(r'orthax(\[|$)', req), (name, req)


def test_version_lives_only_in_the_package(pyproject):
  assert 'version' not in pyproject['project']
  assert 'version' in pyproject['project']['dynamic']
  attr = pyproject['tool']['setuptools']['dynamic']['version']['attr']
  assert attr == 'orthax.__version__'
  assert importlib.metadata.version(DIST) == orthax.__version__
  assert f'## {orthax.__version__}' in (ROOT / 'CHANGELOG.md').read_text()


def test_license_and_metadata(pyproject):
  text = (ROOT / 'LICENSE').read_text()
  assert 'Apache License' in text and 'Version 2.0, January 2004' in text
  assert 'END OF TERMS AND CONDITIONS' in text
  assert pyproject['project']['license'] == 'Apache-2.0'
  meta = importlib.metadata.metadata(DIST)
  assert meta['License-Expression'] == 'Apache-2.0'
  assert meta.get_all('Author')
  assert 'Typing :: Typed' in meta.get_all('Classifier')


def test_typed_marker_ships_with_the_package(pyproject):
  assert (pathlib.Path(orthax.__file__).parent / 'py.typed').exists()
  data = pyproject['tool']['setuptools']['package-data']['orthax']
  assert 'py.typed' in data


def install_cell(path: pathlib.Path) -> str:
  cells = path.read_text().split('\n# %%')
  found = [c for c in cells if 'def has_orthax_optim' in c]
  assert len(found) == 1, f'{path.name}: one install cell expected'
  return found[0].split('\n', 1)[1]


# Runs an install cell with a fake `orthax` (no `muon`) first on sys.path and
# pip replaced: "install" removes the fake (as installing orthax-optim over the
# other project would), unless the case says the install silently failed.
DRIVER = textwrap.dedent('''
    import json, os, subprocess, sys, tempfile
    fake = tempfile.mkdtemp()
    os.makedirs(os.path.join(fake, 'orthax'))
    open(os.path.join(fake, 'orthax', '__init__.py'), 'w').write(
        '"""orthogonal polynomials"""\\n')
    case = sys.argv[1]
    if case != 'ours':
      sys.path.insert(0, fake)
    calls = []
    def run(cmd, check=False):
      calls.append(cmd[3:])
      if cmd[3] == 'install' and case == 'other':
        sys.path.remove(fake)
      return subprocess.CompletedProcess(cmd, 0)
    subprocess.run = run
    err = None
    try:
      exec(open(sys.argv[2]).read(), {'__name__': '__main__'})
    except ImportError as e:
      err = str(e)
    import orthax
    print(json.dumps({'calls': calls, 'has_muon': hasattr(orthax, 'muon'),
                      'error': err}))
''')


def run_install_cell(tmp_path, notebook, case):
  cell = tmp_path / 'cell.py'
  cell.write_text(install_cell(notebook))
  out = subprocess.run([sys.executable, '-c', DRIVER, case, str(cell)],
                       capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('notebook', NOTEBOOKS, ids=lambda p: p.stem)
def test_install_cell_replaces_the_unrelated_orthax(tmp_path, notebook):
  got = run_install_cell(tmp_path, notebook, 'other')
  assert got['error'] is None
  assert got['has_muon']
  assert got['calls'][0] == ['uninstall', '-q', '-y', 'orthax']
  install = got['calls'][1]
  assert install[:2] == ['install', '-q']
  assert any(r.split('[')[0] == DIST for r in install[2:]), install
  assert len(got['calls']) == 2


def test_install_cell_leaves_this_orthax_alone(tmp_path):
  got = run_install_cell(tmp_path, NOTEBOOKS[0], 'ours')
  assert got == {'calls': [], 'has_muon': True, 'error': None}


def test_install_cell_says_when_the_install_did_not_take(tmp_path):
  got = run_install_cell(tmp_path, NOTEBOOKS[0], 'failed')
  assert got['error'] and 'orthax-optim did not install' in got['error']
  assert not got['has_muon']


def test_what_a_type_checker_reads():
  """With ``py.typed``, type checkers read the annotations as written:
  ``learning_rate=None`` (the mode's rate) was refused on every recipe,
  ``orthax.transforms``/``orthax.recipes`` were not attributes of the
  package (bound only as a side effect of importing their members), and
  stages were not dataclasses to them (``MS.NeuronNormalize(0.95)``: "too
  many arguments")."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import typing  # pylint: disable=g-import-not-at-top
  from orthax import matrix_stages as MS  # pylint: disable=g-import-not-at-top
  for name in orthax.recipe_names():
    hints = typing.get_type_hints(orthax.recipe_factory(name))
    assert type(None) in typing.get_args(hints['learning_rate']), name
  for sub in ('engine', 'matrices', 'matrix_stages', 'polar', 'recipes',
              'routing', 'sharding', 'transforms'):
    assert sub in orthax.__all__, sub
  text = (ROOT / 'orthax' / '__init__.py').read_text()
  assert re.search(r'^from orthax import transforms$', text, re.M)
  marker = MS.stage.__dataclass_transform__
  assert marker['kwargs'].get('frozen_default') is True, marker
  assert MS.static in marker['field_specifiers'], marker
  assert dataclasses.field in marker['field_specifiers'], marker
  # A field made with static() and no default is required; with one, not.
  fields = {f.name: f for f in dataclasses.fields(MS.NeuronNormalize)}
  assert fields['axis'].default == 'fan_out'
  assert fields['axis'].metadata['static']


# Runs with one module of the scripts extra made missing (a finder that
# refuses it, as an environment without it would): argv[1] the module,
# argv[2] what to do.
WITHOUT = '''
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name == sys.argv[1] or name.startswith(sys.argv[1] + '.'):
      raise ModuleNotFoundError(f'No module named {name!r}', name=name)
sys.meta_path.insert(0, Missing())
for m in [m for m in sys.modules if m.split('.')[0] == sys.argv[1]]:
  del sys.modules[m]
if sys.argv[2] == 'import':
  import orthax.train
else:
  from orthax.cli import train
  train.run(['orthax-train', '--help'])
'''


@pytest.mark.parametrize('module', ['ml_collections', 'flax', 'orbax'])
def test_a_missing_extra_is_named_not_a_traceback(tmp_path, module):
  """Every command imported ``orthax.train`` before it checked the extra:
  without it, a ``ModuleNotFoundError`` traceback, the message that names
  the extra never shown; ``import orthax.train`` did not name it either.
  (absl, the fourth module checked, comes with optax.)"""
  extra = "pip install 'orthax-optim[scripts]'"
  proc = subprocess.run([sys.executable, '-c', WITHOUT, module, 'cli'],
                        capture_output=True, text=True, cwd=tmp_path,
                        timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('orthax-train needs the trainer') and extra in last
  assert f'({module}' in last, last
  proc = subprocess.run([sys.executable, '-c', WITHOUT, module, 'import'],
                        capture_output=True, text=True, cwd=tmp_path,
                        timeout=300)
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('ModuleNotFoundError: orthax.train needs'), last
  assert extra in last and f'({module}' in last, last
