"""CLI: python -m ov3.main --config configs/<name>.py --workdir DIR [--config.key=value ...]

Restarting with the same DIR resumes from its latest checkpoint. The console shows ov3's lines
and library warnings; `--verbosity=0` brings back absl's INFO lines (orbax, jax). Mistakes a user can make
(config, files, data, checkpoints) print one message and exit 2, without a traceback.
"""

from __future__ import annotations

import difflib
import os
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

from ov3.errors import Ov3Error

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and pictures.")
flags.mark_flags_as_required(["config", "workdir"])


def unknown_override(argv: list[str]) -> str | None:
    """The first `--config.a.b=v` whose key path is not in the config schema, explained."""
    from ov3.config import base_config
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node, walked = base_config(), "config"
        for part in arg[len("--config."):].split("=")[0].split("."):
            if not hasattr(node, "keys") or part not in node:
                known = list(node.keys()) if hasattr(node, "keys") else []
                close = difflib.get_close_matches(part, known, n=1)
                hint = f"; did you mean {walked}.{close[0]}?" if close else ""
                return f"{arg}: {walked} has no key {part!r}{hint} (every key and its default: ov3/config.py)"
            node, walked = node[part], f"{walked}.{part}"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
        print(f"ov3: error: {unknown_override(argv) or e}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ov3 import metrics, train
    metrics.quiet_library_logs()
    from ov3 import sharding
    try:
        train.train(_CONFIG.value, _WORKDIR.value)
    except Ov3Error as e:
        print(f"ov3: error: {e}", file=sys.stderr)
        exit_now(2)
    except Exception as e:  # noqa: BLE001 - a bug or a lost peer: the traceback, then out (see exit_now)
        message = train.explain_failure(e, _CONFIG.value, _WORKDIR.value)  # device OOM, a full disk
        if message:
            print(f"ov3: error: {message}", file=sys.stderr)
            exit_now(2)
        traceback.print_exc()
        exit_now(1)
    sharding.shutdown_distributed()


def exit_now(code: int) -> None:
    """Exit with `code`. One of several processes leaves at once: a normal exit would wait in
    jax.distributed's shutdown barrier for the processes still training (which in turn wait for
    this one), so the failure would show only minutes later, as a timeout. The launcher or
    scheduler sees the exit and stops the others."""
    import jax
    if jax.distributed.is_initialized() and jax.process_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
