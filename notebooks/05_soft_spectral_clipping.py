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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/orthax/orthax/blob/main/notebooks/05_soft_spectral_clipping.ipynb)
#
# # Soft spectral clipping
#
# The SPECTRA recipe does not orthogonalize: it *caps* large singular values
# softly with $H_c(X) = (I + XX^\top/c^2)^{-1/2} X$, i.e.
# $\sigma \mapsto \sigma/\sqrt{1 + \sigma^2/c^2}$, which leaves $\sigma \ll c$
# almost unchanged and sends $\sigma \gg c$ to $c$.
# `polar.soft_clip_matrix` computes it with a coupled Newton–Schulz
# inverse square root (no SVD); `polar.soft_clip_svd` is the exact formula.
# Left: the singular values of `soft_clip_matrix(X, c)` for a matrix with a
# known spectrum spanning $[10^{-2}c, 10^2 c]$, on the exact curve. Right: the
# relative error against the SVD formula as a function of the number of
# steps for the two step rules (`tol=0` runs exactly that many steps), for
# spectra log-spaced from $10^{-2}c$ up to $\sigma_{\max} = 10c$, $100c$ and
# $1000c$.
#
# (Orthogonalization itself, the Newton–Schulz presets and their error
# against the exact polar factor, is in `02_anatomy_of_orthogonalization`.)

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

# ORTHAX_SMOKE=1 (set by the tests) shrinks the matrices and step counts.
SMOKE = os.environ.get('ORTHAX_SMOKE') == '1'

print('orthax', orthax.__version__, 'jax', jax.__version__)
print('devices:', jax.devices())
print('smoke mode:', SMOKE)


def rel_err(y, ref):
  """Relative Frobenius distance of ``y`` (in float32) from ``ref``."""
  y = jnp.asarray(y, jnp.float32)
  return float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))


# %%
C = 1.0
MC, NC = (64, 128) if SMOKE else (128, 256)
k_u3, k_v3 = jax.random.split(jax.random.key(2))
U3, _ = jnp.linalg.qr(jax.random.normal(k_u3, (MC, MC)))
V3, _ = jnp.linalg.qr(jax.random.normal(k_v3, (NC, MC)))


def with_spectrum(s):
  return (U3 * jnp.asarray(s, jnp.float32)) @ V3.T


clip = jax.jit(polar.soft_clip_matrix, static_argnames=('step_rule', 'tol'))
CLIP_STEPS = np.arange(1, (20 if SMOKE else 28) + 1)

fig, axes = plt.subplots(1, 2, figsize=(14, 5))
s_in = np.geomspace(1e-2, 1e2, MC) * C
out = clip(with_spectrum(s_in), C)
s_out = np.linalg.svd(np.asarray(out), compute_uv=False)[::-1]  # ascending
s_dense = np.geomspace(1e-2, 1e2, 400) * C
axes[0].plot(s_dense, s_dense / np.sqrt(1 + (s_dense / C) ** 2), 'k-',
             lw=1, label='σ/√(1+σ²/c²)')
axes[0].plot(s_dense, s_dense, ':', color='gray', label='identity')
axes[0].axhline(C, color='gray', ls='--', lw=0.8, label='c')
axes[0].plot(s_in, s_out, 'o', ms=3, color='C3',
             label='soft_clip_matrix (default: 12 scaled steps)')
axes[0].set_xscale('log')
axes[0].set_yscale('log')
axes[0].set_xlabel('input singular value')
axes[0].set_ylabel('output singular value')
axes[0].set_title(f'soft clip at c = {C:g}')
axes[0].legend(fontsize=8)

floors = {}
for i, ratio in enumerate((10.0, 100.0, 1000.0)):
  X = with_spectrum(np.geomspace(1e-2, ratio, MC) * C)
  exact = polar.soft_clip_svd(X, C)
  for rule, ls in (('scaled', '-'), ('plain', '--')):
    e = [rel_err(clip(X, C, steps=jnp.int32(k), step_rule=rule, tol=0.0),
                 exact) for k in CLIP_STEPS]
    axes[1].plot(CLIP_STEPS, e, ls, color=f'C{i}',
                 label=f'σ_max/c = {ratio:g}, {rule}')
    floors[ratio, rule] = e[-1]
  floors[ratio, 'default'] = rel_err(clip(X, C), exact)
axes[1].axvline(12, color='gray', ls=':', lw=1)
axes[1].set_yscale('log')
axes[1].set_xlabel('coupled Newton–Schulz steps')
axes[1].set_ylabel('relative error vs SVD formula')
axes[1].set_title('float32; dotted: the default cap of 12 steps')
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()

print(f'relative error vs the SVD formula after {CLIP_STEPS[-1]} steps, and '
      'with the defaults (12 scaled steps, early stop):')
for ratio in (10.0, 100.0, 1000.0):
  print(f'  σ_max/c = {ratio:6g}: scaled {floors[ratio, "scaled"]:.1e}, '
        f'plain {floors[ratio, "plain"]:.1e}, '
        f'default {floors[ratio, "default"]:.1e}')

# %% [markdown]
# **What to notice.**
#
# * Left: the dots follow the exact curve: small singular values pass
#   through unchanged, large ones flatten out at $c$. Unlike
#   orthogonalization, the *ordering and ratios* of the small singular values
#   are kept.
# * Right: the iteration starts with every eigenvalue squeezed into
#   $[1/\alpha, 1]$, $\alpha \approx 1 + \sigma_{\max}^2/c^2$, so the larger
#   $\sigma_{\max}/c$, the more steps it needs. The `'plain'` rule (the
#   reference implementation's, $a = 3/2, b = -1/2$) grows small values by
#   1.5× per step; the `'scaled'` rule (orthax's default) picks the optimal
#   cubic for the currently certified interval and converges in far fewer
#   steps. By default orthax stops as soon as the certified interval has
#   converged, so 12 is only a cap.
# * Each curve flattens at a floor that grows with $\sigma_{\max}/c$ (the
#   printed numbers): in float32, forming $I + XX^\top/c^2$ already drowns the
#   smallest directions (of size $10^{-2}c$ here) in the round-off of the
#   largest ones. No step rule can fix that; running in float64 can.
