#!/usr/bin/env bash
# Cloud TPU VM slice: create it, install ov3 on every worker, run on all workers, survive
# preemption, stop/delete.
#
#   launch/tpu_vm.sh [--dry-run] ACTION --name NAME --zone ZONE [--project P] [options] [-- ov3 flags]
#
#   create   --type v4-256 [--version V] [--spot]    the slice (V defaults by TPU generation)
#   install  [--skip-pip]   on every worker: a Python >= 3.11 (deadsnakes' python3.11 from apt
#            where the image has 3.10), this checkout's tracked files (git archive) in ~/ov3, a
#            venv ~/ov3-venv with `pip install -c constraints.txt -e . jax[tpu]`, gcsfuse.
#            --skip-pip: no venv or pip, that Python as the image has it (its jax must be the
#            pinned one; checked)
#   run      (--config configs/ov3_b.py:pretrain | --model b|l) --workdir gs://BUCKET/runs/NAME
#            [--mount gs://BUCKET]... [--port 8476] [--until-done --type T [--version V] [--spot]
#            [--skip-pip]] [--logs DIR] [-- --config.k=v ...]
#            Stops a stale ov3 run on the workers, mounts each --mount bucket read-only at
#            /tmp/gcs/BUCKET (gcsfuse with MaxText's cache flags; give data.path=/tmp/gcs/BUCKET/...),
#            and runs ov3 on every worker (one ssh each) until all exit; outputs go to the workdir
#            directly, never through a mount. Each worker's output is appended to
#            DIR/worker-I.log (default runs/tpu-NAME); a worker that fails has its last lines shown.
#            --until-done: when the slice was preempted or stopped (ov3 saves on SIGTERM and exits
#            0), recreate/start it, reinstall and run again: the run resumes from its checkpoint.
#   logs     [--lines N] [--logs DIR]    the last N (40) lines of every worker's log
#   stop | start | delete                the slice
#
# Every worker gets JAX_COORDINATOR_ADDRESS (worker 0's internal IP:--port), JAX_NUM_PROCESSES and
# JAX_PROCESS_ID, read by ov3.sharding.maybe_initialize_distributed. Run this under tmux/nohup:
# the workers' runs end when this script's ssh sessions do. The VMs authenticate with their
# service account: no keys here.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

ACTION="" NAME="" ZONE="" PROJECT="" TYPE="" VERSION="" SPOT=0 SKIP_PIP=0 UNTIL_DONE=0 PORT=8476
CONFIG="" MODEL="" WORKDIR="" LOGS="" LINES=40
MOUNTS=() EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --name) NAME="$2"; shift ;;
    --zone) ZONE="$2"; shift ;;
    --project) PROJECT="$2"; shift ;;
    --type) TYPE="$2"; shift ;;
    --version) VERSION="$2"; shift ;;
    --spot) SPOT=1 ;;
    --skip-pip) SKIP_PIP=1 ;;
    --until-done) UNTIL_DONE=1 ;;
    --port) PORT="$2"; shift ;;
    --mount) MOUNTS+=("$2"); shift ;;
    --logs) LOGS="$2"; shift ;;
    --lines) LINES="$2"; shift ;;
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
LOGS="${LOGS:-$REPO_ROOT/runs/tpu-$NAME}"

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

create() {
  need type "$TYPE"
  local cmd=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE"
             --version="${VERSION:-$(default_version "$TYPE")}")
  [[ "$SPOT" == 0 ]] || cmd+=(--spot)
  run "${cmd[@]}"
}

# What each worker runs to install: the first Python >= 3.11 (python3, python3.11), else apt's
# python3.11 (the Ubuntu 22.04 TPU images have 3.10); the uploaded tree; the pinned packages.
install_cmd() {
  local env
  if [[ "$SKIP_PIP" == 1 ]]; then
    env='rm -rf ~/ov3-venv && mkdir -p ~/ov3-venv/bin && ln -s "$(command -v "$py")" ~/ov3-venv/bin/python'
  else
    env='{ [ -x ~/ov3-venv/bin/python ] || "$py" -m venv ~/ov3-venv; } && ~/ov3-venv/bin/pip install -q -c constraints.txt -e . "jax[tpu]"'
  fi
  cat <<EOF
set -e
py=""
for c in python3 python3.11; do if "\$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then py=\$c; break; fi; done
if [ -z "\$py" ]; then
  # Ubuntu 22.04's own python3.11 is a release candidate (3.11.0rc1): the deadsnakes build instead.
  echo "ov3: \$(python3 --version 2>&1) here, installing python3.11"
  sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get update -q
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3.11 python3.11-venv; py=python3.11
fi
rm -rf ~/ov3 && mkdir ~/ov3 && tar -xzf ~/ov3-src.tar.gz -C ~/ov3 && cd ~/ov3
$env
want=\$(sed -n 's/^jax==//p' constraints.txt); have=\$(~/ov3-venv/bin/python -c 'import jax; print(jax.__version__)')
[ "\$have" = "\$want" ] || { echo "ov3: jax \$have on this worker, constraints.txt pins \$want" >&2; exit 1; }
if ! command -v gcsfuse >/dev/null; then
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcsfuse
fi
echo "ov3: installed with \$("\$py" --version), jax \$have"
EOF
}

