"""What the non-finite guard costs: one jitted optimizer update without a guard,
with the gradient check only (``skip_if_nonfinite(check_result=False)``) and
with the gradient and result check (the default), median of 20 after warm-up.

    python scripts/bench_guard.py
"""

import jax
import jax.numpy as jnp
import optax

import orthax
from orthax import benchmarking as B


def main():
  cases = {
      'adamw, 8.4M params (4 × 1024×2048)': (
          optax.adamw(1e-3),
          {f'w{i}': jnp.ones((1024, 2048)) for i in range(4)}),
      'orthax.muon, 4 × 768×3072 kernels': (
          orthax.muon(check_finite=False),
          {'blocks': {f'{i}': {'mlp': {'kernel': jnp.ones((768, 3072))}}
                      for i in range(4)}}),
  }
  for name, (inner, params) in cases.items():
    grads = jax.tree.map(lambda p: jnp.cos(p * 3), params)
    row = []
    for label, tx in (
        ('none', inner),
        ('gradient only', orthax.skip_if_nonfinite(inner,
                                                   check_result=False)),
        ('gradient + result', orthax.skip_if_nonfinite(inner))):
      state, update = tx.init(params), jax.jit(tx.update)
      ms = 1e3 * B.median_time(lambda: update(grads, state, params),  # pylint: disable=cell-var-from-loop
                               repeats=20)
      row.append(f'{label} {ms:.1f} ms')
    print(f'{name}: ' + '; '.join(row))


if __name__ == '__main__':
  main()
