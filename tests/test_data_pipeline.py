"""ov3.data.pipeline: determinism, resume, process sharding, eval padding, skip counts."""

import hashlib
import io
import json

import jax
import numpy as np
import pytest
from array_record.python import array_record_module
from jax.sharding import Mesh, PartitionSpec
from PIL import Image

from ov3.data import pipeline, records, synthetic
from ov3.errors import Ov3Error

N_TRAIN, N_HELDOUT, SIZE = 40, 10, 32


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes"))
    synthetic.write_dataset(out, N_TRAIN, N_HELDOUT, SIZE, seed=0, vocab_size=256)
    return out


def _cfg(path, **kw):
    cfg = pipeline.default_config()
    cfg.path = path
    cfg.text_len, cfg.caption_len = 24, 96
    cfg.read_threads = 2
    cfg.update(kw)
    return cfg


def _it(cfg, gb=8, train=True, seed=0, split=None, pi=0, pc=1):
    return pipeline.make_process_iterator(
        cfg, mesh=None, global_batch_size=gb, image_size=SIZE,
        split=split or ("train" if train else "heldout"), train=train, seed=seed,
        tokenizer=None, process_index=pi, process_count=pc)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def _image_ids(split, n):
    """Hash of each example's pixels → its index (the synthetic images are all distinct)."""
    ids = {}
    for i in range(n):
        img = np.asarray(Image.open(io.BytesIO(synthetic.make_example(0, split, i, SIZE)["image"])))
        ids[hashlib.md5(img.tobytes()).hexdigest()] = i
    assert len(ids) == n
    return ids


def _rows(batch, ids):
    """Example index of every row of a center-cropped batch (same size: pixels kept)."""
    u8 = np.asarray(batch["image"])
    return [ids[hashlib.md5(row.tobytes()).hexdigest()] for row in u8]


def test_global_batch_on_mesh(shapes):
    devices = np.array(jax.devices())
    mesh = Mesh(devices.reshape(len(devices), 1, 1), ("data", "fsdp", "tensor"))
    gb = 4 * len(devices)
    it = pipeline.make_iterator(_cfg(shapes), mesh=mesh, global_batch_size=gb,
                                image_size=SIZE, split="train", train=True, seed=0)
    b = next(it)
    assert set(b) == {"image", "text", "caption"}
    assert b["image"].shape == (gb, SIZE, SIZE, 3) and b["image"].dtype == np.uint8  # 4x less to the devices
    assert b["text"].shape == (gb, 24) and b["caption"].shape == (gb, 96)
    assert b["text"].dtype == np.int32
    assert b["image"].sharding.spec == PartitionSpec(("data", "fsdp"))
    img, text = np.asarray(b["image"]), np.asarray(b["text"])
    assert img.min() < 64 and img.max() > 240
    x = np.asarray(jax.jit(pipeline.image_to_float)(b["image"]))  # on the device: [-1, 1]
    np.testing.assert_allclose(x, img.astype(np.float32) / 127.5 - 1, atol=1e-6)
    assert (text[:, 0] == 2).all() and ((text == 3).sum(1) == 1).all()  # BOS, one EOS
    assert (np.asarray(b["caption"])[:, -1] == 0).all()  # captions fit in 96: padded
    with pytest.raises(Ov3Error, match="data x fsdp"):
        pipeline.make_iterator(_cfg(shapes), mesh=mesh, global_batch_size=gb + 1,
                               image_size=SIZE, split="train", train=True, seed=0)
    bad_mesh = Mesh(devices.reshape(len(devices), 1), ("batch", "model"))
    with pytest.raises(Ov3Error, match="missing"):
        pipeline.make_iterator(_cfg(shapes), mesh=bad_mesh, global_batch_size=gb,
                               image_size=SIZE, split="train", train=True, seed=0)


def test_eval_texts_and_pixels_match_the_records(shapes):
    it = _it(_cfg(shapes), gb=4, train=False)
    tok = it.tokenizer
    batches = list(it)
    assert it.num_batches == 3 and len(batches) == 3
    assert [b["mask"].tolist() for b in batches][-1] == [True, True, False, False]
    rows = [(b, i) for b in batches for i in range(4) if b["mask"][i]]
    for idx, (b, i) in enumerate(rows):  # eval: file order, i.e. written order
        ex = synthetic.make_example(0, "heldout", idx, SIZE)
        np.testing.assert_array_equal(b["image"][i], np.asarray(Image.open(io.BytesIO(ex["image"]))))
        assert tok.decode(b["text"][i]) == ex["alt_text"]
        assert tok.decode(b["caption"][i]) == ex["caption"]
    assert (batches[-1]["image"][2:] == 0).all() and (batches[-1]["text"][2:] == 0).all()


