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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/orthax/orthax/blob/main/notebooks/04_sharding_walkthrough.ipynb)
#
# # Sharded Newton–Schulz, step by step
#
# Newton–Schulz needs **whole** matrices: every step multiplies $X$ by
# $XX^\top$, which mixes all rows and columns. When the parameters (and so the
# gradients and the momentum) are sharded across devices, e.g. FSDP-style
# with each device holding a slice of rows, a compiler left to itself
# (GSPMD) keeps the slices where they are and inserts collectives inside
# every step: all-gathers and all-reduces of large blocks, several per
# matrix per step.
#
# `orthax.sharding` instead moves whole matrices to devices: per group of
# same-shape matrices, one fused `all_to_all` gives every device a few
# complete matrices, each device runs the ordinary single-device
# Newton–Schulz on them, and the inverse `all_to_all` sends the results back
# in the parameters' own sharding. This notebook
#
# 1. builds GPT-2 small's hidden matrices on an 8-device mesh,
# 2. prints the static plan orthax makes for them,
# 3. compiles one optimizer update with `optax.contrib.muon` and with
#    `orthax.muon(..., distributed=...)` and counts the collectives and bytes
#    in the compiled programs,
# 4. checks that the distributed update equals the single-device one.
#
# **Devices.** The first code cell asks XLA for 8 *fake* CPU devices; this
# only works before JAX is imported, so after changing it restart the
# runtime. If the runtime has at least 8 accelerator devices (e.g. a Colab TPU
# with 8 cores) those are used instead, with no other change. The fake
# devices share the host's cores, so the timings printed here say nothing
# about real hardware; the collectives and byte counts do.

# %%
import os

# Must run before JAX is imported (orthax imports it).
_FLAG = '--xla_force_host_platform_device_count=8'
if _FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' +
                             _FLAG).strip()

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
                  'orthax-optim'],
                 check=True)
  for module in [m for m in sys.modules if m.split('.')[0] == 'orthax']:
    del sys.modules[module]
  importlib.invalidate_caches()
  if not has_orthax_optim():
    raise ImportError('orthax-optim did not install; restart the runtime '
                      'and run this cell again.')

# %%
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import orthax
from orthax.benchmarking import gpt2_hidden_kernels
from orthax.benchmarking import is_shape
from orthax.benchmarking import random_tree
from orthax.matrices import MatrixSpec
from orthax.sharding import hlo

# ORTHAX_SMOKE=1 (set by the tests) compiles and runs only 2 of GPT-2 small's
# 12 layers: the GSPMD compile of optax's update and the 8 fake devices on a
# small CPU are slow.
SMOKE = os.environ.get('ORTHAX_SMOKE') == '1'
LAYERS = 2 if SMOKE else 12

print('orthax', orthax.__version__, 'jax', jax.__version__)
print('devices:', jax.devices())
DEVICES = jax.devices() if len(jax.devices()) >= 8 else jax.devices('cpu')
assert len(DEVICES) >= 8, (
    'need 8 devices: restart the runtime so that XLA_FLAGS above takes effect')
DEVICES = DEVICES[:8]
print(f'using {len(DEVICES)} {DEVICES[0].platform} devices; '
      f'smoke mode: {SMOKE}, layers: {LAYERS}')

# %% [markdown]
# ## 1. The parameters
#
# `gpt2_hidden_kernels` gives the shapes of GPT-2 small's hidden matrices as
# Flax kernels `(in, out)`: per layer the attention's `c_attn` (768×2304) and
# `c_proj` (768×768), the MLP's `c_fc` (768×3072) and `c_proj` (3072×768).
# These are the parameters Muon orthogonalizes (embeddings, biases and norms
# go to AdamW and are left out here).
#
# We shard every kernel FSDP-style over a mesh axis `fsdp` of size 8: each
# device holds 1/8 of the rows, `P('fsdp', None)`. Gradients and parameters
# are random; only their shapes and shardings matter.

# %%
mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(AxisType.Auto,),
                     devices=DEVICES)
shapes = gpt2_hidden_kernels(LAYERS)
specs = jax.tree.map(lambda s: P('fsdp', None), shapes, is_leaf=is_shape)


def put(tree):
  return jax.tree.map(
      lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)


grads_host = random_tree(shapes, jax.random.key(0))
params_host = random_tree(shapes, jax.random.key(1))
grads, params = put(grads_host), put(params_host)

w = grads['h00']['mlp']['c_fc']['kernel']
n = sum(x.size for x in jax.tree.leaves(grads))
print(f'{len(jax.tree.leaves(grads))} matrices, {n / 1e6:.1f}M entries')
print('h00/mlp/c_fc/kernel:', w.shape, w.sharding.spec, '-> each device holds',
      w.addressable_shards[0].data.shape)

# %% [markdown]
# ## 2. The plan
#
# `orthax.sharding.Distributed(mesh, param_specs)` describes the layout;
# `orthax.sharding.plan` turns it into a static plan from shapes and
# `PartitionSpec`s alone, so it can be printed before anything is compiled.
# The plan below is for all 12 layers (it costs nothing), whatever the smoke
# setting.

