"""ov3.data.synthetic: deterministic, consistent texts, and a complete dataset folder."""

import hashlib
import io
import os

import numpy as np
from PIL import Image

from ov3.data import records, synthetic
from ov3.data.tokenizer import Tokenizer


def test_same_seed_same_bytes_and_examples_are_independent():
    a = [synthetic.make_example(0, "train", i, 32) for i in range(6)]
    b = [synthetic.make_example(0, "train", i, 32) for i in (5, 4, 3, 2, 1, 0)][::-1]
    assert a == b  # byte-identical, whatever order they are made in
    c = synthetic.make_example(1, "train", 0, 32)
    d = synthetic.make_example(0, "heldout", 0, 32)
    assert c["image"] != a[0]["image"] and d["image"] != a[0]["image"]
    assert a[0]["key"] == "train-0000000"


def test_texts_describe_the_image():
    for i in range(20):
        ex = synthetic.make_example(3, "train", i, 64)
        img = np.asarray(Image.open(io.BytesIO(ex["image"])))
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        first, *groups = ex["caption"].removesuffix(".").split(". ")
        assert first.startswith("a small image on a ") and len(groups) == len(ex["alt_text"].replace(" and ", ", ").split(", "))
        background = first.removeprefix("a small image on a ").removesuffix(" background")
        # The corners of the image are background (objects keep inside their cells).
        np.testing.assert_allclose(img[0, 0], synthetic.BACKGROUNDS[background], atol=2)
        for word in ex["alt_text"].replace(",", " ").split():
            assert word == "and" or word in ex["caption"]
        # Every colour named in the alt text shows up in the pixels.
        for name, rgb in synthetic.COLOURS.items():
            present = (np.abs(img.astype(int) - rgb).sum(-1) < 30).sum() >= 6
            assert present == (f" {name} " in f" {ex['alt_text']} "), (name, ex["alt_text"])


def test_write_dataset(tmp_path):
    out = str(tmp_path / "shapes")
    synthetic.main(["--out", out, "--num-train", "24", "--num-heldout", "8", "--size",
                    "32", "--seed", "5", "--vocab-size", "300", "--num-labelled", "10", "6"])
    m = records.read_manifest(out)
    assert m["splits"]["train"]["num_examples"] == 24
    assert m["splits"]["heldout"]["num_examples"] == 8
    assert m["seed"] == 5 and m["image_size"] == 32
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3) and tok.vocab_size <= 300
    ex = synthetic.make_example(5, "train", 3, 32)
    row = tok.encode(ex["caption"], 64)
    assert tok.decode(row) == ex["caption"]  # every word of the grammar is in the vocab
    # Writing it again gives identical shards and vocabulary.
    out2 = str(tmp_path / "again")
    synthetic.write_dataset(out2, 24, 8, 32, seed=5, vocab_size=300)
    for name in ("train-00000-of-00001.array_record", "heldout-00000-of-00001.array_record",
                 "tokenizer.json"):
        assert _sha(os.path.join(out, name)) == _sha(os.path.join(out2, name)), name


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_labelled_set(tmp_path):
    """DIR/colours: one group per image, labelled by its colour's index in COLOURS, classes in the
    manifest; the pipeline yields the labels, and TFDS reads them as a ClassLabel."""
    from ov3.data import pipeline
    out = str(tmp_path / "data")
    splits = synthetic.write_dataset(out, 8, 4, 32, seed=2, vocab_size=200, num_labelled=(20, 10))
    assert splits["colours/train"]["num_examples"] == 20 and splits["colours/heldout"]["num_examples"] == 10
    folder = os.path.join(out, synthetic.LABELLED_SUBDIR)
    m = records.read_manifest(folder)
    colours = list(synthetic.COLOURS)
    assert m["classes"] == colours and m["label_key"] == "label"
    examples = [synthetic.make_example(3, "heldout", i, 32, one_group=True) for i in range(10)]
    for ex in examples:
        name = colours[ex["label"]]
        assert f" {name} " in f" {ex['alt_text']} " and " and " not in ex["alt_text"]  # one group, that colour
        assert not any(f" {other} " in f" {ex['alt_text']} " for other in colours if other != name)
    assert len({ex["label"] for ex in examples}) > 1
    cfg = pipeline.default_config()
    cfg.update(path=folder, tokenizer=os.path.join(out, "tokenizer.json"), label_key="label", read_threads=1)
    batches = list(pipeline.make_iterator(cfg, mesh=None, global_batch_size=5, image_size=32, split="heldout",
                                          train=False, seed=0))
    got = np.concatenate([b["label"][b["mask"]] for b in batches])
    assert sorted(got.tolist()) == sorted(ex["label"] for ex in examples)
    import tensorflow_datasets as tfds
    assert tfds.builder_from_directory(folder).info.features["label"].names == colours
