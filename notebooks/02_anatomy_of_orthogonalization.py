# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/orthax/orthax/blob/main/notebooks/02_anatomy_of_orthogonalization.ipynb)
#
# # Anatomy of orthogonalization
#
# Muon-style optimizers replace an update matrix $G = U \Sigma V^\top$ by
# (an approximation of) its polar factor $UV^\top$: every singular value is
# pushed towards 1 while the singular vectors stay. orthax does this with a
# few Newton–Schulz steps; each step with a coefficient row $(a, b, c)$ maps
#
# $$X \leftarrow aX + b\,(XX^\top)X + c\,(XX^\top)^2 X,$$
#
# which keeps $U$ and $V$ and sends every singular value through the same odd
# quintic $p(\sigma) = a\sigma + b\sigma^3 + c\sigma^5$. A *preset* is a table of
# such rows plus a normalizer that scales $X$ so that its singular values lie
# in $[0, 1]$ first.
#
# This notebook looks inside that machinery with orthax's own functions
# (`orthax.polar`):
#
# 1. the scalar map $\sigma \mapsto p_k(\cdots p_1(\sigma))$ of each preset,
#    step by step;
# 2. the distance to the exact polar factor as the number of steps grows.
#
# What changes when the iteration runs in bfloat16 is in
# `06_newton_schulz_in_bfloat16`; the soft spectral clip of the SPECTRA
# recipe, a relative of these maps, has a notebook of its own:
# `05_soft_spectral_clipping`.

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

PRESETS = ('jordan', 'dion', 'polar_express', 'polar_express_paper', 'cans',
           'aol')
for name in PRESETS:
  p = polar.get_preset(name)
  print(f'{name:20s} {len(p.coeffs)} rows, {p.steps} steps by default, '
        f'normalizer {p.normalizer}, documented band {p.band} '
        f'for inputs in [{p.domain:g}, 1]')

# %% [markdown]
# ## 1. The scalar map of each preset
#
# Because a step only acts on singular values, its effect on *any* matrix is
# described by one scalar function. To see that function we run
# `polar.newton_schulz` on **diagonal** matrices whose diagonals hold a grid
# of values in $[10^{-4}, 1]$: the singular values of a diagonal matrix are its
# diagonal, and the diagonal of the output is the map evaluated on the grid
# (the grid is cut into a batch of 50 small diagonal matrices, since
# `newton_schulz` takes a batch `[..., m, n]`). We pass `normalizer='none'` so
# that the grid is not rescaled first (normalizing is a separate stage,
# discussed below), and vary `steps` from 1 to the preset's default.

# %%
GRID = np.geomspace(1e-4, 1.0, 2000)


def scalar_map(name, steps, sigmas=GRID, batch=50):
  """σ ↦ output singular value after `steps` steps of preset `name`."""
  sigmas = jnp.asarray(sigmas, jnp.float32).reshape(batch, -1)
  diag = jax.vmap(jnp.diag)(sigmas)
  out = polar.newton_schulz(diag, name, steps=steps, normalizer='none')
  return np.asarray(jnp.diagonal(out, axis1=-2, axis2=-1)).reshape(-1)


maps = {name: [scalar_map(name, k)
               for k in range(1, polar.get_preset(name).steps + 1)]
        for name in PRESETS}

fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), sharex=True, sharey=True)
for ax, name in zip(axes.flat, PRESETS):
  p = polar.get_preset(name)
  curves = maps[name]
  colors = plt.cm.viridis(np.linspace(0.15, 0.9, len(curves)))
  for k, (y, col) in enumerate(zip(curves, colors), start=1):
    last = k == len(curves)
    ax.plot(GRID, y, color=col, lw=2.2 if last else 0.8,
            alpha=1.0 if last else 0.6,
            label=f'{k} step{"s" if k > 1 else ""}')
  ax.axhspan(*p.band, color='tab:orange', alpha=0.15,
             label='documented band')
  ax.axvline(p.domain, color='gray', ls=':', lw=1)
  ax.axhline(1.0, color='k', lw=0.6)
  ax.set_xscale('log')
  ax.set_ylim(0, 1.5)
  ax.set_title(name)
  ax.legend(fontsize=7, loc='upper left')
for ax in axes[-1]:
  ax.set_xlabel('input singular value σ')
for ax in axes[:, 0]:
  ax.set_ylabel('output singular value')
fig.suptitle('Iterated Newton–Schulz map σ ↦ p_k(…p_1(σ)), one curve per '
             'step count (dotted line: the preset\'s domain)')
