"""ov3.data.convert: webdataset / table / imagefolder → records round trips, bad inputs
counted, resume after an interruption; the TFDS pipeline source."""

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import grain
import numpy as np
import pytest
from PIL import Image

from ov3.data import convert, convert_inputs, pipeline, records
from ov3.data.tokenizer import train_wordpiece
from ov3.errors import Ov3Error

SIZE = 16


def _image(i: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _pixels(data: bytes) -> bytes:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).tobytes()


def _tar(path, members, mode="w"):
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _records(out, split="train"):
    src = grain.sources.ArrayRecordDataSource(records.split_files(out, split))
    parsed = [records.parse_features(src[i]) for i in range(len(src))]
    return [({k: v[0] for k, v in f.items() if isinstance(v[0], bytes)},
             {k: v[0] for k, v in f.items() if isinstance(v[0], int)}) for f in parsed]


def _batches(out, split, **kw):
    """Every example of `split` through the eval pipeline (centre crop at SIZE: pixels kept)."""
    cfg = pipeline.default_config()
    cfg.update(path=out, text_len=32, caption_len=32, read_threads=1, **kw)
    it = pipeline.make_process_iterator(
        cfg, mesh=None, global_batch_size=4, image_size=SIZE, split=split, train=False, seed=0,
        tokenizer=None, process_index=0, process_count=1)
    rows = []
    for b in it:
        for i in np.flatnonzero(b["mask"]):
            rows.append({k: v[i] for k, v in b.items()})
    return rows, it


@pytest.fixture(scope="module")
def wds(tmp_path_factory):
    """Two good tars (img2dataset layout) with broken examples, and one truncated tar."""
    d = tmp_path_factory.mktemp("wds")
    good = {}
    members0, members1 = [], []
    for i in range(6):
        key = f"{i:09d}"
        img = _image(i, "PNG" if i % 2 else "JPEG")
        meta = {"url": f"http://x/{i}.jpg", "key": key, "caption": f"re {i}",
                "org_caption": f"alt {i}", "status": "success"}
        if i == 5:
            del meta["org_caption"]  # alt text falls back to the .txt
        members = members0 if i < 3 else members1
        members += [(f"{key}.jpg", img), (f"{key}.txt", f"re {i}".encode()),
                    (f"{key}.json", json.dumps(meta).encode())]
        good[key] = (img, f"alt {i}" if i != 5 else f"re {i}", f"re {i}")
    members0 += [("100.jpg", b"not an image"), ("100.txt", b"corrupt"),          # corrupt_image
                 ("101.jpg", _image(101, "JPEG")[:300]), ("101.txt", b"cut"),    # truncated_image
                 ("102.txt", b"no image"),                                        # missing_image
                 ("103.jpg", _image(103)), ("103.json", b"{\"url\": 1}"),         # missing_text
                 ("104.jpg", _image(104)), ("104.json", b"{not json"),            # bad_json
                 ("105.jpg", _image(105)), ("105.txt", b"\xff\xfe"),              # text_not_utf8
                 ("106.jpg", _image(106)), ("106.txt", b"  "),                    # empty_text
                 ("107.jpg", b""), ("107.txt", b"empty"),                         # empty_image
                 ("000000000.jpg", _image(0)), ("000000000.txt", b"dup")]         # duplicate_key
    _tar(d / "00000.tar", members0)
    _tar(d / "00001.tar", members1)
    _tar(d / "00002.tar", [("200.jpg", _image(200)), ("200.txt", b"lost")])
    data = (d / "00002.tar").read_bytes()
    (d / "00002.tar").write_bytes(data[:700])  # ends inside 200.jpg: bad_tar
    out = str(d / "out")
    reader = convert_inputs.WebDataset(convert_inputs.expand_inputs([str(d)], ("*.tar",), "tars"))
    manifest = convert.convert(reader, out, "train", num_shards=3, workers=2,
                               show_progress=False)
    train_wordpiece([t for _, a, c in good.values() for t in (a, c)], 64,
                    os.path.join(out, "tokenizer.json"))
    return out, good, manifest


