"""The optional dependencies: the modules of the ``scripts`` extra, and the
message that names the extra when one is missing (``import orthax`` needs
none of them)."""

from __future__ import annotations

import importlib.util
from typing import Sequence

# What the trainer and its commands import (pyproject's `scripts` extra;
# matplotlib and tensorboardX are imported where they are used).
SCRIPTS_MODULES = ('absl', 'ml_collections', 'flax', 'orbax.checkpoint')


def missing_module(modules: Sequence[str] = SCRIPTS_MODULES) -> str | None:
  """The first of ``modules`` that is not installed (found without
  importing it), or ``None``."""
  for name in modules:
    try:
      found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
      found = False
    if not found:
      return name
  return None


def scripts_extra_message(what: str, module: str) -> str:
  """``what`` needs the ``scripts`` extra, ``module`` is missing."""
  return (f"{what} needs the trainer's dependencies ({module} is missing): "
          "pip install 'orthax-optim[scripts]'")
