"""Sphinx configuration of the orthax documentation.

Build: ``sphinx-build -W -b html docs docs/_build/html`` (the ``docs``
extra). The notebooks are rendered from executed copies when
``ORTHAX_EXECUTED_NOTEBOOKS`` names a folder of them (the test suite runs
them in smoke mode and builds the docs from its copies), else from
``notebooks/`` as committed (no outputs). One page per recipe is
generated from the registry into ``docs/recipes/`` at build time.
"""

import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import orthax  # noqa: E402  pylint: disable=g-import-not-at-top

project = 'orthax'
author = 'The orthax authors'
copyright = '2026, The orthax authors'  # pylint: disable=redefined-builtin
release = orthax.__version__

extensions = [
    'myst_nb',
    'sphinx.ext.autodoc',
    'sphinx.ext.mathjax',
    'sphinx.ext.napoleon',
    'sphinx.ext.viewcode',
]
exclude_patterns = ['_build', 'README.md']
myst_enable_extensions = ['dollarmath']
myst_heading_anchors = 3
nb_execution_mode = 'off'  # executed copies come from the test suite
autodoc_member_order = 'bysource'
autodoc_typehints = 'none'  # the docstrings' Args say it in words
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # Attributes: as fields, not duplicate entries
try:
  import furo  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
  html_theme = 'furo'
except ImportError:
  html_theme = 'alabaster'
html_title = f'orthax {release}'


def _recipe_pages():
  """``recipes/<name>.md``: one page per registered recipe, its docstring
  (update rule, reference modes, arguments, references)."""
  out = os.path.join(HERE, 'recipes')
  os.makedirs(out, exist_ok=True)
  names = orthax.recipe_names()
  for name in names:
    fn = orthax.recipe_factory(name)
    with open(os.path.join(out, f'{name}.md'), 'w') as f:
      f.write(f'# `{name}`\n\n```{{eval-rst}}\n.. autofunction:: '
              f'{fn.__module__}.{fn.__name__}\n```\n')
  with open(os.path.join(out, 'index.md'), 'w') as f:
    f.write('# Recipes\n\nEach recipe is an `optax.GradientTransformation`: '
            'its matrix branch, the AdamW branch for the rest, routing, '
            '`distributed=` and the finiteness check. Its page gives the '
            'update rule, the `reference=` modes and the papers.\n\n'
            '```{toctree}\n:maxdepth: 1\n\n' + '\n'.join(names) + '\n```\n')


def _notebooks():
  """``notebooks/``: copies of the executed notebooks, or of the committed
  ones (see the module docstring)."""
  out = os.path.join(HERE, 'notebooks')
  os.makedirs(out, exist_ok=True)
  src = (os.environ.get('ORTHAX_EXECUTED_NOTEBOOKS')
         or os.path.join(ROOT, 'notebooks'))
  for f in sorted(os.listdir(os.path.join(ROOT, 'notebooks'))):
    if f.endswith('.ipynb'):
      shutil.copy(os.path.join(src, f), out)


_recipe_pages()
_notebooks()
