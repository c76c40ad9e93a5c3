# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/orthax/orthax/blob/main/notebooks/06_newton_schulz_in_bfloat16.ipynb)
#
# # Newton–Schulz in bfloat16
#
# On accelerators the Newton–Schulz iteration of a Muon-style optimizer
# usually runs in bfloat16 (`orthax.muon(..., ns_dtype=jnp.bfloat16)`):
# `newton_schulz(..., dtype=jnp.bfloat16)` feeds the matrix products bfloat16
# inputs, accumulates in float32 and applies the coefficients in float32 (so
# e.g. $a = 8.1566$ is not rounded to $8.125$), but each step still rounds
# the iterate to about 3 significant digits.
#
# This notebook measures what that rounding costs for each preset of
# `orthax.polar`: the error against the exact polar factor and the largest
# output singular value, bfloat16 against float32, and why the `cans` table
# is fragile in bfloat16 while the Polar Express tables are not. The presets
# themselves, their scalar maps and their float32 accuracy, are the subject of
# `02_anatomy_of_orthogonalization`.

# %%
# Install orthax (the distribution `orthax-optim`) if it is missing, e.g. on
# Colab; skipped in a local checkout or in CI. `orthax` on the package index
# is an unrelated project with the same import name, so the check is for this
# package's `orthax.muon`, and the other one is removed first.
import importlib
import subprocess
import sys


def has_orthax_optim():
  try:
    import orthax  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return hasattr(orthax, 'muon')


if not has_orthax_optim():
  subprocess.run([sys.executable, '-m', 'pip', 'uninstall', '-q', '-y',
                  'orthax'], check=False)
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q',
                  'orthax-optim', 'matplotlib'],
                 check=True)
  for module in [m for m in sys.modules if m.split('.')[0] == 'orthax']:
    del sys.modules[module]
  importlib.invalidate_caches()
  if not has_orthax_optim():
    raise ImportError('orthax-optim did not install; restart the runtime '
                      'and run this cell again.')

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import orthax
from orthax import polar

# ORTHAX_SMOKE=1 (set by the tests) shrinks the matrix and the step counts.
SMOKE = os.environ.get('ORTHAX_SMOKE') == '1'

print('orthax', orthax.__version__, 'jax', jax.__version__)
print('devices:', jax.devices())
print('smoke mode:', SMOKE)

PRESETS = ('jordan', 'dion', 'polar_express', 'polar_express_paper', 'cans',
           'aol')

# A Gaussian matrix, 4 times wider than tall (notebook 02's Gaussian one).
M, N = (128, 512) if SMOKE else (256, 1024)
MAX_STEPS = 10 if SMOKE else 14
STEPS = np.arange(1, MAX_STEPS + 1)
X = jax.random.normal(jax.random.split(jax.random.key(1), 3)[0], (M, N),
                      jnp.float32)
EXACT = polar.polar_svd(X)


def rel_err(y, ref):
  y = jnp.asarray(y, jnp.float32)
  return float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))


# `steps` as a traced integer (a `lax.fori_loop` bound): one compilation per
# preset and dtype covers every step count.
ns = jax.jit(polar.newton_schulz, static_argnames=('preset', 'dtype'))

# %% [markdown]
# ## 1. bfloat16 against float32
#
# Left: the error against the exact polar factor at each preset's default
# step count, for both dtypes. Right: the largest singular value of the
# output over steps for three tables, float32 solid, bfloat16 dashed.

# %%
def top_singular_value(y):
  y = np.asarray(y, np.float64)
  if not np.all(np.isfinite(y)):  # a diverged iteration
    return np.inf
  return float(np.linalg.svd(y, compute_uv=False)[0])


fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
xs = np.arange(len(PRESETS))
for dt, off in ((jnp.float32, -0.2), (jnp.bfloat16, 0.2)):
  e = [rel_err(ns(X, preset=n, steps=jnp.int32(polar.get_preset(n).steps),
                  dtype=dt), EXACT) for n in PRESETS]
  axes[0].bar(xs + off, e, 0.4, label=jnp.dtype(dt).name)
axes[0].set_xticks(xs, PRESETS, rotation=20)
axes[0].set_yscale('log')
axes[0].set_ylabel('relative error vs UVᵀ')
axes[0].set_title('default step count')
axes[0].legend()
for i, name in enumerate(PRESETS):
  if name not in ('polar_express', 'polar_express_paper', 'cans'):
    continue
  for dt, ls in ((jnp.float32, '-'), (jnp.bfloat16, '--')):
    tops = [top_singular_value(ns(X, preset=name, steps=jnp.int32(k),
                                  dtype=dt).astype(jnp.float32))
            for k in STEPS]
    axes[1].plot(STEPS, tops, ls, color=f'C{i}',
                 label=f'{name} {jnp.dtype(dt).name}')