def test_webdataset_round_trip_and_bad_inputs(wds):
    out, good, manifest = wds
    split = manifest["splits"]["train"]
    assert split["num_examples"] == 6 and len(split["shards"]) == 2  # 3rd tar: nothing kept
    assert split["skipped"] == {
        "bad_json": 1, "bad_tar": 1, "corrupt_image": 1, "duplicate_key": 1, "empty_image": 1,
        "empty_text": 1, "missing_image": 1, "missing_text": 1, "text_not_utf8": 1,
        "truncated_image": 1}
    info = manifest["per_split"]["train"]
    # re_caption is in no .json (img2dataset stores its caption column as "caption"), so
    # the caption comes from the .txt; one example has no org_caption either.
    assert info["text_sources"] == {"alt_text": {"org_caption": 5, "txt": 1},
                                    "caption": {"txt": 6}}
    assert list(info["input_errors"]) == [os.path.join(os.path.dirname(out), "00002.tar")]
    assert info["input_bytes_lost"] == 700  # the tar broke in its first example
    assert not os.path.exists(os.path.join(out, ".work-train"))
    rows, it = _batches(out, "train")
    tok = it.tokenizer
    expected = {(_pixels(img), tuple(tok.encode(a, 32)), tuple(tok.encode(c, 32)))
                for img, a, c in good.values() if img[:2] == b"\x89P"}  # PNGs: lossless
    got = {(np.asarray(r["image"], np.uint8).tobytes(), tuple(r["text"]),  # host batches are uint8
            tuple(r["caption"])) for r in rows}
    assert len(rows) == 6 and expected <= got
    stored = {f["key"].decode(): f for f, _ in _records(out)}
    assert stored.keys() == good.keys()
    for key, (img, alt, cap) in good.items():  # bytes stored as they came, texts as chosen
        assert stored[key]["image"] == img
        assert (stored[key]["alt_text"].decode(), stored[key]["caption"].decode()) == (alt, cap)


def test_rerun_of_a_finished_split_is_a_no_op(wds, capsys):
    out, _, manifest = wds
    reader = convert_inputs.WebDataset([])
    assert convert.convert(reader, out, "train", num_shards=3, workers=1,
                           show_progress=False) == manifest
    assert "already converted" in capsys.readouterr().out


def test_webdataset_tar_gz_member_cap_and_bytes_lost(tmp_path):
    """.tar.gz shards convert; a member over --max-member-mb is skipped unread and counted
    as image_too_large; a gz tar that ends early reports the bytes lost from the example
    being read on (to within tarfile's 10 KB read-ahead: compressed bytes)."""
    import tracemalloc
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    members = [m for i in range(3) for m in ((f"{i:03d}.png", _image(i)), (f"{i:03d}.txt", b"t"))]
    members += [("big.jpg", rng.bytes(8 << 20)), ("big.txt", b"too large"),  # 8 MB > 1 MB cap
                ("003.png", _image(3)), ("003.txt", b"t")]
    _tar(d / "a.tar.gz", members, "w:gz")

    def noise_png(i):  # ~49 KB that gzip cannot shrink: the break lands in a known example
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (128, 128, 3), np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    _tar(d / "b.tgz", [m for i in range(4) for m in ((f"b{i}.png", noise_png(i)), (f"b{i}.txt", b"t"))],
         "w:gz")
    cut = (d / "b.tgz").stat().st_size * 5 // 8  # inside b2.png
    (d / "b.tgz").write_bytes((d / "b.tgz").read_bytes()[:cut])
    out = str(tmp_path / "out")
    tracemalloc.start()
    convert.main(["webdataset", "--input", str(d), "--out", out, "--workers", "1",
                  "--max-member-mb", "1", "--no-progress"])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20  # the 8 MB member was never read whole
    m = records.read_manifest(out)
    split, info = m["splits"]["train"], m["per_split"]["train"]
    assert sorted(f["key"].decode() for f, _ in _records(out)) == ["000", "001", "002", "003", "b0", "b1"]
    assert split["skipped"] == {"bad_tar": 1, "image_too_large": 1}
    (path, error), = info["input_errors"].items()
    assert path.endswith("b.tgz") and f"{info['input_bytes_lost']:,} of {cut:,} bytes lost" in error
    # b2 starts after 2 x (PNG + txt); tarfile's read-ahead (10 KB) makes the count lower.
    lost = cut - 2 * (len(noise_png(0)) + 1024 + 1024)
    assert lost - 10240 - 1024 <= info["input_bytes_lost"] <= lost + 1024


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_table_formats(tmp_path, fmt):
    (tmp_path / "images").mkdir()
    (tmp_path / "example.com" / "a").mkdir(parents=True)
    rows = []
    for i in range(5):
        rel = f"images/{i}.png"
        (tmp_path / rel).write_bytes(_image(i))
        rows.append({"url": f"http://other/{i}.jpg", "path": rel, "key": f"k{i}",
                     "re_caption": f"a synthetic caption {i}", "org_caption": f"alt {i}"})
    (tmp_path / "example.com/a/5.png").write_bytes(_image(5))
    rows.append({"url": "", "path": "http://example.com/a/5.png", "key": "k5",
                 "re_caption": "re 5", "org_caption": "alt 5"})           # URL → host/path
    rows.append({**rows[0], "key": "k6", "path": "images/missing.png"})   # missing_image
    rows.append({**rows[0], "key": "k7", "path": "images/0.png", "re_caption": ""})  # empty_text
    table = tmp_path / f"meta.{fmt}"
    if fmt == "jsonl":
        table.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")  # bad_json
    elif fmt == "csv":
        with open(table, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), table, row_group_size=3)
    out = str(tmp_path / "out")
    convert.main(["table", "--input", str(table), "--out", out, "--shards", "3",
                  "--workers", "1", "--no-progress"])
    m = records.read_manifest(out)["splits"]["train"]
    expected_skips = {"missing_image": 1, "empty_text": 1}
    if fmt == "jsonl":
        expected_skips["bad_json"] = 1
    assert m["skipped"] == expected_skips and m["num_examples"] == 6
    assert sum(m["shard_lengths"]) == 6 and min(m["shard_lengths"]) > 0  # empty shards dropped
    stored = {f["key"].decode(): f for f, _ in _records(out)}
    assert sorted(stored) == [f"k{i}" for i in range(6)]
    for i in range(6):
        assert stored[f"k{i}"]["image"] == _image(i)
        assert stored[f"k{i}"]["caption"] == rows[i]["re_caption"].encode()
        assert stored[f"k{i}"]["alt_text"] == rows[i]["org_caption"].encode()


