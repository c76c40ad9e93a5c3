"""The trainer's configs, shipped with the package.

Each ``<name>.py`` here is an ml_collections config file (``get_config(
optimizer_name)``): ``lm_cpu`` (the embedded default: a small byte-level
GPT on Python's own documentation, about two minutes on 2 CPU cores),
``gpt2_124m``, ``gpt2_350m`` (TPU v4-64) and ``gpt_1b`` (8×H100). The
commands (``orthax-train``, ``orthax-compare``, ``orthax-sweep``) take a
config by name from any directory, ``--config=lm_cpu:normuon``, or by path,
``--config=my_config.py:muon``.

Example:
  >>> from orthax import configs
  >>> configs.names()
  ('gpt2_124m', 'gpt2_350m', 'gpt_1b', 'lm_cpu')
  >>> configs.resolve('lm_cpu:normuon').endswith('lm_cpu.py:normuon')
  True
"""

from __future__ import annotations

import os

DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def names() -> tuple[str, ...]:
  """The packaged configs' names."""
  return tuple(sorted(f[:-3] for f in os.listdir(DIRECTORY)
                      if f.endswith('.py') and not f.startswith('_')))


def path(name: str) -> str:
  """The file of packaged config ``name``.

  Raises:
    ValueError: naming ``name`` and the packaged configs.
  """
  if name not in names():
    raise ValueError(f'no packaged config {name!r}; packaged: '
                     f'{", ".join(names())} (or give a path to a .py file).')
  return os.path.join(DIRECTORY, name + '.py')


def resolve(value: str) -> str:
  """A ``--config`` value with a packaged config's name (``'lm_cpu'``,
  ``'lm_cpu:adamw'``; also the former ``'configs/lm_cpu.py:adamw'`` when no
  such file exists here) replaced by its file; an existing file, or
  anything else, unchanged."""
  file, sep, arg = value.partition(':')
  if os.path.exists(file):
    return value
  stem = os.path.basename(file)
  stem = stem[:-3] if stem.endswith('.py') else stem
  if stem in names() and (file in (stem, stem + '.py') or
                          os.path.dirname(file) in ('configs',
                                                    './configs')):
    return path(stem) + sep + arg
  return value
