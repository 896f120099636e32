"""ov3.data.cache_latents: the cached latents are the VAE encoding of the cached centre crop,
which is the pipeline's own centre crop; the pipeline yields them; misuse is an Ov3Error."""

import numpy as np
import pytest

from ov3.data import cache_latents, pipeline, records, shapes
from ov3.errors import Ov3Error
from ov3.models import vae_weights
from tests.helpers import make_assets

SIZE = 16


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    data, vae = make_assets(tmp_path_factory.mktemp("assets"))
    out = tmp_path_factory.mktemp("cache") / "latents"
    cache_latents.main(["--data", str(data), "--vae", str(vae), "--image-size", str(SIZE),
                        "--out", str(out), "--batch", "24", "--threads", "2"])
    return str(data), str(vae), str(out)


def _iterator(path, train, **kw):
    cfg = pipeline.default_config()
    cfg.update(path=path, text_len=16, caption_len=24, read_threads=2, **kw)
    return pipeline.make_process_iterator(
        cfg, mesh=None, global_batch_size=16, image_size=SIZE, split="train" if train
        else "heldout", train=train, seed=0, tokenizer=None, process_index=0, process_count=1)


def test_manifest(cache):
    data, vae, out = cache
    m = records.read_manifest(out)
    src = records.read_manifest(data)
    for split in ("train", "heldout"):
        assert m["splits"][split]["num_examples"] == src["splits"][split]["num_examples"]
        assert len(m["splits"][split]["shards"]) == len(src["splits"][split]["shards"])
    info = m["latent_cache"]
    assert info["latent_shape"] == [8, 8, 16] and info["image_size"] == SIZE
    assert info["vae_sha256"] == shapes.vae_fingerprint(vae)
    shapes.check_vae(out, vae, "scale")


def test_training_refuses_a_cache_of_another_vae_setting(cache):
    """Checked at start, before the VAE loads or anything compiles."""
    from ov3 import train
    from tests.helpers import tiny_config
    data, vae, out = cache
    cfg = tiny_config(data, vae, **{"data.path": out, "data.use_cached_latents": True,
                                    "vae.latent_norm": "scale_shift"})
    with pytest.raises(Ov3Error, match=r"made with the VAE .* \(latent_norm='scale'\), not config.vae.path"):
        train.train(cfg, out + "_run")


def test_karpathy_captions_survive_caching(tmp_path):
    """The list of captions an image (retrieval's texts) is kept, and declared for TFDS."""
    import json

    from ov3.data import convert
    from tests.helpers import write_karpathy
    data, vae = make_assets(tmp_path)
    path = write_karpathy(tmp_path / "coco", [["a red", "a blue", "two"], ["one"]], ["test", "test"])
    src, out = tmp_path / "karpathy", tmp_path / "karpathy_latents"
    convert.main(["karpathy", "--input", str(path), "--root", str(tmp_path / "coco"), "--out", str(src),
                  "--split", "test", "--workers", "1", "--no-progress"])
    cache_latents.main(["--data", str(src), "--vae", str(vae), "--image-size", str(SIZE), "--out", str(out)])
    got = [records.parse_features(r) for r in
           pipeline.grain.sources.ArrayRecordDataSource(records.split_files(str(out), "test"))]
    assert sorted(tuple(f["captions"]) for f in got) == [(b"a red", b"a blue", b"two"), (b"one",)]
    assert records.read_manifest(str(out))["texts_key"] == "captions"
    assert "captions" in json.loads((out / "features.json").read_text())["featuresDict"]["features"]


def test_cached_batch_latent_is_the_vae_encoding_of_its_image(cache):
    data, vae_dir, out = cache
    b = next(_iterator(out, train=True, use_cached_latents=True, augment="rrc"))
    assert set(b) == {"image", "text", "caption", "latent"}
    assert b["latent"].shape == (16, 8, 8, 16) and b["latent"].dtype.name == "bfloat16"
    ref = np.asarray(vae_weights.from_pretrained(vae_dir).encode(b["image"]))
    lat = b["latent"].astype(np.float32)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_array_less(np.abs(lat - ref), 1e-2 * np.maximum(1, np.abs(ref)))


def test_cached_images_are_the_pipeline_centre_crops(cache):
    data, _, out = cache
    plain = list(_iterator(data, train=False))
    cached = list(_iterator(out, train=False, use_cached_latents=True))
    assert len(plain) == len(cached) == 1
    for k in ("image", "text", "caption", "mask"):
        np.testing.assert_array_equal(plain[0][k], cached[0][k])


def test_misuse(cache):
    data, _, out = cache
    with pytest.raises(Ov3Error, match="not a latent cache"):
        _iterator(data, train=True, use_cached_latents=True)
    cfg = pipeline.default_config()
    cfg.update(path=out, use_cached_latents=True)
    with pytest.raises(Ov3Error, match="holds 16 px crops"):
        pipeline.make_process_iterator(cfg, mesh=None, global_batch_size=16, image_size=32,
                                       split="train", train=True, seed=0, tokenizer=None,
                                       process_index=0, process_count=1)
