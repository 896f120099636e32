#!/usr/bin/env bash
# SLURM, one or many GPU nodes: writes an sbatch script and submits it.
#
#   launch/slurm.sh [--dry-run] [--install] --nodes N [--gpus-per-node 8] [--cpus-per-gpu 12]
#                   [--partition P] [--account A] [--time 72:00:00] [--name ov3] [--logs DIR]
#                   (--config configs/ov3_b.py:pretrain | --model b|l) --workdir DIR [-- ov3 flags]
#
# One task per GPU: srun starts N x gpus-per-node processes, and jax.distributed's SLURM
# detection takes the coordinator (first node of SLURM_STEP_NODELIST, port from SLURM_JOB_ID),
# the process count and id and the local GPU from SLURM_NTASKS / SLURM_PROCID / SLURM_LOCALID
# (ov3 calls jax.distributed.initialize when SLURM_NTASKS is set). --install: pip install -c
# constraints.txt into .venv (on the login node; the venv must be on a filesystem every node sees,
# as DIR must). Each task's output goes to DIR/logs/JOBID-RESTART-TASK.log (--logs), the script's
# to DIR/logs/slurm-JOBID.out. Preemption and the time limit: the job is --requeue'able, SLURM
# sends SIGTERM 120 s before the limit (--signal), ov3 saves and exits 0, and the script requeues
# the job when a signal stopped a task early; the requeued job resumes from the checkpoint.
# --dry-run prints the sbatch script and the command instead of submitting.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

INSTALL=0 NODES="" GPUS=8 CPUS=12 PARTITION="" ACCOUNT="" TIME="72:00:00" JOB=ov3 LOGS="" CONFIG="" MODEL="" WORKDIR=""
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --install) INSTALL=1 ;;
    --nodes) NODES="$2"; shift ;;
    --gpus-per-node) GPUS="$2"; shift ;;
    --cpus-per-gpu) CPUS="$2"; shift ;;
    --partition) PARTITION="$2"; shift ;;
    --account) ACCOUNT="$2"; shift ;;
    --time) TIME="$2"; shift ;;
    --name) JOB="$2"; shift ;;
    --logs) LOGS="$2"; shift ;;
    --config|--model|--workdir) job_flag "$1" "${2:-}"; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
need nodes "$NODES"
check_job_flags
if [[ -z "$LOGS" ]]; then
  [[ "$WORKDIR" != gs://* ]] || die "with a gs:// --workdir, give --logs DIR on a filesystem every node sees"
  LOGS="$WORKDIR/logs"
fi
[[ "$LOGS" != *[[:space:]]* ]] || die "#SBATCH --output cannot take a path with spaces: give --logs DIR without them"

mapfile -t args < <(ov3_command "$CONFIG" "$MODEL" "$WORKDIR" "${EXTRA[@]}")
logs="$(quote "$LOGS")"
script="$(cat <<SCRIPT_END
#!/usr/bin/env bash
#SBATCH --job-name=$JOB
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$GPUS
#SBATCH --gpus-per-node=$GPUS
#SBATCH --cpus-per-task=$CPUS
#SBATCH --time=$TIME
#SBATCH --requeue
#SBATCH --signal=TERM@120
#SBATCH --open-mode=append
#SBATCH --output=$LOGS/slurm-%j.out
${PARTITION:+#SBATCH --partition=$PARTITION}
${ACCOUNT:+#SBATCH --account=$ACCOUNT}
set -euo pipefail
cd $(quote "$REPO_ROOT")
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
export XLA_FLAGS="\${XLA_FLAGS:+\$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true"
restart=\${SLURM_RESTART_COUNT:-0}
echo "ov3: job \$SLURM_JOB_ID, start \$restart, \$SLURM_NTASKS tasks; task logs: \$SLURM_JOB_ID-\$restart-*.log"
status=0
srun --kill-on-bad-exit=1 --output=$logs/%j-\$restart-%t.log $(quote "$PYTHON")$(for a in "${args[@]}"; do printf ' %s' "$(quote "$a")"; done) || status=\$?
if grep -qs "$STOPPED_EARLY" $logs/"\$SLURM_JOB_ID-\$restart"-*.log; then
  echo "ov3: stopped early by a signal (preemption or the time limit): requeueing"
  scontrol requeue "\$SLURM_JOB_ID"
fi
exit "\$status"
SCRIPT_END
)"

if [[ "$DRY_RUN" == 1 ]]; then
  echo "# sbatch script:"
  echo "$script"
  echo "+ sbatch <that script, written to $LOGS/ov3-sbatch.sh>"
  exit 0
fi
[[ "$INSTALL" == 0 ]] || install_venv cuda12
mkdir -p "$LOGS"
printf '%s\n' "$script" >"$LOGS/ov3-sbatch.sh"
run sbatch "$LOGS/ov3-sbatch.sh"
