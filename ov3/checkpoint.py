"""Orbax checkpoints holding the train state *and* the data iterator position together.

Layout: DIR/checkpoints/<step>/{state, data}; `state` is the TrainState pytree (restored
straight into the shardings of the current mesh, whatever mesh saved it), `data` has one JSON
file per process (grain's handler). Saves are async; orbax writes to a temporary directory
and renames it when complete, so a run killed mid-write never restores a partial step.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

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


class Checkpointer:
    def __init__(self, workdir: str | pathlib.Path, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any | None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator.get_state()))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None) -> Any:
        """Restore `step` into `abstract_state` (a pytree of ShapeDtypeStruct with shardings);
        a checkpoint of another model raises an Ov3Error listing every mismatched parameter."""
        check_compatible(self.manager.item_metadata(step)["state"], abstract_state, self.directory / str(step))
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(_IteratorRestore(data_iterator))
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _flat(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(getattr(leaf, "shape", ()))
            for path, leaf in leaves}


def check_compatible(saved_metadata: Any, expected: Any, where: pathlib.Path) -> None:
    saved, want = _flat(saved_metadata), _flat(expected)
    problems = [f"{k}: saved {saved[k]}, expected {want[k]}" for k in sorted(saved.keys() & want.keys())
                if saved[k] != want[k]]
    problems += [f"{k}: in the checkpoint, not in this model" for k in sorted(saved.keys() - want.keys())]
    problems += [f"{k}: in this model, not in the checkpoint" for k in sorted(want.keys() - saved.keys())]
    if problems:
        shown = "\n  ".join(problems[:40]) + (f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else "")
        raise Ov3Error(f"checkpoint {where} does not fit the configured model ({len(problems)} mismatches):\n  "
                       f"{shown}\nUse the config the checkpoint was trained with (DIR/config.json), or a new workdir.")
