"""Records with features beyond records.py's four: int64 labels and extra bytes (latents).

`records.SplitWriter` stores `key`, `image`, `alt_text`, `caption`. Two kinds of dataset
need more: image-label sets for evaluations (an int64 `label`, which TFDS reads as a
`ClassLabel`) and the latent cache (`latent` and `latent_shape` bytes).

Protobuf parses a message followed by another as the merge of the two, so the extra
features are serialized as a second `Features` and appended to
`records.serialize_example`'s bytes: the result is one valid `tf.train.Example` (TFDS and
protobuf read it; `records.parse_example` reads its bytes features and ignores int64 ones,
which `parse_ints` reads).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from ov3.data import decode, records

Value = bytes | str | int


def _int64_features(ints: Mapping[str, int]) -> bytes:
    """Features{feature: {name: Feature{int64_list: Int64List{value: [v] (packed)}}}}."""
    entries = b""
    for name, value in sorted(ints.items()):
        packed = records._varint(int(value) & 0xFFFF_FFFF_FFFF_FFFF)  # two's complement
        feature = records._field(3, records._field(1, packed))  # Feature.int64_list = 3
        entries += records._field(1, records._field(1, name.encode()) + records._field(2, feature))
    return records._field(1, entries)


def serialize(features: Mapping[str, Value]) -> bytes:
    """{name: bytes | str | int} → one serialized tf.train.Example (ints as int64)."""
    ints = {k: v for k, v in features.items() if isinstance(v, int)}
    data = records.serialize_example({k: v for k, v in features.items() if k not in ints})
    return data + _int64_features(ints) if ints else data


def parse_ints(data: bytes) -> dict[str, int]:
    """Serialized tf.train.Example → {name: first int64 value}; ValueError if malformed."""
    out: dict[str, int] = {}
    try:
        for f, feats in records._fields(memoryview(data)):
            for f2, entry in records._fields(feats) if f == 1 else ():
                name, value = None, None
                for f3, part in records._fields(entry) if f2 == 1 else ():
                    if f3 == 1:
                        name = bytes(part).decode("utf-8")
                    elif f3 == 2:
                        for f4, ilist in records._fields(part):
                            if f4 == 3:  # int64_list; its values are packed (proto3 default)
                                for f5, packed in records._fields(ilist):
                                    if f5 == 1 and len(packed):
                                        v, _ = records._read_varint(packed, 0)
                                        value = v - (1 << 64) if v >= 1 << 63 else v
                if name is not None and value is not None:
                    out[name] = value
    except (IndexError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed tf.train.Example: {e}") from e
    return out


class SplitWriter(records.SplitWriter):
    """`records.SplitWriter` whose `write` also takes `extra` features (bytes, str or int)."""

    def write(self, key: str, image: bytes, alt_text: str | bytes, caption: str | bytes,
              extra: Mapping[str, Value] | None = None) -> str | None:
        if not extra:
            return super().write(key, image, alt_text, caption)
        # The same steps as records.SplitWriter.write, which has no hook for more features.
        if self._validate:
            try:
                decode.decode_text(alt_text)
                decode.decode_text(caption)
                decode.decode_image(image, max_pixels=self._max_pixels)
            except decode.Skip as s:
                self.skipped[s.reason] = self.skipped.get(s.reason, 0) + 1
                return s.reason
        record = serialize({"key": key, "image": image, "alt_text": alt_text,
                            "caption": caption, **extra})
        shard = self._count % self._n
        self._writers[shard].write(record)
        self._lengths[shard] += 1
        self._count += 1
        return None


def add_class_label(out_dir: str, names: Sequence[str], feature: str = "label") -> None:
    """Declares the int64 `feature` as a TFDS ClassLabel in the folder's features.json.

    Call after `records.write_metadata` (which writes the four standard features only).
    TFDS reads the class names from `<feature>.labels.txt`, one a line.
    """
    path = os.path.join(out_dir, "features.json")
    with open(path) as f:
        spec = json.load(f)
    spec["featuresDict"]["features"][feature] = {
        "pythonClassName":
            "tensorflow_datasets.core.features.class_label_feature.ClassLabel",
        "classLabel": {"numClasses": str(len(names))}}
    records._write_json(path, spec)
    with open(os.path.join(out_dir, f"{feature}.labels.txt"), "w") as f:
        f.write("".join(n + "\n" for n in names))
