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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/orthax/orthax/blob/main/notebooks/01_quickstart.ipynb)
#
# # Quickstart: orthogonalized optimizers on a small GPT
#
# orthax splits a model's parameters into two groups. The hidden weight
# matrices (attention and MLP kernels) get an **orthogonalized** step: the
# momentum of their gradient is replaced by (an approximation of) its polar
# factor $UV^\top$, so every direction of the matrix moves by about the same
# amount. Everything else (embeddings, the LM head, norm scales) gets AdamW.
# Each stage of that pipeline is an ordinary Optax
# `GradientTransformation`, so a recipe such as Muon or NorMuon is just a
# chain of them.
#
# In this notebook we
#
# 1. build a small byte-level GPT in Flax NNX (`orthax.train.model`) and ask
#    orthax how it routes each parameter;
# 2. chain orthax's primitives into an optimizer of our own and take a few
#    steps with a plain `jax.jit` training step;
# 3. train the same model with a named recipe (NorMuon) through the
#    reference trainer `orthax.train`, on text that ships with Python (no
#    download), and plot the loss;
# 4. sample some text from the trained model.
#
# Everything runs on a CPU in about five minutes (most of it the training in
# part 3); on a GPU or TPU runtime it is faster with no change.

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
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import orthax
from orthax.train import configs
from orthax.train import data
from orthax.train import model
from orthax.train import step as step_lib
from orthax.train import trainer

# ORTHAX_SMOKE=1 (set by the tests) shrinks the model and the step counts.
SMOKE = os.environ.get('ORTHAX_SMOKE') == '1'

print('orthax', orthax.__version__, 'jax', jax.__version__)
print('devices:', jax.devices())
print('smoke mode:', SMOKE)

# %% [markdown]
# ## 1. A small GPT and how orthax sees it
#
# `orthax.train.model.GPT` is a pre-norm decoder written in Flax NNX. Its
# blocks are created with `nnx.vmap`, so each block parameter is **one**
# array with a leading layer axis: the four query kernels of a 4-layer model
# are a single `(4, d, d)` leaf. The tokens are the UTF-8 bytes of the text
# (vocabulary 256).

# %%
if SMOKE:
  MODEL = dict(seq_len=32, d_model=32, num_layers=2, num_heads=2)
else:
  MODEL = dict(seq_len=128, d_model=128, num_layers=4, num_heads=4)
cfg = model.GPTConfig(vocab_size=data.VOCAB_BYTES, **MODEL)

gpt = model.GPT(cfg, rngs=nnx.Rngs(0))
tokens = jnp.asarray(data.encode_bytes('Hello, orthax!'), jnp.int32)[None]
print('logits:', gpt(tokens).shape)  # [batch, time, vocab]

# %% [markdown]
# For training we keep the parameters as a plain nested dict of arrays:
# `model.create` splits the same module into its structure (`graphdef`), a
# template of its state, and the parameter dict, and `model.apply` merges them
# back for a forward pass. Optax and orthax only ever see the dict.
#
# `orthax.describe` prints the routing table: the label of every leaf
# (`matrix` → orthogonalized branch, `adam` → AdamW branch) and, for
# matrices, the view it is orthogonalized as. `L x in x out` means a stack of
# `L` independent `in × out` matrices — one per layer, not one big tensor.

# %%
graphdef, abstract_state, params = model.create(cfg, seed=0)
print(f'{model.num_params(params):,} parameters\n')
_ = orthax.describe(params)

# %% [markdown]
# ## 2. An optimizer from primitives
#
# A recipe is an `optax.partition` over the labels an `orthax.Router`
# gives: one chain for the matrices, AdamW for the rest. Here is a NorMuon-like
# matrix chain built by hand:
#
# | stage | what it does to each matrix $G$ (per layer) |
# |---|---|
# | `orthax.momentum` | EMA momentum with a Nesterov look-ahead |
# | `orthax.orthogonalize` | a few Newton–Schulz steps (the Polar Express table) → ≈ $UV^\top$ |
# | `orthax.neuron_normalize` | divides each output neuron by a running RMS of its step, then restores the matrix's norm |
# | `orthax.scale_by_shape` | $\sqrt{\max(1, \text{out}/\text{in})}$, so wide and tall matrices move alike |
# | `optax.scale_by_learning_rate` | $-\eta$ |
# | `orthax.decoupled_weight_decay` | $W \leftarrow W(1 - \eta\lambda)$ |
#
# The router's `specs` tell the stages that work on whole matrices how each
# leaf is one (the `view` column above), so the stacked `(L, in, out)` kernels
# are orthogonalized layer by layer.