def test_table_errors(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"file": "x.png", "text": "t"}) + "\n")
    with pytest.raises(Ov3Error, match="no image column"):
        convert.convert(convert_inputs.Table.open([str(tmp_path / "t.jsonl")]),
                        str(tmp_path / "o"), "train", num_shards=1, workers=1,
                        show_progress=False)
    with pytest.raises(Ov3Error, match="no JSONL/CSV"):
        convert_inputs.Table.open([str(tmp_path / "nothing*.csv")])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder") / "val"
    expected = {}
    for c, cls in enumerate(["cat", "dog", "zebra fish"]):
        (root / cls / "sub").mkdir(parents=True)
        for j in range(3):
            rel = f"{cls}/sub/{j}.png" if j == 2 else f"{cls}/{j}.PNG"
            (root / rel).write_bytes(_image(10 * c + j))
            expected[rel] = (c, 10 * c + j)
    (root / "cat" / "notes.txt").write_text("ignored")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff junk")  # corrupt_image
    (root / "README").write_text("ignored too")
    out = str(root.parent / "out")
    convert.main(["imagefolder", "--input", str(root), "--out", out, "--split", "val",
                  "--shards", "2", "--workers", "1", "--no-progress"])
    return out, expected


def test_imagefolder_labels(folder):
    out, expected = folder
    m = records.read_manifest(out)
    assert m["classes"] == ["cat", "dog", "zebra fish"] and m["label_key"] == "label"
    assert m["splits"]["val"]["skipped"] == {"corrupt_image": 1}
    assert m["per_split"]["val"]["ignored_files"] == 2
    stored = {f["key"].decode(): (f, ints) for f, ints in _records(out, "val")}
    assert stored.keys() == expected.keys()
    for key, (label, seed) in expected.items():
        f, ints = stored[key]
        assert ints == {"label": label} and f["image"] == _image(seed)
        assert f["alt_text"] == f["caption"] == m["classes"][label].encode()
    # TFDS reads the labels as a ClassLabel with the class names.
    tfds = pytest.importorskip("tensorflow_datasets")
    builder = tfds.builder_from_directory(out)
    assert builder.info.features["label"].names == m["classes"]
    ex = builder.as_data_source("val")[0]
    assert m["classes"][ex["label"]].encode() == ex["caption"]


def test_tfds_source_matches_records(folder, tmp_path):
    """source="tfds" over the same folder: the same examples (texts from the ClassLabel)."""
    pytest.importorskip("tensorflow_datasets")
    out, expected = folder
    train_wordpiece(["cat", "dog", "zebra fish"], 32, os.path.join(out, "tokenizer.json"))
    rec_rows, _ = _batches(out, "val", label_key="label")
    tfds_rows, _ = _batches(out, "val", source="tfds", label_key="label",
                            text_key="label", caption_key="caption")
    assert len(rec_rows) == len(tfds_rows) == len(expected)
    for a, b in zip(rec_rows, tfds_rows):
        assert a.keys() == b.keys() == {"image", "text", "caption", "label", "mask"}
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # A TFDS data dir holding the set as name/version, named by tfds_name.
    shutil.copytree(out, tmp_path / "tfds" / "ov3_imagefolder" / "1.0.0")
    named, _ = _batches(str(tmp_path / "tfds"), "val", source="tfds",
                        tfds_name="ov3_imagefolder:1.0.0",
                        tokenizer=os.path.join(out, "tokenizer.json"))
    assert len(named) == len(expected)
    with pytest.raises(Ov3Error, match="not a feature"):
        _batches(out, "val", source="tfds", text_key="nope")
    with pytest.raises(Ov3Error, match="has no such int field"):
        _batches(out, "val", label_key="class")
    with pytest.raises(Ov3Error, match="cannot open the TFDS"):
        _batches(str(tmp_path), "val", source="tfds", tokenizer=os.path.join(out, "tokenizer.json"))