def test_same_seed_same_batches_any_worker_count(shapes):
    a = _take(_it(_cfg(shapes)), 3)
    it = _it(_cfg(shapes, worker_count=1))  # a worker process: ~3 s to start
    b = _take(it, 3)
    it.close()
    assert _same(a, b)
    assert not _same(a, _take(_it(_cfg(shapes), seed=1), 3))
    # rrc draws crops from (seed, position): a new epoch gets new crops and order.
    epoch = _take(_it(_cfg(shapes)), 10)
    assert not np.array_equal(epoch[0]["image"], epoch[5]["image"])


def test_resume_gives_the_exact_next_batches(shapes):
    full = _take(_it(_cfg(shapes)), 8)  # 5 batches per epoch: crosses an epoch boundary
    it = _it(_cfg(shapes))
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    assert state["consumed"] == 24 and state["batches"] == 3
    resumed = _it(_cfg(shapes))
    resumed.set_state(state)
    assert _same(full[3:], _take(resumed, 5))
    assert resumed.get_state()["consumed"] == 64


def test_caption_sentence_and_colour_jitter_resume_exactly(shapes):
    """The second contrastive positive (one sentence of the caption) and the colour jitter are
    drawn from (seed, stream position), like the crop: a resumed run draws the same ones."""
    cfg = _cfg(shapes, color_jitter=0.4, grayscale=0.2)

    def it(c=cfg):
        return pipeline.make_process_iterator(c, mesh=None, global_batch_size=8, image_size=SIZE, split="train",
                                              train=True, seed=0, tokenizer=None, process_index=0,
                                              process_count=1, caption_sentence=True)
    full = _take(it(), 6)
    first = it()
    _take(first, 2)
    resumed = it()
    resumed.set_state(json.loads(json.dumps(first.get_state())))
    assert _same(full[2:], _take(resumed, 4))
    tok = first.tokenizer
    picks = []
    for b in full[:5]:  # one epoch
        for caption, sentence in zip(b["caption"], b["caption_sentence"]):
            sentences = pipeline.caption_sentences(tok.decode(caption))
            assert tok.decode(sentence) in sentences
            picks.append(sentences.index(tok.decode(sentence)))
    assert len(set(picks)) > 2  # not always the same sentence
    # Jitter changes pixels only; without it the same crops, texts and sentences come back.
    plain = _take(it(_cfg(shapes)), 1)[0]
    assert not np.array_equal(plain["image"], full[0]["image"])
    assert all(np.array_equal(plain[k], full[0][k]) for k in ("text", "caption", "caption_sentence"))
    assert pipeline.caption_sentences("A dog. It runs!! Fast...  ") == ["A dog", "It runs", "Fast"]


def test_processes_split_every_epoch(shapes):
    cfg = _cfg(shapes, augment="center_crop")  # pixels kept, so rows can be identified
    ids = _image_ids("train", N_TRAIN)
    single = [_rows(b, ids) for b in _take(_it(cfg, gb=8), 10)]
    procs = [[_rows(b, ids) for b in _take(_it(cfg, gb=8, pi=p, pc=2), 10)]
             for p in (0, 1)]
    for epoch in (slice(0, 5), slice(5, 10)):
        seen = [sum(procs[p][epoch], []) for p in (0, 1)]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(N_TRAIN))
    assert sum(single[:5], []) != sum(single[5:], [])  # reshuffled each epoch
    for k in range(10):  # global batch k: same examples whatever the process count
        assert sorted(single[k]) == sorted(procs[0][k] + procs[1][k])
    # Eval over 2 processes: same batch count on both, every example once.
    evals = [list(_it(cfg, gb=4, train=False, pi=p, pc=2)) for p in (0, 1)]
    assert len(evals[0]) == len(evals[1]) == 3
    heldout = _image_ids("heldout", N_HELDOUT)
    got = [i for e in evals for b in e for i in _rows({"image": b["image"][b["mask"]]}, heldout)]
    assert sorted(got) == list(range(N_HELDOUT))


