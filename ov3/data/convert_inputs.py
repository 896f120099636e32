"""The input formats `python -m ov3.data.convert` reads: webdataset tars, tables, image folders,
Karpathy's COCO / Flickr30k caption splits.

A reader is a picklable description of the input. The converter asks it for one task per
output shard (`shard_tasks`), runs `read(task, tick, stats)` in a worker and writes what it
yields: an `Example`, or a `Bad`, counted by reason in the manifest next to the
decode.SKIP_REASONS that SplitWriter counts. `tick(n)` reports progress in the reader's
`unit` ("B" for tars, whose example counts are unknown up front; else examples).

Skip reasons found while reading (READ_SKIP_REASONS):
    missing_image   no image member (tar), or the file is missing / unreadable (table)
    missing_text    none of the configured text sources is present (tar); a null text (table)
    bad_json        the example's .json (tar) or its JSONL line is not a JSON object
    duplicate_key   the key was already written to this output shard (set by the converter)
    bad_tar         the tar ends early or is damaged: the example being read is lost (the
                    examples before it are kept; the file is listed under input_errors with
                    the bytes from the lost example's start to the file's end, and
                    Stats.bytes_lost sums them; compressed tars count compressed bytes, a
                    few KB low because of tarfile's read-ahead)
    image_too_large (also a decode.SKIP_REASONS) a tar member larger than max_member_bytes:
                    skipped in the stream, never read into memory
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import tarfile
import urllib.parse
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ov3 import paths
from ov3.errors import Ov3Error

READ_SKIP_REASONS = ("missing_image", "missing_text", "bad_json", "duplicate_key", "bad_tar")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
TAR_PATTERNS = ("*.tar", "*.tar.gz", "*.tgz")
# A member above this is skipped unread: a web photo is a few MB; max_pixels (64 Mi) of
# PNG RGB is at most ~200 MB but such images are skipped by the decoder anyway.
MAX_MEMBER_BYTES = 64 << 20


@dataclasses.dataclass
class Example:
    key: str
    image: bytes
    alt_text: str | bytes
    caption: str | bytes
    label: int | None = None
    sources: tuple[str, str] = ("", "")  # where alt_text and caption came from
    texts: tuple[str, ...] = ()  # every caption of the image (stored as TEXTS_FEATURE)


TEXTS_FEATURE = "captions"  # the records field holding several captions per image


@dataclasses.dataclass
class Bad:
    key: str
    reason: str  # one of READ_SKIP_REASONS
    detail: str = ""


Tick = Callable[[int], None]


@dataclasses.dataclass
class Stats:
    """What reading a shard's inputs found besides examples (merged into the manifest)."""
    input_errors: dict[str, str] = dataclasses.field(default_factory=dict)  # file → error
    bytes_lost: int = 0  # input bytes not read because a file broke (tars: see bad_tar)


def expand_inputs(inputs: Sequence[str], patterns: Sequence[str], what: str) -> list[str]:
    """Files named, matched by a glob, or in a named folder (matching `patterns`), sorted.
    gs:// inputs too (a glob there matches in the last path component only)."""
    files: list[str] = []
    for item in inputs:
        if paths.is_remote(item):
            folder, name = (item.rsplit("/", 1) if any(c in item for c in "*?[")
                            else (item, None))
            top = paths.path(folder)
            if name is None and not top.is_dir():
                found = [item] if top.exists() else []
            else:
                found = sorted(str(f) for p in ([name] if name else patterns) for f in top.glob(p))
        elif os.path.isdir(item):
            found = sorted(f for p in patterns for f in glob.glob(os.path.join(item, p)))
        elif any(c in item for c in "*?["):
            found = sorted(glob.glob(item))
        else:
            found = [item] if os.path.exists(item) else []
        if not found:
            raise Ov3Error(f"--input {item}: no {what} found (looked for {', '.join(patterns)}).")
        files += found
    return files


