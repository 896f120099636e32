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

# The Python that runs ov3 here (gpu.sh, slurm.sh): $PYTHON, else this checkout's venv.
PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"

# install_venv JAX_EXTRA: this checkout and jax[JAX_EXTRA] into .venv at the pinned versions.
install_venv() {
  [[ -x "$REPO_ROOT/.venv/bin/python" ]] || run python3.11 -m venv "$REPO_ROOT/.venv"
  run "$REPO_ROOT/.venv/bin/pip" install -q -c "$REPO_ROOT/constraints.txt" -e "$REPO_ROOT" "jax[$1]"
}

# What ov3 prints when SIGTERM/SIGINT stopped it before the end (ov3/train.py: "stop requested:
# saved step N", or before the first step "ov3: stop requested while ..."): the run is not done,
# and running it again resumes from the last checkpoint.
STOPPED_EARLY="stop requested"

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
