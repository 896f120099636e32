"""`python -m ov3.main` with faults injected, for tests/test_reliability.py (no tests here).

    OV3_FAULTS='{"nan_at_steps": [6]}' launch/local.sh --module tests.fault_injection -- \
        --config ... --workdir ...

OV3_FAULTS (JSON), any of:
  nan_at_steps: [k, ...]  the images of the batch for step k are NaN on every process
                          (a data fault: the loss and the gradient of that step are NaN)
  pause_commit_step: k    process 0 stops for good right before it commits checkpoint k
                          (everything written to <k>.orbax-checkpoint-tmp, not yet renamed;
                          on gs://: written to <k>/, no commit_success.txt yet),
                          after printing "FAULT: pausing before committing checkpoint k",
                          so that a test can SIGKILL it mid-write
  free_bytes: n           shutil.disk_usage reports n bytes free (a full disk)
  fail_on_process: p      process p raises an Ov3Error right after joining the others
OV3_PROBE_OUT=path.npz: instead of training, restore the latest checkpoint of --workdir on
the configured mesh and have process 0 write every parameter (gathered) to that file.
"""

from __future__ import annotations

import json
import os
import sys
import time


def install_faults(faults: dict) -> None:
    if "nan_at_steps" in faults:
        import numpy as np

        from ov3.data import pipeline
        steps, stack = set(faults["nan_at_steps"]), pipeline.BatchIterator._stack

        def nan_stack(self, rows):
            batch = stack(self, rows)
            if self._train and self._batches in steps:  # _batches already counts this batch: its step
                batch["image"] = np.full_like(batch["image"], np.nan)
            return batch
        pipeline.BatchIterator._stack = nan_stack

    if "pause_commit_step" in faults:
        from orbax.checkpoint._src.path import atomicity
        step = str(faults["pause_commit_step"])

        def pausing(finalize):
            async def paused_finalize(self):
                if self.get_final().name == step and self.get_final().parent.name == "checkpoints":
                    print(f"FAULT: pausing before committing checkpoint {step}", flush=True)
                    time.sleep(3600)
                return await finalize(self)
            return paused_finalize
        # Rename (local disks) and commit file (gs://): ov3.checkpoint.atomicity picks one.
        for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
            cls.finalize = pausing(cls.finalize)

    if "fail_on_process" in faults:
        from ov3 import sharding
        from ov3.errors import Ov3Error
        initialize = sharding.maybe_initialize_distributed

        def fail_after_joining(*args, **kwargs):
            initialize(*args, **kwargs)
            import jax
            if jax.process_index() == faults["fail_on_process"]:
                raise Ov3Error(f"injected failure on process {jax.process_index()}")
        sharding.maybe_initialize_distributed = fail_after_joining

    if "free_bytes" in faults:
        import shutil
        usage = shutil.disk_usage

        def full_disk(path):
            u = usage(path)
            return type(u)(u.total, u.total - faults["free_bytes"], faults["free_bytes"])
        shutil.disk_usage = full_disk


def probe(config, workdir: str, out: str) -> None:
    """Restore the latest checkpoint of `workdir` on this config's mesh; process 0 saves params."""
    import jax
    import numpy as np

    from ov3 import checkpoint as ckpt_lib
    from ov3 import sharding, train
    sharding.maybe_initialize_distributed()
    mesh = sharding.make_mesh(config.mesh)
    trainer = train.Trainer(config, mesh, train.build_task(config)[0])
    checkpointer = ckpt_lib.Checkpointer(workdir)
    step = checkpointer.latest_step()
    state = checkpointer.restore(step, trainer.abstract_state, None)
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    names = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in flat]
    params = {k: train.to_host(x) for k, (_, x) in zip(names, flat, strict=True)}
    specs = {k: str(x.sharding.spec) for k, (_, x) in zip(names, flat, strict=True)}
    if jax.process_index() == 0:
        np.savez(out, **params)
        print(f"probe: restored step {step} on mesh {dict(mesh.shape)} over {jax.process_count()} processes; "
              f"sharded like {json.dumps(specs)[:200]}", flush=True)
    checkpointer.close()


def main() -> None:
    install_faults(json.loads(os.environ.get("OV3_FAULTS", "{}")))
    from absl import app

    from ov3 import main as cli
    if os.environ.get("OV3_PROBE_OUT"):
        from ov3 import train

        def restore_only(cfg, workdir):
            probe(cfg, workdir, os.environ["OV3_PROBE_OUT"])
        train.train = restore_only
    sys.argv[0] = "ov3.main"
    app.run(cli.main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    main()
