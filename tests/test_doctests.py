"""Every docstring example in the package runs as a doctest."""

import doctest
import importlib
import pkgutil

import pytest

import orthax

MODULES = sorted(m.name for m in pkgutil.walk_packages(orthax.__path__,
                                                       'orthax.')
                 if not m.name.startswith('orthax.configs.'))


@pytest.mark.parametrize('name', MODULES)
def test_docstring_examples_run(name):
  mod = importlib.import_module(name)
  res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS
                        | doctest.NORMALIZE_WHITESPACE, report=False)
  assert res.failed == 0, f'{name}: {res.failed} of {res.attempted} failed'


def test_the_main_entry_points_have_examples():
  finder = doctest.DocTestFinder()
  for fn in (orthax.muon, orthax.orthogonalize, orthax.describe):
    assert any(t.examples for t in finder.find(fn)), fn.__name__
