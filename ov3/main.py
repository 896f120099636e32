"""CLI: python -m ov3.main --config configs/<name>.py --workdir DIR [--config.key=value ...]

Restarting with the same DIR resumes from its latest checkpoint. Mistakes a user can make
(config, files, data, checkpoints) print one message and exit 2, without a traceback.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from ov3.errors import Ov3Error

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and pictures.")
flags.mark_flags_as_required(["config", "workdir"])


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
    app.run(main)