# %%
dist = orthax.sharding.Distributed(mesh, specs)
full_shapes = gpt2_hidden_kernels(12)
full_specs = jax.tree.map(lambda s: P('fsdp', None), full_shapes,
                          is_leaf=is_shape)


def abstract(shape_tree, dtype=jnp.float32):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shape_tree,
                      is_leaf=is_shape)


full_plan = orthax.sharding.plan(orthax.sharding.Distributed(mesh, full_specs),
                                 abstract(full_shapes))
print(full_plan)

# %% [markdown]
# How to read it, row by row:
#
# * **group**: same-shape matrices that travel and are orthogonalized
#   together. Matrices are handled in the wide orientation ($m \le n$), so the
#   MLP's `c_proj` (3072×768) is seen as a transposed 768×3072 matrix. It
#   still gets its own group because its `fsdp` slices now cut the *columns*:
#   the split axes column reads `rows|columns`, `fsdp|-` versus `-|fsdp`.
# * **count / local / padded**: 12 matrices per group; each `all_to_all` must
#   hand every device the same number of whole matrices, so the stack is
#   padded with zero matrices to 16 = 2 per device (Newton–Schulz maps zero to
#   zero, so padding is exact; it costs FLOPs, not correctness).
# * **strategy** `a2a`: one `all_to_all` in, local Newton–Schulz, one out:
#   **coll. = 2** per group, 8 in all.
# * **GFLOP/dev, MiB/dev**: the Newton–Schulz FLOPs each device runs (5 steps,
#   padding included) and the bytes each device sends, here in bfloat16, the
#   default wire dtype (`comm_dtype`).
#
# Other layouts get other strategies. With tensor parallelism on top (kernels
# sharded over both mesh axes, `P('fsdp', 'tp')`), one fused `all_to_all` over
# both axes still suffices. With scan-stacked layers `(12, m, n)` whose *layer*
# axis is sharded, every device already holds whole matrices and the
# strategy is `local`: no collective at all. (Its FLOPs per device are higher:
# the two `tp` devices that hold the same layers both orthogonalize them.)
# A matrix too large for one device (over `max_local_matrix_bytes`, 2 GiB by
# default) whose long side is sharded runs `gram`: each device keeps its
# column block and the small `m×m` Gram matrix is summed across devices at
# every step — exact, but one all-reduce per step instead of two
# all-to-alls in all, so `auto` keeps it for matrices that do not fit.

# %%
mesh2 = jax.make_mesh((4, 2), ('fsdp', 'tp'),
                      axis_types=(AxisType.Auto,) * 2, devices=DEVICES)
tp_specs = jax.tree.map(lambda s: P('fsdp', 'tp'), full_shapes,
                        is_leaf=is_shape)
print(orthax.sharding.plan(orthax.sharding.Distributed(mesh2, tp_specs),
                           abstract(full_shapes)))
print()

scan_shapes = {'attn_c_attn': (12, 768, 2304), 'attn_c_proj': (12, 768, 768),
               'mlp_c_fc': (12, 768, 3072), 'mlp_c_proj': (12, 3072, 768)}
scan_specs = {k: P('fsdp', None, None) for k in scan_shapes}
print(orthax.sharding.plan(orthax.sharding.Distributed(mesh2, scan_specs),
                           abstract(scan_shapes),
                           {k: MatrixSpec.stacked(0) for k in scan_shapes}))

# %%
# The plan of an optimizer as built: `plan(tx, abstract_params)` traces its
# update with `jax.eval_shape` (nothing is compiled). The same groups as
# above, and a few more bytes and collectives: the all-gather of NorMuon's
# per-neuron state from each group's owner devices; fewer FLOPs, since
# normuon's default `method='auto'` runs the Gram iteration on the
# rectangular matrices.
normuon = orthax.recipe('normuon', learning_rate=0.02,
                        distributed=orthax.sharding.Distributed(mesh,
                                                                full_specs))
print(orthax.sharding.plan(normuon, abstract(full_shapes)))

# %% [markdown]
# ## 3. The compiled programs
#
# Now a real optimizer update, jitted on the sharded arrays, for
# `optax.contrib.muon` (which leaves the partitioning to GSPMD) and for
# `orthax.muon(..., distributed=dist)`. `orthax.sharding.hlo.measure` lowers
# and compiles a jitted function and reads the collectives off the per-device
# program, with the bytes each device sends (ring formulas). XLA:CPU widens
# bfloat16 collectives to float32 when it compiles, so for orthax we also
# report the bytes of the *lowered* program, which keeps the bfloat16 the
# program asks for.

# %%
def compiled_update(tx):
  state = tx.init(params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p)[0])
  return update, state


def measure(name, tx):
  t0 = time.perf_counter()
  update, state = compiled_update(tx)
  m = hlo.measure(update, grads, state, params)
  kinds = ', '.join(f"{k} ×{v['count']}" for k, v in sorted(
      m['summary'].items())) or 'none'
  count = sum(v['count'] for v in m['summary'].values())
  print(f'{name}: compiled in {time.perf_counter() - t0:.1f} s')
  return dict(name=name, update=update, state=state, kinds=kinds, count=count,
              mib=m['wire_bytes'] / 2**20,
              lowered_mib=m['lowered_wire_bytes'] / 2**20,
              temp_mib=(m['temp_bytes'] or 0) / 2**20)


