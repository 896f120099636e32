#!/usr/bin/env bash
# Cloud TPU VM: create a slice, install ov3 on every worker, train on all workers, stop/delete.
#
#   launch/tpu_vm.sh [--dry-run] ACTION --name NAME --zone ZONE [--project P] [options] [-- ov3 flags]
#
#   create   --type v4-256 [--version V] [--spot]   the slice (V defaults by TPU generation)
#   install  [--jax-version X]                      this working tree (no .venv/.git/runs) to ~/ov3
#                                                   on every worker, venv with jax[tpu]==X, gcsfuse
#   train    --config configs/ov3_b.py:pretrain --workdir gs://BUCKET/PATH [-- --config.k=v ...]
#   stages   --model b|l --workdir gs://BUCKET/PATH [-- --pretrain_config.k=v ...]
#                                                   both paper stages in sequence (ov3.stages)
#   logs     tail worker 0's log;   stop | start | delete   the slice
#
# Multi-host: every worker runs the same command (--worker=all). JAX_COORDINATOR_ADDRESS is set
# to worker 0's internal IP (ov3 then calls jax.distributed.initialize, which reads process
# count and ids from the TPU metadata server).
# gs:// workdir: the train loop writes with local file APIs (metrics.jsonl, PNGs, config.json,
# and orbax under a pathlib path), so the bucket is mounted with gcsfuse at /gcs/BUCKET on every
# worker and ov3 gets that path. (orbax alone could write gs:// through tensorstore, and
# tensorboardX only with google-cloud-storage installed; the mount covers all writers.) The VMs
# authenticate with their service account: no keys in this script.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

ACTION="" NAME="" ZONE="" PROJECT="" TYPE="" VERSION="" SPOT=0 JAX_VERSION="" CONFIG="" MODEL="" WORKDIR=""
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --name) NAME="$2"; shift ;;
    --zone) ZONE="$2"; shift ;;
    --project) PROJECT="$2"; shift ;;
    --type) TYPE="$2"; shift ;;
    --version) VERSION="$2"; shift ;;
    --spot) SPOT=1 ;;
    --jax-version) JAX_VERSION="$2"; shift ;;
    --config|--model|--workdir) job_flag "$1" "${2:-}"; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z "$ACTION" ]] || die "one action only, got '$ACTION' and '$1'"; ACTION="$1" ;;
  esac
  shift
done
[[ -n "$ACTION" ]] || usage 2
need name "$NAME"
need zone "$ZONE"

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || WHERE+=(--project="$PROJECT")

# Runtime image per TPU generation (Cloud TPU docs, "TPU software versions").
default_version() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default --version for --type $1; pass --version" ;;
  esac
}

remote() {  # remote WORKER COMMAND: ssh to one or all workers of the slice
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}

# gs://BUCKET/PATH -> BUCKET and /gcs/BUCKET/PATH (the gcsfuse mount ov3 writes through).
mount_cmd() {
  local bucket="$1"
  echo "sudo mkdir -p /gcs/$bucket && sudo chown \$USER /gcs/$bucket && (mountpoint -q /gcs/$bucket || gcsfuse --implicit-dirs $bucket /gcs/$bucket)"
}

start_training() {  # start_training PYTHON_ARGS...
  [[ "$WORKDIR" == gs://* ]] || die "--workdir must be gs://BUCKET/PATH (shared by every worker)"
  local path="${WORKDIR#gs://}" bucket="${WORKDIR#gs://}"
  bucket="${bucket%%/*}"
  local local_dir="/gcs/$path"
  local -a args
  mapfile -t args < <(ov3_command "$CONFIG" "$MODEL" "$local_dir" "${EXTRA[@]}")
  local coordinator="<worker-0 IP>"
  local describe=("${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format='value(networkEndpoints[0].ipAddress)')
  show_cmd "${describe[@]}"
  if [[ "$DRY_RUN" == 0 ]]; then coordinator="$("${describe[@]}")"; fi
  local py a
  py=""
  for a in "${args[@]}"; do py+=" $(quote "$a")"; done
  remote all "$(mount_cmd "$bucket") && cd ~/ov3 && JAX_COORDINATOR_ADDRESS=$coordinator:8476 nohup .venv/bin/python$py > ~/ov3.log 2>&1 &"
}

case "$ACTION" in
  create)
    need type "$TYPE"
    VERSION="${VERSION:-$(default_version "$TYPE")}"
    cmd=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE" --version="$VERSION")
    [[ "$SPOT" == 0 ]] || cmd+=(--spot)
    run "${cmd[@]}"
    ;;
  install)
    JAX_VERSION="${JAX_VERSION:-$(local_jax_version)}"
    tarball="${TMPDIR:-/tmp}/ov3-src.tar.gz"
    run tar -C "$REPO_ROOT" --exclude=.venv --exclude=.git --exclude=runs --exclude=__pycache__ -czf "$tarball" .
    run "${GCLOUD[@]}" scp "$tarball" "$NAME:~/ov3-src.tar.gz" "${WHERE[@]}" --worker=all
    gcsfuse_repo='echo "deb [signed-by=/usr/share/keyrings/cloud.google.gpg] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo gpg --dearmor --yes -o /usr/share/keyrings/cloud.google.gpg'
    remote all "set -e; mkdir -p ~/ov3 && tar -xzf ~/ov3-src.tar.gz -C ~/ov3 && cd ~/ov3 && python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . 'jax[tpu]==$JAX_VERSION' && $gcsfuse_repo && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse"
    ;;
  train)
    need config "$CONFIG"
    check_job_flags
    start_training
    ;;
  stages)
    need model "$MODEL"
    check_job_flags
    start_training
    ;;
  logs) remote 0 "tail -n 100 -f ~/ov3.log" ;;
  stop|start|delete)
    cmd=("${GCLOUD[@]}" "$ACTION" "$NAME" "${WHERE[@]}")
    [[ "$ACTION" != delete ]] || cmd+=(--quiet)
    run "${cmd[@]}"
    ;;
  *) die "unknown action '$ACTION' (create, install, train, stages, logs, stop, start, delete)" ;;
esac
