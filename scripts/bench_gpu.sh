#!/usr/bin/env bash
# The GPU figures in one run: the device, bf16 Newton–Schulz on GPT-2 small
# (12 layers) against optax and the matmul peak, every recipe against Muon,
# wider matrices (d_model 2048), the non-finite guard's cost and the
# profiles of scripts/profile_gpu.sh (skipped with T_PROFILE=0). Each part writes its own file, so a part cut
# off by its time limit leaves the others.
#
#   scripts/bench_gpu.sh [OUTDIR]        # default results/gpu
set -u
out=${1:-results/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
# Compiled programs are cached, so a recipe's second compile is a lookup.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/orthax_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv
  $py -c 'import jax, optax; print("jax", jax.__version__, "optax",
optax.__version__, jax.devices())'
} 2>&1 | tee "$out/device.txt"
# The Muon table prints first, then one line per recipe as it is timed.
timeout "${T_MAIN:-380}" $py scripts/bench_ns.py --layers 12 --repeats 5 \
  --recipes 2>&1 | tee "$out/bench_ns_gpt2_small.txt"
timeout "${T_WIDE:-90}" $py scripts/bench_ns.py --layers 4 --d_model 2048 2>&1 \
  | tee "$out/bench_ns_d2048.txt"
# The non-finite guard's cost: on a GPU each of its two lax.conds (and
# Newton–Schulz's huge-norm branch) copies its predicate to the host.
timeout "${T_GUARD:-60}" $py scripts/bench_guard.py 2>&1 \
  | tee "$out/bench_guard.txt"
if [ "${T_PROFILE:-90}" != 0 ]; then
  T_PROFILE=${T_PROFILE:-90} scripts/profile_gpu.sh "$out"
fi
