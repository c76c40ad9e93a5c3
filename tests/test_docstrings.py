"""The public API documents itself: every argument of every public function
and class of ``orthax``, ``orthax.transforms``, ``orthax.polar``,
``orthax.matrix_stages``, ``orthax.sharding``, ``orthax.flax`` and
``orthax.train`` is described under ``Args:`` (a class's fields may be under
``Attributes:``; optax-style state tuples are left out), and every public
function that returns a transformation has an ``Example:`` (run by
``tests/test_doctests.py``)."""

import importlib
import inspect
import re

import pytest

MODULES = ('orthax', 'orthax.transforms', 'orthax.polar',
           'orthax.matrix_stages', 'orthax.sharding', 'orthax.flax',
           'orthax.train')

_SECTION = re.compile(r'\n\s*(?:Returns|Example|Examples|Raises|References|'
                      r'Yields|Note|Notes):')
# An entry: indented names, comma-separated for a group
# ("adam_b1, adam_b2, adam_eps: ..."), then a colon.
_ENTRY = re.compile(r'^\s+(\*{0,2}\w+(?:,\s*\*{0,2}\w+)*):', re.M)


def documented_arguments(doc: str, header: str = 'Args:') -> set[str]:
  """The argument names described in ``doc``'s ``header`` section."""
  if header not in doc:
    return set()
  section = _SECTION.split(doc.split(header, 1)[1])[0]
  return {name.strip().lstrip('*') for entry in _ENTRY.findall(section)
          for name in entry.split(',')}


def _is_state_tuple(obj) -> bool:
  return inspect.isclass(obj) and issubclass(obj, tuple)


def _public_objects():
  seen = {}
  for mod_name in MODULES:
    mod = importlib.import_module(mod_name)
    for name in mod.__all__:
      obj = getattr(mod, name)
      if ((inspect.isfunction(obj) or inspect.isclass(obj))
          and obj.__module__.startswith('orthax')
          and not _is_state_tuple(obj)
          and not (inspect.isclass(obj) and issubclass(obj, BaseException))
          and obj not in seen.values()):
        seen[f'{mod_name}.{name}'] = obj
  return seen


PUBLIC = _public_objects()


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
  obj = PUBLIC[name]
  doc = obj.__doc__ or ''
  described = documented_arguments(doc)
  if inspect.isclass(obj):
    described |= documented_arguments(doc, 'Attributes:')
  missing = [a for a in _arguments(obj) if a not in described]
  assert not missing, f'{name}: no Args entry for {missing}'


@pytest.mark.parametrize('name', sorted(
    n for n, f in PUBLIC.items()
    if 'GradientTransformation' in str(inspect.signature(f).return_annotation)))
def test_every_transformation_has_an_example(name):
  doc = PUBLIC[name].__doc__ or ''
  assert 'Example:' in doc and '>>>' in doc.split('Example:', 1)[1], name
