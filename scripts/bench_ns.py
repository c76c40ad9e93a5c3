"""Single-device Muon update: orthax vs optax.contrib.muon vs the matmul roofline.

Workload: GPT-2 small's hidden matrices (per layer 768×2304, 768×768,
768×3072, 3072×768 as Flax kernels), f32 on CPU (bf16 iteration on a GPU).
Prints one table measured in this process: median update time, efficiency
(roofline time / method time), time relative to optax, compiled temp memory,
and the error of each method's orthogonalization against the exact polar
factor (on one layer's gradients).

  python scripts/bench_ns.py                 # 4 layers (MEASURING.md baseline)
  python scripts/bench_ns.py --layers 12     # the full model
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from optax import contrib

import orthax
from orthax import benchmarking as B
from orthax import matrices


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--layers', type=int, default=4)
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--steps', type=int, default=5)
  ap.add_argument('--recipes', action='store_true',
                  help='also time every registered recipe against orthax.muon')
  args = ap.parse_args()

  on_gpu = jax.default_backend() != 'cpu'
  ns_dtype = jnp.bfloat16 if on_gpu else jnp.float32
  shapes = B.gpt2_hidden_kernels(args.layers)
  params = B.random_tree(shapes, jax.random.key(0))
  grads = B.random_tree(shapes, jax.random.key(1))
  flops = B.tree_ns_flops(shapes, args.steps)

  # Roofline: the same matmuls, stacked by shape like orthax's groups.
  leaves = jax.tree.leaves(params)
  groups = matrices.plan_groups([(1,) + x.shape for x in leaves],
                                [x.dtype for x in leaves])
  stacks = [B.orthonormal_rows(jax.random.key(i), g.count, g.m, g.n, ns_dtype)
            for i, g in enumerate(groups)]
  roof = {}
  for unroll in (False, True):
    f = jax.jit(lambda s, u=unroll: B.matmul_chain(s, args.steps, u))
    roof[unroll] = B.median_time(lambda: f(stacks), args.repeats)
  t_roof = min(roof.values())

  def bench_update(tx, later=False):
    """Median time of one jitted update (and its temp bytes): of the first
    step, from ``tx.init``, or with ``later`` of the second, whose state
    has seen one step (a step that reuses cached preconditioners)."""
    state = tx.init(params)
    upd = jax.jit(tx.update)
    compiled = upd.lower(grads, state, params).compile()
    if later:
      state = jax.block_until_ready(compiled(grads, state, params)[1])
    t = B.median_time(lambda: compiled(grads, state, params), args.repeats)
    return t, B.temp_bytes(compiled)

  rows = []
  for method in ('auto', 'standard'):
    ox = orthax.muon(0.02, ns_steps=args.steps, ns_dtype=ns_dtype,
                     ns_method=method)
    rows.append((f'orthax.muon (jordan, {method})', method)
                + bench_update(ox))
  t_optax, m_optax = bench_update(contrib.muon(0.02, ns_steps=args.steps))
  rows.append(('optax.contrib.muon', 'optax', t_optax, m_optax))

  # Accuracy on one layer: relative Frobenius error vs the exact polar factor.
  layer = jax.tree.leaves(grads)[:4]
  exact = [orthax.polar.polar_svd(g) for g in layer]
  rel = lambda outs: float(np.mean([
      jnp.linalg.norm(o - e) / jnp.linalg.norm(e) for o, e in zip(outs, exact)]))
  err = {m: rel([orthax.polar.orthogonalize_stack(
      g, steps=args.steps, dtype=ns_dtype, method=m) for g in layer])
         for m in ('auto', 'standard')}
  coeffs = jnp.asarray((3.4445, -4.7750, 2.0315))
  err['optax'] = rel([contrib._muon.orthogonalize_via_newton_schulz(
      g, coeffs, args.steps) for g in layer])

  print(f'backend={jax.default_backend()} devices={jax.device_count()} '
        f'layers={args.layers} steps={args.steps} '
        f'ns_dtype={jnp.dtype(ns_dtype).name} NS GFLOP/update={flops / 1e9:.1f}')
  hdr = (f'{"method":36s} {"time s":>8s} {"GFLOP/s":>8s} {"eff":>6s} '
         f'{"vs optax":>8s} {"temp MiB":>9s} {"err":>8s}')
  print(hdr)
  print('-' * len(hdr))
  print(f'{"roofline (matmuls only, fori_loop)":36s} {roof[False]:8.3f} '
        f'{flops / roof[False] / 1e9:8.1f} {t_roof / roof[False]:6.2f}')
  print(f'{"roofline (matmuls only, unrolled)":36s} {roof[True]:8.3f} '
        f'{flops / roof[True] / 1e9:8.1f} {t_roof / roof[True]:6.2f}')
  for name, method, t, mem in rows:
    mib = f'{mem / 2**20:9.1f}' if mem is not None else f'{"n/a":>9s}'
    print(f'{name:36s} {t:8.3f} {flops / t / 1e9:8.1f} {t_roof / t:6.2f} '
          f'{t / t_optax:8.2f} {mib} {err[method]:8.4f}')
  if args.recipes:
    recipe_table(bench_update, params)
  print('eff = roofline time / method time (above 1: faster than the plain '
        'matmuls, i.e. fewer FLOPs); GFLOP/s counts the plain iteration\'s '
        'FLOPs; err = mean ‖O − UVᵀ‖_F/‖UVᵀ‖_F on one layer; auto = Gram '
        'Newton–Schulz for the rectangular groups.')


# Non-default modes timed too: ARO's dion mode rotates fan-out (the larger
# side of an up-projection: an R of 3072² there, ALGORITHMS.md §13.1.3).
EXTRA_ROWS = {
    'aro/dion': ('aro', {'reference': 'dion'}),
    'aro/shifted_cholesky': ('aro', {'qr': 'shifted_cholesky'}),
    'fismo/every10': ('fismo', {'precondition_every': 10}),
}

# Recipes whose steps differ in cost: every ``period``-th step (the first
# included) refreshes something the others reuse. Their ``amortised`` time
# is ``(first + (period - 1)·later) / period``.
PERIODS = {'fismo/every10': 10}


def recipe_table(bench_update, params):
  """Every registered recipe at its defaults vs orthax.muon, same tree.

  Each recipe is timed at its first step (from ``init``) and at its second
  (a state that has seen one step); the ratios to Muon are of those, and
  of the amortised time where :data:`PERIODS` names a period. The
  denominator is the mean of two ``muon`` timings, one before and one
  after the others, so that drift on a shared machine shows as the gap
  between them (printed).
  """
  muon = lambda: orthax.recipe('muon', learning_rate=0.02)
  muon_before, _ = bench_update(muon())
  rows = {name: (name, {}) for name in orthax.recipe_names()}
  rows.update(EXTRA_ROWS)
  times = {}
  for key, (name, kw) in rows.items():
    tx = orthax.recipe(name, learning_rate=0.02, **kw)
    times[key] = (bench_update(tx)[0], bench_update(tx, later=True)[0])
  muon_after, _ = bench_update(muon())
  t_muon = (muon_before + muon_after) / 2
  print()
  print(f'muon timed before/after the others: {muon_before:.3f} s / '
        f'{muon_after:.3f} s')
  hdr = (f'{"recipe":24s} {"step 1 s":>8s} {"vs muon":>8s} {"later s":>8s} '
         f'{"vs muon":>8s} {"amortised":>9s} {"state MiB":>10s} '
         f'{"extra state vs muon":>20s}')
  print(hdr)
  print('-' * len(hdr))
  size = lambda tree: sum(x.size * x.dtype.itemsize
                          for x in jax.tree.leaves(tree))
  muon_state = size(muon().init(params))
  for key, (name, kw) in rows.items():
    first, later = times[key]
    period = PERIODS.get(key)
    amort = (f'{(first + (period - 1) * later) / period / t_muon:9.2f}'
             if period else f'{"":9s}')
    state = size(orthax.recipe(name, learning_rate=0.02, **kw).init(params))
    print(f'{key:24s} {first:8.3f} {first / t_muon:8.2f} {later:8.3f} '
          f'{later / t_muon:8.2f} {amort} {state / 2**20:10.2f} '
          f'{(state - muon_state) / 2**10:17.1f} KiB')


if __name__ == '__main__':
  main()
