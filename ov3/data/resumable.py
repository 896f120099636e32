"""One split written as independent output shards, so that a long job can be resumed and
shared by several hosts.

    OUT/.work-{split}/plan.json          what is being built; a re-run must ask for the same
    OUT/.work-{split}/{i:05d}/           shard i in progress: records.SplitWriter(..., 1) here
    OUT/.work-{split}/{i:05d}/done.json  shard i finished: its manifest entry and its stats
    OUT/.work-{split}.{h}.lock           held while host h's job runs: a second one is refused

Hosts: with num_hosts = N, host h writes the shards i with i % N == h, and only those: it
deletes nothing another host writes (leftovers of its own unfinished shards only; --overwrite
needs N = 1). Host 0 then waits until every shard is done and finalizes. A re-run skips
finished shards and deletes and redoes unfinished ones (a shard is written by one worker from
its own inputs, so redoing it never duplicates an example). `finalize` moves the finished
shards to `OUT/{split}-{k:05d}-of-{K:05d}.array_record` (empty ones are dropped), returns the
split's manifest entry and removes the work folder. Every step is atomic or idempotent, so an
interruption at any point leaves a state a re-run completes.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import time
from typing import Any

from ov3.data import records
from ov3.errors import Ov3Error

DONE = "done.json"


class ShardedJob:
    """The resumable state of writing `num_shards` shards of `split` into `out`."""

    def __init__(self, out: str, split: str, num_shards: int, plan: dict[str, Any], *,
                 overwrite: bool = False, host_index: int = 0, num_hosts: int = 1):
        if not 0 <= host_index < num_hosts:
            raise Ov3Error(f"--host-index {host_index} with --num-hosts {num_hosts}: the "
                           f"index must be 0..{num_hosts - 1}.")
        if overwrite and num_hosts > 1:
            raise Ov3Error("--overwrite with --num-hosts > 1 would delete the other hosts' "
                           "work: run once with --num-hosts 1 --overwrite (or delete "
                           f"{os.path.join(out, f'.work-{split}')}) first.")
        self.out, self.split, self.num_shards = out, split, num_shards
        self.host_index, self.num_hosts = host_index, num_hosts
        self.work = os.path.join(out, f".work-{split}")
        os.makedirs(out, exist_ok=True)
        # Before anything is read or deleted.
        self._lock = _lock(f"{self.work}.{host_index}.lock")
        try:
            self._start(plan, overwrite)
        except BaseException:
            self.release()
            raise

    def _start(self, plan: dict[str, Any], overwrite: bool) -> None:
        plan = {**plan, "split": self.split, "num_shards": self.num_shards,
                "num_hosts": self.num_hosts}
        plan_path = os.path.join(self.work, "plan.json")
        if overwrite and os.path.exists(self.work):
            shutil.rmtree(self.work)
        if os.path.exists(plan_path):
            with open(plan_path) as f:
                old = json.load(f)
            if old != plan:
                changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
                raise Ov3Error(
                    f"{self.work} holds an unfinished job with other settings (differs in: "
                    f"{', '.join(changed)}). Re-run with the same arguments to resume it, or "
                    "pass --overwrite to start this split over.")
        else:  # Hosts starting at once write the same plan; the file is replaced whole.
            os.makedirs(self.work, exist_ok=True)
            records._write_json(plan_path, plan)

    def __getstate__(self) -> dict:  # Workers get a copy without the lock.
        return {**self.__dict__, "_lock": None}

    def shard_dir(self, i: int) -> str:
        return os.path.join(self.work, f"{i:05d}")

    def is_done(self, i: int) -> bool:
        return os.path.exists(os.path.join(self.shard_dir(i), DONE))

    def mine(self) -> list[int]:
        """The shards this host writes."""
        return list(range(self.host_index, self.num_shards, self.num_hosts))

    def pending(self) -> list[int]:
        """This host's shards still to write; the leftovers of its interrupted ones are
        deleted (never another host's)."""
        todo = [i for i in self.mine() if not self.is_done(i)]
        for i in todo:
            shutil.rmtree(self.shard_dir(i), ignore_errors=True)
        return todo

    def wait_for_all(self, poll_s: float = 2.0) -> None:
        """Returns once every host's shards are done (host 0 calls this before finalize)."""
        said = 0.0
        while missing := [i for i in range(self.num_shards) if not self.is_done(i)]:
            if time.monotonic() - said > 60:
                hosts = sorted({i % self.num_hosts for i in missing})
                print(f"waiting for {len(missing)} shards of hosts {hosts} (run each of them "
                      "again if it stopped)", file=sys.stderr, flush=True)
                said = time.monotonic()
            time.sleep(poll_s)

    def writer_args(self, i: int) -> tuple[str, str, int]:
        """(out_dir, split, num_shards) for the SplitWriter of shard i."""
        os.makedirs(self.shard_dir(i), exist_ok=True)
        return self.shard_dir(i), self.split, 1

    def mark_done(self, i: int, entry: dict, stats: dict | None = None) -> None:
        """Records shard i as finished (`entry`: what its SplitWriter.close() returned)."""
        records._write_json(os.path.join(self.shard_dir(i), DONE),
                            {"entry": entry, "stats": stats or {}})

    def done_info(self, i: int) -> dict:
        with open(os.path.join(self.shard_dir(i), DONE)) as f:
            return json.load(f)

    def finalize(self) -> tuple[dict, list[dict]]:
        """Moves the shards into place; returns (manifest entry of the split, shard stats)."""
        missing = [i for i in range(self.num_shards) if not self.is_done(i)]
        if missing:
            raise Ov3Error(f"{self.work}: shards {missing[:5]} are not finished; re-run.")
        infos = [self.done_info(i) for i in range(self.num_shards)]
        kept = [i for i, x in enumerate(infos) if x["entry"]["num_examples"]] or [0]
        names = [f"{self.split}-{k:05d}-of-{len(kept):05d}.array_record"
                 for k in range(len(kept))]
        # Shards of this split from an earlier run with another shard count would be read too.
        for old in glob.glob(os.path.join(self.out, f"{self.split}-*-of-*.array_record")):
            if os.path.basename(old) not in names:
                os.remove(old)
        for i, name in zip(kept, names):
            src = os.path.join(self.shard_dir(i), infos[i]["entry"]["shards"][0])
            if os.path.exists(src):  # else moved by a finalize that was interrupted
                os.replace(src, os.path.join(self.out, name))
        skipped: dict[str, int] = {}
        for x in infos:
            for reason, n in x["entry"]["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
        entry = {
            "num_examples": sum(x["entry"]["num_examples"] for x in infos),
            "num_bytes": sum(os.path.getsize(os.path.join(self.out, n)) for n in names),
            "shards": names,
            "shard_lengths": [infos[i]["entry"]["num_examples"] for i in kept],
            "skipped": dict(sorted(skipped.items())),
        }
        return entry, [x["stats"] for x in infos]

    def cleanup(self) -> None:
        """Removes the work folder (call once the manifest lists the split)."""
        shutil.rmtree(self.work, ignore_errors=True)

    def release(self) -> None:
        """Lets another job work on this split (call when done, also after an error)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _lock(path: str):
    """An exclusive lock on the file `path`, held until the returned file is closed or
    this process ends (also when killed)."""
    try:
        import fcntl
    except ImportError:  # Not POSIX: no guard against two jobs writing one split.
        return None
    f = open(path, "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise Ov3Error(f"Another job holds {path}: it is writing the same split right now. "
                       "Wait for it to finish (or stop it) before running this one.") from None
    return f


def merge_metadata(out: str, split: str, entry: dict, *, name: str, description: str,
                   extra: dict[str, Any]) -> dict:
    """Writes the folder's metadata with `split` added to the splits already there.

    Top-level `extra` keys replace earlier ones, except `per_split`, whose entries are merged
    by split name. Returns the manifest.
    """
    splits, old_extra = {}, {}
    if os.path.exists(os.path.join(out, records.MANIFEST)):
        old = records.read_manifest(out)
        splits = old.pop("splits")
        old_extra = {k: v for k, v in old.items()
                     if k not in ("format", "record", "name", "description")}
    splits[split] = entry
    merged = {**old_extra, **extra}
    merged["per_split"] = {**old_extra.get("per_split", {}), **extra.get("per_split", {})}
    records.write_metadata(out, splits, name=name, description=description, extra=merged)
    return records.read_manifest(out)
