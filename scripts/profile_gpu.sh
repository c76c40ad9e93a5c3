#!/usr/bin/env bash
# Profiles of single updates on a GPU (GPT-2 small, 12 layers), one file per
# row in OUTDIR: bf16 Muon, ARO's first and later step, FISMO's
# preconditioning step. See scripts/profile_update.py.
#
#   scripts/profile_gpu.sh [OUTDIR]        # default results/gpu
set -u
out=${1:-results/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
prof() {  # file, then profile_update.py's arguments
  local file=$1; shift
  timeout "${T_PROFILE:-120}" $py scripts/profile_update.py --top 30 "$@" \
    2>&1 | grep -v '^WARNING\|^I0000\|^E0000' | tee "$out/$file"
}
prof profile_muon_bf16.txt --row muon --ns_dtype bfloat16 --later
prof profile_aro_first.txt --row aro
prof profile_aro_later.txt --row aro --later
prof profile_fismo_first.txt --row fismo
