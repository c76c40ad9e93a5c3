"""Single-device Muon update: orthax vs optax.contrib.muon vs the matmul roofline.

Workload: GPT-2 small's hidden matrices (per layer 768×2304, 768×768,
768×3072, 3072×768 as Flax kernels), f32 on CPU (bf16 iteration on a GPU).
Prints one table measured in this process: median update time, efficiency
(roofline time / method time), time relative to optax, compiled temp memory,
and the error of each method's orthogonalization against the exact polar
factor (on one layer's gradients).

  python scripts/bench_ns.py                 # 4 layers (the baseline)
  python scripts/bench_ns.py --layers 12     # the full model
  python scripts/bench_ns.py --d_model 2048  # wider matrices, same layout
  python scripts/bench_ns.py --layers 1 --recipes [--only aro,fismo]

On a GPU it also times a large bf16 product (the matmul peak) and prints
every row's throughput as a fraction of it.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from optax import contrib

import orthax
from orthax import benchmarking as B
from orthax import matrices


def parse_args():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--layers', type=int, default=4)
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--steps', type=int, default=5)
  ap.add_argument('--d_model', type=int, default=768,
                  help='width of the GPT-2-shaped layers (768: GPT-2 small)')
  ap.add_argument('--recipes', action='store_true',
                  help='also time every registered recipe against orthax.muon')
  ap.add_argument('--ns_dtype', default=None,
                  help="orthax's iteration dtype (default: bfloat16 on an "
                       'accelerator, float32 on CPU)')
  ap.add_argument('--only', default='',
                  help='with --recipes: a comma-separated list of rows '
                       '(e.g. aro,aro/dion); default all')
  args = ap.parse_args()
  for name in ('layers', 'repeats', 'steps', 'd_model'):
    if getattr(args, name) < 1:
      ap.error(f'--{name} must be >= 1, got {getattr(args, name)}')
  return args


def roofline_times(params, steps, ns_dtype, repeats):
  """The same matmuls as the iteration, stacked by shape like orthax's
  groups: ``{unrolled: median time}`` (``fori_loop`` and unrolled)."""
  leaves = jax.tree.leaves(params)
  groups = matrices.plan_groups([(1,) + x.shape for x in leaves],
                                [x.dtype for x in leaves])
  stacks = [B.orthonormal_rows(jax.random.key(i), g.count, g.m, g.n, ns_dtype)
            for i, g in enumerate(groups)]
  roof = {}
  for unroll in (False, True):
    f = jax.jit(lambda s, u=unroll: B.matmul_chain(s, steps, u))
    roof[unroll] = B.median_time(lambda: f(stacks), repeats)
  return roof


def update_timer(params, grads, repeats):
  """``bench_update(tx, later=False) -> (median time, temp bytes)`` of one
  jitted update: of the first step, from ``tx.init``, or with ``later`` of
  the second, whose state has seen one step (a step that reuses cached
  preconditioners)."""
  def bench_update(tx, later=False):
    state = tx.init(params)
    upd = jax.jit(tx.update)
    compiled = upd.lower(grads, state, params).compile()
    if later:
      state = jax.block_until_ready(compiled(grads, state, params)[1])
    t = B.median_time(lambda: compiled(grads, state, params), repeats)
    return t, B.temp_bytes(compiled)
  return bench_update


def muon_rows(bench_update, steps, ns_dtype, bench_cast=None):
  """``(rows, t_one)``: rows ``(name, error key, time, temp bytes)`` of
  orthax.muon (auto, standard) and optax.contrib.muon, and the time of a
  one-step orthax update (what the update costs outside Newton–Schulz).
  optax iterates in its gradients' dtype, so where orthax's ``ns_dtype``
  is not float32 a second optax row (``bench_cast``: the update timed on
  parameters and gradients cast to ``ns_dtype``) compares like with
  like."""
  rows = []
  for method in ('auto', 'standard'):
    ox = orthax.muon(0.02, ns_steps=steps, ns_dtype=ns_dtype,
                     ns_method=method)
    rows.append((f'orthax.muon (jordan, {method})', method)
                + bench_update(ox))
  rows.append(('optax.contrib.muon', 'optax')
              + bench_update(contrib.muon(0.02, ns_steps=steps)))
  if bench_cast is not None:
    rows.append((f'optax.contrib.muon ({jnp.dtype(ns_dtype).name} grads)',
                 'optax_cast')
                + bench_cast(contrib.muon(0.02, ns_steps=steps)))
  t_one = bench_update(orthax.muon(0.02, ns_steps=1, ns_dtype=ns_dtype,
                                   ns_method='standard'))[0]
  return rows, t_one


def polar_errors(grads, steps, ns_dtype):
  """Mean relative Frobenius error against the exact polar factor on one
  layer, per error key (``auto``, ``standard``, ``optax``)."""
  layer = jax.tree.leaves(grads)[:4]
  exact = [orthax.polar.polar_svd(g) for g in layer]
  rel = lambda outs: float(np.mean([
      jnp.linalg.norm(o - e) / jnp.linalg.norm(e) for o, e in zip(outs, exact)]))
  err = {m: rel([orthax.polar.orthogonalize_stack(
      g, steps=steps, dtype=ns_dtype, method=m) for g in layer])
         for m in ('auto', 'standard')}
  coeffs = jnp.asarray((3.4445, -4.7750, 2.0315))
  err['optax'] = rel([contrib._muon.orthogonalize_via_newton_schulz(
      g, coeffs, steps) for g in layer])
  err['optax_cast'] = rel([contrib._muon.orthogonalize_via_newton_schulz(
      g.astype(ns_dtype), coeffs, steps).astype(g.dtype) for g in layer])
  return err


def print_table(roof, rows, err, flops, peak):
  t_roof = min(roof.values())
  t_optax = next(t for _, key, t, _ in rows if key == 'optax')
  hdr = (f'{"method":36s} {"time s":>8s} {"GFLOP/s":>8s} {"of peak":>7s} '
         f'{"eff":>6s} {"vs optax":>8s} {"temp MiB":>9s} {"err":>8s}')
  print(hdr)
  print('-' * len(hdr))
  for name, t in (('roofline (matmuls only, fori_loop)', roof[False]),
                  ('roofline (matmuls only, unrolled)', roof[True])):
    print(f'{name:36s} {t:8.4f} {flops / t / 1e9:8.1f} '
          f'{flops / t / peak:7.1%} {t_roof / t:6.2f}')
  for name, key, t, mem in rows:
    mib = f'{mem / 2**20:9.1f}' if mem is not None else f'{"n/a":>9s}'
    print(f'{name:36s} {t:8.4f} {flops / t / 1e9:8.1f} '
          f'{flops / t / peak:7.1%} {t_roof / t:6.2f} '
          f'{t / t_optax:8.2f} {mib} {err[key]:8.4f}')


def main():
  args = parse_args()
  recipe_selection = B.recipe_rows([k for k in args.only.split(',') if k])
  on_gpu = jax.default_backend() != 'cpu'
  ns_dtype = jnp.dtype(args.ns_dtype or (jnp.bfloat16 if on_gpu
                                         else jnp.float32))
  shapes = B.gpt2_hidden_kernels(args.layers, args.d_model)
  params = B.random_tree(shapes, jax.random.key(0))
  grads = B.random_tree(shapes, jax.random.key(1))
  flops = B.tree_ns_flops(shapes, args.steps)

  roof = roofline_times(params, args.steps, ns_dtype, args.repeats)
  bench_update = update_timer(params, grads, args.repeats)
  cast = lambda t: jax.tree.map(lambda x: x.astype(ns_dtype), t)  # pylint: disable=unnecessary-lambda-assignment
  bench_cast = (None if ns_dtype == jnp.float32 else
                update_timer(cast(params), cast(grads), args.repeats))
  rows, t_one = muon_rows(bench_update, args.steps, ns_dtype, bench_cast)
  # The update outside Newton–Schulz: the one-step update, less one step's
  # share of the difference to the standard update.
  t_standard = next(t for _, key, t, _ in rows if key == 'standard')
  t_outside = t_one - (t_standard - t_one) / max(args.steps - 1, 1)
  err = polar_errors(grads, args.steps, ns_dtype)
  # The ceiling: a large square product in the iteration's dtype.
  peak_n = 8192 if on_gpu else 1024
  peak = B.matmul_peak(peak_n, ns_dtype, chain=10 if on_gpu else 2,
                       repeats=args.repeats)

  print(f'backend={jax.default_backend()} devices={jax.device_count()} '
        f'layers={args.layers} d_model={args.d_model} steps={args.steps} '
        f'ns_dtype={jnp.dtype(ns_dtype).name} NS GFLOP/update={flops / 1e9:.1f}'
        # LAPACK calls (ARO's QR, FISMO's eigh) run on OpenBLAS's threads
        f" OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
  print(f'matmul peak ({jnp.dtype(ns_dtype).name}, {peak_n}³ products): '
        f'{peak / 1e9:.1f} GFLOP/s')
  print_table(roof, rows, err, flops, peak)
  if args.steps > 1:  # one step leaves nothing to subtract it from
    print(f'outside Newton–Schulz (1-step update {t_one:.4f} s, less one '
          f'step): {t_outside:.4f} s, {t_outside / t_standard:.0%} of the '
          f'standard update')
  if args.recipes:
    recipe_table(bench_update, params, recipe_selection)
  print('of peak = GFLOP/s / the matmul peak above; '
        'eff = roofline time / method time (above 1: faster than the plain '
        'matmuls, i.e. fewer FLOPs); GFLOP/s counts the plain iteration\'s '
        'FLOPs; err = mean ‖O − UVᵀ‖_F/‖UVᵀ‖_F on one layer; auto = Gram '
        'Newton–Schulz for the rectangular groups; orthax iterates in '
        'ns_dtype, optax.contrib.muon in its gradients\' dtype (float32 '
        'unless the row says otherwise: on a GPU its float32 products run as '
        'TF32).')


def recipe_table(bench_update, params, rows):
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
  times = {}
  for key, (name, kw) in rows.items():
    tx = orthax.recipe(name, learning_rate=0.02, **kw)
    times[key] = (bench_update(tx)[0], bench_update(tx, later=True)[0])
    print(f'  timed {key}: {times[key][0]:.4f} s / {times[key][1]:.4f} s',
          flush=True)
  muon_after, _ = bench_update(muon())
  t_muon = (muon_before + muon_after) / 2
  print()
  print(f'muon timed before/after the others: {muon_before:.4f} s / '
        f'{muon_after:.4f} s')
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
    period = B.PERIODS.get(key)
    amort = (f'{(first + (period - 1) * later) / period / t_muon:9.2f}'
             if period else f'{"":9s}')
    state = size(orthax.recipe(name, learning_rate=0.02, **kw).init(params))
    print(f'{key:24s} {first:8.4f} {first / t_muon:8.2f} {later:8.4f} '
          f'{later / t_muon:8.2f} {amort} {state / 2**20:10.2f} '
          f'{(state - muon_state) / 2**10:17.1f} KiB')


if __name__ == '__main__':
  main()
