"""CLI: python -m ov3.main --config configs/<name>.py --workdir DIR [--config.key=value ...]

Restarting with the same DIR resumes from its latest checkpoint. Mistakes a user can make
(config, files, data, checkpoints) print one message and exit 2, without a traceback.
"""

from __future__ import annotations

import difflib
import sys

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
    from ov3 import train
    try:
        train.train(_CONFIG.value, _WORKDIR.value)
    except Ov3Error as e:
        print(f"ov3: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
