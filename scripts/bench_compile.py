"""XLA compile time of one jitted update against the number of parameter
leaves: a GPT-like tree with one dict entry per layer (10 leaves a layer,
width 64), orthax recipes at their defaults (the non-finite guard on)
against ``optax.contrib.muon`` and ``optax.adamw``, in one process. The
ratio column should stay flat as the leaves grow (it grew as N² before
2026-12-06: 557 s for ``orthax.muon`` at 402 leaves).

    python scripts/bench_compile.py [--layers 10,20,40] [--only muon,lanton]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import orthax


def per_layer_tree(layers: int, d: int = 64) -> dict:
  """Abstract GPT-like parameters, one entry per layer (not stacked)."""
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # pylint: disable=unnecessary-lambda-assignment
  layer = lambda: {  # pylint: disable=unnecessary-lambda-assignment
      'attn': {n: {'kernel': s(d, d)} for n in ('query', 'key', 'value',
                                                'out')},
      'mlp': {'fc': {'kernel': s(d, 4 * d), 'bias': s(4 * d)},
              'proj': {'kernel': s(4 * d, d), 'bias': s(d)}},
      'ln1': {'scale': s(d)}, 'ln2': {'scale': s(d)}}
  return {'embed': {'embedding': s(512, d)}, 'head': {'kernel': s(d, 512)},
          'blocks': {f'layer_{i:03d}': layer() for i in range(layers)}}


def compile_seconds(tx, params) -> float:
  state = jax.eval_shape(tx.init, params)
  lowered = jax.jit(tx.update).lower(params, state, params)
  t0 = time.perf_counter()
  lowered.compile()
  return time.perf_counter() - t0


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--layers', default='10,20,40')
  ap.add_argument('--only', default='muon,lanton')
  args = ap.parse_args()
  names = [n for n in args.only.split(',') if n]
  for n in names:
    orthax.recipe_factory(n)  # names an unknown recipe before any compile
  print('leaves | ' + ' | '.join(f'{n} s (÷ optax.contrib.muon)'
                                 for n in names)
        + ' | optax.contrib.muon s | optax.adamw s')
  for layers in (int(x) for x in args.layers.split(',')):
    params = per_layer_tree(layers)
    jax.clear_caches()
    ref = compile_seconds(optax.contrib.muon(0.02), params)
    adamw = compile_seconds(optax.adamw(3e-3), params)
    cells = []
    for n in names:
      t = compile_seconds(orthax.recipe(n), params)
      cells.append(f'{t:.2f} ({t / ref:.2f}×)')
    print(f'{len(jax.tree.leaves(params))} | ' + ' | '.join(cells)
          + f' | {ref:.2f} | {adamw:.2f}')


if __name__ == '__main__':
  main()