axes[1].axhline(1.0, color='k', lw=0.6)
axes[1].set_ylim(0.8, 2.5)
axes[1].set_xlabel('Newton–Schulz steps')
axes[1].set_ylabel('largest output singular value')
axes[1].set_title('largest singular value vs steps')
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()

print(f'At the default step count ({M}×{N} Gaussian matrix):')
print(f'{"preset":20s} {"band top":>8s} {"max σ f32":>10s} {"max σ bf16":>10s}'
      f' {"‖bf16 − f32‖/‖f32‖":>19s}')
for name in PRESETS:
  k = jnp.int32(polar.get_preset(name).steps)
  y32 = ns(X, preset=name, steps=k, dtype=jnp.float32)
  y16 = ns(X, preset=name, steps=k, dtype=jnp.bfloat16).astype(jnp.float32)
  print(f'{name:20s} {polar.get_preset(name).band[1]:8.4f} '
        f'{top_singular_value(y32):10.3f} {top_singular_value(y16):10.3f}'
        f' {rel_err(y16, y32):19.4f}')

# %% [markdown]
# **What to notice.**
#
# * For most presets bfloat16 barely matters at the default step count: the
#   error of the approximation itself (1% to 20%) dwarfs the rounding error,
#   the bf16 and f32 outputs differ by 0.5–2%, and the largest output
#   singular value moves by at most a few thousandths.
# * Once the iteration is accurate (`polar_express_paper` after its 8 rows)
#   bfloat16 shows a floor of a few $10^{-3}$, about bfloat16's unit
#   round-off ($2^{-8} \approx 4\cdot 10^{-3}$).
# * `cans` is the exception: in bfloat16 its largest singular value
#   overshoots the band (the table above, and the dashed purple curve), by an
#   amount that varies from matrix to matrix; on some matrices the extra
#   steps past its 5 rows then blow it up.

# %% [markdown]
# ## 2. Why `cans` overshoots
#
# After two steps the top singular values of both `cans` and
# `polar_express` sit just below 1.965, and the remaining rows must bring
# them back to 1. The next cell runs rows 3–5 alone (`coeffs=` overrides a
# preset's table) on values around there: the Polar Express rows tolerate
# inputs up to about 2, the CANS rows blow up just 0.3% above the largest
# value they were designed for. A bfloat16 rounding of the top directions is
# enough to cross that edge. The Polar Express tables are built with a
# *safety factor* for exactly this (each row but the last is stretched,
# $p(x) \to p(x/1.02)$); applying a 1% safety factor to the CANS table
# removes the overshoot.

# %%
from orthax.polar.presets import CANS  # noqa: E402
from orthax.polar.presets import POLAR_EXPRESS_C  # noqa: E402

probe = np.array([1.9, 1.95, 1.965, 1.97, 1.99, 2.0, 2.02])
print('rows 3-5 applied to σ =      ' + ' '.join(f'{x:7.3f}' for x in probe))
for name, table in (('polar_express', POLAR_EXPRESS_C), ('cans', CANS)):
  out = polar.newton_schulz(jnp.diag(jnp.asarray(probe, jnp.float32)),
                            coeffs=table[2:], steps=3, normalizer='none')
  print(f'{name:28s} ' + ' '.join(f'{x:7.3g}' for x in np.diag(out)))
print()


def with_safety(rows, sf):
  """p(x) -> p(x / sf) on every row but the last."""
  stretched = [(a / sf, b / sf**3, c / sf**5) for a, b, c in rows[:-1]]
  return stretched + [rows[-1]]


print(f'{"":28s} {"smallest σ":>10s} {"largest σ":>10s}')
for sf in (1.0, 1.01):
  for dt in (jnp.float32, jnp.bfloat16):
    y = polar.newton_schulz(X, 'cans', coeffs=with_safety(CANS, sf),
                            dtype=dt).astype(jnp.float32)
    s = np.linalg.svd(np.asarray(y), compute_uv=False)
    print(f'cans, safety {sf:4.2f}, {jnp.dtype(dt).name:8s}    '
          f'{s.min():10.3f} {s.max():10.3f}')
print('documented band of cans:', polar.get_preset('cans').band)

# %% [markdown]
# In float32 both tables are fine; in bfloat16 only the stretched one stays
# in the band. If you run Newton–Schulz in bfloat16 (the usual choice on
# accelerators, `orthax.muon(..., ns_dtype=jnp.bfloat16)`), prefer
# `polar_express`, or check the output band of the preset you pick in the
# dtype you train in.
