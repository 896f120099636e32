#!/usr/bin/env bash
# A pod in miniature: P processes on this machine (127.0.0.1), each with D fake CPU devices,
# joined by jax.distributed exactly as the hosts of a TPU/GPU pod are.
#
#   launch/local.sh --processes 2 --devices-per-process 4 -- \
#       --config configs/demo.py --workdir runs/demo_2x4
#
# Everything after `--` goes to `python -m ov3.main` (or to --module M). Each process gets
# JAX_PROCESS_ID, JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=D;
# with P > 1 also JAX_COORDINATOR_ADDRESS (process 0 serves it on a free loopback port, or
# --port N) and JAX_NUM_PROCESSES (read by ov3.sharding.maybe_initialize_distributed). Output lines are
# prefixed [p0], [p1], ...; the launcher's own lines [launch] (including each process's pid).
# Defaults: 2 processes, 1 device each. Collectives between the processes go over loopback TCP
# (gloo, jax's CPU default); ov3 needs nothing else to run on them.
#
# Exit status: 0 if every process exits 0. When one fails, the others get SIGTERM, then
# SIGKILL after OV3_KILL_GRACE_S (10) seconds, and the status is the first failure's own exit
# code (1-127) if any process had one, else the first non-zero status (128+N: killed by
# signal N). SIGTERM/SIGINT to the launcher go to every process (ov3 then agrees on a step,
# saves a checkpoint and exits 0: preemption). Environment: PYTHON (default: the repo's
# .venv/bin/python, else python3), JAX_INIT_TIMEOUT_S (seconds to join, default 300).
set -u

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  echo "launch/local.sh: needs bash >= 5.1 (wait -n -p), this is $BASH_VERSION" >&2
  exit 2
fi

usage() {
  echo "usage: launch/local.sh [--processes P] [--devices-per-process D] [--port N] [--module M] -- ARGS..." >&2
  exit 2
}

procs=2 devices=1 port="" module=ov3.main
while (($#)); do
  case "$1" in
    --processes) procs="${2:-}"; shift 2 || usage ;;
    --devices-per-process) devices="${2:-}"; shift 2 || usage ;;
    --port) port="${2:-}"; shift 2 || usage ;;
    --module) module="${2:-}"; shift 2 || usage ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "launch/local.sh: unknown option $1 (ov3 arguments go after --)" >&2; usage ;;
  esac
done
[[ "$procs" =~ ^[1-9][0-9]*$ && "$devices" =~ ^[1-9][0-9]*$ ]] || {
  echo "launch/local.sh: --processes and --devices-per-process must be positive integers" >&2; exit 2; }

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
if [[ -z "$port" && "$procs" -gt 1 ]]; then  # a free port now; process 0 binds it a second later
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" || exit 2
fi

# Replace any device-count flag (e.g. from a test environment) with ours.
xla_flags="$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g')"
export XLA_FLAGS="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$devices"
export JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1
if ((procs > 1)); then  # one process needs no coordinator (and its CPU collectives stay in-process)
  export JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$procs"
else
  unset JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES
fi

fifos="$(mktemp -d)"
pids=() printers=()
forward() {  # $1: signal name
  echo "[launch] got SIG$1: passing it to every process" >&2
  kill "-$1" "${pids[@]}" 2>/dev/null
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'rm -rf "$fifos"' EXIT

echo "[launch] $procs processes x $devices CPU devices${JAX_COORDINATOR_ADDRESS:+, coordinator $JAX_COORDINATOR_ADDRESS}" >&2
for ((i = 0; i < procs; i++)); do
  mkfifo "$fifos/p$i"
  # The printer ignores TERM/INT (Ctrl-C hits the whole group), so no last line is lost; bash's
  # read, unlike awk/sed on a pipe, hands each line on as soon as it is complete.
  (trap '' TERM INT; while IFS= read -r line || [[ -n "$line" ]]; do printf '[p%d] %s\n' "$i" "$line"; done) \
    <"$fifos/p$i" &
  printers+=($!)
  JAX_PROCESS_ID=$i "$python" -m "$module" "$@" >"$fifos/p$i" 2>&1 &
  pids+=($!)
  echo "[launch] p$i pid ${pids[i]}" >&2
done

live=("${pids[@]}") status=0 first_nonzero=0 first_own=0 killer=""
while ((${#live[@]})); do
  finished=""
  wait -n -p finished "${live[@]}"
  rc=$?
  [[ -n "${finished:-}" ]] || continue  # a trapped signal interrupted wait
  for i in "${!pids[@]}"; do [[ "${pids[i]}" == "$finished" ]] && who=$i; done
  live=($(for p in "${live[@]}"; do [[ "$p" != "$finished" ]] && echo "$p"; done))
  ((rc == 0)) && continue
  echo "[launch] p$who exited with status $rc" >&2
  ((first_nonzero == 0)) && first_nonzero=$rc
  ((first_own == 0 && rc < 128)) && first_own=$rc
  if [[ -z "$killer" && ${#live[@]} -gt 0 ]]; then
    echo "[launch] stopping the other processes" >&2
    kill -TERM "${live[@]}" 2>/dev/null
    (sleep "${OV3_KILL_GRACE_S:-10}"; kill -KILL "${live[@]}" 2>/dev/null) </dev/null >/dev/null 2>&1 &
    killer=$!
  fi
done
[[ -n "$killer" ]] && kill "$killer" 2>/dev/null
wait "${printers[@]}" 2>/dev/null
((first_own)) && status=$first_own || status=$first_nonzero
exit "$status"