def test_resume_after_interruption(tmp_path, monkeypatch):
    root = tmp_path / "in"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for j in range(6):
            (root / c / f"{j}.png").write_bytes(_image(j + (10 if c == "b" else 0)))
    out = str(tmp_path / "out")
    reader = convert_inputs.ImageFolder.open(str(root))
    real_read = convert_inputs.ImageFolder.read

    def crash_in_second_shard(self, task, tick, stats):
        for n, item in enumerate(real_read(self, task, tick, stats)):
            if task[0] != reader.items[0] and n == 2:
                raise KeyboardInterrupt  # killed half way through shard 1
            yield item

    monkeypatch.setattr(convert_inputs.ImageFolder, "read", crash_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        convert.convert(reader, out, "train", num_shards=3, workers=1, show_progress=False)
    work = os.path.join(out, ".work-train")
    assert os.path.exists(os.path.join(work, "00000", "done.json"))
    assert not os.path.exists(os.path.join(work, "00001", "done.json"))
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    monkeypatch.setattr(convert_inputs.ImageFolder, "read", real_read)
    with pytest.raises(Ov3Error, match="other settings"):  # a different plan is refused
        convert.convert(reader, out, "train", num_shards=2, workers=1, show_progress=False)
    redone = []

    def record(self, task, tick, stats):
        redone.append(task)
        yield from real_read(self, task, tick, stats)

    monkeypatch.setattr(convert_inputs.ImageFolder, "read", record)
    m = convert.convert(reader, out, "train", num_shards=3, workers=1, show_progress=False)
    assert redone == reader.shard_tasks(3)[1:]  # shard 0 was kept, 1 redone, 2 done
    keys = [f["key"].decode() for f, _ in _records(out)]
    assert sorted(keys) == sorted(rel for rel, _ in reader.items) and len(set(keys)) == 12
    assert m["splits"]["train"]["shard_lengths"] == [4, 4, 4]
    assert not os.path.exists(work)


def test_one_job_per_split(tmp_path):
    from ov3.data import resumable
    job = resumable.ShardedJob(str(tmp_path), "train", 2, {"format": "x"})
    with pytest.raises(Ov3Error, match="writing the same split"):
        resumable.ShardedJob(str(tmp_path), "train", 2, {"format": "x"})
    job.release()
    resumable.ShardedJob(str(tmp_path), "train", 2, {"format": "x"}).release()


def test_karpathy_split_file_to_records_tfds_and_batches(tmp_path):
    """dataset_coco.json + images: one record per image with every caption, the split picked
    (train = train + restval), missing images counted; TFDS reads the captions as a
    Sequence(Text); the pipeline yields them as token rows, the same from both sources."""
    from tests.helpers import write_karpathy
    captions = [[f"a photo number {i} caption {j}" for j in range(5)] for i in range(5)]
    captions[1] = captions[1] + ["  ", "a sixth caption"]  # the blank one is dropped
    path = write_karpathy(tmp_path / "coco", captions, ["test", "test", "restval", "train", "test"],
                          missing=frozenset({4}))
    out = str(tmp_path / "out")
    for split in ("test", "train"):
        convert.main(["karpathy", "--input", str(path), "--root", str(tmp_path / "coco"), "--out", out,
                      "--split", split, "--workers", "1", "--no-progress"])
    m = records.read_manifest(out)
    assert m["texts_key"] == "captions"
    assert m["splits"]["test"]["num_examples"] == 2 and m["splits"]["test"]["skipped"] == {"missing_image": 1}
    assert m["splits"]["train"]["num_examples"] == 2  # restval + train
    assert m["per_split"]["test"]["max_texts"] == 6 and m["per_split"]["train"]["max_texts"] == 5
    src = grain.sources.ArrayRecordDataSource(records.split_files(out, "test"))
    stored = {}
    for i in range(len(src)):
        lists = records.parse_features(src[i])
        stored[lists["key"][0].decode()] = lists
    want = {f"val2014/COCO_val2014_{i:012d}.jpg": [c for c in captions[i] if c.strip()] for i in (0, 1)}
    assert {k: [c.decode() for c in v["captions"]] for k, v in stored.items()} == want
    for key, texts in want.items():
        assert stored[key]["alt_text"] == [texts[0].encode()] and stored[key]["caption"] == [texts[1].encode()]

    tokenizer = train_wordpiece([c for cs in captions for c in cs], 64, str(tmp_path / "tok.json"), min_frequency=1)
    rows = {}
    for source in ("arrayrecord", "tfds"):
        if source == "tfds":
            tfds = pytest.importorskip("tensorflow_datasets")
            features = tfds.builder_from_directory(out).info.features
            assert isinstance(features["captions"], tfds.features.Sequence)
        cfg = pipeline.default_config()
        cfg.update(path=out, source=source, text_len=12, read_threads=1)
        it = pipeline.make_process_iterator(
            cfg, mesh=None, global_batch_size=4, image_size=SIZE, split="test", train=False, seed=0,
            tokenizer=tokenizer, process_index=0, process_count=1, texts_key="captions", max_texts=6)
        (batch,) = list(it)
        assert batch["texts"].shape == (4, 6, 12) and batch["mask"].tolist() == [True, True, False, False]
        rows[source] = batch
        for r in range(2):  # one shard, written and read in the split file's order
            texts = want[f"val2014/COCO_val2014_{r:012d}.jpg"]
            n = int(batch["num_texts"][r])
            assert n == len(texts)
            np.testing.assert_array_equal(batch["texts"][r, :n], [tokenizer.encode(t, 12) for t in texts])
            assert not batch["texts"][r, n:].any()
    np.testing.assert_array_equal(rows["arrayrecord"]["texts"], rows["tfds"]["texts"])

    with pytest.raises(SystemExit):
        convert.main(["karpathy", "--input", str(path), "--root", str(tmp_path / "coco"), "--out", out,
                      "--split", "restval", "--workers", "1"])


def _host_cmd(inputs, out, host=None, hosts=None):
    cmd = [sys.executable, "-m", "ov3.data.convert", "webdataset", "--input", inputs, "--out", out,
           "--workers", "1", "--no-progress"]
    return cmd + (["--host-index", str(host), "--num-hosts", str(hosts)] if hosts else [])


def test_two_hosts_convert_gs_tars_like_one_host(tmp_path, gcs):
    """Webdataset tars in a bucket (fake-gcs-server), streamed: two processes acting as two
    hosts (--host-index/--num-hosts) convert one split into the bucket at once; the result
    equals a one-host conversion: the same shard files, records and manifest totals."""
    from ov3 import paths
    bucket = gcs.bucket("convert")
    for t in range(5):
        _tar(tmp_path / "t.tar", [m for i in range(3) for m in (
            (f"{t}{i:03d}.png", _image(10 * t + i)), (f"{t}{i:03d}.txt", f"text {t} {i}".encode()))])
        paths.path(f"{bucket}/tars/{t:05d}.tar").write_bytes((tmp_path / "t.tar").read_bytes())
    one, two = str(tmp_path / "one"), f"{bucket}/two"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    subprocess.run(_host_cmd(f"{bucket}/tars", one), check=True, env=env, capture_output=True)
    hosts = [subprocess.Popen(_host_cmd(f"{bucket}/tars/*.tar", two, h, 2), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for h in (1, 0)]
    logs = [h.communicate(timeout=180)[0] for h in hosts]
    assert [h.returncode for h in hosts] == [0, 0], logs
    assert "host 1 of 2: its 2 shards" in logs[0] and "this run wrote 9 examples" in logs[1]
    m1, m2 = records.read_manifest(one), records.read_manifest(two)
    assert m2["splits"] == m1["splits"] and m2["splits"]["train"]["num_examples"] == 15
    for shard in m1["splits"]["train"]["shards"]:
        assert (tmp_path / "one" / shard).read_bytes() == paths.path(f"{two}/{shard}").read_bytes()
    assert not paths.path(f"{two}/.work-train").exists()  # host 0 cleaned up after both
    # Training reads the bucket directly: array_record opens gs:// shards itself.
    tokenizer = str(tmp_path / "tokenizer.json")
    train_wordpiece([f"text {t} {i}" for t in range(5) for i in range(3)], 64, tokenizer)
    local, _ = _batches(one, "train", tokenizer=tokenizer)
    remote, _ = _batches(two, "train", tokenizer=tokenizer)
    assert len(remote) == 15 and all(np.array_equal(a[k], b[k]) for a, b in zip(local, remote) for k in a)
