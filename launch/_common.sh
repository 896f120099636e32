# Shared by launch/*.sh (sourced, not run). Every command goes through `run`, which prints it
# shell-quoted on stdout and executes it unless --dry-run was given.

DRY_RUN=0
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# quote ARG: ARG as a shell word, single-quoted only when it needs to be (like Python's shlex.quote).
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# show_cmd ARGS...: the command line `run` would execute, on one line after "+".
show_cmd() {
  printf '+'
  local a
  for a in "$@"; do printf ' %s' "$(quote "$a")"; done
  printf '\n'
}

run() {
  show_cmd "$@"
  if [[ "$DRY_RUN" == 0 ]]; then
    "$@"
  fi
}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# need NAME VALUE: fail with the flag's name when a required option is missing.
need() {
  [[ -n "$2" ]] || die "missing --$1 (see --help)"
}

# The JAX version of this checkout's venv, so the remote install matches what was tested here.
# Read from the installed package's metadata: importing jax takes seconds.
local_jax_version() {
  local meta
  meta="$(ls -d "$REPO_ROOT"/.venv/lib/python3*/site-packages/jax-*.dist-info 2>/dev/null | head -n 1)"
  if [[ -n "$meta" ]]; then
    meta="${meta##*/jax-}"
    echo "${meta%.dist-info}"
  else
    echo "0.10.2"
  fi
}

# The flags every launcher takes for what to run: CONFIG="" MODEL="" WORKDIR="" before the
# option loop, then `--config|--model|--workdir) job_flag "$1" "${2:-}"; shift ;;` in it.
job_flag() {  # job_flag FLAG VALUE
  [[ -n "$2" ]] || die "$1 needs a value (see --help)"
  case "$1" in
    --config) CONFIG="$2" ;;
    --model) MODEL="$2" ;;
    --workdir) WORKDIR="$2" ;;
  esac
}

# check_job_flags: a --workdir and what to run in it, --config or --model b|l.
check_job_flags() {
  need workdir "$WORKDIR"
  [[ -n "$CONFIG" || -n "$MODEL" ]] || die "give --config or --model (see --help)"
  [[ -z "$MODEL" || "$MODEL" == b || "$MODEL" == l ]] || die "--model must be b or l (configs/ov3_b.py, configs/ov3_l.py)"
}

# The ov3 entry point for a config or for both stages of a model family (b, l):
# prints the python module and its arguments, one per line.
ov3_command() {  # ov3_command CONFIG STAGES_MODEL WORKDIR [overrides...]
  local config="$1" model="$2" workdir="$3"
  shift 3
  if [[ -n "$model" ]]; then
    printf '%s\n' -m ov3.stages "--pretrain_config=configs/ov3_${model}.py:pretrain" \
      "--finetune_config=configs/ov3_${model}.py:finetune" "--workdir=$workdir" "$@"
  else
    printf '%s\n' -m ov3.main "--config=$config" "--workdir=$workdir" "$@"
  fi
}