def _split_even(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of n items in `parts` contiguous, nearly equal pieces."""
    return [(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


def _first(sources: Sequence[str], available: Callable[[str], Any]) -> tuple[str, Any] | None:
    """(source, value) of the first source whose value is not None."""
    for s in sources:
        value = available(s)
        if value is not None:
            return s, value
    return None


# --- webdataset tars (img2dataset) -----------------------------------------------------

@dataclasses.dataclass
class WebDataset:
    """img2dataset-style tars: `KEY.jpg` (or another image extension) + `KEY.txt` / `KEY.json`.

    Tars may be gzip-, bzip2- or xz-compressed (`.tar.gz`, read as one stream like plain
    ones: `tarfile` mode "r|*"). A member larger than `max_member_bytes` is not read: its
    example is skipped as `image_too_large`.

    alt_text/caption come from the first present source of `alt_text_from`/`caption_from`:
    a field of KEY.json, or `txt` for KEY.txt. img2dataset's .json holds the caption column
    as `caption` plus the columns named in --save_additional_columns; for Recap-DataComp
    that is `re_caption` (the LLaVA recaption) and `org_caption` (the alt text), the column
    not chosen as --caption_col being in the .txt. So the defaults below work whichever of
    the two was the caption column, and plain alt-text sets (LAION) get the .txt twice.
    """
    files: list[str]
    alt_text_from: tuple[str, ...] = ("org_caption", "txt")
    caption_from: tuple[str, ...] = ("re_caption", "txt")
    max_member_bytes: int = MAX_MEMBER_BYTES
    unit = "B"

    def plan(self) -> dict:
        return {"format": "webdataset", "inputs": [str(paths.absolute(f)) for f in self.files],
                "alt_text_from": list(self.alt_text_from),
                "caption_from": list(self.caption_from),
                "max_member_bytes": self.max_member_bytes}

    def shard_tasks(self, num_shards: int) -> list[list[str]]:
        # A tar is read by one worker, so there are at most as many shards as tars.
        n = min(num_shards, len(self.files))
        return [self.files[a:b] for a, b in _split_even(len(self.files), n)]

    def weight(self, task: list[str]) -> int:
        return sum(paths.path(f).stat().length for f in task)

    def read(self, task: list[str], tick: Tick, stats: Stats) -> Iterator[Example | Bad]:
        for path in task:
            yield from self._read_tar(path, tick, stats)

    def _read_tar(self, path: str, tick: Tick, stats: Stats) -> Iterator[Example | Bad]:
        size, reported = paths.path(path).stat().length, 0
        # A gs:// tar is streamed (gcsfs reads ahead in blocks), never copied to disk.
        with paths.path(path).open("rb") as fobj:
            group_key, group, start = None, {}, 0  # start: file offset of the group's 1st member
            try:
                # Streaming mode: members in file order, no index built (tars are big), any
                # compression; a member we do not read is skipped, not held in memory.
                with tarfile.open(fileobj=fobj, mode="r|*") as tar:
                    plain = tar.fileobj.comptype == "tar"
                    for member in tar:
                        if not member.isfile():
                            continue
                        key, ext = _split_name(member.name)
                        if key != group_key:
                            if group_key is not None:
                                yield self._example(group_key, group)
                            # Where this example starts in the file: exact for plain tars;
                            # compressed ones are read ahead by up to tarfile's 10 KB buffer.
                            group, start = {}, member.offset if plain else reported
                        group_key = key
                        if member.size > self.max_member_bytes:
                            group[ext] = _TooLarge(member.size)
                        else:
                            group[ext] = tar.extractfile(member).read()
                        pos = fobj.tell()
                        tick(pos - reported)
                        reported = pos
                if group_key is not None:
                    yield self._example(group_key, group)
            except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
                lost = size - start
                stats.bytes_lost += lost
                stats.input_errors[path] = (f"{type(e).__name__}: {e}; {lost:,} of {size:,} "
                                            "bytes lost (from the example being read on)")
                if group_key is not None:  # The example being read when the tar broke.
                    yield Bad(group_key, "bad_tar", str(e))
        tick(size - reported)

    def _example(self, key: str, group: dict[str, bytes]) -> Example | Bad:
        large = {e: v.size for e, v in group.items() if isinstance(v, _TooLarge)}
        if large:
            return Bad(key, "image_too_large", f"members over {self.max_member_bytes:,} "
                                               f"bytes: {large}")
        image = next((group[e] for e in IMAGE_EXTENSIONS if e in group), None)
        if image is None:
            return Bad(key, "missing_image", f"members: {sorted(group)}")
        meta: dict = {}
        if "json" in group:
            try:
                meta = json.loads(group["json"])
            except (ValueError, UnicodeDecodeError) as e:
                return Bad(key, "bad_json", str(e))
            if not isinstance(meta, dict):
                return Bad(key, "bad_json", f"a JSON {type(meta).__name__}, not an object")

        def get(source: str):
            if source == "txt":
                return group.get("txt")  # bytes: SplitWriter checks it is UTF-8
            value = meta.get(source)
            return value if isinstance(value, str) else None

        found = []
        for field, sources in (("alt_text", self.alt_text_from), ("caption", self.caption_from)):
            found.append(_first(sources, get))
            if found[-1] is None:
                return Bad(key, "missing_text", f"{field}: none of {list(sources)}")
        (alt_source, alt_text), (caption_source, caption) = found
        return Example(key, image, alt_text, caption, sources=(alt_source, caption_source))


@dataclasses.dataclass
class _TooLarge:
    """Stands for a tar member that was skipped unread."""
    size: int


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first '.' of the file name."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(folder, stem), ext.lower()


# --- tables: JSONL / CSV / TSV / Parquet -----------------------------------------------

TABLE_PATTERNS = ("*.jsonl", "*.json", "*.csv", "*.tsv", "*.parquet")


@dataclasses.dataclass
class Table:
    """Rows with an image reference and texts (Recap-DataComp's columns by default).

    Image: the first of `image_columns` the table has; its value is a path relative to
    `root` (default: the table's folder) or absolute; an http(s) URL maps to
    `root/<host>/<path>` (the layout `wget -x` and most mirrors write); bytes or a
    {"bytes": ...} struct (Hugging Face Image columns) are the image itself.
    `image_template` (e.g. "images/{key}.jpg", filled from the row) overrides the column.
    Texts: the first of `alt_text_columns` / `caption_columns` the table has (Recap-
    DataComp: org_caption is the alt text, re_caption the synthetic caption).
    Key: `key_column` when the table has it, else "<table name>-<row>".
    """
    files: list[str]
    row_counts: list[int]
    image_columns: tuple[str, ...] = ("path", "image_path", "file_name", "filepath", "image",
                                      "jpg", "url")
    image_template: str = ""
    root: str = ""
    alt_text_columns: tuple[str, ...] = ("org_caption", "alt_text", "caption", "text")
    caption_columns: tuple[str, ...] = ("re_caption", "caption", "alt_text", "text")
    key_column: str = "key"
    unit = "examples"

    @classmethod
    def open(cls, inputs: Sequence[str], **options) -> "Table":
        files = expand_inputs(inputs, TABLE_PATTERNS, "JSONL/CSV/TSV/Parquet tables")
        return cls(files=files, row_counts=[_count_rows(f) for f in files], **options)

    def plan(self) -> dict:
        return {"format": "table", "inputs": [os.path.abspath(f) for f in self.files],
                "rows": self.row_counts, "image_columns": list(self.image_columns),
                "image_template": self.image_template, "root": self.root,
                "alt_text_columns": list(self.alt_text_columns),
                "caption_columns": list(self.caption_columns), "key_column": self.key_column}

    def shard_tasks(self, num_shards: int) -> list[list[tuple[int, int, int]]]:
        """Contiguous global row ranges, as [(file index, start row, stop row)] per shard."""
        total = sum(self.row_counts)
        tasks = []
        for a, b in _split_even(total, max(1, min(num_shards, total))):
            task, offset = [], 0
            for f, n in enumerate(self.row_counts):
                lo, hi = max(a, offset), min(b, offset + n)
                if lo < hi:
                    task.append((f, lo - offset, hi - offset))
                offset += n
            tasks.append(task)
        return tasks

    def weight(self, task: list[tuple[int, int, int]]) -> int:
        return sum(hi - lo for _, lo, hi in task)

    def read(self, task, tick: Tick, stats: Stats) -> Iterator[Example | Bad]:
        for f, lo, hi in task:
            path = self.files[f]
            columns = _columns(path)
            pick = {}
            for field, options in (("alt_text", self.alt_text_columns),
                                   ("caption", self.caption_columns),
                                   ("image", () if self.image_template else self.image_columns)):
                found = next((c for c in options if c in columns), None)
                if found is None and options:
                    raise Ov3Error(f"{path} has no {field} column: looked for {list(options)}, "
                                   f"it has {sorted(columns)}. Name it with "
                                   f"--{field.replace('_', '-')}-column.")
                pick[field] = found
            root = self.root or os.path.dirname(os.path.abspath(path))
            stem = os.path.splitext(os.path.basename(path))[0]
            # Parquet: read only the columns used (others may hold image bytes).
            used = None if self.image_template else sorted(
                {c for c in pick.values() if c} | ({self.key_column} & columns))
            for row_index, row in _rows(path, lo, hi, used):
                tick(1)
                key = row.get(self.key_column)
                key = str(key) if key not in (None, "") else f"{stem}-{row_index:09d}"
                if row.get("__bad_json__"):
                    yield Bad(key, "bad_json", row["__bad_json__"])
                    continue
                texts = [row.get(pick["alt_text"]), row.get(pick["caption"])]
                if any(t is None for t in texts):
                    yield Bad(key, "missing_text", f"row {row_index} of {path}")
                    continue
                image = self._image(row, pick["image"], root)
                if isinstance(image, Bad):
                    image.key = key
                    yield image
                    continue
                yield Example(key, image, str(texts[0]), str(texts[1]),
                              sources=(pick["alt_text"], pick["caption"]))

    def _image(self, row: dict, column: str | None, root: str) -> bytes | Bad:
        if self.image_template:
            try:
                ref: Any = self.image_template.format(**row)
            except (KeyError, IndexError, ValueError) as e:
                raise Ov3Error(f"--image-template {self.image_template!r}: {e!r}; fields are "
                               f"the table's columns: {sorted(row)}.") from e
        else:
            ref = row.get(column)
        if isinstance(ref, dict):  # Hugging Face Image struct: {"bytes": ..., "path": ...}
            ref = ref.get("bytes") or ref.get("path")
        if isinstance(ref, (bytes, bytearray)):
            return bytes(ref)
        if not ref:
            return Bad("", "missing_image", f"empty {column}")
        path = _local_path(str(ref), root)
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            return Bad("", "missing_image", f"{path}: {e.strerror}")


def _local_path(ref: str, root: str) -> str:
    url = urllib.parse.urlsplit(ref)
    if url.scheme in ("http", "https"):
        ref = os.path.join(url.netloc, urllib.parse.unquote(url.path).lstrip("/"))
    elif url.scheme == "file":
        ref = urllib.parse.unquote(url.path)
    return os.path.join(root, ref)  # An absolute ref stays itself.


def _kind(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    kinds = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv",
             ".parquet": "parquet"}
    if ext not in kinds:
        raise Ov3Error(f"{path}: unknown table type {ext!r}; use .jsonl, .csv, .tsv or .parquet.")
    return kinds[ext]


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise Ov3Error("Reading Parquet needs pyarrow: pip install pyarrow") from e
    return pq


def _count_rows(path: str) -> int:
    kind = _kind(path)
    if kind == "parquet":
        return _pq().ParquetFile(path).metadata.num_rows
    if kind == "jsonl":
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    with open(path, newline="", encoding="utf-8") as f:
        return sum(1 for _ in csv.DictReader(f, delimiter="\t" if kind == "tsv" else ","))


def _columns(path: str) -> set[str]:
    kind = _kind(path)
    if kind == "parquet":
        return set(_pq().ParquetFile(path).schema_arrow.names)
    if kind == "jsonl":  # JSONL rows may differ; the first good row names the columns.
        for _, row in _rows(path, 0, 1 << 62):
            if "__bad_json__" not in row:
                return set(row)
        return set()
    with open(path, newline="", encoding="utf-8") as f:
        return set(csv.DictReader(f, delimiter="\t" if kind == "tsv" else ",").fieldnames or ())


def _rows(path: str, lo: int, hi: int,
          columns: list[str] | None = None) -> Iterator[tuple[int, dict]]:
    """(row index, row) for rows lo..hi-1; a bad JSONL line is {"__bad_json__": why}.

    `columns` limits what Parquet reads (text formats read whole rows anyway)."""
    kind = _kind(path)
    if kind == "parquet":
        pf = _pq().ParquetFile(path)
        start = 0
        for g in range(pf.num_row_groups):  # Read only the row groups that overlap.
            n = pf.metadata.row_group(g).num_rows
            if start < hi and start + n > lo:
                for i, row in enumerate(pf.read_row_group(g, columns=columns).to_pylist(), start):
                    if lo <= i < hi:
                        yield i, row
            start += n
        return
    if kind == "jsonl":
        with open(path, "rb") as f:
            i = 0
            for line in f:
                if not line.strip():
                    continue
                if lo <= i < hi:
                    try:
                        row = json.loads(line)
                        if not isinstance(row, dict):
                            row = {"__bad_json__": f"a JSON {type(row).__name__}"}
                    except ValueError as e:
                        row = {"__bad_json__": str(e)}
                    yield i, row
                i += 1
                if i >= hi:
                    return
        return
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f, delimiter="\t" if kind == "tsv" else ",")):
            if i >= hi:
                return
            if i >= lo:
                yield i, row


# --- image folder with class subfolders ------------------------------------------------

class _FileList:
    """A reader whose input is a list of `items`, one image file under `root` each: strided
    output shards (like SplitWriter's round robin, so every shard has every class of a sorted
    list)."""
    root: str
    items: list
    unit = "examples"

    def shard_tasks(self, num_shards: int) -> list[list]:
        n = max(1, min(num_shards, len(self.items)))
        return [self.items[i::n] for i in range(n)]

    def weight(self, task) -> int:
        return len(task)

    def load(self, rel: str) -> bytes | Bad:
        """The bytes of root/rel, or why not."""
        try:
            with open(os.path.join(self.root, rel), "rb") as f:
                return f.read()
        except OSError as e:
            return Bad(rel, "missing_image", e.strerror or str(e))


@dataclasses.dataclass
class ImageFolder(_FileList):
    """`root/<class>/**/<image>` (torchvision's ImageFolder layout), for evaluations.

    Labels are class indices: the sorted folder names, or the order of a classes file whose
    lines are `folder` or `folder<TAB>display name`. alt_text and caption are the display
    name (zero-shot evaluators put it in their prompts). Files that are not images by their
    extension, and files directly under root, are ignored (and counted).
    """
    root: str
    folders: list[str]  # label i is folders[i]
    names: list[str]    # and its display name
    items: list[tuple[str, int]]  # (path relative to root, label), sorted
    ignored: int = 0

    @classmethod
    def open(cls, root: str, classes_file: str = "") -> "ImageFolder":
        if not os.path.isdir(root):
            raise Ov3Error(f"--input {root} is not a folder; imagefolder reads "
                           "root/<class>/<image>.")
        found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if classes_file:
            folders, names = _read_classes(classes_file)
            unknown = sorted(set(found) - set(folders))
            if unknown:
                raise Ov3Error(f"{root} has class folders not in {classes_file}: {unknown[:5]}; "
                               "add them to the classes file (one line each).")
        else:
            folders, names = found, found
        if not folders:
            raise Ov3Error(f"{root} has no class subfolders; imagefolder reads "
                           "root/<class>/<image>.")
        files, ignored = [], 0
        for label, folder in enumerate(folders):
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
                dirnames.sort()
                for name in sorted(filenames):
                    if name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS:
                        files.append((os.path.relpath(os.path.join(dirpath, name), root), label))
                    else:
                        ignored += 1
        ignored += sum(1 for d in os.listdir(root) if os.path.isfile(os.path.join(root, d)))
        return cls(root=root, folders=folders, names=names, items=files, ignored=ignored)

    def plan(self) -> dict:
        return {"format": "imagefolder", "inputs": [os.path.abspath(self.root)],
                "classes": self.names, "files": len(self.items)}

    def read(self, task, tick: Tick, stats: Stats) -> Iterator[Example | Bad]:
        for rel, label in task:
            tick(1)
            image = self.load(rel)
            yield image if isinstance(image, Bad) else Example(
                rel, image, self.names[label], self.names[label], label, sources=("class name", "class name"))


def _read_classes(path: str) -> tuple[list[str], list[str]]:
    folders, names = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.strip():
                folder, _, name = line.partition("\t")
                folders.append(folder.strip())
                names.append(name.strip() or folder.strip())
    if len(set(folders)) != len(folders):
        raise Ov3Error(f"{path} names a class folder twice.")
    return folders, names


# --- Karpathy's caption splits (COCO, Flickr30k) ----------------------------------------

KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


@dataclasses.dataclass
class Karpathy(_FileList):
    """Karpathy's split file (`dataset_coco.json`, `dataset_flickr30k.json`) and the image folder
    it refers to, for image-text retrieval: one record per image with all its captions in
    `captions` (COCO has 5-7, Flickr30k 5), the first as alt_text and the second as caption.

    Images are `root/<filepath>/<filename>` (COCO: filepath is val2014 or train2014, so root
    is the folder holding those) or `root/<filename>` (Flickr30k has no filepath). The output
    split name picks the images: train = train + restval (113,287 COCO images), val, test
    (COCO 5,000 images / 25,010 captions; Flickr30k 1,000 / 5,000).
    """
    path: str
    root: str
    split: str
    items: list[tuple[str, tuple[str, ...]]]  # (image path relative to root, its captions)

    @classmethod
    def open(cls, path: str, root: str, split: str) -> "Karpathy":
        if split not in KARPATHY_SPLITS:
            raise Ov3Error(f"--split {split!r}: a Karpathy split is one of {sorted(KARPATHY_SPLITS)} "
                           "(train includes restval).")
        if not os.path.isdir(root):
            raise Ov3Error(f"--root {root} is not a folder: give the folder the split file's image "
                           "paths are relative to (COCO: the one holding val2014/; Flickr30k: the images).")
        try:
            with open(path, encoding="utf-8") as f:
                images = json.load(f)["images"]
            items, found = [], {}
            for im in images:
                found[im["split"]] = found.get(im["split"], 0) + 1
                if im["split"] in KARPATHY_SPLITS[split]:
                    rel = os.path.join(im.get("filepath", ""), im["filename"])
                    items.append((rel, tuple(s["raw"].strip() for s in im["sentences"])))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise Ov3Error(f"--input {path} is not a Karpathy split file (dataset_coco.json / "
                           f"dataset_flickr30k.json: {{'images': [{{'filename', 'split', 'sentences': "
                           f"[{{'raw'}}]}}]}}): {type(e).__name__}: {e}") from None
        if not items:
            raise Ov3Error(f"{path} has no images in split {split!r} (it has {found}).")
        return cls(path=path, root=root, split=split, items=items)

    def plan(self) -> dict:
        return {"format": "karpathy", "inputs": [os.path.abspath(self.path)],
                "root": os.path.abspath(self.root), "karpathy_split": self.split, "images": len(self.items)}

    def read(self, task, tick: Tick, stats: Stats) -> Iterator[Example | Bad]:
        for rel, captions in task:
            tick(1)
            texts = tuple(c for c in captions if c)
            if not texts:
                yield Bad(rel, "missing_text", "no non-empty sentence")
                continue
            image = self.load(rel)
            yield image if isinstance(image, Bad) else Example(
                rel, image, texts[0], texts[min(1, len(texts) - 1)], texts=texts,
                sources=("sentence 1", f"sentence {min(2, len(texts))}"))
