"""ov3.data.records: tf.train.Example codec, sharded writer, manifest, TFDS and grain reads."""

import io
import json

import grain
import pytest
from PIL import Image

from ov3.data import records
from ov3.errors import Ov3Error


def _png(value: int, size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_example_codec_round_trip_and_protobuf_compatible():
    feats = {"key": "k-1", "image": bytes(range(256)) * 600, "alt_text": "h\u00e9llo",
             "caption": ""}
    raw = records.serialize_example(feats)
    assert records.parse_example(raw) == {k: v if isinstance(v, bytes) else v.encode()
                                          for k, v in feats.items()}
    # The bytes are a real tf.train.Example (TFDS vendors the proto; TF is not needed).
    pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.proto import tf_example_pb2 as pb
    ex = pb.Example.FromString(raw)
    assert ex.features.feature["alt_text"].bytes_list.value == [b"h\xc3\xa9llo"]
    assert ex.features.feature["image"].bytes_list.value[0] == feats["image"]
    # ...and we read what protobuf writes, ignoring non-bytes features.
    ex.features.feature["label"].int64_list.value.append(7)
    ex.features.feature["score"].float_list.value.append(0.5)
    parsed = records.parse_example(ex.SerializeToString())
    assert parsed["caption"] == b"" and parsed["key"] == b"k-1" and "label" not in parsed
    with pytest.raises(ValueError):
        records.parse_example(raw[:-5])


def test_unpacked_int64_list_is_read():
    """Other writers (proto2 code, hand-rolled encoders) store int64 lists unpacked: a tag and a
    varint per value. Both encodings are valid protobuf; the label reads either way."""
    def ld(field: int, payload: bytes) -> bytes:  # a length-delimited field (payloads < 128 bytes)
        return bytes([field << 3 | 2, len(payload)]) + payload
    unpacked_list = bytes([1 << 3 | 0, 7, 1 << 3 | 0, 9])  # Int64List{value: 7, value: 9}, unpacked
    feature = ld(3, unpacked_list)  # Feature.int64_list
    raw = ld(1, ld(1, ld(1, b"label") + ld(2, feature)) + ld(1, ld(1, b"key") + ld(2, ld(1, ld(1, b"k")))))
    from tensorflow_datasets.proto import tf_example_pb2 as pb
    assert list(pb.Example.FromString(raw).features.feature["label"].int64_list.value) == [7, 9]
    assert records.parse_features(raw) == {"label": [7, 9], "key": [b"k"]}
    assert records.parse_features(records.serialize_example({"key": "k", "label": [7, 9]})) == \
        records.parse_features(raw)  # what ov3 writes (packed) reads the same


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ds"))
    w = records.SplitWriter(out, "train", num_shards=3)
    for i in range(7):
        assert w.write(f"k{i}", _png(i), f"alt {i}", f"caption {i}") is None
    assert w.write("bad1", b"garbage", "alt", "cap") == "corrupt_image"
    assert w.write("bad2", _png(9), " ", "cap") == "empty_text"
    assert w.write("bad3", _png(9), "alt", b"\xff\xfe") == "text_not_utf8"
    small = records.SplitWriter(out, "val", num_shards=4)  # fewer examples than shards
    small.write("v0", _png(100), "a", "b")
    splits = {"train": w.close(), "val": small.close()}
    records.write_metadata(out, splits, name="tiny", extra={"seed": 1})
    return out


def test_writer_shards_and_manifest(dataset):
    m = records.read_manifest(dataset)
    train = m["splits"]["train"]
    assert train["num_examples"] == 7 and train["shard_lengths"] == [3, 2, 2]
    assert train["shards"] == [f"train-{i:05d}-of-00003.array_record" for i in range(3)]
    assert train["skipped"] == {"corrupt_image": 1, "empty_text": 1, "text_not_utf8": 1}
    assert train["num_bytes"] > 7 * 60
    assert m["splits"]["val"]["shards"] == ["val-00000-of-00001.array_record"]
    assert m["seed"] == 1 and m["format"] == records.FORMAT
    json.dumps(m)


def test_grain_reads_shards(dataset):
    src = grain.sources.ArrayRecordDataSource(records.split_files(dataset, "train"))
    assert len(src) == 7
    keys = sorted(records.parse_example(src[i])["key"] for i in range(7))
    assert keys == [f"k{i}".encode() for i in range(7)]  # round-robin: k0,k3,k6 in shard 0
    assert records.parse_example(src[1])["key"] == b"k3"


def test_tfds_reads_the_same_folder(dataset):
    tfds = pytest.importorskip("tensorflow_datasets")
    builder = tfds.builder_from_directory(dataset)
    assert builder.info.splits["train"].num_examples == 7
    ds = builder.as_data_source("train")
    ex = ds[0]
    assert ex["key"] == b"k0" and ex["caption"] == b"caption 0"
    assert ex["image"].shape == (6, 8, 3) and ex["image"][0, 0, 0] == 0
    assert builder.as_data_source("val")[0]["image"][0, 0, 0] == 100


def test_reader_errors(dataset, tmp_path):
    with pytest.raises(Ov3Error, match="manifest.json not found"):
        records.read_manifest(str(tmp_path))
    with pytest.raises(Ov3Error, match=r"has \['train', 'val'\]"):
        records.split_files(dataset, "test")
    with pytest.raises(Ov3Error, match="num_shards"):
        records.SplitWriter(str(tmp_path), "train", 0)
