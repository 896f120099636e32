#!/usr/bin/env bash
# SLURM, one or many GPU nodes: writes an sbatch script and submits it.
#
#   launch/slurm.sh [--dry-run] --nodes N [--gpus-per-node 8] [--cpus-per-gpu 12]
#                   [--partition P] [--account A] [--time 72:00:00] [--name ov3]
#                   (--config configs/ov3_b.py:pretrain | --model b|l) --workdir DIR [-- ov3 flags]
#
# One task per GPU: srun starts N x gpus-per-node processes and JAX's SLURM detection reads
# the coordinator (first node of the step), process count and id and the local GPU from
# SLURM_STEP_NODELIST / SLURM_NTASKS / SLURM_PROCID / SLURM_LOCALID (ov3 calls
# jax.distributed.initialize when SLURM_NTASKS is set). DIR must be on a filesystem every node
# sees. --dry-run prints the sbatch script and the command instead of submitting.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

NODES="" GPUS=8 CPUS=12 PARTITION="" ACCOUNT="" TIME="72:00:00" JOB=ov3 CONFIG="" MODEL="" WORKDIR=""
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --nodes) NODES="$2"; shift ;;
    --gpus-per-node) GPUS="$2"; shift ;;
    --cpus-per-gpu) CPUS="$2"; shift ;;
    --partition) PARTITION="$2"; shift ;;
    --account) ACCOUNT="$2"; shift ;;
    --time) TIME="$2"; shift ;;
    --name) JOB="$2"; shift ;;
    --config|--model|--workdir) job_flag "$1" "${2:-}"; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
need nodes "$NODES"
check_job_flags

mapfile -t args < <(ov3_command "$CONFIG" "$MODEL" "$WORKDIR" "${EXTRA[@]}")
script="$(cat <<EOF
#!/usr/bin/env bash
#SBATCH --job-name=$JOB
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$GPUS
#SBATCH --gpus-per-node=$GPUS
#SBATCH --cpus-per-task=$CPUS
#SBATCH --time=$TIME
#SBATCH --output=$WORKDIR/slurm-%j.out
${PARTITION:+#SBATCH --partition=$PARTITION}
${ACCOUNT:+#SBATCH --account=$ACCOUNT}
set -euo pipefail
cd $(quote "$REPO_ROOT")
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true
srun --kill-on-bad-exit=1 .venv/bin/python$(for a in "${args[@]}"; do printf ' %s' "$(quote "$a")"; done)
EOF
)"

if [[ "$DRY_RUN" == 1 ]]; then
  echo "# sbatch script:"
  echo "$script"
  echo "+ sbatch <that script, written to a temporary file>"
  exit 0
fi
run mkdir -p "$WORKDIR"
file="$(mktemp "${TMPDIR:-/tmp}/ov3-sbatch.XXXXXX")"
printf '%s\n' "$script" > "$file"
run sbatch "$file"
