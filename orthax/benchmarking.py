"""Helpers for the benchmark scripts: workloads, timing, FLOP counts.

Nothing here is used by the optimizers; ``scripts/bench_*.py`` import it.
Timings are medians of repeated runs after a warm-up, each ending in
``block_until_ready``; scripts print ratios measured in one process.
"""

from __future__ import annotations

import collections
import glob
import statistics
import tempfile
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from orthax.recipes import registry


def gpt2_hidden_kernels(layers: int = 12, d: int = 768) -> dict[str, Any]:
  """Shapes of GPT-2 small's hidden matrices as Flax kernels ``(in, out)``."""
  tree = {}
  for i in range(layers):
    tree[f'h{i:02d}'] = {
        'attn': {'c_attn': {'kernel': (d, 3 * d)},
                 'c_proj': {'kernel': (d, d)}},
        'mlp': {'c_fc': {'kernel': (d, 4 * d)},
                'c_proj': {'kernel': (4 * d, d)}},
    }
  return tree


def is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def random_tree(shapes: Any, key: jax.Array, dtype=jnp.float32) -> Any:
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=is_shape)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      jax.random.normal(k, s, dtype) for k, s in zip(keys, leaves)])


def ns_step_flops(m: int, n: int) -> int:
  """FLOPs of one quintic step: ``XXᵀ`` 2a²b, ``A·A`` 2a³, ``B·X`` 2a²b."""
  a, b = min(m, n), max(m, n)
  return 4 * a * a * b + 2 * a ** 3


def tree_ns_flops(shapes: Any, steps: int) -> int:
  total = 0
  for s in jax.tree.leaves(shapes, is_leaf=is_shape):
    batch = 1
    for d in s[:-2]:
      batch *= d
    total += batch * steps * ns_step_flops(s[-2], s[-1])
  return total


def median_time(fn: Callable[[], Any], repeats: int = 5,
                warmup: int = 1) -> float:
  """Median wall time of ``fn()`` (which must return arrays) in seconds."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def matmul_chain(stacks: list[jax.Array], steps: int,
                 unroll: bool = False) -> list[jax.Array]:
  """The roofline: per stack ``A = XXᵀ; X ← (A·A)·X`` for ``steps`` steps.

  The same three matmuls per step as a quintic Newton–Schulz step, batched the
  same way, with no coefficients, normalization or casts. Start from matrices
  with orthonormal rows so the values stay bounded.
  """
  def step(_, x):
    a = x @ jnp.swapaxes(x, -1, -2)
    return (a @ a) @ x

  out = []
  for x in stacks:
    if unroll:
      for k in range(steps):
        x = step(k, x)
    else:
      x = jax.lax.fori_loop(0, steps, step, x)
    out.append(x)
  return out


def matmul_peak(n: int = 8192, dtype=jnp.bfloat16, chain: int = 10,
                repeats: int = 5) -> float:
  """Measured FLOP/s of a square ``n×n·n×n`` product in ``dtype``.

  A jitted chain of ``chain`` products ``X ← X·W`` (``W`` scaled by
  ``1/√n`` so the values stay bounded), so that one launch is long against
  its overhead. It is the ceiling the Newton–Schulz rows are read against.
  """
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (n, n), jnp.float32).astype(dtype)
  w = (jax.random.normal(kw, (n, n), jnp.float32) / n ** 0.5).astype(dtype)
  f = jax.jit(lambda x, w: jax.lax.fori_loop(0, chain, lambda _, y: y @ w, x))
  t = median_time(lambda: f(x, w), repeats)
  return chain * 2 * n ** 3 / t


def orthonormal_rows(key: jax.Array, count: int, m: int, n: int,
                     dtype=jnp.float32) -> jax.Array:
  """``[count, m, n]`` (m ≤ n) with orthonormal rows."""
  q, _ = jnp.linalg.qr(jax.random.normal(key, (count, n, m), jnp.float32))
  return jnp.swapaxes(q, -1, -2).astype(dtype)


def temp_bytes(compiled) -> int | None:
  try:
    return compiled.memory_analysis().temp_size_in_bytes
  except Exception:  # pragma: no cover - backend without memory analysis
    return None


# Non-default modes timed beside the registered recipes: ARO's dion mode
# rotates fan-out (the larger side of an up-projection: an R of 3072² there,
# as ``orthax.matrix_stages.AroRotate.flops`` counts); each of ARO's QR kinds (its default, 'auto', is
# Householder on CPU and Cholesky QR3 elsewhere).
EXTRA_ROWS = {
    'aro/dion': ('aro', {'reference': 'dion'}),
    'aro/householder': ('aro', {'qr': 'householder'}),
    'aro/cholesky_qr3': ('aro', {'qr': 'cholesky_qr3'}),
    'aro/shifted_cholesky': ('aro', {'qr': 'shifted_cholesky'}),
    'fismo/every10': ('fismo', {'precondition_every': 10}),
}

# Rows whose steps differ in cost: every ``period``-th step (the first
# included) refreshes something the others reuse. Their ``amortised`` time
# is ``(first + (period - 1)·later) / period``.
PERIODS = {'fismo/every10': 10}


def recipe_rows(only=()) -> dict[str, tuple[str, dict[str, Any]]]:
  """``{row: (recipe, kwargs)}``: every registered recipe and
  :data:`EXTRA_ROWS`, or the rows named in ``only``."""
  rows = {name: (name, {}) for name in registry.recipe_names()}
  rows.update(EXTRA_ROWS)
  unknown = sorted(set(only) - set(rows))
  if unknown:
    raise ValueError(f'recipe_rows: only must name rows of the table: no '
                     f'rows named {unknown}; rows: {sorted(rows)}')
  return {k: v for k, v in rows.items() if not only or k in only}


class OpTime(NamedTuple):
  """One compiled operation's share of a profiled run."""
  op: str  # the HLO instruction (``fusion.12``, ``custom-call.3``, ...)
  kernel: str  # what ran for it (a GPU kernel's name, the op's on CPU)
  seconds: float  # total over the profiled calls, divided by their number
  launches: float  # per call


