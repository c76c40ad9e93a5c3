"""The README's Python snippets run as written, top to bottom in one
namespace (what a reader pasting them in order would get)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'
GETTING_STARTED = README.parent / 'docs' / 'getting_started.md'


def python_blocks(text):
  return re.findall(r'^```python\n(.*?)^```', text, re.S | re.M)


def test_readme_python_blocks_run(capsys):
  blocks = python_blocks(README.read_text())
  assert len(blocks) >= 2
  namespace = {}
  for i, code in enumerate(blocks):
    exec(compile(code, f'README.md python block {i}', 'exec'), namespace)  # pylint: disable=exec-used
  # The quickstart's table routes each leaf as its comments say.
  table = capsys.readouterr().out
  rows = {line.split()[0]: line.split() for line in table.splitlines()[2:]}
  assert rows['blocks/mlp/kernel'][-8:] == ['matrix', '4', 'x', '64', 'x',
                                           '256', '0.05656', '0.2']
  for leaf in ('embed', 'blocks/norm/scale', 'lm_head/kernel'):
    assert rows[leaf][-3:] == ['adam', '0.003', '0'], rows[leaf]


def test_getting_started_quickstart_runs_and_prints_its_table(capsys):
  """The quickstart block of docs/getting_started.md runs as written (it
  used ``params`` without defining it) and ``describe`` prints the table
  its comment shows."""
  code = python_blocks(GETTING_STARTED.read_text())[0]
  exec(compile(code, 'getting_started.md quickstart', 'exec'), {})  # pylint: disable=exec-used
  printed = capsys.readouterr().out.strip().splitlines()
  start = code.index('# path ')
  shown = [line[2:].rstrip() for line in code[start:].splitlines()
           if line.startswith('# ')][:len(printed)]
  assert printed == shown, (printed, shown)
