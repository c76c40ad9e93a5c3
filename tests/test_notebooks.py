"""The notebooks in ``notebooks/``: paired sources in sync, and each one runs.

Every ``notebooks/*.py`` (jupytext percent format, the reviewed source) must
have a ``.ipynb`` twin with the same cells and no outputs, and vice versa; a
new notebook is picked up by adding the pair, nothing here needs editing.

Execution runs each ``.ipynb`` top to bottom in a fresh kernel with
``ORTHAX_SMOKE=1`` (the notebooks shrink their workloads), in a temporary
working directory. The kernel is this interpreter (``sys.executable``): a
``python3`` kernelspec is written to a temporary ``JUPYTER_PATH``, which
jupyter searches before the environment's and the user's kernelspecs, so a
``python3`` kernelspec installed elsewhere cannot pick another Python (the
executed notebook's last cell checks ``sys.prefix``).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

jupytext = pytest.importorskip('jupytext')
nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / 'notebooks'
PY = sorted(NOTEBOOKS.glob('*.py'))
IPYNB = sorted(NOTEBOOKS.glob('*.ipynb'))
NAMES = sorted({p.stem for p in PY} | {p.stem for p in IPYNB})

COLAB = ('https://colab.research.google.com/github/orthax/orthax/blob/main/'
         'notebooks/{}.ipynb')
SMOKE_LINE = "SMOKE = os.environ.get('ORTHAX_SMOKE') == '1'"
# Per-cell limit; a smoke run of a whole notebook should take well under 90 s.
CELL_TIMEOUT_S = 600


def _cells(nb):
  return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_there_are_notebooks():
  assert PY, f'no notebooks/*.py in {NOTEBOOKS}'


@pytest.mark.parametrize('name', NAMES)
def test_pair_in_sync(name):
  """``.py`` and ``.ipynb`` exist and hold the same cells, in order."""
  py, ipynb = NOTEBOOKS / f'{name}.py', NOTEBOOKS / f'{name}.ipynb'
  fix = f'run `jupytext --sync notebooks/{name}.py`'
  assert py.exists(), f'{ipynb.name} has no paired {py.name}; {fix}'
  assert ipynb.exists(), f'{py.name} has no paired {ipynb.name}; {fix}'
  a, b = _cells(jupytext.read(py)), _cells(jupytext.read(ipynb))
  assert len(a) == len(b), (
      f'{name}: {len(a)} cells in the .py, {len(b)} in the .ipynb; {fix}')
  for i, (ca, cb) in enumerate(zip(a, b)):
    assert ca == cb, f'{name}: cell {i} differs between .py and .ipynb; {fix}'


@pytest.mark.parametrize('name', [p.stem for p in IPYNB])
def test_ipynb_committed_without_outputs(name):
  nb = nbformat.read(NOTEBOOKS / f'{name}.ipynb', as_version=4)
  for i, c in enumerate(nb.cells):
    if c.cell_type == 'code':
      assert not c.outputs and c.execution_count is None, (
          f'{name}.ipynb cell {i} has outputs; regenerate it with '
          f'`jupytext --to ipynb notebooks/{name}.py`')


@pytest.mark.parametrize('name', [p.stem for p in PY])
def test_conventions(name):
  """Colab badge first, a guarded install, smoke switch, devices printed."""
  text = (NOTEBOOKS / f'{name}.py').read_text()
  assert re.search(r'^#\s+formats:\s*ipynb,py:percent\s*$', text, re.M), (
      f'{name}.py: header must pair it (formats: ipynb,py:percent)')
  nb = jupytext.read(NOTEBOOKS / f'{name}.py')
  first = nb.cells[0]
  assert first.cell_type == 'markdown' and COLAB.format(name) in first.source, (
      f'{name}: the first cell must be a markdown "Open in Colab" badge '
      f'linking to {COLAB.format(name)}')
  code = '\n'.join(c.source for c in nb.cells if c.cell_type == 'code')
  assert ("hasattr(orthax, 'muon')" in code
          and "'orthax-optim" in code), (
      f'{name}: install orthax-optim only when the orthax it imports is not '
      f'this package (test_packaging runs the cell)')
  assert SMOKE_LINE in code, f'{name}: define `{SMOKE_LINE}`'
  assert 'jax.devices()' in code, f'{name}: print jax.devices()'


@pytest.fixture
def python_kernel(tmp_path, monkeypatch):
  """A ``python3`` kernelspec that runs this interpreter; returns its name."""
  spec = tmp_path / 'jupyter' / 'kernels' / 'python3'
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f',
               '{connection_file}'],
      'display_name': f'Python 3 ({sys.executable})',
      'language': 'python',
  }))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  monkeypatch.setenv('JUPYTER_RUNTIME_DIR', str(tmp_path / 'runtime'))
  monkeypatch.setenv('IPYTHONDIR', str(tmp_path / 'ipython'))
  return 'python3'


@pytest.fixture(scope='module')
def executed_dir(tmp_path_factory):
  """Where :func:`test_notebook_executes` leaves the executed notebooks,
  which :func:`test_docs_build` renders."""
  return tmp_path_factory.mktemp('executed_notebooks')


@pytest.mark.parametrize('name', [p.stem for p in PY])
def test_notebook_executes(name, tmp_path, monkeypatch, python_kernel,
                           executed_dir):
  """Runs every cell (smoke mode); any cell error fails the test."""
  ipynb = NOTEBOOKS / f'{name}.ipynb'
  if not ipynb.exists():
    pytest.fail(f'{name}.ipynb is missing (see test_pair_in_sync)')
  nb = nbformat.read(ipynb, as_version=4)
  work = tmp_path / 'work'
  work.mkdir()
  monkeypatch.setenv('ORTHAX_SMOKE', '1')
  # One extra cell at the end reports the kernel's interpreter.
  nb.cells.append(nbformat.v4.new_code_cell('import sys; print(sys.prefix)'))
  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, kernel_name=python_kernel,
      resources={'metadata': {'path': str(work)}})
  t0 = time.perf_counter()
  client.execute()
  print(f'{name}: executed in {time.perf_counter() - t0:.1f} s')
  out = ''.join(o.get('text', '') for o in nb.cells[-1].outputs)
  assert out.strip() == sys.prefix, (
      f'the kernel ran in {out.strip()!r}, not in this environment '
      f'({sys.prefix!r})')
  nb.cells.pop()
  nbformat.write(nb, executed_dir / f'{name}.ipynb')


def test_docs_build(executed_dir, tmp_path):
  """The Sphinx site builds with warnings as errors (docstrings, cross
  references, the recipe pages, the API reference), the notebooks rendered
  with the outputs of their smoke runs above (the committed ones, without
  outputs, when those did not run)."""
  pytest.importorskip('sphinx')
  pytest.importorskip('myst_nb')
  root = NOTEBOOKS.parent
  have = all((executed_dir / f'{p.stem}.ipynb').exists() for p in IPYNB)
  env = dict(os.environ)
  if have:
    env['ORTHAX_EXECUTED_NOTEBOOKS'] = str(executed_dir)
  html = tmp_path / 'html'
  proc = subprocess.run(
      [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-E', '-q',
       '-b', 'html', str(root / 'docs'), str(html)],
      capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  import orthax  # pylint: disable=g-import-not-at-top
  for name in orthax.recipe_names():
    page = (html / 'recipes' / f'{name}.html').read_text()
    assert 'References' in page or 'reference' in page, name
  api = (html / 'api.html').read_text()
  assert 'map_matrices' in api and 'resolve_adam_learning_rate' in api
  if have:  # the executed outputs are on the page (jax.devices() printed)
    page = (html / 'notebooks' / '01_quickstart.html').read_text()
    assert 'CpuDevice' in page or 'cpu' in page
