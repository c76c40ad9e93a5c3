"""orthax's layers: no import cycle between its units, and each layer imports
only the layers below it.

Static: every module under ``orthax/`` is parsed with ``ast`` (imports inside
functions included) and nothing is imported. A *unit* is a top-level
subpackage (``orthax/sharding``) or module (``orthax/routing.py``); the
package ``orthax/__init__.py`` is the aggregator, exempt itself, but a unit
that imports it (``import orthax``, ``from orthax import recipe``) depends on
what it re-exports.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import orthax

PKG = pathlib.Path(orthax.__file__).parent
AGGREGATOR = 'orthax'
# What the matrix layers (pure jnp, no optimizer) never depend on.
ABOVE_MATRICES = {'engine', 'transforms', 'recipes', 'sharding', 'train',
                  'flax'}


def _modules() -> dict[str, pathlib.Path]:
  """Dotted module name → file, for every module of the package."""
  out = {}
  for f in sorted(PKG.rglob('*.py')):
    parts = ('orthax',) + f.relative_to(PKG).with_suffix('').parts
    if parts[-1] == '__init__':
      parts = parts[:-1]
    out['.'.join(parts)] = f
  return out


MODULES = _modules()


def _unit_of(module: str) -> str | None:
  """``'orthax.sharding._plan'`` → ``'sharding'``; ``None`` outside orthax;
  the aggregator for ``'orthax'`` itself."""
  parts = module.split('.')
  if parts[0] != 'orthax':
    return None
  return AGGREGATOR if len(parts) == 1 else parts[1]


def _imports(module: str) -> list[tuple[str, tuple[str, ...]]]:
  """``(imported module, names taken from it)`` for every import statement
  of ``module``, anywhere in it; relative imports resolved."""
  f = MODULES[module]
  package = module if f.name == '__init__.py' else module.rpartition('.')[0]
  out = []
  for node in ast.walk(ast.parse(f.read_text(), str(f))):
    if isinstance(node, ast.Import):
      out += [(a.name, ()) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.split('.')
        anchor = anchor[:len(anchor) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
      out.append((base, tuple(a.name for a in node.names)))
  return out


def _targets(imported: str, names: tuple[str, ...]) -> set[str]:
  """The modules an import statement loads: ``from orthax import sharding``
  loads ``orthax.sharding``, ``from orthax import recipe`` the aggregator."""
  subs = {f'{imported}.{n}' for n in names if f'{imported}.{n}' in MODULES}
  rest = [n for n in names if f'{imported}.{n}' not in MODULES]
  return subs | ({imported} if rest or not names else set())


def _graph() -> dict[str, set[str]]:
  """Unit → the units (and the aggregator) its modules import."""
  graph: dict[str, set[str]] = {}
  for module in MODULES:
    unit = _unit_of(module)
    deps = graph.setdefault(unit, set())
    for imported, names in _imports(module):
      for target in _targets(imported, names):
        dep = _unit_of(target)
        if dep is not None and dep != unit:
          deps.add(dep)
  return graph


def _external(unit: str) -> set[str]:
  """Top-level names of the non-orthax packages ``unit`` imports."""
  out = set()
  for module in MODULES:
    if _unit_of(module) == unit:
      for imported, _ in _imports(module):
        if _unit_of(imported) is None:
          out.add(imported.split('.')[0])
  return out


GRAPH = _graph()


def _reach(unit: str) -> set[str]:
  """Units ``unit`` depends on, directly or not (through the aggregator
  too)."""
  seen, todo = set(), [unit]
  while todo:
    for dep in GRAPH.get(todo.pop(), ()):
      if dep not in seen:
        seen.add(dep)
        todo.append(dep)
  return seen - {AGGREGATOR}


def _cycle() -> list[str] | None:
  """One import cycle between units, or ``None``. The aggregator is a node:
  a unit importing ``orthax`` depends on everything it re-exports."""
  state: dict[str, int] = {}  # 1: on the stack, 2: done
  stack: list[str] = []

  def visit(u):
    state[u] = 1
    stack.append(u)
    for v in sorted(GRAPH.get(u, ())):
      if state.get(v) == 1:
        return stack[stack.index(v):] + [v]
      if v not in state and (found := visit(v)):
        return found
    stack.pop()
    state[u] = 2
    return None

  for u in sorted(GRAPH):
    if u not in state and (found := visit(u)):
      return found
  return None


def test_the_scan_sees_the_known_units_and_edges():
  for unit in ('polar', 'matrices', 'matrix_stages', 'transforms', 'routing',
               'recipes', 'sharding', 'train', 'flax', '_tree'):
    assert unit in GRAPH, unit
  assert 'sharding' in GRAPH['transforms']  # the engine sits in sharding
  assert 'transforms' in GRAPH['recipes']
  assert AGGREGATOR in GRAPH['train']  # optim: `import orthax`
  assert 'recipes' in _reach('train')  # through the aggregator
  assert 'flax' in _external('train')


def test_no_import_cycle_between_units():
  cycle = _cycle()
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


@pytest.mark.parametrize('unit, forbidden', [
    ('polar', ABOVE_MATRICES),
    ('matrices', ABOVE_MATRICES),
    ('matrix_stages', ABOVE_MATRICES),
    ('routing', ABOVE_MATRICES),
    ('_tree', ABOVE_MATRICES),
    ('sharding', {'engine', 'transforms', 'recipes', 'train', 'flax'}),
    ('engine', {'transforms', 'recipes', 'train', 'flax'}),
    ('transforms', {'recipes', 'train', 'flax'}),
    ('recipes', {'train', 'flax'}),
    ('flax', {'train'}),
])
def test_layers_import_only_below(unit, forbidden):
  if unit not in GRAPH:  # orthax/engine.py: the engine, where it exists
    pytest.skip(f'no orthax/{unit}')
  bad = _reach(unit) & forbidden
  assert not bad, (f'orthax/{unit} depends on {sorted(bad)} (direct: '
                   f'{sorted(GRAPH[unit])})')


def test_layers_below_the_aggregator_do_not_import_it():
  for unit in ('polar', 'matrices', 'matrix_stages', 'routing', '_tree',
               'transforms', 'recipes', 'sharding', 'flax', 'engine'):
    assert AGGREGATOR not in GRAPH.get(unit, ()), unit


def test_matrix_stages_are_pure_jnp():
  for unit in {'matrix_stages'} | _reach('matrix_stages'):
    assert 'optax' not in _external(unit), unit


def test_only_the_trainer_imports_flax():
  users = {u for u in GRAPH if u != AGGREGATOR and 'flax' in _external(u)}
  assert users <= {'train', 'flax'}, users
  # The package itself neither loads the trainer nor the Flax integration.
  assert not {'train', 'flax'} & GRAPH[AGGREGATOR]
  assert 'flax' not in _external(AGGREGATOR)


def test_orthax_distributed_is_the_sharding_one():
  assert orthax.Distributed is orthax.sharding.Distributed
  assert 'Distributed' in orthax.__all__
