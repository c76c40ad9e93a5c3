"""The checksum record of a checkpoint step: the size and SHA-256 of every
file of its directory (``<step>/orthax_checksums.json``), and checking a
step against it (:mod:`orthax.train.checkpoint`'s verification)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

CHECKSUMS = 'orthax_checksums.json'


def sha256(path: str) -> str:
  """Hex SHA-256 of a file, read in 1 MiB chunks."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def file_digests(step_dir: str) -> dict[str, dict[str, Any]]:
  """``{relative path: {'size', 'sha256'}}`` of every file under
  ``step_dir`` (the checksum record itself excluded)."""
  out = {}
  for root, _, files in os.walk(step_dir):
    for name in sorted(files):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if rel.startswith(CHECKSUMS):  # the record (and its temporary file)
        continue
      out[rel] = {'size': os.path.getsize(path), 'sha256': sha256(path)}
  return out


def check_files(step_dir: str) -> list[str] | None:
  """What is wrong with ``step_dir`` against its checksum record: ``[]``
  when intact, ``None`` when it has no record (unverified)."""
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      expected = json.load(f)['files']
  except (OSError, ValueError, KeyError, TypeError) as e:
    return [f'{CHECKSUMS}: unreadable ({e})']
  problems = []
  for rel, want in sorted(expected.items()):
    full = os.path.join(step_dir, rel)
    if not os.path.isfile(full):
      problems.append(f'{rel}: missing')
      continue
    size = os.path.getsize(full)
    if size != want['size']:
      problems.append(f'{rel}: {size} bytes, expected {want["size"]} '
                      '(truncated or overwritten)')
    elif sha256(full) != want['sha256']:
      problems.append(f'{rel}: SHA-256 mismatch (bytes changed)')
  return problems
