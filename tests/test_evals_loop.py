"""Evaluators (ov3/evals/evaluators.py) on tiny real parts: the same numbers on every mesh,
known answers through the plumbing with fake encoders, rows in metrics.jsonl from the
training loop, the CLI's table and files, clear errors for bad `config.evals` entries."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ov3 import config as config_lib
from ov3 import evaluate, sharding, train
from ov3 import metrics as metrics_lib
from ov3.data import records
from ov3.data.tokenizer import Tokenizer
from ov3.errors import Ov3Error
from ov3.evals import evaluators, inception, metrics, reconstruction
from ov3.evals.base import Context, ModelFns
from tests.helpers import make_assets, tiny_config

CLASSES = ["circle", "square", "triangle", "diamond"]


def _grey(k: int) -> int:
    return 40 + 50 * k  # class k is a flat image of this grey level


def write_labelled(out, tokenizer_json, train=32, heldout=12, int_labels=False):
    """Flat grey images whose alt-text/caption is a class name, like the imagefolder converter
    writes. Every 4th held-out text names the next class: the image says k, the text k+1.
    `int_labels`: also an int64 `label` (the image's class) and the class list in the manifest,
    as `python -m ov3.data.convert imagefolder` writes them."""
    splits = {}
    for split, n in (("train", train), ("heldout", heldout)):
        writer = records.SplitWriter(str(out), split, 1)
        for i in range(n):
            k = i % len(CLASSES)
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (_grey(k),) * 3).save(buf, format="PNG")
            name = CLASSES[(k + 1) % len(CLASSES)] if split == "heldout" and i % 4 == 3 else CLASSES[k]
            writer.write(f"{split}-{i}", buf.getvalue(), name, name, extra={"label": k} if int_labels else None)
        splits[split] = writer.close()
    records.write_metadata(str(out), splits, extra=dict(classes=CLASSES, label_key="label") if int_labels else None)
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    data, vae = make_assets(root)
    labelled = write_labelled(root / "labelled", data / "tokenizer.json")
    return data, vae, labelled


# ------------------------------------------------------------------ fakes: known answers

def fake_fns(tok: Tokenizer, text_len: int, image_from_text: bool) -> ModelFns:
    """Embeddings = bags of token ids. Images: the bag of their own text (retrieval is then
    perfect), or the bag of the class their grey level shows (labelled split)."""
    special = jnp.array([tok.pad_id, tok.bos_id, tok.eos_id])

    def bag(ids):  # 64 wide like the tiny model's features, so the probe compiles once for both
        keep = ~jnp.isin(ids, special)
        return (jax.nn.one_hot(ids % 64, 64) * keep[..., None]).sum(axis=1)

    class_bags = bag(jnp.asarray(tok.encode_batch(CLASSES, text_len)))

    def encode_image(params, frozen, batch):
        if image_from_text:
            pooled = bag(batch["text"])
        else:
            level = batch["image"].astype(jnp.float32).mean(axis=(1, 2, 3))
            k = jnp.clip(jnp.round((level - _grey(0)) / 50), 0, len(CLASSES) - 1).astype(jnp.int32)
            pooled = class_bags[k]
        return pooled, jnp.repeat(pooled[:, None], 4, axis=1)

    identity = lambda params, frozen, images: images  # noqa: E731
    return ModelFns(identity, identity, encode_image, lambda params, ids: bag(ids))


def fake_evaluators(cfg, fns, tok, axes=dict(data=2, fsdp=2, tensor=2)):
    cfg.mesh.update(axes)
    ctx = Context(cfg=cfg, mesh=sharding.make_mesh(cfg.mesh), scope=contextlib.nullcontext,
                  tokenizer=tok, fns=fns)
    return evaluators.build(cfg, ctx)


@pytest.fixture()
def fake_inception(monkeypatch):
    """A cheap stand-in for the FID network (its parity is tests/test_evals_inception.py)."""
    monkeypatch.setattr(inception, "FEATURE_DIM", 6)
    monkeypatch.setattr(inception, "load_fid_inception", lambda path: {"w": jnp.ones((3, 6))})
    monkeypatch.setattr(reconstruction, "inception_features",
                        lambda v, x: jnp.concatenate([x.mean((1, 2)), x.std((1, 2))], -1) * v["w"][0])


def test_known_answers_through_the_plumbing(assets, tmp_path, fake_inception):
    data, vae, labelled = assets
    from ov3.models import lpips as lpips_lib
    x = jnp.zeros((1, 16, 16, 3))
    lpips_lib.save_lpips(lpips_lib.LPIPS().init(jax.random.key(1), x, x)["params"], tmp_path / "lpips.safetensors")
    tok = Tokenizer.from_file(str(data / "tokenizer.json"))
    cfg = tiny_config(data, vae)
    cfg.evals.ret = dict(type="retrieval")
    cfg.evals.ret_caption = dict(type="retrieval", text_key="caption", batch_size=8)
    cfg.evals.recon = dict(type="reconstruction", vae_only=True, max_examples=5, batch_size=8,
                           lpips_path=str(tmp_path / "lpips.safetensors"), inception_path="fid.pth")
    out = fake_evaluators(cfg, fake_fns(tok, cfg.data.text_len, image_from_text=True), tok).run(None, None)
    for name in ("ret", "ret_caption"):
        assert {k: v for k, v in out[name].items() if "@" in k} == {
            f"{d}_R@{k}": 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}, name
        assert out[name]["num_images"] == 16
    assert out["recon"]["num_images"] == 5  # max_examples, counted after the mask
    # The fake reconstructs perfectly.
    # LPIPS of equal images: 0 up to float rounding in its fused head (~1e-17)
    assert out["recon"]["ssim"] == 1.0 and out["recon"]["psnr"] == np.inf and abs(out["recon"]["lpips"]) < 1e-12
    assert out["recon"]["rfid"] == pytest.approx(0.0, abs=1e-6)

    cfg = tiny_config(data, vae)
    common = dict(data_path=str(labelled), batch_size=8, classnames=CLASSES)  # 12 held out: 4 padding rows
    cfg.evals.zs = dict(type="zero_shot", templates=["{}"], ks=[1], **common)
    cfg.evals.probe = dict(type="linear_probe", max_iters=100, **common)
    cfg.evals.probe_no_names = dict(type="linear_probe", max_iters=100, data_path=str(labelled),
                                    batch_size=8, features=["pooled"])
    out = fake_evaluators(cfg, fake_fns(tok, cfg.data.text_len, image_from_text=False), tok).run(None, None)
    # 3 of the 12 held-out texts name the wrong class: the image's class wins 9 times.
    assert out["zs"]["top1"] == pytest.approx(0.75) and out["zs"]["num_images"] == 12
    for name in ("probe", "probe_no_names"):
        assert out[name]["pooled/train_top1"] == 1.0 and out[name]["num_train"] == 32
        assert out[name]["pooled/test_top1"] == pytest.approx(0.75)
    assert out["probe"]["tokens_mean/test_top1"] == pytest.approx(0.75)


def test_int_labels_and_classes_from_the_manifest(assets, tmp_path):
    """An imagefolder-style set: labels from the int field, class names from the manifest."""
    from ov3.data import pipeline
    if "label_key" not in pipeline.default_config():
        pytest.skip("this pipeline yields no int labels")
    data, vae, _ = assets
    labelled = write_labelled(tmp_path / "labelled", data / "tokenizer.json", int_labels=True)
    tok = Tokenizer.from_file(str(data / "tokenizer.json"))
    cfg = tiny_config(data, vae)
    cfg.evals.zs = dict(type="zero_shot", templates=["{}"], ks=[1], data_path=str(labelled), batch_size=8)
    out = fake_evaluators(cfg, fake_fns(tok, cfg.data.text_len, image_from_text=False), tok).run(None, None)
    assert out["zs"]["top1"] == 1.0  # the int labels follow the images, not the wrong texts


def test_retrieval_with_several_captions_per_image(assets, tmp_path):
    """A Karpathy-style split (python -m ov3.data.convert karpathy): every caption is a text,
    its own image the hit. Images embed as the bag of their first caption; image 5's second
    and third captions name image 0's word, so those two texts rank image 0 first (R@1 miss)
    and score their own image 0, tied with four other images: ties count against the model,
    so they are R@5 misses too (t2i R@1 = R@5 = 29/31) and R@6 hits."""
    from ov3.data import convert
    from tests.helpers import write_karpathy
    data, vae, _ = assets
    words = ["red", "blue", "yellow", "orange", "circle", "square"]  # one token each, distinct bags
    captions = [[f"{w} a", f"{w} small", f"{w} large", f"{w} triangle", f"{w} a small"] for w in words]
    captions[2].append(f"{words[2]} small large")  # six captions: none may be cut
    captions[5][1:3] = ["red small", "red large"]
    path = write_karpathy(tmp_path / "coco", captions, ["test"] * 6)
    out = tmp_path / "karpathy"
    convert.main(["karpathy", "--input", str(path), "--root", str(tmp_path / "coco"), "--out", str(out),
                  "--split", "test", "--workers", "1", "--no-progress"])
    shutil.copyfile(data / "tokenizer.json", out / "tokenizer.json")
    tok = Tokenizer.from_file(str(data / "tokenizer.json"))
    cfg = tiny_config(data, vae)
    cfg.evals.coco = dict(type="retrieval", data_path=str(out), split="test", batch_size=8, ks=[1, 5, 6])
    cfg.evals.first_caption_only = dict(type="retrieval", data_path=str(out), split="test", batch_size=8,
                                        text_key="alt_text", ks=[1])
    out = fake_evaluators(cfg, fake_fns(tok, cfg.data.text_len, image_from_text=True), tok).run(None, None)
    assert out["coco"]["num_images"] == 6 and out["coco"]["num_texts"] == 31
    assert out["coco"]["i2t_R@1"] == 1.0 and out["coco"]["i2t_R@5"] == 1.0
    assert out["coco"]["t2i_R@1"] == out["coco"]["t2i_R@5"] == pytest.approx(29 / 31)
    assert out["coco"]["t2i_R@6"] == 1.0
    # An explicit text_key reads one text per image, as before.
    assert out["first_caption_only"]["num_texts"] == 6 and out["first_caption_only"]["t2i_R@1"] == 1.0


def naive_recall(img, txt, group, ks):
    sim = img @ txt.T
    out = {}
    for k in ks:
        i2t = [np.sum(sim[i] > sim[i, group[i]]) < k for i in range(len(img))]
        t2i = []
        for t in range(len(txt)):
            best = sim[group == t, t].max()
            t2i.append(np.sum((sim[:, t] > best) & (group != t)) < k)
        out[f"i2t_R@{k}"], out[f"t2i_R@{k}"] = np.mean(i2t), np.mean(t2i)
    return out


def test_recall_with_repeated_texts():
    rng = np.random.default_rng(0)
    txt = rng.normal(size=(9, 6)).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    group = np.concatenate([np.arange(9), rng.integers(0, 9, 14)])  # 14 images repeat a text
    img = txt[group] + 0.6 * rng.normal(size=(23, 6)).astype(np.float32)  # near their text, not on it
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    # 4 does not divide 23: a padded block
    got = metrics.retrieval_recall(img, txt, image_to_text=group, ks=(1, 2, 5), chunk=4)
    want = naive_recall(img, txt, group, (1, 2, 5))
    assert got == pytest.approx(want) and 0 < got["i2t_R@1"] < 1 and 0 < got["t2i_R@1"] < 1
    # One text per image: both mappings describe the same pairs.
    one = metrics.retrieval_recall(img[:9], txt, image_to_text=np.arange(9), ks=(1, 5))
    assert one == pytest.approx(metrics.retrieval_recall(img[:9], txt, text_to_image=np.arange(9), ks=(1, 5)))


# ------------------------------------------------------------- the real model, every mesh

def test_sharded_equals_unsharded(assets):
    data, vae, labelled = assets

    def config():
        cfg = tiny_config(data, vae)
        # Batch 8 everywhere: one image program serves retrieval, zero-shot and the probe.
        cfg.evals.recon = dict(type="reconstruction", batch_size=8, max_examples=13)
        cfg.evals.ret = dict(type="retrieval", batch_size=8)
        common = dict(data_path=str(labelled), batch_size=8, classnames=CLASSES)  # 12 held out: padding
        cfg.evals.zs = dict(type="zero_shot", templates=["a {}", "{}"], **common)
        cfg.evals.probe = dict(type="linear_probe", max_iters=100, **common)
        return cfg

    devices = jax.devices()
    assert len(devices) == 8, "conftest sets 8 fake CPU devices"
    cfg = config()
    task, tok = train.build_task(cfg)
    params = jax.device_get(train.Trainer(cfg, sharding.make_mesh(cfg.mesh), task).init_state().params)
    results = {}
    for axes in (dict(data=1, fsdp=1, tensor=1), dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2)):
        cfg = config()
        cfg.mesh.update(axes)
        trainer = train.Trainer(cfg, sharding.make_mesh(cfg.mesh, devices[:math.prod(axes.values())]), task)
        evals = evaluators.from_config(cfg, trainer, tok)
        results[tuple(axes.values())] = evals.run(jax.device_put(params, trainer.state_shardings.params),
                                                  trainer.put_frozen(task.frozen_params()))
    want = results.pop((1, 1, 1))
    assert want["recon"]["num_images"] == 13 and want["zs"]["num_images"] == 12
    for axes, got in results.items():
        for name, values in want.items():
            for key, value in values.items():
                if key != "time_s":
                    assert got[name][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (axes, name, key)


# -------------------------------------------------------------------- the loop and the CLI

def test_loop_writes_eval_rows_and_the_cli_reports_them(assets, tmp_path, capsys):
    data, vae, _ = assets
    cfg = tiny_config(data, vae, total_steps=4, log_every=2, checkpoint_every=2)
    # Batch 8 on the default (data=8) mesh: the programs of test_sharded_equals_unsharded.
    cfg.evals.recon = dict(type="reconstruction", every=2, batch_size=8)
    cfg.evals.ret = dict(type="retrieval", batch_size=8)  # every=0: after the last step only
    train.train(cfg, tmp_path)

    rows = [r for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in rows] == [2, 4]
    assert {"eval/recon/psnr", "eval/recon/ssim", "eval/recon/time_s"} <= set(rows[0])
    assert not any(k.startswith("eval/ret/") for k in rows[0])
    assert {"eval/ret/i2t_R@1", "eval/ret/t2i_R@10", "eval/ret/time_s", "eval/recon/psnr"} <= set(rows[1])
    assert (tmp_path / "tensorboard").is_dir()

    capsys.readouterr()
    assert evaluate.main(["--workdir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "evaluator" in printed and "i2t_R@1" in printed
    assert "30.9200" in printed and "32.8600" in printed  # the paper's PSNRs (OV3, FLUX VAE) beside ours
    doc = json.loads((tmp_path / "eval_4.json").read_text())
    assert doc["step"] == 4 and doc["paper"]["recon"]["OV3"]["psnr"] == 30.92
    for name in ("recon", "ret"):
        for key, value in doc["results"][name].items():
            if key != "time_s":  # the same checkpoint gives the loop's numbers
                assert value == pytest.approx(rows[1][f"eval/{name}/{key}"], rel=1e-6), (name, key)
    md = (tmp_path / "eval_4.md").read_text()
    assert "| recon | reconstruction | psnr |" in md and "ImageNet val at 256 px" in md

    assert evaluate.main(["--workdir", str(tmp_path), "--step", "3"]) == 2
    assert "no checkpoint of step 3" in capsys.readouterr().err


# ------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("entry,message", [
    (dict(type="reconstruction", evry=10), r"config.evals.x.evry is not a key of 'reconstruction' "
                                           r"evaluators \(did you mean config.evals.x.every\?\)"),
    (dict(type="retreival"), r"config.evals.x.type='retreival' is not an evaluator type \(did you mean 'retrieval'"),
    (dict(type="retrieval", every=-5), r"config.evals.x.every=-5 must be >= 0"),
    (dict(type="retrieval", ks="1"), r"config.evals.x.ks='1' must be a tuple"),
    (dict(type="zero_shot", templates=["a photo"]), r"config.evals.x.templates: 'a photo' has no '\{\}'"),
    (dict(type="linear_probe", features=["cls"]), r"config.evals.x.features=\['cls'\]: use a non-empty subset"),
])
def test_bad_entries_name_the_key(entry, message):
    cfg = config_lib.base_config()
    cfg.evals.x = entry
    with pytest.raises(Ov3Error, match=message):
        config_lib.validate(cfg)


def test_errors_found_when_built(assets):
    data, vae, _ = assets
    cfg = config_lib.base_config()
    cfg.task = "vae"
    cfg.evals.x = dict(type="retrieval")
    with pytest.raises(Ov3Error, match=r"config.evals.x.type='retrieval' needs the image and text towers"):
        config_lib.validate(cfg)
    tok = Tokenizer.from_file(str(data / "tokenizer.json"))
    cfg = tiny_config(data, vae)
    cfg.evals.x = dict(type="reconstruction", split="validation")
    with pytest.raises(Ov3Error, match=r"config.evals.x.split='validation': Split 'validation' is not in"):
        fake_evaluators(cfg, fake_fns(tok, 16, True), tok)
    cfg.evals.x = dict(type="reconstruction", batch_size=6)
    with pytest.raises(Ov3Error, match=r"config.evals.x.batch_size=6 is not divisible"):
        fake_evaluators(cfg, fake_fns(tok, 16, True), tok)
    cfg.evals.x = dict(type="zero_shot", classnames=CLASSES)  # the shapes set has no class names
    with pytest.raises(Ov3Error, match=r"config.evals.x.classnames: 16 of 16 examples .* no class name"):
        fake_evaluators(cfg, fake_fns(tok, 16, True), tok).run(None, None)


def test_eval_skip_counts_are_reported(assets, tmp_path):
    """An eval split with a corrupt image: the evaluator scores the rest and says how many it
    could not use (logged as eval/<name>/skipped/<reason>)."""
    import io

    data, vae, _ = assets
    tok = Tokenizer.from_file(str(data / "tokenizer.json"))
    out = tmp_path / "dirty"
    writer = records.SplitWriter(str(out), "heldout", 1, validate=False)
    for i, word in enumerate(["red", "blue", "yellow", "orange", "circle", "square", "red circle"]):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (30 * i, 0, 0)).save(buf, format="PNG")
        writer.write(f"k{i}", buf.getvalue(), word, word)
    writer.write("bad", b"not an image", "red", "red")
    records.write_metadata(str(out), {"heldout": writer.close()})
    shutil.copyfile(data / "tokenizer.json", out / "tokenizer.json")
    cfg = tiny_config(data, vae)
    cfg.evals.ret = dict(type="retrieval", data_path=str(out), batch_size=8, ks=[1])
    got = fake_evaluators(cfg, fake_fns(tok, cfg.data.text_len, image_from_text=True), tok).run(None, None)["ret"]
    assert got["num_images"] == 7 and got["skipped/corrupt_image"] == 1 and got["skipped/empty_text"] == 0
