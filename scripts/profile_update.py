"""Where one optimizer update's time goes: per compiled operation and kind.

Same workload as ``scripts/bench_ns.py`` (GPT-2-shaped hidden kernels); one
recipe row (``bench_ns.py --recipes``' names: ``muon``, ``aro``,
``aro/householder``, ...) at its first step or a later one. Prints the
operations that take the longest, with the kernel that ran and the JAX
operation it came from, and the time by kind (matrix products, Cholesky,
triangular solves, Householder QR, eigendecompositions, the rest).

  python scripts/profile_update.py --row aro --later --layers 12
  python scripts/profile_update.py --row muon --ns_dtype bfloat16
"""

from __future__ import annotations

import argparse
import collections
import re

import jax
import jax.numpy as jnp

import orthax
from orthax import benchmarking as B

# Substrings of operation and kernel names, by kind; the first match wins.
KINDS = (
    ('householder qr', ('geqr', 'orgqr', 'larf', 'householder')),
    ('cholesky', ('potrf', 'cholesky')),
    ('triangular solve', ('trsm', 'triangular', 'trsv')),
    ('eigh', ('syev', 'eigh', 'jacobi')),
    ('matmul', ('gemm', 'cutlass', 'xmma', 'nvjet', 'dot', 'ynn', 'cublas')),
)
_META = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]+)"')


def kind_of(kernel: str) -> str:
  low = kernel.lower()
  for kind, marks in KINDS:
    if any(m in low for m in marks):
      return kind
  return 'other'


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--row', default='muon',
                  help='a recipe row of bench_ns.py --recipes')
  ap.add_argument('--layers', type=int, default=12)
  ap.add_argument('--d_model', type=int, default=768)
  ap.add_argument('--later', action='store_true',
                  help='profile the second step (a state that has seen one)')
  ap.add_argument('--ns_dtype', default=None,
                  help="the recipe's ns_dtype (e.g. bfloat16); default its own")
  ap.add_argument('--top', type=int, default=25)
  ap.add_argument('--repeats', type=int, default=3)
  args = ap.parse_args()

  (name, kw), = B.recipe_rows([args.row]).values()
  if args.ns_dtype:
    kw = dict(kw, ns_dtype=jnp.dtype(args.ns_dtype))
  tx = orthax.recipe(name, learning_rate=0.02, **kw)
  shapes = B.gpt2_hidden_kernels(args.layers, args.d_model)
  params = B.random_tree(shapes, jax.random.key(0))
  grads = B.random_tree(shapes, jax.random.key(1))
  state = tx.init(params)
  compiled = jax.jit(tx.update).lower(grads, state, params).compile()
  if args.later:
    state = jax.block_until_ready(compiled(grads, state, params)[1])
  wall = B.median_time(lambda: compiled(grads, state, params), args.repeats)
  rows = B.op_times(lambda: compiled(grads, state, params), args.repeats)
  source = dict(m.groups() for m in map(_META.match,
                                        compiled.as_text().splitlines()) if m)

  busy = sum(r.seconds for r in rows)
  print(f'backend={jax.default_backend()} row={args.row} '
        f'step={"later" if args.later else "first"} layers={args.layers} '
        f'd_model={args.d_model}: wall {wall * 1e3:.3f} ms, operations '
        f'{busy * 1e3:.3f} ms ({len(rows)} distinct)')
  by_kind = collections.defaultdict(float)
  for r in rows:
    by_kind[kind_of(f'{r.op} {r.kernel}')] += r.seconds
  for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
    print(f'  {kind:18s} {t * 1e3:9.3f} ms {t / busy:6.1%}')
  print(f'{"ms":>9s} {"share":>6s} {"n":>4s}  {"op":24s} {"kernel":44s} from')
  for r in rows[:args.top]:
    print(f'{r.seconds * 1e3:9.3f} {r.seconds / busy:6.1%} {r.launches:4.0f}'
          f'  {r.op[:24]:24s} {r.kernel[:44]:44s} '
          f'{source.get(r.op, "")[-60:]}')


if __name__ == '__main__':
  main()
