"""The public API documents itself: every argument of every public function
of ``orthax`` and ``orthax.transforms`` is described under ``Args:``, and
every public function that returns a transformation has an ``Example:``
(run by ``tests/test_doctests.py``)."""

import inspect
import re

import pytest

import orthax
from orthax import transforms

_SECTION = re.compile(r'\n\s*(?:Returns|Example|Examples|Raises|References|'
                      r'Yields|Note|Notes):')
# An entry: indented names, comma-separated for a group
# ("adam_b1, adam_b2, adam_eps: ..."), then a colon.
_ENTRY = re.compile(r'^\s+(\*{0,2}\w+(?:,\s*\*{0,2}\w+)*):', re.M)


def documented_arguments(doc: str) -> set[str]:
  """The argument names described in ``doc``'s ``Args:`` section."""
  if 'Args:' not in doc:
    return set()
  section = _SECTION.split(doc.split('Args:', 1)[1])[0]
  return {name.strip().lstrip('*') for entry in _ENTRY.findall(section)
          for name in entry.split(',')}


def _public_functions():
  seen = {}
  for mod in (orthax, transforms):
    for name in mod.__all__:
      f = getattr(mod, name)
      if inspect.isfunction(f) and f not in seen.values():
        seen[f'{mod.__name__}.{name}'] = f
  return seen


PUBLIC = _public_functions()


def _arguments(f):
  kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
  return [p.name for p in inspect.signature(f).parameters.values()
          if p.kind not in kinds]


def test_the_reader_finds_single_and_grouped_entries():
  doc = """Summary.

  Args:
    learning_rate: a rate
      over two lines: with a colon.
    adam_b1, adam_b2: the moments.

  Example:
    >>> x = 1
  """
  assert documented_arguments(doc) == {'learning_rate', 'adam_b1', 'adam_b2'}
  assert documented_arguments('No section.') == set()


@pytest.mark.parametrize('name', sorted(PUBLIC))
def test_every_argument_is_documented(name):
  f = PUBLIC[name]
  missing = [a for a in _arguments(f)
             if a not in documented_arguments(f.__doc__ or '')]
  assert not missing, f'{name}: no Args entry for {missing}'


@pytest.mark.parametrize('name', sorted(
    n for n, f in PUBLIC.items()
    if 'GradientTransformation' in str(inspect.signature(f).return_annotation)))
def test_every_transformation_has_an_example(name):
  doc = PUBLIC[name].__doc__ or ''
  assert 'Example:' in doc and '>>>' in doc.split('Example:', 1)[1], name