rows = [
    measure('optax.contrib.muon (GSPMD)', optax.contrib.muon(0.02)),
    measure('orthax.muon, distributed', orthax.muon(0.02, distributed=dist)),
]
print()
print(f'{LAYERS} layers on {len(DEVICES)} devices, per device:')
print(f'{"":28s} {"collectives":>11s}  {"MiB sent":>9s} '
      f'{"(lowered)":>9s} {"temp MiB":>9s}  kinds')
for r in rows:
  print(f"{r['name']:28s} {r['count']:11d}  {r['mib']:9.1f} "
        f"{r['lowered_mib']:9.1f} {r['temp_mib']:9.0f}  {r['kinds']}")
optax_row, orthax_row = rows
print(f"orthax: {optax_row['count'] / orthax_row['count']:.0f}× fewer "
      f"collectives, {optax_row['mib'] / orthax_row['mib']:.0f}× fewer bytes "
      f"in float32 (as compiled here), "
      f"{optax_row['mib'] / orthax_row['lowered_mib']:.0f}× fewer with its "
      f"default bfloat16 wire")

# %% [markdown]
# **What to notice.**
#
# * optax's program is full of all-gathers and all-reduces: GSPMD keeps each
#   matrix split by rows, so every Newton–Schulz step gathers blocks to form
#   $XX^\top$ and reduces partial products, for every matrix separately (the
#   lowered program has none: they are all inserted by the partitioner).
# * orthax's program has exactly the plan's 8 all-to-alls (2 per group), plus
#   a few tiny all-reduces: the finiteness checks of `check_finite=True` (of
#   the gradient, and of the step's update and state), a few bytes of flags
#   per leaf. The bytes are what the plan predicted: in float32 as
#   compiled for the CPU, half of that in bfloat16 (the lowered column), which
#   is what a GPU or TPU sends.
# * The ratios grow with the number of layers: orthax's collective count
#   stays at 8 all-to-alls plus the flags' all-reduces (one `all_to_all` pair
#   per group, however many matrices the group has), optax's grows with every
#   matrix. With all 12 layers (run without smoke mode) this cell measures
#   601 collectives against about ten,
#   and about 26× fewer bytes in float32, over 50× with the bfloat16 wire.

# %% [markdown]
# ## 4. Same numbers as on one device
#
# Distributing must not change the result. We run the distributed update with
# float32 on the wire (then the only difference from one device is the
# order of floating-point operations) and with the default bfloat16 wire
# (matrices are rounded to bfloat16 on the way, so expect differences of the
# order of bfloat16's precision relative to the update's size), and compare
# both with `orthax.muon` on a single device. (Smoke mode runs only the
# bfloat16 wire, reusing the update compiled above: on 8 fake devices
# sharing a small CPU each distributed run takes a while.)

# %%
single = orthax.muon(0.02)
g1 = jax.device_put(grads_host, DEVICES[0])
p1 = jax.device_put(params_host, DEVICES[0])
reference, _ = jax.jit(single.update)(g1, single.init(p1), p1)
scale = max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(reference))
print(f'largest |update| entry on one device: {scale:.3e}')

for comm in (jnp.bfloat16,) if SMOKE else (jnp.float32, jnp.bfloat16):
  t0 = time.perf_counter()
  if comm == dist.comm_dtype:  # the default, compiled in section 3
    update, state = rows[1]['update'], rows[1]['state']
  else:
    d = orthax.sharding.Distributed(mesh, specs, comm_dtype=comm)
    update, state = compiled_update(orthax.muon(0.02, distributed=d))
  out = update(grads, state, params)
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(reference)))
  same_sharding = all(
      u.sharding.is_equivalent_to(p.sharding, u.ndim)
      for u, p in zip(jax.tree.leaves(out), jax.tree.leaves(params)))
  print(f'wire {jnp.dtype(comm).name:8s}: max |distributed − single| = '
        f'{diff:.2e} ({diff / scale:.1e} of the largest entry); updates in '
        f'the parameters\' sharding: {same_sharding} '
        f'[{time.perf_counter() - t0:.1f} s]')

# %% [markdown]
# With float32 on the wire the distributed update agrees with one device to
# float32 round-off: the same matrices go through the same Newton–Schulz,
# only on another device. With bfloat16 on the wire the difference is below
# $10^{-3}$ of the update's scale: both the momentum going out and the
# orthogonalized matrix coming back are rounded once. That is the price of
# halving the bytes, and it is far below the approximation error of 5
# Newton–Schulz steps itself (see the notebook *Anatomy of
# orthogonalization*). Pass `comm_dtype=jnp.float32` to `Distributed` when you
# want exact agreement.
#
# Every update comes back sharded exactly like its parameter, so it can be
# applied with `optax.apply_updates` without any resharding. On a mesh with
# `Explicit` axes, `Distributed(mesh)` with no `param_specs` reads the specs
# from the arrays themselves.
