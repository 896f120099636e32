#!/usr/bin/env bash
# One GPU node: every visible GPU in one process (the config's mesh spreads over them).
#
#   launch/gpu.sh [--dry-run] [--install] [--gpus 0,1,...] [--jax-extra cuda12] [--logs DIR]
#                 (--config configs/ov3_b.py:pretrain | --model b|l) --workdir DIR [-- ov3 flags]
#
#   --install    pip install -c constraints.txt this checkout and jax[<jax-extra>] into .venv first
#   --gpus       CUDA_VISIBLE_DEVICES (default: all)
#   --model      both paper stages in sequence (ov3.stages) instead of one --config
#   --logs       the output is also appended to DIR/gpu-<time>.log (default: runs/logs)
# ov3 replaces this script's process (exec), so SIGTERM to it (a scheduler, `kill`) reaches ov3,
# which saves a checkpoint and exits 0; the same command again resumes. Memory: XLA may take 95%
# of each GPU; the latency-hiding scheduler overlaps the FSDP all-gathers with compute.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

INSTALL=0 GPUS="" JAX_EXTRA=cuda12 CONFIG="" MODEL="" WORKDIR="" LOGS="$REPO_ROOT/runs/logs"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --install) INSTALL=1 ;;
    --gpus) GPUS="$2"; shift ;;
    --jax-extra) JAX_EXTRA="$2"; shift ;;
    --logs) LOGS="$2"; shift ;;
    --config|--model|--workdir) job_flag "$1" "${2:-}"; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
check_job_flags

cd "$REPO_ROOT"
[[ "$INSTALL" == 0 ]] || install_venv "$JAX_EXTRA"

envs=(XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true")
[[ -z "$GPUS" ]] || envs+=(CUDA_VISIBLE_DEVICES="$GPUS")
mapfile -t args < <(ov3_command "$CONFIG" "$MODEL" "$WORKDIR" "${EXTRA[@]}")
if [[ "$DRY_RUN" == 0 ]]; then
  mkdir -p "$LOGS"
  log="$LOGS/gpu-$(date -u +%Y%m%dT%H%M%SZ).log"
  echo "[gpu] output also in $log" >&2
  exec > >(trap '' TERM INT; exec tee -a "$log") 2>&1  # tee outlives a SIGTERM to catch the last lines
fi
run exec env "${envs[@]}" "$PYTHON" "${args[@]}"