# %%
MATRIX_LR, ADAM_LR, WEIGHT_DECAY = 0.02, 3e-3, 0.01

router = orthax.Router()
matrix_branch = optax.named_chain(
    ('momentum', orthax.momentum(0.95, nesterov=True)),
    ('orthogonalize', orthax.orthogonalize('polar_express',
                                           matrix_specs=router.specs)),
    ('neuron_normalize', orthax.neuron_normalize(0.95,
                                                 matrix_specs=router.specs)),
    ('scale_by_shape', orthax.scale_by_shape('keller',
                                             matrix_specs=router.specs)),
    ('scale_by_learning_rate', optax.scale_by_learning_rate(MATRIX_LR)),
    ('decoupled_weight_decay', orthax.decoupled_weight_decay(
        WEIGHT_DECAY, learning_rate=MATRIX_LR)),
)
tx = optax.partition(
    {'matrix': matrix_branch,
     'adam': optax.adamw(ADAM_LR, b1=0.9, b2=0.95, weight_decay=0.0)},
    router.labels)

# %% [markdown]
# A training step is the usual Optax pattern. `step_lib.loss_fn` is the
# trainer's next-token cross-entropy (`model.apply` + softmax cross-entropy);
# the batches are random windows of the embedded corpus, the help pages of
# Python's documentation (`pydoc_data`, about 466 KB of text).

# %%
train_data, val_data, _ = data.make_loaders(batch_size=8 if SMOKE else 16,
                                            seq_len=cfg.seq_len)


@jax.jit
def train_step(params, opt_state, batch):
  loss, grads = jax.value_and_grad(
      lambda p: step_lib.loss_fn(graphdef, abstract_state, p, batch))(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, grads, updates


p, opt_state = params, tx.init(params)
for i in range(5 if SMOKE else 20):
  p, opt_state, loss, grads, updates = train_step(p, opt_state,
                                                  train_data.batch(i))
  print(f'step {i + 1:2d}  loss {float(loss):.3f}')

# %% [markdown]
# The first loss is a little above $\ln 256 \approx 5.55$ nats, the loss of a
# uniform guess over bytes; it drops within a few steps.
#
# What did the matrix branch do to the gradient? Compare the singular values
# of a raw gradient with those of the update (divided by $-\eta$) for two
# matrices of the first layer. The gradient's spectrum falls off steeply: one
# to three directions carry almost all of it. In the update most singular
# values sit near the largest one: the orthogonalization gives every
# direction a step of about the same size. What is left is a little spread
# from the per-neuron normalization, and (in the square attention kernels) a
# tail of directions that the momentum hardly contains, which five
# Newton–Schulz steps amplify but cannot lift all the way.

# %%
def spectrum(x):
  s = np.linalg.svd(np.asarray(x), compute_uv=False)
  return s / s[0]


fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for ax, (part, name) in zip(axes, [('attn', 'query'), ('mlp', 'fc1')]):
  s_g = spectrum(grads['blocks'][part][name]['kernel'][0])
  s_u = spectrum(updates['blocks'][part][name]['kernel'][0] / -MATRIX_LR)
  ax.semilogy(s_g, '.-', label='gradient')
  ax.semilogy(s_u, '.-', label='update / (-η)')
  ax.set_xlabel('singular value index')
  ax.set_ylabel('σ / σ_max')
  ax.set_title(f'layer 0 {name} kernel')
  ax.legend()
  ax.grid(alpha=0.3)
  print(f'{name:6s} singular values >= σ_max / 2:  gradient '
        f'{(s_g >= 0.5).sum():3d}   update {(s_u >= 0.5).sum():3d}   '
        f'(of {s_u.size})')
plt.show()

# %% [markdown]
# ## 3. A named recipe through the trainer
#
# The recipes bundle such chains with the defaults of their reference
# implementations: `orthax.muon(...)`, `orthax.normuon(...)`,
# `orthax.recipe('namo', ...)` and so on (`orthax.recipe_names()`). You can
# use them exactly like `tx` above. Here we hand one to the reference
# trainer instead, which adds what a real run needs: a warm-up + cosine
# learning-rate schedule on every branch, periodic evaluation on held-out
# text, logging, and (optionally) checkpoints and a device mesh.
#
# The trainer takes an `ml_collections.ConfigDict`;
# `configs.base_config(name)` holds every key with its default (the same
# byte-level GPT on the embedded corpus) and the peak learning rates of
# `configs.LEARNING_RATES`.

# %%
print(orthax.recipe_names())

config = configs.base_config('normuon')
config.model.update(**MODEL)
if SMOKE:
  config.data.batch_size = 8
  config.train.update(steps=20, log_every=2, eval_every=10, eval_batches=2)
  config.schedule.warmup_steps = 2
else:
  config.train.update(steps=300, log_every=10, eval_every=25)
print(config.optimizer)

# %%
t0 = time.perf_counter()
out = trainer.train(config)
print(f'{time.perf_counter() - t0:.0f} s')
print({k: round(v, 4) if isinstance(v, float) else v
       for k, v in out['summary'].items()})

# %%
fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 3.8))
ax.plot([r['step'] for r in out['train']], [r['loss'] for r in out['train']],
        alpha=0.5, label='train (one batch)')
