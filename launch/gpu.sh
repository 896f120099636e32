#!/usr/bin/env bash
# One GPU node: every visible GPU in one process (the config's mesh spreads over them).
#
#   launch/gpu.sh [--dry-run] [--install] [--gpus 0,1,...] [--jax-extra cuda12]
#                 (--config configs/ov3_b.py:pretrain | --model b|l) --workdir DIR [-- ov3 flags]
#
#   --install    pip install this checkout and jax[<jax-extra>]==<this venv's jax> into .venv first
#   --gpus       CUDA_VISIBLE_DEVICES (default: all)
#   --model      both paper stages in sequence (ov3.stages) instead of one --config
# Memory: XLA may take 95% of each GPU (XLA_PYTHON_CLIENT_MEM_FRACTION); the latency-hiding
# scheduler overlaps the FSDP all-gathers with compute.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

INSTALL=0 GPUS="" JAX_EXTRA=cuda12 CONFIG="" MODEL="" WORKDIR=""
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --install) INSTALL=1 ;;
    --gpus) GPUS="$2"; shift ;;
    --jax-extra) JAX_EXTRA="$2"; shift ;;
    --config|--model|--workdir) job_flag "$1" "${2:-}"; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
check_job_flags

cd "$REPO_ROOT"
if [[ "$INSTALL" == 1 ]]; then
  [[ -x .venv/bin/python ]] || run python3.11 -m venv .venv
  run .venv/bin/pip install -q -e . "jax[$JAX_EXTRA]==$(local_jax_version)"
fi

envs=(XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true")
[[ -z "$GPUS" ]] || envs+=(CUDA_VISIBLE_DEVICES="$GPUS")
mapfile -t args < <(ov3_command "$CONFIG" "$MODEL" "$WORKDIR" "${EXTRA[@]}")
run env "${envs[@]}" .venv/bin/python "${args[@]}"