install() {
  local tarball="${TMPDIR:-/tmp}/ov3-src-$NAME.tar.gz"
  # Tracked files as they are now (uncommitted edits included), nothing else: no venv, no runs.
  show_cmd git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" '$(git stash create || echo HEAD)'
  [[ "$DRY_RUN" == 1 ]] || { local tree; tree="$(git -C "$REPO_ROOT" stash create)"
    git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" "${tree:-HEAD}"; }
  run "${GCLOUD[@]}" scp "$tarball" "$NAME:~/ov3-src.tar.gz" "${WHERE[@]}" --worker=all
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$(install_cmd)"
}

state() {  # READY, STOPPED, PREEMPTED, ... or MISSING
  "${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)' 2>/dev/null || echo MISSING
}

# A slice to run on: start a stopped one; recreate (and reinstall) a preempted or missing one.
ensure_ready() {
  local s
  s="$(state)"
  case "$s" in
    READY) ;;
    STOPPED) echo "[tpu_vm] $NAME is STOPPED: starting it" >&2; run "${GCLOUD[@]}" start "$NAME" "${WHERE[@]}" ;;
    *) echo "[tpu_vm] $NAME is $s: (re)creating it" >&2
       [[ "$s" == MISSING ]] || run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
       create
       install ;;
  esac
}

# The command worker I of N runs: mounts, stale run stopped, then ov3 with the coordinator env.
worker_cmd() {  # worker_cmd I N COORDINATOR
  local cmd="cd ~/ov3" m bucket a
  for m in "${MOUNTS[@]}"; do
    bucket="${m#gs://}"
    cmd+=" && mkdir -p /tmp/gcs/$bucket && { mountpoint -q /tmp/gcs/$bucket || gcsfuse -o ro --implicit-dirs"
    cmd+=" --type-cache-max-size-mb=-1 --stat-cache-max-size-mb=-1 --kernel-list-cache-ttl-secs=-1"
    cmd+=" --metadata-cache-ttl-secs=-1 --log-file=\$HOME/gcsfuse-$bucket.json $bucket /tmp/gcs/$bucket; }"
  done
  cmd+=' && if old=$(cat ~/ov3.pid 2>/dev/null) && grep -qs ov3 /proc/$old/cmdline; then'
  cmd+=' echo "ov3: stopping the stale run on this worker (pid $old)"; kill -TERM $old;'
  cmd+=' for s in $(seq 120); do grep -qs ov3 /proc/$old/cmdline || break; sleep 1; done; kill -KILL $old 2>/dev/null || true; fi'
  cmd+=" && echo \$\$ > ~/ov3.pid && exec env JAX_COORDINATOR_ADDRESS=$(quote "$3") JAX_NUM_PROCESSES=$2"
  cmd+=" JAX_PROCESS_ID=$1 PYTHONUNBUFFERED=1 ~/ov3-venv/bin/python"
  for a in "${ARGS[@]}"; do cmd+=" $(quote "$a")"; done
  printf '%s 2>&1' "$cmd"
}