@pytest.fixture(scope="module")
def dirty(tmp_path_factory, shapes):
    """Good examples interleaved with one of each kind of bad one."""
    out = str(tmp_path_factory.mktemp("dirty"))
    good = [synthetic.make_example(0, "train", i, SIZE) for i in range(6)]
    png = good[0]["image"]
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, 4)).save(buf, format="PNG")
    thin = buf.getvalue()
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="PNG")
    big = buf.getvalue()
    def ex(image=png, alt="alt", cap="cap"):
        return records.serialize_example({"key": "bad", "image": image, "alt_text": alt, "caption": cap})
    bad = [b"\x00\x01 not a protobuf", records.serialize_example({"key": "k", "image": png}),
           ex(image=b""), ex(image=b"not an image"), ex(image=png[:-40]),
           ex(image=big), ex(image=thin), ex(alt=" "), ex(cap=b"\xc3\x28")]
    w = array_record_module.ArrayRecordWriter(
        f"{out}/train-00000-of-00001.array_record", "group_size:1")
    recs = []
    for i, r in enumerate(bad):
        recs.append(r)
        if i < len(good):
            g = good[i]
            recs.append(records.serialize_example(
                {k: g[k] for k in ("key", "image", "alt_text", "caption")}))
    for r in recs:
        w.write(r)
    w.close()
    records.write_metadata(out, {"train": {"num_examples": len(recs), "num_bytes": 0,
                                           "shards": ["train-00000-of-00001.array_record"],
                                           "shard_lengths": [len(recs)], "skipped": {}}})
    return out, len(good), len(bad)


def test_bad_examples_are_skipped_and_counted(dirty, shapes):
    path, n_good, n_bad = dirty
    cfg = _cfg(path, tokenizer=f"{shapes}/tokenizer.json", num_epochs=1,
               max_pixels=SIZE * SIZE, min_side=8, augment="center_crop")
    want = {r: 1 for r in pipeline.decode.SKIP_REASONS}
    want["bad_record"] = 2
    it = _it(cfg, gb=3)
    batches = list(it)
    assert len(batches) == n_good // 3 and "mask" not in batches[0]
    assert it.stats() == want and it.get_state()["skipped"] == want
    assert sum(want.values()) == n_bad
    ev = _it(cfg, gb=4, train=False, split="train")
    masks = np.concatenate([b["mask"] for b in ev])
    assert masks.sum() == n_good and len(masks) == 16 and ev.stats() == want


def test_config_errors(shapes):
    with pytest.raises(Ov3Error, match="augment"):
        _it(_cfg(shapes, augment="flip"))
    with pytest.raises(Ov3Error, match="path is empty"):
        _it(_cfg(""))
    with pytest.raises(Ov3Error, match="not divisible by the 3 processes"):
        _it(_cfg(shapes), gb=8, pc=3)
    with pytest.raises(Ov3Error, match="Split 'validation'"):
        _it(_cfg(shapes), split="validation")
    with pytest.raises(Ov3Error, match="source"):
        _it(_cfg(shapes, source="webdataset"))


def test_a_run_that_cannot_progress_stops_with_the_counts(shapes):
    """A misspelt key fails when the iterator is made (before any compile); a filter that drops
    everything (min_side above every image) fails after the first SKIP_WINDOW/2 examples,
    where it used to pull the next example forever."""
    with pytest.raises(Ov3Error, match=r"config.data.text_key='alttext': the records of .* have no such "
                                       r"field; they hold \['alt_text', 'caption', 'image', 'key'\]"):
        _it(_cfg(shapes, text_key="alttext"))
    it = _it(_cfg(shapes, min_side=SIZE + 1))
    half = pipeline.SKIP_WINDOW // 2
    with pytest.raises(Ov3Error, match=rf"skipped {half + 1} of the first {half + 1} examples "
                                       rf"\(image_too_small: {half + 1}\); more than config.data.max_skip_fraction=0.5"):
        next(it)
    it = _it(_cfg(shapes, min_side=SIZE + 1))  # past the first examples (resumed): SKIP_WINDOW in a row
    it.set_state({"consumed": 2000, "batches": 250, "skipped": {}})
    with pytest.raises(Ov3Error, match=rf"skipped {pipeline.SKIP_WINDOW} examples in a row \(at stream position 3000\)"):
        next(it)


def test_read_latency_delays_every_read_and_changes_no_batch(shapes, capsys):
    """bench_data's bucket stand-in: with read_latency_ms every record read waits first;
    the batches are the ones without it. bench_data runs both settings back to back."""
    import time

    from ov3.tools import bench_data
    cfg = _cfg(shapes, read_threads=1)
    plain = _take(_it(cfg), 2)
    t0 = time.perf_counter()
    slow_it = pipeline.make_process_iterator(
        cfg, mesh=None, global_batch_size=8, image_size=SIZE, split="train", train=True,
        seed=0, tokenizer=None, process_index=0, process_count=1, read_latency_ms=20)
    slow = _take(slow_it, 2)
    assert time.perf_counter() - t0 >= 16 * 0.020  # 16 reads in one thread: what sleep guarantees
    assert _same(plain, slow)
    bench_data.main(["--path", shapes, "--image-size", str(SIZE), "--batch", "8",
                     "--batches", "1", "--threads", "2", "--read-latency-ms", "0,20"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r["read_latency_ms"] for r in rows] == [0, 20] and "ratio_to_0ms" in rows[1]
