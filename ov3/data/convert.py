"""Converts existing image-text (or image-label) data into an ov3 records folder.

    python -m ov3.data.convert webdataset --input /data/recap_wds --out /data/recap \
        --split train --shards 1024 --workers 16
    python -m ov3.data.convert table --input /data/recap/meta.parquet --out /data/recap \
        --split train [--image-column path] [--image-template 'images/{key}.jpg'] \
        [--root DIR] [--alt-text-column org_caption] [--caption-column re_caption]
    python -m ov3.data.convert imagefolder --input /data/imagenet/val --out /data/in1k \
        --split val [--classes classes.txt]
    python -m ov3.data.convert karpathy --input dataset_coco.json --root /data/coco \
        --out /data/coco_karpathy --split test

Inputs (see ov3.data.convert_inputs for the details of each format):
  webdataset   img2dataset tars (.tar, .tar.gz): KEY.jpg + KEY.txt and/or KEY.json
  table        JSONL / CSV / TSV / Parquet rows naming local image files (or holding the
               bytes), with Recap-DataComp's columns by default: org_caption → alt_text,
               re_caption → caption
  imagefolder  root/<class>/<image>: adds an int64 `label`, the class names go to the
               manifest (`classes`) and to TFDS's ClassLabel; alt_text = caption = class name
  karpathy     Karpathy's dataset_coco.json / dataset_flickr30k.json + their images: every
               caption of an image in `captions` (a TFDS Sequence(Text)), which the
               retrieval evaluator scores as 5-captions-per-image retrieval

The output is the folder ov3.data.records describes (the same one grain and TFDS read);
several splits can be converted into one folder by running once per split.

Parallel: each output shard is written by one worker process from its own inputs (a
tar is never split between shards, so there are at most as many shards as tars).
Resumable: finished shards are kept (ov3.data.resumable); after an interruption, run the
same command again: finished shards are skipped, unfinished ones redone, nothing is
written twice. Several hosts: run the command on each with --host-index i --num-hosts N
(the same --out, a bucket or a shared folder); each writes every N-th shard, host 0 waits
for the rest and writes the manifest. Bad examples are left out and counted by reason (decode.SKIP_REASONS and
convert_inputs.READ_SKIP_REASONS); the manifest and the closing table list the counts.
Keys are checked for duplicates within an output shard, not across shards.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import threading
import time
from typing import Any

from tqdm import tqdm

from ov3 import paths
from ov3.data import decode, records, resumable
from ov3.data.convert_inputs import (MAX_MEMBER_BYTES, TAR_PATTERNS, TEXTS_FEATURE, Bad,
                                     ImageFolder, Karpathy, Stats, Table, WebDataset,
                                     expand_inputs)
from ov3.errors import Ov3Error

# Set in each worker by _init_worker (and in this process when workers <= 1).
_WORKER: dict[str, Any] = {}


class _Ticker:
    """Progress from a worker: batched onto a queue (a few puts per second), or direct."""

    def __init__(self, sink):
        self._sink, self._pending, self._last = sink, 0, time.monotonic()

    def __call__(self, n: int) -> None:
        self._pending += n
        if time.monotonic() - self._last > 0.25:
            self.flush()

    def flush(self) -> None:
        parent = _WORKER.get("parent")
        if parent is not None and os.getppid() != parent:
            # The converter was killed: stop too, or a re-run and this orphan would write
            # the same shard at once.
            os._exit(1)
        if self._pending:
            self._sink(self._pending)
        self._pending, self._last = 0, time.monotonic()


def _init_worker(queue, reader, job: resumable.ShardedJob, max_pixels: int) -> None:
    _WORKER.update(reader=reader, job=job, max_pixels=max_pixels,
                   sink=queue.put if queue is not None else None,
                   parent=os.getppid() if queue is not None else None)


def _convert_shard(i: int, task: Any, sink=None) -> int:
    """Writes output shard i from `task` and marks it done; returns i."""
    reader, job = _WORKER["reader"], _WORKER["job"]
    tick = _Ticker(sink or _WORKER["sink"])
    folder, split, n = job.writer_args(i)
    writer = records.SplitWriter(folder, split, n, max_pixels=_WORKER["max_pixels"])
    stats, seen, max_texts = Stats(), set(), 0
    sources: dict[str, dict[str, int]] = {"alt_text": {}, "caption": {}}
    for item in reader.read(task, tick, stats):
        if isinstance(item, Bad) or item.key in seen:
            reason = item.reason if isinstance(item, Bad) else "duplicate_key"
            writer.skipped[reason] = writer.skipped.get(reason, 0) + 1
            continue
        extra = {"label": item.label} if item.label is not None else {}
        if item.texts:
            extra[TEXTS_FEATURE] = list(item.texts)
        if writer.write(item.key, item.image, item.alt_text, item.caption, extra) is None:
            seen.add(item.key)
            max_texts = max(max_texts, len(item.texts))
            for field, source in zip(sources, item.sources):
                sources[field][source] = sources[field].get(source, 0) + 1
    tick.flush()
    job.mark_done(i, writer.close(), {"text_sources": sources, "max_texts": max_texts,
                                      "input_errors": stats.input_errors,
                                      "bytes_lost": stats.bytes_lost}, written_in=folder)
    return i


def convert(reader, out: str, split: str, *, num_shards: int, workers: int,
            overwrite: bool = False, name: str = "ov3_converted", description: str = "",
            max_pixels: int = decode.DEFAULT_MAX_PIXELS, show_progress: bool = True,
            host_index: int = 0, num_hosts: int = 1) -> dict | None:
    """Writes `split` of `out` from `reader`'s input; returns the manifest.

    With num_hosts > 1 this host writes its share of the shards (ov3.data.resumable);
    host 0 waits for the others and writes the manifest, the others return None."""
    classes = getattr(reader, "names", None)  # an image-label set
    manifest_path = paths.path(out) / records.MANIFEST
    if manifest_path.exists():
        old = records.read_manifest(out)
        if classes is not None and old.get("classes") not in (None, classes):
            raise Ov3Error(f"{manifest_path} has other classes ({len(old['classes'])}) than "
                           f"{reader.root} ({len(classes)}): labels would not match between "
                           "splits. Pass the same --classes file for every split.")
        work = paths.path(out) / f".work-{split}"
        if split in old["splits"] and not work.exists() and not overwrite:
            print(f"{out}: split {split!r} is already converted "
                  f"({old['splits'][split]['num_examples']} examples); nothing to do. "
                  "Pass --overwrite to convert it again.")
            return old
    tasks = reader.shard_tasks(num_shards)
    if len(tasks) < num_shards:
        print(f"note: {len(tasks)} output shards, not {num_shards}: there are only "
              f"{len(tasks)} input {'tars' if reader.unit == 'B' else 'examples'}.")
    job = resumable.ShardedJob(out, split, len(tasks), {**reader.plan(), "max_pixels": max_pixels},
                               overwrite=overwrite, host_index=host_index, num_hosts=num_hosts)
    try:
        t0 = time.time()
        todo = job.pending()
        _write_shards(reader, job, tasks, todo, workers, max_pixels, show_progress)
        written_now = sum(job.done_info(i)["entry"]["num_examples"] for i in todo)
        if host_index:
            print(f"host {host_index} of {num_hosts}: its {len(job.mine())} shards of split "
                  f"{split!r} are written ({written_now} examples this run); host 0 writes the "
                  "manifest once every host is done.")
            return None
        job.wait_for_all()
        entry, shard_stats = job.finalize()
        info = _summary(reader, entry, shard_stats, time.time() - t0, written_now)
        extra: dict[str, Any] = {"source": "ov3.data.convert", "per_split": {split: info}}
        if classes is not None:
            extra.update(classes=classes, class_folders=reader.folders, label_key="label")
        if info["max_texts"]:
            extra.update(texts_key=TEXTS_FEATURE)
        manifest = resumable.merge_metadata(out, split, entry, name=name,
                                            description=description, extra=extra)
        if classes is not None:
            records.add_class_label(out, classes)
        if "texts_key" in manifest:
            records.add_text_list(out, manifest["texts_key"])
        job.cleanup()
    finally:
        job.release()
    print(report(split, entry, info, out))
    if classes is None:  # image-text sets are trained on, and training needs a tokenizer
        from ov3.data.tokenizer import describe
        print(describe(out))
    return manifest


def _write_shards(reader, job: resumable.ShardedJob, tasks: list, todo: list[int],
                  workers: int, max_pixels: int, show_progress: bool) -> None:
    """Writes the shards in `todo`, in this process or a pool, with a progress bar."""
    mine = job.mine()  # This host's shards (all of them on one host).
    if len(todo) < len(mine):
        print(f"resuming: {len(mine) - len(todo)} of {len(mine)} shards already written")
    bar = tqdm(total=sum(reader.weight(tasks[i]) for i in mine),
               initial=sum(reader.weight(tasks[i]) for i in mine if i not in todo),
               unit=reader.unit, unit_scale=True, desc=f"{job.split}: {len(todo)} shards",
               disable=not show_progress, smoothing=0.05)
    try:
        if workers <= 1 or len(todo) <= 1:
            _init_worker(None, reader, job, max_pixels)
            for n, i in enumerate(todo, len(mine) - len(todo) + 1):
                _convert_shard(i, tasks[i], sink=bar.update)
                bar.set_postfix(shards=f"{n}/{len(mine)}")
        else:
            _run_pool(reader, job, tasks, todo, workers, max_pixels, bar)
    except KeyboardInterrupt:
        bar.close()
        finished = sum(job.is_done(i) for i in mine)
        print(f"\ninterrupted: {finished} of {len(mine)} shards finished. Run the same "
              "command again to resume.", file=sys.stderr)
        raise
    bar.close()


def _run_pool(reader, job, tasks, todo, workers, max_pixels, bar) -> None:
    # spawn, not fork: the parent has threads (tqdm, the progress drain below).
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()

    def drain():
        while (n := queue.get()) is not None:
            bar.update(n)

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    pool = ctx.Pool(min(workers, len(todo)), initializer=_init_worker,
                    initargs=(queue, reader, job, max_pixels))
    try:
        finished, mine = len(job.mine()) - len(todo), len(job.mine())
        for _ in pool.imap_unordered(_star, [(i, tasks[i]) for i in todo]):
            finished += 1
            bar.set_postfix(shards=f"{finished}/{mine}")
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
        queue.put(None)
        drainer.join()


def _star(args: tuple[int, Any]) -> int:
    return _convert_shard(*args)


def _summary(reader, entry: dict, shard_stats: list[dict], seconds: float,
             written_now: int) -> dict:
    sources: dict[str, dict[str, int]] = {}
    errors: dict[str, str] = {}
    for s in shard_stats:
        for field, counts in s["text_sources"].items():
            for src, n in counts.items():
                sources.setdefault(field, {})[src] = sources.get(field, {}).get(src, 0) + n
        errors.update(s["input_errors"])
    return {"format": reader.plan()["format"], "num_inputs": len(reader.plan()["inputs"]),
            "examples_read": entry["num_examples"] + sum(entry["skipped"].values()),
            "text_sources": sources, "input_errors": errors,
            "input_bytes_lost": sum(s.get("bytes_lost", 0) for s in shard_stats),
            "max_texts": max(s.get("max_texts", 0) for s in shard_stats),
            "ignored_files": getattr(reader, "ignored", 0),
            "last_run": {"seconds": round(seconds, 1), "examples_written": written_now}}


def report(split: str, entry: dict, info: dict, out: str) -> str:
    """The closing table: what was written, what was skipped and why, where texts came from."""
    rows = [("examples read", info["examples_read"]), ("examples written", entry["num_examples"])]
    rows += [(f"skipped: {r}", n) for r, n in entry["skipped"].items()]
    for field, counts in info["text_sources"].items():
        rows += [(f"{field} from: {src}", n) for src, n in sorted(counts.items())]
    if info["ignored_files"]:
        rows.append(("ignored files (not images)", info["ignored_files"]))
    if info["input_bytes_lost"]:
        rows.append(("input bytes lost (broken files)", info["input_bytes_lost"]))
    width = max(len(r[0]) for r in rows)
    run = info["last_run"]
    lines = [f"split {split!r} → {out}: {len(entry['shards'])} shards, "
             f"{entry['num_bytes'] / 1e6:.1f} MB; this run wrote {run['examples_written']} "
             f"examples in {run['seconds']:.1f} s "
             f"({run['examples_written'] / max(run['seconds'], 0.1):.0f}/s)",
             f"  {'':{width}}  {'count':>10}"]
    lines += [f"  {k:{width}}  {v:>10,}" for k, v in rows]
    lines += [f"  input error: {f}: {e}" for f, e in sorted(info["input_errors"].items())]
    return "\n".join(lines)


def _texts(value: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in value.split(",") if s.strip())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ov3.data.convert",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="format", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--input", nargs="+", required=True,
                        help="files, globs or folders (imagefolder: the root folder)")
    common.add_argument("--out", required=True, help="the ov3 records folder to write")
    common.add_argument("--split", default="train")
    common.add_argument("--shards", type=int, default=0,
                        help="output shards (default: one per tar, or one per 10k examples)")
    common.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes (1: convert in this process)")
    common.add_argument("--overwrite", action="store_true",
                        help="convert the split again, discarding earlier (partial) output")
    common.add_argument("--name", default="", help="dataset name in the metadata")
    common.add_argument("--max-pixels", type=int, default=decode.DEFAULT_MAX_PIXELS,
                        help="larger images are skipped (decompression bombs)")
    common.add_argument("--no-progress", action="store_true")
    common.add_argument("--host-index", type=int, default=0,
                        help="this host's index when --num-hosts hosts convert one split")
    common.add_argument("--num-hosts", type=int, default=1,
                        help="hosts converting the split at once (each runs this command "
                             "with its own --host-index; host 0 writes the manifest)")
    w = sub.add_parser("webdataset", parents=[common], help="img2dataset tar shards")
    w.add_argument("--alt-text-from", default="org_caption,txt",
                   help="comma list: .json fields, or 'txt' for KEY.txt; first present wins")
    w.add_argument("--caption-from", default="re_caption,txt", help="same, for the caption")
    w.add_argument("--max-member-mb", type=int, default=MAX_MEMBER_BYTES >> 20,
                   help="a larger tar member is skipped unread (counted as image_too_large)")
    t = sub.add_parser("table", parents=[common], help="JSONL/CSV/TSV/Parquet + image files")
    t.add_argument("--image-column", default=",".join(Table.image_columns),
                   help="comma list; the first column the table has is used")
    t.add_argument("--image-template", default="",
                   help="image path from the row's columns, e.g. 'images/{key}.jpg'")
    t.add_argument("--root", default="", help="folder image paths are relative to "
                                               "(default: each table's folder)")
    t.add_argument("--alt-text-column", default=",".join(Table.alt_text_columns))
    t.add_argument("--caption-column", default=",".join(Table.caption_columns))
    t.add_argument("--key-column", default="key")
    f = sub.add_parser("imagefolder", parents=[common], help="root/<class>/<image>")
    f.add_argument("--classes", default="",
                   help="file: one class a line, 'folder' or 'folder<TAB>display name'; "
                        "its order gives the labels (default: sorted folder names)")
    k = sub.add_parser("karpathy", parents=[common],
                       help="dataset_coco.json / dataset_flickr30k.json + images (--split train|val|test)")
    k.add_argument("--root", required=True, help="the folder the split file's image paths are relative to")
    args = p.parse_args(argv)
    try:
        if args.format == "webdataset":
            reader = WebDataset(expand_inputs(args.input, TAR_PATTERNS, "tar files"),
                                _texts(args.alt_text_from), _texts(args.caption_from),
                                max_member_bytes=args.max_member_mb << 20)
            shards = args.shards or len(reader.files)
        elif args.format == "table":
            reader = Table.open(args.input, image_columns=_texts(args.image_column),
                                image_template=args.image_template, root=args.root,
                                alt_text_columns=_texts(args.alt_text_column),
                                caption_columns=_texts(args.caption_column),
                                key_column=args.key_column)
            shards = args.shards or -(-sum(reader.row_counts) // 10_000)
        elif args.format == "karpathy":
            if len(args.input) != 1:
                raise Ov3Error("karpathy takes one --input file (dataset_coco.json or dataset_flickr30k.json).")
            reader = Karpathy.open(args.input[0], args.root, args.split)
            shards = args.shards or -(-len(reader.items) // 10_000)
        else:
            if len(args.input) != 1:
                raise Ov3Error("imagefolder takes one --input folder (root/<class>/<image>).")
            reader = ImageFolder.open(args.input[0], args.classes)
            shards = args.shards or -(-len(reader.items) // 10_000)
        convert(reader, args.out, args.split, num_shards=max(shards, 1), workers=args.workers,
                overwrite=args.overwrite, name=args.name or f"ov3_{args.format}",
                description=f"Converted by ov3.data.convert {args.format}.",
                max_pixels=args.max_pixels, show_progress=not args.no_progress,
                host_index=args.host_index, num_hosts=args.num_hosts)
    except Ov3Error as e:
        print(f"ov3: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
