"""ArrayRecord storage of captioned images, readable by grain and by TFDS.

A dataset is one folder:

    DIR/train-00000-of-00004.array_record ...   one file per shard, per split
    DIR/manifest.json                           ov3's index: counts, bytes, skips
    DIR/dataset_info.json, DIR/features.json    the same, for tfds.builder_from_directory
    DIR/tokenizer.json                          (optional) the vocabulary to use

Each record is a serialized `tf.train.Example` with four bytes features:
`key` (unique id), `image` (the encoded file as stored: PNG, JPEG, WebP… — never
re-encoded), `alt_text` and `caption` (UTF-8); converters may add an int64 `label` or a
list of texts (`captions`, several per image, for retrieval benchmarks). Why this format: it is the format TFDS
and TF (`tf.io.parse_single_example`) read, so the same shards open with
`tfds.builder_from_directory(DIR).as_data_source(split)` (an `Image` feature plus
three `Text` features) with no conversion. The codec is TF's own `example.proto`, as TFDS
ships it compiled (`tensorflow_datasets.proto.tf_example_pb2`): no TF needed, and records
written by other tools (e.g. unpacked int64 lists) read as TF reads them.

Shards are filled round-robin, so they differ in size by at most one record and a
split with fewer records than shards just has fewer shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from array_record.python import array_record_module
from google.protobuf import message
from tensorflow_datasets.proto import tf_example_pb2

from ov3 import paths
from ov3.data import decode
from ov3.errors import Ov3Error

MANIFEST = "manifest.json"
FORMAT = "ov3.records/1"
FEATURES = ("key", "image", "alt_text", "caption")
# group_size:1 keeps every record separately addressable: grain reads in random order.
_WRITER_OPTIONS = "group_size:1"


# --- tf.train.Example: TFDS's compiled copy of TF's example.proto (no TF needed) ----------

Value = bytes | str | int | Sequence[bytes | str] | Sequence[int]


def serialize_example(features: Mapping[str, Value]) -> bytes:
    """{name: bytes, str, int or a list of texts or ints} -> serialized tf.train.Example (ints
    as int64, e.g. a class label, which TFDS reads as a ClassLabel; a list of texts as one
    bytes_list, e.g. the five captions of a COCO image, which TFDS reads as a Sequence(Text))."""
    example = tf_example_pb2.Example()
    for name, value in sorted(features.items()):
        feature = example.features.feature[name]
        values = [value] if isinstance(value, (bytes, str, int)) else list(value)
        if values and all(isinstance(v, int) for v in values):
            feature.int64_list.value.extend(values)
        else:
            feature.bytes_list.value.extend(v.encode("utf-8") if isinstance(v, str) else v for v in values)
    return example.SerializeToString(deterministic=True)


def parse_features(data: bytes) -> dict[str, list]:
    """Serialized tf.train.Example -> {name: its values} (a list of bytes, ints or floats);
    ValueError if malformed. Reads every valid encoding (packed or unpacked int64 lists...)."""
    example = _parse(data)
    return {name: list(getattr(f, f.WhichOneof("kind")).value) if f.WhichOneof("kind") else []
            for name, f in example.features.feature.items()}


def parse_example(data: bytes) -> dict[str, bytes]:
    """Serialized tf.train.Example -> {name: first bytes value}; ValueError if malformed.

    Features that are not bytes lists (int64/float) are left out."""
    example = _parse(data)
    return {name: f.bytes_list.value[0] if f.bytes_list.value else b""
            for name, f in example.features.feature.items() if f.WhichOneof("kind") == "bytes_list"}


def _parse(data: bytes):
    try:
        return tf_example_pb2.Example.FromString(data)
    except message.DecodeError as e:
        raise ValueError(f"malformed tf.train.Example: {e}") from e


# --- writing -----------------------------------------------------------------------

class SplitWriter:
    """Writes one split of a dataset folder; call `write` per example, then `close`.

    With `validate=True` (the default) images are decoded and texts checked before they
    are stored, and bad examples are left out and counted by reason in the manifest.
    """

    def __init__(self, out_dir: str, split: str, num_shards: int, *,
                 validate: bool = True, max_pixels: int = decode.DEFAULT_MAX_PIXELS):
        if num_shards < 1:
            raise Ov3Error(f"num_shards={num_shards} for split {split!r}; use >= 1.")
        if not split or "-" in split or "/" in split:
            raise Ov3Error(f"Split name {split!r} must be non-empty without '-' or '/'.")
        os.makedirs(out_dir, exist_ok=True)
        self._dir, self._split, self._n = out_dir, split, num_shards
        self._validate, self._max_pixels = validate, max_pixels
        self._writers = [
            array_record_module.ArrayRecordWriter(self._tmp_path(i), _WRITER_OPTIONS)
            for i in range(num_shards)]
        self._lengths = [0] * num_shards
        self._count = 0
        self.skipped: dict[str, int] = {}

    def _tmp_path(self, i: int) -> str:
        return os.path.join(self._dir, f".{self._split}-{i:05d}.array_record.tmp")

    def write(self, key: str, image: bytes, alt_text: str | bytes, caption: str | bytes,
              extra: Mapping[str, Value] | None = None) -> str | None:
        """Stores one example; returns None, or the skip reason if it was left out."""
        if self._validate:
            try:
                for text in (alt_text, caption, *(t for v in (extra or {}).values()
                                                   if isinstance(v, (list, tuple)) for t in v)):
                    decode.decode_text(text)
                decode.decode_image(image, max_pixels=self._max_pixels)
            except decode.Skip as s:
                self.skipped[s.reason] = self.skipped.get(s.reason, 0) + 1
                return s.reason
        record = serialize_example(
            {"key": key, "image": image, "alt_text": alt_text, "caption": caption, **(extra or {})})
        shard = self._count % self._n
        self._writers[shard].write(record)
        self._lengths[shard] += 1
        self._count += 1
        return None

    def close(self) -> dict:
        """Finishes the shard files; returns this split's manifest entry."""
        for w in self._writers:
            w.close()
        used = [i for i in range(self._n) if self._lengths[i]] or [0]
        shards = []
        for i in range(self._n):
            if i in used:
                name = f"{self._split}-{i:05d}-of-{len(used):05d}.array_record"
                os.replace(self._tmp_path(i), os.path.join(self._dir, name))
                shards.append(name)
            else:
                os.remove(self._tmp_path(i))
        return {
            "num_examples": self._count,
            "num_bytes": sum(os.path.getsize(os.path.join(self._dir, s)) for s in shards),
            "shards": shards,
            "shard_lengths": [self._lengths[i] for i in used],
            "skipped": dict(sorted(self.skipped.items())),
        }


