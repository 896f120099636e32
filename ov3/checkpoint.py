"""Orbax checkpoints holding the train state *and* the data iterator position together.

Layout: DIR/checkpoints/<step>/{state, data}; `state` is the TrainState pytree (restored
straight into the shardings of the current mesh, whatever mesh saved it), `data` has one JSON
file per process (grain's handler). Saves are async, and a run killed mid-write never restores a
partial step. How a step is committed depends on where DIR is (`atomicity`): on a local disk
orbax writes `<step>.orbax-checkpoint-tmp` and renames it when complete; on gs:// (where a
"rename" is a copy of every object) it writes `<step>/` in place, tensorstore putting the arrays
straight into the bucket, and marks it complete with a last object, `<step>/commit_success.txt`.
Only committed steps are listed; leftovers are deleted when the next run opens the directory.
A checkpoint saved by another number of processes resumes with the data position carried over
(see `_data_state_for_this_layout`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from ov3 import paths
from ov3.errors import Ov3Error


class _IteratorSnapshot:
    """The iterator position taken at save time (the loop keeps advancing while orbax writes)."""

    def __init__(self, state: dict):
        self._state = json.dumps(state).encode()

    def get_state(self) -> bytes:
        return self._state


class _IteratorRestore:
    def __init__(self, iterator: Any):
        self.iterator = iterator

    def set_state(self, state: bytes) -> None:
        self.iterator.set_state(json.loads(state.decode()))

    def start_prefetch(self) -> None:  # grain's handler calls this after set_state
        pass


def atomicity(directory: str | os.PathLike) -> ocp.options.AtomicityOptions:
    """Commit-file on gs:// (objects cannot be renamed, and orbax's rename of a step folder is a
    copy of every object), rename of a temporary folder elsewhere. Orbax 0.12.8's AUTO picks the
    same; spelled out so that readers and writers of one directory always agree."""
    mode = ocp.options.AtomicityMode.COMMIT_FILE if paths.is_remote(directory) \
        else ocp.options.AtomicityMode.ATOMIC_RENAME
    return ocp.options.AtomicityOptions(mode=mode)


def directory(workdir: str | os.PathLike) -> paths.Path:
    """DIR/checkpoints, absolute (orbax wants it so)."""
    return paths.absolute(workdir) / "checkpoints"


def finished_steps(workdir: str | os.PathLike) -> list[int]:
    """The committed checkpoint steps of a run, oldest first (none: an empty list); read-only."""
    folder = directory(workdir)
    if not folder.exists():
        return []
    with ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(
            read_only=True, atomicity_options=atomicity(folder))) as manager:
        return sorted(manager.all_steps())


class Checkpointer:
    def __init__(self, workdir: str | os.PathLike, keep: int = 3, async_save: bool = True):
        self.directory = directory(workdir)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                                 enable_async_checkpointing=async_save,
                                                 atomicity_options=atomicity(self.directory)),
            # Named handlers, so a fresh process can read a step's metadata before restoring it.
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def resume_step(self, requested: int = -1) -> int | None:
        """The step to resume from: the latest complete one (`requested` < 0), or `requested`.
        Steps after `requested` are moved to DIR/discarded_checkpoints/ (not deleted: the user
        decides), so that the resumed run can save its own steps there."""
        if requested < 0:
            return self.latest_step()
        steps = sorted(self.manager.all_steps())
        if requested not in steps:
            raise Ov3Error(f"config.resume_step={requested}: {self.directory} has no complete checkpoint "
                           f"{requested}; it has {steps or 'none'}.")
        later = [s for s in steps if s > requested]
        if later and jax.process_index() == 0:
            aside = self.directory.parent / "discarded_checkpoints"
            paths.makedirs(aside)
            for s in later:
                target = aside / str(s)
                n = 1
                while target.exists():  # resumed back past this step before
                    target, n = aside / f"{s}.{n}", n + 1
                paths.move(self.directory / str(s), target)
            print(f"resume_step={requested}: moved the later checkpoints {later} to {aside}", flush=True)
        if later:
            from ov3 import sharding
            sharding.sync_processes("resume_step")  # every process lists the steps after the move
            self.manager.reload()
        return requested

    def save(self, step: int, state: Any, data_iterator: Any | None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator.get_state()))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None) -> Any:
        """Restore `step` into `abstract_state` (a pytree of ShapeDtypeStruct with shardings);
        a checkpoint of another model raises an Ov3Error listing every mismatched parameter, a
        damaged one an Ov3Error naming the step, what failed and the earlier steps to resume from."""
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds; all mean "unreadable"
            raise self._damaged(step, e) from e
        if saved is None:
            raise self._damaged(step, "no readable 'state' item")
        check_compatible(saved, abstract_state, self.directory / str(step))
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        data_dir = self.directory / str(step) / "data"
        if data_iterator is not None and (data_dir / _data_file(jax.process_index(), jax.process_count())).exists():
            items["data"] = grain.checkpoint.CheckpointRestore(_IteratorRestore(data_iterator))
        elif data_iterator is not None:  # saved by another number of processes
            data_iterator.set_state(_data_state_for_this_layout(data_dir))
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
        except Exception as e:  # noqa: BLE001 - as above
            raise self._damaged(step, e) from e

    def _damaged(self, step: int, problem: Any) -> Ov3Error:
        if isinstance(problem, BaseException):
            lines = str(problem).strip().splitlines() or [""]
            problem = f"{type(problem).__name__}: {lines[0][:300]}"
        earlier = [s for s in self.manager.all_steps() if s < step]
        fix = (f"resume from an earlier one with --config.resume_step={max(earlier)} (complete: {sorted(earlier)})"
               if earlier else "no earlier checkpoint is here: remove it to start afresh, or use another --workdir")
        return Ov3Error(f"checkpoint {self.directory / str(step)} is damaged ({problem}); {fix}.")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _data_file(process_index: int, process_count: int) -> str:
    return f"process_{process_index}-of-{process_count}.json"  # grain's handler names them so


def _data_state_for_this_layout(data_dir: paths.Path) -> dict[str, Any]:
    """This process's data position from one saved by P' processes (ov3.data.pipeline, step 3:
    global batch k is stream positions [kB, (k+1)B), whatever the process count).

    Every saved process took `batches` global batches; the new run starts at the first global
    batch no saved process had begun. With nothing skipped that is batch `batches` itself, so
    the resumed run sees exactly what an uninterrupted one would; otherwise the rest of the
    batches the old processes had partly read ahead (to replace skipped examples) is not seen."""
    saved = [json.loads(f.read_text()) for f in sorted(data_dir.glob("process_*-of-*.json"))]
    if not saved:
        raise Ov3Error(f"{data_dir} holds no data position (process_*-of-*.json); the checkpoint is incomplete.")
    count = saved[0]["process_count"]
    if len(saved) != count:
        raise Ov3Error(f"{data_dir} holds {len(saved)} data positions, expected {count}; the checkpoint is incomplete.")
    batches = saved[0]["batches"]
    if batches == 0:
        next_batch, old_per_process = 0, 1
    else:  # consumed = good rows (batches * per-process batch) + skipped examples
        old_per_process = (saved[0]["consumed"] - sum(saved[0]["skipped"].values())) // batches
        next_batch = max(math.ceil(s["consumed"] / old_per_process) for s in saved)
    here, now = jax.process_index(), jax.process_count()
    skipped = {k: sum(s["skipped"][k] for s in saved) if here == 0 else 0 for k in saved[0]["skipped"]}
    if here == 0:
        print(f"data position: saved by {count} processes, now {now}; resuming at global batch {next_batch}"
              + ("" if next_batch == batches else f" ({next_batch - batches} batches' worth of examples skipped)"),
              flush=True)
    return {"consumed": next_batch * old_per_process * count // now, "batches": batches, "skipped": skipped,
            "process_index": here, "process_count": now}


def check_free_space(workdir: str | os.PathLike, abstract_state: Any, keep: int) -> None:
    """Raise before anything compiles if the workdir cannot hold this run's checkpoints: up to
    `keep` of them plus the one being written (fewer if some are already there). A bucket has
    no free-space figure (its limits are quotas and billing): not checked on gs://."""
    if paths.is_remote(workdir):
        return
    one = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
    folder = paths.path(workdir) / "checkpoints"
    present = sum(p.name.isdigit() for p in folder.iterdir()) if folder.is_dir() else 0
    more = max(keep + 1 - present, 1)
    free = shutil.disk_usage(workdir).free
    if free < one * more:
        gib = 2 ** 30
        raise Ov3Error(f"workdir {workdir} has {free / gib:.3g} GiB free, but this run's checkpoints need "
                       f"{one * more / gib:.3g} GiB ({more} x {one / gib:.3g} GiB with keep_checkpoints={keep}); "
                       "free space there, pick another --workdir, or lower config.keep_checkpoints.")


