"""Plain-text tables for :func:`orthax.describe` and the routing report."""

from __future__ import annotations

from typing import Any, Sequence


def format_hyperparameter(lr: Any) -> str:
  """A learning rate or weight decay as ``'0.02'``, ``'schedule'`` or
  ``'?'`` (a label with none)."""
  if lr is None:
    return '?'
  if callable(lr):
    return 'schedule'
  return f'{float(lr):.4g}'


def format_table(rows: Sequence[Sequence[str]]) -> str:
  """Left-aligned columns, a rule under the header row."""
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
           for row in rows]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)
