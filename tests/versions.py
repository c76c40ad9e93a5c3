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
    digits = p[:len(p) - len(p.lstrip('0123456789'))]  # 2rc1 -> 2
    if not digits:
      break
    parts.append(int(digits))
    if digits != p:  # a pre-release: (0, 12, 0) for 0.12.0rc1, not above
      break
  return tuple(parts)


JAXLIB = version('jaxlib')
FLAX = version('flax')