def _flat(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(getattr(leaf, "shape", ()))
            for path, leaf in leaves}


def check_compatible(saved_metadata: Any, expected: Any, where: paths.Path) -> None:
    saved, want = _flat(saved_metadata), _flat(expected)
    if any(not k.startswith("opt_state/") and saved.get(k) != want.get(k) for k in saved.keys() | want.keys()):
        # The optimizer moments mirror the params: listing them too would only repeat each name.
        saved = {k: v for k, v in saved.items() if not k.startswith("opt_state/")}
        want = {k: v for k, v in want.items() if not k.startswith("opt_state/")}
    problems = [f"{k}: saved {saved[k]}, expected {want[k]}" for k in sorted(saved.keys() & want.keys())
                if saved[k] != want[k]]
    problems += [f"{k}: in the checkpoint, not in this model" for k in sorted(saved.keys() - want.keys())]
    problems += [f"{k}: in this model, not in the checkpoint" for k in sorted(want.keys() - saved.keys())]
    if problems:
        shown = "\n  ".join(problems[:40]) + (f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else "")
        raise Ov3Error(f"checkpoint {where} does not fit the configured model ({len(problems)} mismatches):\n  "
                       f"{shown}\nUse the config the checkpoint was trained with (DIR/config.json), or a new workdir.")