def op_times(fn: Callable[[], Any], repeats: int = 3) -> list[OpTime]:
  """Where ``fn()``'s time goes, per compiled operation, longest first.

  Runs ``fn`` once to warm up, then ``repeats`` times under
  :func:`jax.profiler.trace`, and reads the trace back with
  :class:`jax.profiler.ProfileData` (no other tools): every event that
  carries an ``hlo_op`` on a device plane (a GPU) or, with no device plane,
  on the host (CPU). Times are per call. Raises ``RuntimeError`` on
  jax/jaxlib before 0.7.2, whose CPU traces name no operation.
  """
  jax.block_until_ready(fn())
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir):
      for _ in range(repeats):
        jax.block_until_ready(fn())
    (path,) = glob.glob(f'{log_dir}/**/*.xplane.pb', recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
    planes = list(data.planes)
  devices = [p for p in planes if p.name.startswith('/device:')]
  total = collections.defaultdict(float)
  count = collections.Counter()
  for plane in devices or [p for p in planes if p.name == '/host:CPU']:
    for line in plane.lines:
      for op, event in _innermost(line.events):
        total[op, event.name] += event.duration_ns * 1e-9
        count[op, event.name] += 1
  if not total and tuple(jax.__version_info__[:3]) < (0, 7, 2):
    raise RuntimeError(
        f'op_times: the profile names no compiled operation: the CPU traces '
        f'of jax/jaxlib {jax.__version__} carry none (from 0.7.2 they do).')
  rows = [OpTime(op, kernel, t / repeats, count[op, kernel] / repeats)
          for (op, kernel), t in total.items()]
  return sorted(rows, key=lambda r: -r.seconds)


def _innermost(events) -> list[tuple[str, Any]]:
  """``(hlo_op, event)`` for the events of one trace line that carry an
  ``hlo_op`` and contain no other such event: on CPU a ``cond`` or
  ``while`` runs its body's operations inside its own event, which would
  count them twice."""
  ops = sorted(((dict(e.stats).get('hlo_op'), e) for e in events),
               key=lambda oe: (oe[1].start_ns, -oe[1].end_ns))
  ops = [(op, e) for op, e in ops if op is not None]
  outer = set()
  open_events = []  # indices of events that may still contain the next one
  for i, (_, e) in enumerate(ops):
    while open_events and ops[open_events[-1]][1].end_ns <= e.start_ns:
      open_events.pop()
    if open_events:
      outer.add(open_events[-1])
    open_events.append(i)
  return [oe for i, oe in enumerate(ops) if i not in outer]
