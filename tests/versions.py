"""Installed versions of the dependencies, for the tests whose subject
changed inside the supported range (pyproject.toml's lower bounds)."""

from __future__ import annotations

from importlib import metadata


def version(dist: str) -> tuple[int, ...]:
  """``(major, minor, patch)`` of the installed distribution ``dist``;
  ``()`` when it is not installed."""
  try:
    text = metadata.version(dist)
  except metadata.PackageNotFoundError:
    return ()
  parts = []
  for p in text.split('.')[:3]:
    digits = ''.join(c for c in p if c.isdigit())
    if not digits:
      break
    parts.append(int(digits))
  return tuple(parts)


JAXLIB = version('jaxlib')
FLAX = version('flax')
