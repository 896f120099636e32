"""Stage handoff (paper Table 1): fine-tuning at 224/256 px starts from the 128 px pretraining run.

    python -m ov3.stages --workdir DIR \
        --pretrain_config configs/ov3_b.py:pretrain --finetune_config configs/ov3_b.py:finetune \
        [--pretrain_config.total_steps=... --finetune_config.batch_size=... ...]

trains DIR/pretrain (resuming it, or skipping it once it reached its last step), then DIR/finetune
with `init_from=DIR/pretrain`. Any single run can do the same with `--config.init_from=RUN_DIR`
(its latest checkpoint) or `RUN_DIR/checkpoints/STEP`.

What the new stage takes from the previous run (params, position tables adapted; not the
optimizer state or the step), and why: ov3/init_from.py. A resumed fine-tuning run restores its
own checkpoints and ignores `init_from`.
"""

from __future__ import annotations

import sys
from typing import Any

from ov3 import paths, train
from ov3.errors import Ov3Error


def _finished(workdir: paths.Path, total_steps: int) -> bool:
    from ov3 import checkpoint as ckpt_lib
    return ckpt_lib.finished_steps(workdir)[-1:] == [total_steps]


def run(pretrain_cfg: Any, finetune_cfg: Any, workdir: str) -> dict[str, float]:
    """Both stages in DIR/pretrain and DIR/finetune; returns the fine-tuning run's last metrics."""
    root = paths.path(workdir)
    pre, fine = root / "pretrain", root / "finetune"
    if finetune_cfg.init_from and finetune_cfg.init_from != str(pre):
        raise Ov3Error(f"--finetune_config.init_from={finetune_cfg.init_from!r}: ov3.stages sets it to "
                       f"{pre}; leave it empty (or run ov3.main with --config.init_from for one stage).")
    if _finished(pre, pretrain_cfg.total_steps):
        print(f"{pre} already reached step {pretrain_cfg.total_steps}; skipping pretraining", flush=True)
    else:
        train.train(pretrain_cfg, pre)
    finetune_cfg.init_from = str(pre)
    return train.train(finetune_cfg, fine)


def cli() -> None:
    # Flags are defined here, not at import: tests import this module next to ov3.main's flags.
    from absl import app, flags
    from ml_collections import config_flags
    pretrain = config_flags.DEFINE_config_file("pretrain_config", None, "configs/*.py[:arg] of stage 1.")
    finetune = config_flags.DEFINE_config_file("finetune_config", None, "configs/*.py[:arg] of stage 2.")
    workdir = flags.DEFINE_string("workdir", None, "Holds pretrain/ and finetune/.")
    flags.mark_flags_as_required(["pretrain_config", "finetune_config", "workdir"])

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        from ov3 import metrics
        metrics.quiet_library_logs()
        try:
            run(pretrain.value, finetune.value, workdir.value)
        except Ov3Error as e:
            print(f"ov3: error: {e}", file=sys.stderr)
            sys.exit(2)
        from ov3 import sharding
        sharding.shutdown_distributed()

    app.run(main)


if __name__ == "__main__":
    cli()