# Runs ov3 on every worker, one ssh each, output appended to LOGS/worker-I.log. Sets RCS (exit
# status per worker), FIRST_FAILURE and FIRST_FAILED (the first non-zero status and its worker:
# the others are then stopped) and STOPPED (per worker: a stop signal ended ov3 before the end,
# after saving or before the first step).
run_workers() {
  local ips=("<worker-0 IP>") describe=("${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}"
                                         --format='value(networkEndpoints[].ipAddress)')
  show_cmd "${describe[@]}"
  if [[ "$DRY_RUN" == 0 ]]; then
    local endpoints
    endpoints="$("${describe[@]}")" || die "cannot describe $NAME (create it first, or run with --until-done)"
    IFS=';' read -r -a ips <<<"$endpoints"
  fi
  local n=${#ips[@]} i pids=() starts=() cmd
  for ((i = 0; i < n; i++)); do
    cmd=("${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker="$i" --command="$(worker_cmd "$i" "$n" "${ips[0]}:$PORT")")
    show_cmd "${cmd[@]}"
    [[ "$DRY_RUN" == 0 ]] || continue
    mkdir -p "$LOGS"
    touch "$LOGS/worker-$i.log"
    starts+=("$(wc -l <"$LOGS/worker-$i.log")")
    echo "=== $(date -u +%FT%TZ) run on $NAME, worker $i of $n" >>"$LOGS/worker-$i.log"
    "${cmd[@]}" >>"$LOGS/worker-$i.log" 2>&1 </dev/null &
    pids+=($!)
  done
  RCS=() STOPPED=() FIRST_FAILURE=0 FIRST_FAILED=0
  [[ "$DRY_RUN" == 0 ]] || return 0
  echo "[tpu_vm] $n workers running; logs: $LOGS/worker-*.log" >&2
  local live=("${pids[@]}") done_pid rc who
  while ((${#live[@]})); do
    done_pid=""
    wait -n -p done_pid "${live[@]}" && rc=0 || rc=$?
    [[ -n "$done_pid" ]] || continue
    for i in "${!pids[@]}"; do
      if [[ "${pids[i]}" == "$done_pid" ]]; then RCS[i]=$rc who=$i; fi
    done
    live=()
    for i in "${!pids[@]}"; do
      if [[ -z "${RCS[i]:-}" ]]; then live+=("${pids[i]}"); fi
    done
    if ((rc != 0 && FIRST_FAILURE == 0)); then  # one worker is gone: the others cannot go on
      FIRST_FAILURE=$rc FIRST_FAILED=$who
      ((${#live[@]} == 0)) || kill -TERM "${live[@]}" 2>/dev/null || true
    fi
  done
  for ((i = 0; i < n; i++)); do
    STOPPED[i]=0
    if tail -n "+$((starts[i] + 1))" "$LOGS/worker-$i.log" | grep -q "$STOPPED_EARLY"; then
      STOPPED[i]=1
    fi
  done
}

show_failures() {
  local i
  for i in "${!RCS[@]}"; do
    ((RCS[i] != 0)) || continue
    echo "[tpu_vm] worker $i exited with status ${RCS[i]}; the last lines of $LOGS/worker-$i.log:" >&2
    grep -v '^[IW][0-9]\{4\} ' "$LOGS/worker-$i.log" | tail -n 20 | sed "s/^/[worker $i] /" >&2
  done
}

run_until_done() {
  local attempt=0 s
  while true; do
    attempt=$((attempt + 1))
    [[ "$UNTIL_DONE" == 0 || "$DRY_RUN" == 1 ]] || ensure_ready
    run_workers
    [[ "$DRY_RUN" == 0 ]] || return 0
    s="$(state)"
    if [[ "$s" != READY ]]; then
      [[ "$UNTIL_DONE" == 1 ]] || die "$NAME is $s (preempted or stopped); run again with --until-done to recreate it and resume"
      echo "[tpu_vm] $NAME is $s after attempt $attempt: recreating and resuming" >&2
    elif ((FIRST_FAILURE != 0 && STOPPED[FIRST_FAILED] == 0)); then
      show_failures  # a worker failed on its own: a bug or bad input, not preemption
      exit "$FIRST_FAILURE"
    elif [[ " ${STOPPED[*]} " == *" 1 "* ]]; then
      [[ "$UNTIL_DONE" == 1 ]] || { echo "[tpu_vm] stopped early by a signal; run again to resume" >&2; exit "$FIRST_FAILURE"; }
      echo "[tpu_vm] stopped early by a signal on a READY slice (maintenance?): resuming" >&2
    else
      echo "[tpu_vm] finished on every worker (attempt $attempt)" >&2
      return 0
    fi
  done
}

case "$ACTION" in
  create) create ;;
  install) install ;;
  run)
    check_job_flags
    [[ "$WORKDIR" == gs://* || "$WORKDIR" == /* ]] || \
      die "--workdir must be gs://BUCKET/PATH (or an absolute path every worker mounts), not $WORKDIR"
    for m in "${MOUNTS[@]}"; do
      [[ "$m" =~ ^gs://[a-z0-9][a-z0-9._-]*$ ]] || die "--mount takes a bucket, gs://BUCKET (got $m)"
    done
    mapfile -t ARGS < <(ov3_command "$CONFIG" "$MODEL" "$WORKDIR" "${EXTRA[@]}")
    run_until_done
    ;;
  logs)
    for f in "$LOGS"/worker-*.log; do
      [[ -e "$f" ]] || die "no logs in $LOGS (run writes them; --logs DIR)"
      echo "==> $f <=="
      tail -n "$LINES" "$f"
    done
    ;;
  stop|start|delete)
    cmd=("${GCLOUD[@]}" "$ACTION" "$NAME" "${WHERE[@]}")
    [[ "$ACTION" != delete ]] || cmd+=(--quiet)
    run "${cmd[@]}"
    ;;
  *) die "unknown action '$ACTION' (create, install, run, logs, stop, start, delete)" ;;
esac
