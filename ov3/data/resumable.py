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

OUT may be a gs:// folder: a shard is written in a local temporary folder and uploaded before
its done.json; finalize moves objects within the bucket; the lock file is then a local one
(it guards against a second job on this machine; hosts are kept apart by their shares).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from ov3 import paths
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
        self.out, self.split, self.num_shards = out, split, num_shards
        self.host_index, self.num_hosts = host_index, num_hosts
        self.work = paths.path(out) / f".work-{split}"
        if overwrite and num_hosts > 1:
            raise Ov3Error("--overwrite with --num-hosts > 1 would delete the other hosts' "
                           f"work: run once with --num-hosts 1 --overwrite (or delete "
                           f"{self.work}) first.")
        paths.makedirs(out)
        lock = f"{self.work}.{host_index}.lock"
        if paths.is_remote(out):  # No locks on objects: a local file guards this machine.
            lock = os.path.join(tempfile.gettempdir(),
                                f"ov3-{hashlib.sha1(lock.encode()).hexdigest()[:16]}.lock")
        self._lock = _lock(lock)  # Before anything is read or deleted.
        try:
            self._start(plan, overwrite)
        except BaseException:
            self.release()
            raise

    def _start(self, plan: dict[str, Any], overwrite: bool) -> None:
        plan = {**plan, "split": self.split, "num_shards": self.num_shards,
                "num_hosts": self.num_hosts}
        plan_path = self.work / "plan.json"
        if overwrite and self.work.exists():
            self.work.rmtree()
        if plan_path.exists():
            old = json.loads(plan_path.read_text())
            if old != plan:
                changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
                raise Ov3Error(
                    f"{self.work} holds an unfinished job with other settings (differs in: "
                    f"{', '.join(changed)}). Re-run with the same arguments to resume it, or "
                    "pass --overwrite to start this split over.")
        else:  # Hosts starting at once write the same plan; the file is replaced whole.
            paths.makedirs(self.work)
            records._write_json(plan_path, plan)

    def __getstate__(self) -> dict:  # Workers get a copy without the lock.
        return {**self.__dict__, "_lock": None}

    def shard_dir(self, i: int) -> paths.Path:
        return self.work / f"{i:05d}"

    def is_done(self, i: int) -> bool:
        return (self.shard_dir(i) / DONE).exists()

    def done(self) -> set[int]:
        """The finished shards, from one listing (a bucket answers it in one request)."""
        if not self.work.exists():
            return set()
        return {int(p.parent.name) for p in self.work.glob(f"*/{DONE}")}

    def mine(self) -> list[int]:
        """The shards this host writes."""
        return list(range(self.host_index, self.num_shards, self.num_hosts))

    def pending(self) -> list[int]:
        """This host's shards still to write; the leftovers of its interrupted ones are
        deleted (never another host's)."""
        done = self.done()
        todo = [i for i in self.mine() if i not in done]
        for i in todo:
            if self.shard_dir(i).exists():
                self.shard_dir(i).rmtree()
        return todo

    def wait_for_all(self, poll_s: float = 2.0) -> None:
        """Returns once every host's shards are done (host 0 calls this before finalize)."""
        said = 0.0
        while missing := sorted(set(range(self.num_shards)) - self.done()):
            if time.monotonic() - said > 60:
                hosts = sorted({i % self.num_hosts for i in missing})
                print(f"waiting for {len(missing)} shards of hosts {hosts} (run each of them "
                      "again if it stopped)", file=sys.stderr, flush=True)
                said = time.monotonic()
            time.sleep(poll_s)

    def writer_args(self, i: int) -> tuple[str, str, int]:
        """(out_dir, split, num_shards) for the SplitWriter of shard i: its folder, or for a
        bucket a local temporary one that mark_done uploads."""
        if paths.is_remote(self.out):
            return tempfile.mkdtemp(prefix=f"ov3-{self.split}-{i:05d}-"), self.split, 1
        paths.makedirs(self.shard_dir(i))
        return str(self.shard_dir(i)), self.split, 1

    def mark_done(self, i: int, entry: dict, stats: dict | None = None,
                  written_in: str = "") -> None:
        """Records shard i as finished (`entry`: what its SplitWriter.close() returned;
        `written_in`: the folder writer_args gave, uploaded first when it is a local stand-in)."""
        if written_in and paths.path(written_in) != self.shard_dir(i):
            for name in entry["shards"]:
                with open(os.path.join(written_in, name), "rb") as src, \
                        (self.shard_dir(i) / name).open("wb") as dst:
                    shutil.copyfileobj(src, dst, 16 << 20)
            shutil.rmtree(written_in)
        records._write_json(self.shard_dir(i) / DONE, {"entry": entry, "stats": stats or {}})

    def done_info(self, i: int) -> dict:
        return json.loads((self.shard_dir(i) / DONE).read_text())

    def finalize(self) -> tuple[dict, list[dict]]:
        """Moves the shards into place; returns (manifest entry of the split, shard stats)."""
        missing = sorted(set(range(self.num_shards)) - self.done())
        if missing:
            raise Ov3Error(f"{self.work}: shards {missing[:5]} are not finished; re-run.")
        out = paths.path(self.out)
        infos = [self.done_info(i) for i in range(self.num_shards)]
        kept = [i for i, x in enumerate(infos) if x["entry"]["num_examples"]] or [0]
        names = [f"{self.split}-{k:05d}-of-{len(kept):05d}.array_record"
                 for k in range(len(kept))]
        # Shards of this split from an earlier run with another shard count would be read too.
        for old in out.glob(f"{self.split}-*-of-*.array_record"):
            if old.name not in names:
                old.unlink()
        for i, name in zip(kept, names):
            src = self.shard_dir(i) / infos[i]["entry"]["shards"][0]
            if src.exists():  # else moved by a finalize that was interrupted
                src.replace(out / name)  # A rename here; a copy and delete in a bucket.
        skipped: dict[str, int] = {}
        for x in infos:
            for reason, n in x["entry"]["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
        entry = {
            "num_examples": sum(x["entry"]["num_examples"] for x in infos),
            "num_bytes": sum((out / n).stat().length for n in names),
            "shards": names,
            "shard_lengths": [infos[i]["entry"]["num_examples"] for i in kept],
            "skipped": dict(sorted(skipped.items())),
        }
        return entry, [x["stats"] for x in infos]

    def cleanup(self) -> None:
        """Removes the work folder (call once the manifest lists the split)."""
        if self.work.exists():
            self.work.rmtree()

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
    if (paths.path(out) / records.MANIFEST).exists():
        old = records.read_manifest(out)
        splits = old.pop("splits")
        old_extra = {k: v for k, v in old.items()
                     if k not in ("format", "record", "name", "description")}
    splits[split] = entry
    merged = {**old_extra, **extra}
    merged["per_split"] = {**old_extra.get("per_split", {}), **extra.get("per_split", {})}
    records.write_metadata(out, splits, name=name, description=description, extra=merged)
    return records.read_manifest(out)