def write_metadata(out_dir: str, splits: Mapping[str, dict], *, name: str = "ov3_captions",
                   description: str = "", extra: Mapping | None = None) -> str:
    """Writes manifest.json and TFDS's dataset_info.json/features.json; returns manifest path."""
    manifest = {"format": FORMAT,
                "record": "tf.train.Example; bytes features " + ", ".join(FEATURES),
                "name": name, "description": description,
                "splits": dict(splits), **(extra or {})}
    _write_json(os.path.join(out_dir, MANIFEST), manifest)
    _write_json(os.path.join(out_dir, "dataset_info.json"), {
        "name": name, "version": "1.0.0", "description": description,
        "fileFormat": "array_record",
        "splits": [{"name": s, "numBytes": str(info["num_bytes"]),
                    "shardLengths": [str(n) for n in info["shard_lengths"]],
                    "filepathTemplate": "{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}"}
                   for s, info in splits.items()],
    })
    text = {"pythonClassName": "tensorflow_datasets.core.features.text_feature.Text",
            "text": {}}
    _write_json(os.path.join(out_dir, "features.json"), {
        "pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
        "featuresDict": {"features": {
            "key": text, "alt_text": text, "caption": text,
            "image": {"pythonClassName":
                          "tensorflow_datasets.core.features.image_feature.Image",
                      "image": {"shape": {"dimensions": ["-1", "-1", "3"]},
                                "dtype": "uint8"}},
        }}})
    return os.path.join(out_dir, MANIFEST)


def _write_json(path: str | os.PathLike, obj) -> None:
    text = json.dumps(obj, indent=2)
    if paths.is_remote(path):  # An object appears whole once its upload ends.
        paths.path(path).write_text(text)
        return
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)  # Readers never see half a file.


# --- reading -----------------------------------------------------------------------

def read_manifest(path: str) -> dict:
    """The manifest of the dataset folder `path`."""
    mpath = paths.path(path) / MANIFEST
    if not mpath.exists():
        raise Ov3Error(
            f"{mpath} not found: config.data.path must be a folder written by ov3 (e.g. "
            "python -m ov3.data.synthetic --out DIR); a missing manifest also means the "
            "conversion did not finish.")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format") != FORMAT:
        raise Ov3Error(f"{mpath} has format {manifest.get('format')!r}; this ov3 reads "
                       f"{FORMAT!r}. Rewrite the dataset with this version.")
    return manifest


def split_files(path: str, split: str) -> list[str]:
    """Paths of the shard files of `split`, in order."""
    splits = read_manifest(path)["splits"]
    if split not in splits:
        raise Ov3Error(f"Split {split!r} is not in {path}; it has {sorted(splits)}. "
                       "Set the split name in the config (e.g. config.data.eval_split).")
    files = [str(paths.path(path) / s) for s in splits[split]["shards"]]
    missing = [f for f in files if not paths.path(f).exists()]
    if missing:
        raise Ov3Error(f"Dataset {path} lists shards that are missing: {missing[:3]}...")
    return files


def add_class_label(out_dir: str, names: Sequence[str], feature: str = "label") -> None:
    """Declares the int64 `feature` as a TFDS ClassLabel in the folder's features.json.

    Call after `write_metadata` (which writes the four standard features only).
    TFDS reads the class names from `<feature>.labels.txt`, one a line.
    """
    _add_feature(out_dir, feature, {
        "pythonClassName": "tensorflow_datasets.core.features.class_label_feature.ClassLabel",
        "classLabel": {"numClasses": str(len(names))}})
    (paths.path(out_dir) / f"{feature}.labels.txt").write_text("".join(n + "\n" for n in names))


def add_text_list(out_dir: str, feature: str) -> None:
    """Declares the bytes list `feature` (several texts per example) as a TFDS Sequence(Text)."""
    _add_feature(out_dir, feature, {
        "pythonClassName": "tensorflow_datasets.core.features.sequence_feature.Sequence",
        "sequence": {"feature": {"pythonClassName": "tensorflow_datasets.core.features.text_feature.Text",
                                 "text": {}}, "length": "-1"}})


def _add_feature(out_dir: str, name: str, spec: dict) -> None:
    path = paths.path(out_dir) / "features.json"
    features = json.loads(path.read_text())
    features["featuresDict"]["features"][name] = spec
    _write_json(path, features)