fig.tight_layout()
plt.show()

# %% [markdown]
# **What to notice.**
#
# * Near zero every step is linear, $p(\sigma) \approx a\sigma$, so after $k$
#   steps a tiny singular value has only been multiplied by $a_1 a_2 \cdots
#   a_k$ (the rising left flanks) and needs several steps to reach the
#   plateau. This is why each preset states a *domain* (dotted line):
#   singular values below it are not guaranteed to arrive.
# * `jordan` reuses one row $(3.4445, -4.775, 2.0315)$ at every step. It is
#   tuned for speed at the small end, not for accuracy at the top: the final
#   curve wobbles between about 0.7 and 1.2 (0.47 at the domain's edge) and
#   **never converges to 1**, however many steps you run.
# * The other presets change the row at every step. The first rows of
#   `polar_express` and `cans` have a large slope ($a \approx 8$), so the small
#   singular values move up quickly, and later rows flatten the plateau;
#   after 5 (or 4) steps the output lies in a much tighter band around 1.
#   `dion` is flat near 1 at the top but slow at the small end (its band
#   starts at 0.47, like `jordan`'s).
# * `polar_express_paper` runs 8 rows and the final curve is flat at 1 to
#   four digits over the whole domain: it is the one preset that actually
#   converges to $UV^\top$.
# * `aol` gets away with 4 steps and a domain of $10^{-2}$ because its
#   normalizer (a row scaling computed from $XX^\top$) puts the largest singular
#   values much closer to 1 than a Frobenius-norm division does.
#
# ### The same map on a random matrix
#
# The diagonal trick is only a convenient way to evaluate the map. Here is a
# dense random matrix $X = U\,\mathrm{diag}(s)\,V^\top$ with a prescribed
# spectrum $s$ and random singular vectors, run through each Frobenius
# preset **with its real normalizer** ($X / (\text{scale}\cdot\|X\|_F +
# \varepsilon)$). The normalized singular values are known in closed form,
# and since we also know $U$ and $V$ we can read what became of each one:
# the diagonal of $U^\top\,NS(X)\,V$ (dots), on top of the scalar map at the
# default step count (line). (Sorting the output's SVD would not do: the map
# is not monotone, so it reorders the singular values.)

# %%
M, N = (64, 128) if SMOKE else (128, 256)
key = jax.random.key(0)
k_u, k_v = jax.random.split(key)
U_, _ = jnp.linalg.qr(jax.random.normal(k_u, (M, M)))
V_, _ = jnp.linalg.qr(jax.random.normal(k_v, (N, M)))
s_known = np.geomspace(1.0, 1e-3, M).astype(np.float32)
X_known = (U_ * s_known) @ V_.T

fig, ax = plt.subplots(figsize=(9, 5))
for i, name in enumerate(n for n in PRESETS if n != 'aol'):
  p = polar.get_preset(name)
  out = np.asarray(U_.T @ polar.newton_schulz(X_known, name) @ V_)
  s_out = np.diag(out)
  off = np.linalg.norm(out - np.diag(s_out)) / np.linalg.norm(out)
  s_in = s_known / (p.norm_scale * np.linalg.norm(s_known) + p.eps)
  col = f'C{i}'
  ax.plot(GRID, maps[name][-1], color=col, lw=1, label=f'{name}: scalar map')
  ax.plot(s_in, s_out, 'o', ms=3, color=col)
  # The scalar map evaluated exactly at the normalized singular values:
  gap = np.max(np.abs(scalar_map(name, p.steps, s_in, batch=1) - s_out))
  print(f'{name:20s} max |dot − scalar map| = {gap:.1e}, '
        f'off-diagonal part of Uᵀ·NS(X)·V: {off:.1e}')
ax.set_xscale('log')
ax.set_xlim(1e-4, 1)
ax.set_xlabel('normalized input singular value')
ax.set_ylabel('output singular value')
ax.set_title(f'Dots: diag(Uᵀ·newton_schulz(X)·V) for a {M}×{N} matrix '
             'X = U·diag(s)·Vᵀ')
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# The dots sit on the lines, and $U^\top NS(X) V$ is diagonal (the printed
# numbers are float32 round-off): a dense matrix with random singular vectors
# goes through exactly the scalar map of its singular values, and keeps its
# singular vectors. Note also where the dots are on the horizontal axis:
# dividing by the Frobenius norm puts even the *largest* singular value well
# below 1 (here about 0.32), because $\|X\|_F \ge \sigma_{\max}$. The right end of the curves is rarely used in
# practice; the left end, where small singular values must be lifted, is what
# the tables are designed for.