ax.plot([r['step'] for r in out['eval']], [r['val_loss'] for r in out['eval']],
        'o-', label='validation')
ax.set_xlabel('step')
ax.set_ylabel('loss (nats / byte)')
ax.set_title('NorMuon on the embedded corpus')
ax.legend()
ax.grid(alpha=0.3)
for key in ('lr/matrix', 'lr/adam'):
  ax_lr.plot([r['step'] for r in out['train']], [r[key] for r in out['train']],
             label=key)
ax_lr.set_xlabel('step')
ax_lr.set_title('learning rate per branch')
ax_lr.legend()
ax_lr.grid(alpha=0.3)
plt.show()

# %% [markdown]
# ## 4. Sampling
#
# The trainer returns its final `TrainState`; its `params` is the same kind
# of nested dict as before, so `model.apply` runs it. To sample we keep a
# fixed-length window of `seq_len` bytes, so the forward pass compiles once:
# the model is causal, so the logits at position $n-1$ only depend on the
# first $n$ bytes and whatever sits after them in the buffer does not matter.
# When the window is full it slides by one byte (RoPE positions are
# relative, so that is harmless).

# %%
@jax.jit
def next_token(params, window, n, key, temperature):
  logits = model.apply(graphdef, abstract_state, params, window[None])[0]
  logits = jax.lax.dynamic_index_in_dim(logits, n - 1, keepdims=False)
  sampled = jax.random.categorical(key, logits / jnp.maximum(temperature,
                                                             1e-6))
  return jnp.where(temperature > 0, sampled, jnp.argmax(logits))


def sample(params, prompt, num_bytes, temperature=0.8, seed=0):
  """Continues ``prompt`` by ``num_bytes`` bytes (temperature 0: greedy)."""
  ids = list(data.encode_bytes(prompt)[-cfg.seq_len:])
  key = jax.random.key(seed)
  for _ in range(num_bytes):
    window = ids[-cfg.seq_len:]
    n = len(window)
    buf = np.zeros(cfg.seq_len, np.int32)
    buf[:n] = window
    key, sub = jax.random.split(key)
    ids.append(int(next_token(params, buf, n, sub, temperature)))
  text = data.decode_bytes(ids)
  # Random bytes include control characters: show them as '·'.
  return ''.join(c if c.isprintable() or c == '\n' else '·' for c in text)


PROMPT = 'The return statement'
N_BYTES = 60 if SMOKE else 250
trained = out['state'].params
print('--- untrained model ---')
print(sample(params, PROMPT, N_BYTES))
print('\n--- after training, temperature 0.8 ---')
print(sample(trained, PROMPT, N_BYTES))
print('\n--- after training, greedy ---')
print(sample(trained, PROMPT, N_BYTES, temperature=0.0))

# %% [markdown]
# The untrained model emits random bytes. After 300 steps (about 600 k
# bytes, one and a half passes over the training text) the byte-level
# model spells most common words, puts spaces and punctuation in plausible
# places and copies the layout of the help pages (quoted `"names"`, indented
# lines, PEP references); it does not make sense yet. Greedy decoding tends to
# fall into a loop, since the most likely next byte keeps leading back into
# the same phrase; sampling at a temperature avoids that. (In smoke mode, 20
# steps of a tiny model, the samples stay mostly noise.)
#
# ## Where next
#
# * `02_anatomy_of_orthogonalization` — what the Newton–Schulz presets do to
#   singular values;
# * `03_comparing_recipes` — AdamW against Muon, NorMuon, NAMO and SPECTRA
#   on this same model, with the steps each needs to reach AdamW's loss;
# * `04_sharding_walkthrough` — the same update on a device mesh;
# * `05_soft_spectral_clipping` — SPECTRA's soft clip of the singular values;
# * `06_newton_schulz_in_bfloat16` — what bfloat16 does to each preset.
#
# Recipes also work with `nnx.Optimizer(model, tx, wrt=nnx.Param)` if you
# prefer to keep the NNX module stateful, and under
# `optax.inject_hyperparams` or `optax.MultiSteps`.
