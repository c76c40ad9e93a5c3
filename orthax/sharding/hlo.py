"""Reading collectives, FLOPs and memory off a compiled (per-device) program.

Used by the sharding tests and ``scripts/bench_sharding.py``. Wire bytes per
device follow ring/pairwise formulas with group size ``g``: all-gather
``(g−1)/g·result``, reduce-scatter ``(g−1)/g·operand``, all-reduce
``2(g−1)/g·operand``, all-to-all ``(g−1)/g·operand``, collective-permute
``operand``. XLA:CPU upcasts bf16 collectives to f32 when it compiles, so
:func:`lowered_collectives` reads the dtypes the program asked for from the
lowered StableHLO.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any

_BYTES = {'f64': 8, 'f32': 4, 'bf16': 2, 'f16': 2, 's64': 8, 'u64': 8,
          's32': 4, 'u32': 4, 's16': 2, 'u16': 2, 's8': 1, 'u8': 1,
          'pred': 1, 'f8e4m3fn': 1, 'f8e5m2': 1}
_ARRAY = re.compile(r'\b(' + '|'.join(_BYTES) + r')\[([0-9,]*)\]')
_INSTR = re.compile(
    r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][a-z0-9\-]*)\((.*)$')
_COMP = re.compile(r'^\s*(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$')
KINDS = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all',
         'collective-permute', 'collective-broadcast', 'ragged-all-to-all')


def _nbytes(shape_txt: str) -> int:
  total = 0
  for dt, dims in _ARRAY.findall(shape_txt):
    total += math.prod(int(d) for d in dims.split(',') if d) * _BYTES[dt]
  return total


def _group_size(line: str, num_partitions: int) -> int:
  m = re.search(r'replica_groups=\{\{([^}]*)\}', line)
  if m:
    return len([x for x in m.group(1).split(',') if x.strip()])
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=', line)
  if m:
    return int(m.group(2))
  if 'source_target_pairs' in line:
    return 2
  return num_partitions


def collectives(hlo_text: str) -> list[dict[str, Any]]:
  """Every collective in a compiled HLO module's text (``-done`` halves of
  async pairs are skipped), with group size and per-device wire bytes."""
  m = re.search(r'num_partitions=(\d+)', hlo_text)
  nparts = int(m.group(1)) if m else 1
  shapes: dict[str, str] = {}
  comp, ops = None, []
  for line in hlo_text.splitlines():
    cm = _COMP.match(line)
    if cm and '=' not in line.split('(')[0]:
      comp = ('ENTRY ' if cm.group(1) else '') + cm.group(2)
      continue
    im = _INSTR.match(line)
    if not im:
      continue
    name, shape_txt, opcode, rest = im.groups()
    shapes[name] = shape_txt
    if opcode.endswith('-done'):
      continue
    base = opcode[:-6] if opcode.endswith('-start') else opcode
    if base not in KINDS:
      continue
    args = rest.split(')')[0]
    operand = 0
    for o in re.findall(r'%?([\w.\-]+)', args):
      operand += _nbytes(shapes.get(o, ''))
    if operand == 0:  # operands printed with their shapes inline
      operand = _nbytes(args)
    result = _nbytes(shape_txt)
    if opcode.endswith('-start') and base in ('all-gather',
                                              'collective-permute'):
      result = max(result - operand, 0)
    g = _group_size(line, nparts)
    if base == 'all-gather':
      wire = (g - 1) / g * result
    elif base == 'all-reduce':
      wire = 2 * (g - 1) / g * operand
    elif base in ('reduce-scatter', 'all-to-all', 'ragged-all-to-all'):
      wire = (g - 1) / g * operand
    else:
      wire = float(operand)
    ops.append(dict(op=base, name=name, computation=comp, group=g,
                    operand_bytes=operand, result_bytes=result,
                    wire_bytes=wire, shape=shape_txt))
  return ops


def summarize(ops: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
  """``{kind: {count, wire_bytes}}`` (an op with ``runs`` counts that many
  times, see :func:`per_step`)."""
  out = collections.defaultdict(lambda: dict(count=0, wire_bytes=0.0))
  for o in ops:
    out[o['op']]['count'] += o.get('runs', 1)
    out[o['op']]['wire_bytes'] += o['wire_bytes']
  return dict(out)


_SHLO = re.compile(r'"?stablehlo\.(all_to_all|all_gather|all_reduce|'
                   r'reduce_scatter|collective_permute)"?')
_TENSOR = re.compile(r'tensor<([0-9x]*?)x?(f64|f32|bf16|f16|i64|i32|i16|i8|'
                     r'i1|ui32|ui8)>')
_SHLO_BYTES = {'f64': 8, 'f32': 4, 'bf16': 2, 'f16': 2, 'i64': 8, 'i32': 4,
               'i16': 2, 'i8': 1, 'i1': 1, 'ui32': 4, 'ui8': 1}


def _shlo_bytes(txt: str) -> int:
  return sum(math.prod(int(d) for d in dims.split('x') if d) * _SHLO_BYTES[dt]
             for dims, dt in _TENSOR.findall(txt))


def lowered_collectives(stablehlo_text: str,
                        num_devices: int) -> list[dict[str, Any]]:
  """Collectives in lowered StableHLO with the dtypes the program asked for.

  Group size is read from ``replica_groups`` (its inner dimension); the wire
  bytes use the formulas of the module docstring.
  """
  lines = stablehlo_text.splitlines()
  ops = []
  for i, line in enumerate(lines):
    mm = _SHLO.search(line)
    if not mm:
      continue
    block = ' '.join(lines[i:i + 40])
    sig = re.search(r':\s*\(([^()]*)\)\s*->\s*(tensor<[^>]*>|\([^()]*\))',
                    block)
    if sig is None:
      continue
    operand, result = _shlo_bytes(sig.group(1)), _shlo_bytes(sig.group(2))
    rg = re.search(r'replica_groups\s*=\s*dense<.*?>\s*:\s*tensor<(\d+)x(\d+)',
                   block)
    g = int(rg.group(2)) if rg else num_devices
    kind = mm.group(1).replace('_', '-')
    if kind == 'all-gather':
      wire = (g - 1) / g * result
    elif kind == 'all-reduce':
      wire = 2 * (g - 1) / g * operand
    elif kind == 'collective-permute':
      wire = float(operand)
    else:
      wire = (g - 1) / g * operand
    ops.append(dict(op=kind, group=g, operand_bytes=operand,
                    result_bytes=result, wire_bytes=wire))
  return ops


def measure(jitted, *args) -> dict[str, Any]:
  """Lowers and compiles ``jitted(*args)``; per-device FLOPs, temp bytes,
  compiled and lowered collectives."""
  lowered = jitted.lower(*args)
  compiled = lowered.compile()
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0]
  mem = compiled.memory_analysis()
  text = compiled.as_text()
  m = re.search(r'num_partitions=(\d+)', text)
  nparts = int(m.group(1)) if m else 1
  ops = collectives(text)
  low = lowered_collectives(lowered.as_text(), nparts)
  return dict(
      flops=float(ca.get('flops', float('nan'))),
      temp_bytes=getattr(mem, 'temp_size_in_bytes', None),
      collectives=ops, summary=summarize(ops),
      wire_bytes=sum(o['wire_bytes'] for o in ops),
      lowered=low, lowered_summary=summarize(low),
      lowered_wire_bytes=sum(o['wire_bytes'] for o in low),
      compiled_text=text)


_WHILE = re.compile(r'\bwhile\(.*?\bbody=%?([\w.\-]+)')
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


def loop_multipliers(hlo_text: str) -> dict[str, int]:
  """``{computation: times it runs per call of the program}`` for the bodies
  of ``while`` loops with a known trip count (nested loops multiply;
  computations not listed run once). Collectives inside a scanned layer
  stack run once per layer, which the static op list does not show."""
  parent: dict[str, tuple[str, int]] = {}
  comp = None
  for line in hlo_text.splitlines():
    cm = _COMP.match(line)
    if cm and '=' not in line.split('(')[0]:
      comp = ('ENTRY ' if cm.group(1) else '') + cm.group(2)
      continue
    wm = _WHILE.search(line)
    if wm and comp is not None:
      tm = _TRIP.search(line)
      parent[wm.group(1)] = (comp, int(tm.group(1)) if tm else 1)

  def mult(c, depth=0):
    if c not in parent or depth > 32:
      return 1
    p, n = parent[c]
    return n * mult(p, depth + 1)

  return {c: mult(c) for c in parent}


def per_step(ops: list[dict[str, Any]], hlo_text: str) -> list[dict[str, Any]]:
  """``ops`` (from :func:`collectives`) with ``count`` and ``wire_bytes``
  scaled by how often their computation runs (:func:`loop_multipliers`)."""
  mult = loop_multipliers(hlo_text)
  out = []
  for o in ops:
    k = mult.get(o.get('computation'), 1)
    out.append({**o, 'runs': k, 'wire_bytes': o['wire_bytes'] * k})
  return out
