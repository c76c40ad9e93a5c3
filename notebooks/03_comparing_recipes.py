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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/orthax/orthax/blob/main/notebooks/03_comparing_recipes.ipynb)
#
# # Comparing recipes: AdamW, Muon, NorMuon, NAMO, SPECTRA
#
# The papers behind orthax's recipes all make the same kind of claim: *this
# optimizer reaches a given loss in fewer steps (or tokens) than AdamW.* This
# notebook sets up that measurement on a model small enough for a CPU, with
# `orthax.train.compare`:
#
# | optimizer | matrix step | paper |
# |---|---|---|
# | `adamw` | AdamW on every parameter (the baseline) | |
# | `muon` | Nesterov momentum → Newton–Schulz ≈ $UV^\top$ | K. Jordan (2024) |
# | `normuon` | Muon + a per-neuron running RMS that evens out the rows of the step | Li et al., arXiv 2510.05491 |
# | `namo` | orthogonalized momentum with an Adam-style, noise-adaptive step size per matrix | Zhang et al., arXiv 2602.17080 |
# | `spectra` | AdamW's step with its large singular values softly clipped, $\sigma \mapsto \sigma/\sqrt{1+\sigma^2/c^2}$ | Jiang et al., arXiv 2603.14315 |
#
# For the first four, the embeddings, the LM head and the norm scales go to
# an AdamW branch (see `01_quickstart` for the routing table); SPECTRA clips
# AdamW's own step on every parameter.
#
# Every run uses the same model, initialization, batches (a pure function of
# the seed and the step) and schedule shape (warm-up, then cosine decay to
# 10 %); only the optimizer and its peak learning rate change.

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
                  'orthax-optim[notebooks]'],
                 check=True)
  for module in [m for m in sys.modules if m.split('.')[0] == 'orthax']:
    del sys.modules[module]
  importlib.invalidate_caches()
  if not has_orthax_optim():
    raise ImportError('orthax-optim did not install; restart the runtime '
                      'and run this cell again.')

# %%
import os
import time

import jax
import matplotlib.pyplot as plt
from IPython.display import Markdown
from IPython.display import display

import orthax
from orthax.train import compare
from orthax.train import configs

# ORTHAX_SMOKE=1 (set by the tests) trains a tiny model for a few steps.
SMOKE = os.environ.get('ORTHAX_SMOKE') == '1'

print('orthax', orthax.__version__, 'jax', jax.__version__)
print('devices:', jax.devices())
print('smoke mode:', SMOKE)

# %% [markdown]
# ## The setup
#
# `configs.base_config()` is the trainer's default: a byte-level GPT with
# 4 layers of width 128 (0.85 M parameters) on the text of Python's help
# pages, batches of 16 × 128 bytes, 200 steps. `compare.run` replaces its
# `optimizer` section for each run and sets every optimizer's main peak
# learning rate to `scale ×` its default in `configs.LEARNING_RATES` (the
# recipes' AdamW branch keeps 3e-3).
#
# One learning rate per optimizer is not a fair fight: an optimizer can lose
# only because its default rate suits this model worse. `LR_SCALES = (0.5,
# 1.0, 2.0)` runs a small sweep (three times as long) and represents each
# optimizer by its best scale. The full run below took 4 minutes on 2 CPU
# cores with one scale (much less on an accelerator).

# %%
OPTIMIZERS = ('adamw', 'muon', 'normuon', 'namo', 'spectra')

base = configs.base_config()
if SMOKE:
  base.model.update(d_model=32, num_layers=2, num_heads=2, seq_len=32)
  base.data.batch_size = 8
  base.train.update(log_every=2, eval_batches=2)
  STEPS, EVAL_EVERY, LR_SCALES = 12, 4, (1.0,)
else:
  STEPS, EVAL_EVERY, LR_SCALES = 200, 20, (1.0,)

print('peak learning rates (main branch, AdamW branch):')
for name in OPTIMIZERS:
  print(f'  {name:8s} {configs.LEARNING_RATES[name]}')

# %%
t0 = time.perf_counter()
results = compare.run(base, OPTIMIZERS, LR_SCALES, steps=STEPS,
                      eval_every=EVAL_EVERY, progress=True)
print(f'{len(results)} runs in {time.perf_counter() - t0:.0f} s')

# %% [markdown]
# ## Loss curves
#
# Left: the training loss at every log point (one batch each, so noisy).
# Right: the validation loss, measured on the same held-out bytes every
# `EVAL_EVERY` steps; the dashed line is AdamW's final validation loss, the
# target of the table below. Where a curve crosses the dashed line is how
# many steps that optimizer needs to match what AdamW reaches at the end.

# %%
best = compare.best_runs(results)
target = best['adamw']['final_val_loss']

fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.2))
for name, r in best.items():
  label = f"{name} (lr {r['learning_rate']:.3g})"
  line, = ax_t.plot(r['train_steps'], r['train_loss'], lw=1.2, label=label)
  ax_v.plot(r['eval_steps'], r['val_loss'], 'o-', ms=4,
            color=line.get_color(), label=label)
ax_v.axhline(target, color='k', ls='--', lw=0.8, label='AdamW final')
ax_t.set_title('training loss')
ax_v.set_title('validation loss')
for ax in (ax_t, ax_v):
  ax.set_xlabel('step')
  ax.set_ylabel('loss (nats / byte)')
  ax.grid(alpha=0.3)
ax_v.legend()
plt.show()

# %% [markdown]
# ## Steps to AdamW's loss
#
# `compare.table` lists every run (the best scale of each optimizer is
# marked `*`):
#
# * **final val loss** — after all steps;
# * **steps to AdamW** — the step at which the run's validation loss
#   reaches the best AdamW run's *final* one (linear between the two
#   evaluations around it, `EVAL_EVERY` apart): the papers'
#   training-efficiency measure; "—" means never within the run;
# * **tokens/s** — training throughput (the orthogonalized recipes pay for
#   their Newton–Schulz matmuls here; the timer runs through the periodic
#   evaluations too, so compare this column between rows, not with other
#   measurements);
# * **optimizer state** — AdamW keeps two moments per parameter; Muon keeps
#   one momentum for the matrices (plus AdamW's two for the rest); NorMuon
#   adds one number per neuron.

# %%
display(Markdown(compare.table(results)))

# %%
adamw_steps = compare.steps_to(best['adamw'], target)
print(f"AdamW's final validation loss {target:.4f} "
      f'(reached at step {adamw_steps:.0f})\n')
for name, r in sorted(best.items(), key=lambda kv: kv[1]['final_val_loss']):
  s = compare.steps_to(r, target)
  if s is None:
    speed = 'never'
  elif name == 'adamw':
    speed = f'step {s:4.0f}  (the baseline)'
  else:
    speed = f'step {s:4.0f}  (speed-up over AdamW: {adamw_steps / s:.2f}x)'
  print(f"{name:8s} final {r['final_val_loss']:.4f}   reaches target: "
        f'{speed}')

# %% [markdown]
# ## How to read this
#
# Look at the **ordering**: which optimizers end below the dashed line, and
# which cross it before the last step. In the papers, the orthogonalized
# optimizers reach AdamW's loss in fewer steps, and the variants (NorMuon's
# per-neuron normalization, NAMO's adaptive step size, SPECTRA's clipping)
# improve on plain Muon or AdamW by smaller margins still.
#
# Do **not** read the sizes of the gains off this run. The papers measure
# models of hundreds of millions to billions of parameters trained on
# billions of tokens, with learning rates tuned per optimizer and often
# several seeds. Here a 0.85 M-parameter model sees about 400 k bytes (about
# one pass over the training text), every optimizer gets a single default
# learning rate, there is one seed, and "steps to AdamW" is only resolved to
# `EVAL_EVERY` steps. Differences of a few hundredths of a nat in the final
# loss may well be within what another seed or learning rate would change. The
# throughput column is a CPU's: on an accelerator the Newton–Schulz matmuls
# are a much smaller share of a step of a large model.
#
# **What we saw** running the full version on 2 CPU cores (each optimizer at
# its default rate of 2026-12-06: Muon's and NorMuon's 0.0566, NAMO's 0.226;
# one seed; your numbers on other hardware will differ in the last digits):
# NorMuon, NAMO and Muon ended at 1.442, 1.444 and 1.445 and reached AdamW's
# final loss at steps 97, 93 and 95 of 200 (about 2× fewer steps,
# interpolated between evaluations 20 steps apart); SPECTRA ended at 1.492
# (step 106). These defaults come from the
# library's learning-rate sweep on this model (README); at its papers' rates
# NAMO ends near 2.04, because a paper's rate is tuned for the paper's model
# and scale convention (docs/training.md, "Reference modes"). This is exactly
# why a comparison at a single rate shows orderings that a sweep can
# overturn.
#
# In smoke mode (`ORTHAX_SMOKE=1`, 12 steps of a 2-layer width-32 model) the
# numbers only show that everything runs.
#
# To go further: sweep the learning rate (`LR_SCALES`), train longer
# (`STEPS`), add recipes (`orthax.recipe_names()`: `namo_d`, `root`, `auon`,
# `hybrid_auon`, `lanton`, `aro`, `fismo`, `dct_adamw`, `trion`), or run the same comparison from the command line
# with `python scripts/compare.py --optimizers=adamw,muon,normuon
# --lr_scales=0.5,1,2`, which also writes the table, the raw results
# (JSON) and the plot to a directory.