# %% [markdown]
# ## 2. Distance to the exact polar factor
#
# `polar.polar_svd` computes $UV^\top$ exactly from an SVD. We measure the
# relative error $\|NS_k(X) - UV^\top\|_F / \|UV^\top\|_F$ after $k$ steps for two
# random matrices:
#
# * a Gaussian matrix (well conditioned: with 4 times more columns than rows
#   its singular values span only about a factor of 3);
# * a matrix with singular values spread log-uniformly over $[10^{-4}, 1]$,
#   closer to what gradients and momenta look like (a few large directions and
#   a long tail of small ones).
#
# Beyond a table's length orthax repeats its last row, so every preset can be
# run for any number of steps. `steps` is passed as a traced integer (a
# `lax.fori_loop` bound), so one compilation per preset covers every step
# count.

# %%
M2, N2 = (128, 512) if SMOKE else (256, 1024)
MAX_STEPS = 10 if SMOKE else 14
k_g, k_u2, k_v2 = jax.random.split(jax.random.key(1), 3)
X_gauss = jax.random.normal(k_g, (M2, N2), jnp.float32)
U2, _ = jnp.linalg.qr(jax.random.normal(k_u2, (M2, M2)))
V2, _ = jnp.linalg.qr(jax.random.normal(k_v2, (N2, M2)))
X_decay = (U2 * jnp.geomspace(1.0, 1e-4, M2)) @ V2.T
TESTS = {'Gaussian': X_gauss, 'log-spaced spectrum [1e-4, 1]': X_decay}


def rel_err(y, ref):
  y = jnp.asarray(y, jnp.float32)
  return float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))


ns = jax.jit(polar.newton_schulz, static_argnames=('preset', 'dtype'))

STEPS = np.arange(1, MAX_STEPS + 1)
errors = {}  # (matrix, preset) -> [error per step count]
for label, X in TESTS.items():
  exact = polar.polar_svd(X)
  for name in PRESETS:
    errors[label, name] = [
        rel_err(ns(X, preset=name, steps=jnp.int32(k), dtype=jnp.float32),
                exact)
        for k in STEPS]

fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
for ax, label in zip(axes, TESTS):
  for i, name in enumerate(PRESETS):
    e = errors[label, name]
    d = polar.get_preset(name).steps
    ax.plot(STEPS, e, '-', color=f'C{i}', label=name)
    ax.plot([d], [e[d - 1]], 'o', color=f'C{i}', ms=7)
  ax.set_yscale('log')
  ax.set_xlabel('Newton–Schulz steps')
  ax.set_title(f'{label} ({M2}×{N2}, float32)')
  ax.grid(alpha=0.3)
axes[0].set_ylabel('‖NS(X) − UVᵀ‖_F / ‖UVᵀ‖_F')
axes[0].legend()
fig.suptitle('Error against the exact polar factor (dot: the preset\'s '
             'default step count)')
fig.tight_layout()
plt.show()

print('error at the default step count (float32):')
for name in PRESETS:
  d = polar.get_preset(name).steps
  print(f'  {name:20s} ' + '   '.join(
      f'{label}: {errors[label, name][d - 1]:.4f}'
      for label in TESTS))

# %% [markdown]
# **What to notice.**
#
# * The first steps can make the error *worse*: a preset with a steep first
#   row overshoots the largest singular values (the curves of section 1 go
#   above 1), and later rows bring them back.
# * Most presets level off when run longer: `jordan` (one fixed row) keeps
#   oscillating around an error of about 0.2 and `dion` stops near 1%,
#   because repeating their last row never makes the map flat at 1. Polar Express's deployed table (`polar_express`, 5 rows)
#   converges, when its last row is repeated, to about $1.035\,UV^\top$, so its
#   error floor is about 3.5%; `cans` behaves alike.
# * `polar_express_paper` drops to float32 round-off once its 8 rows are used.
# * On the log-spaced spectrum every curve is higher: the singular values
#   near $10^{-4}$ lie below every preset's domain and are still far from 1
#   after the default number of steps. Those directions are the ones a few
#   extra steps buy.
#
# For optimization, the band matters more than the exact error: Muon only
# needs every direction of the update to get a step of roughly the same size,
# and the 5-step presets trade exactness for speed on purpose.
