"""transformers export: stock ViTModel / SiglipTextModel / BeitForImageClassification loaded with
AutoModel* from the exported folders (no custom code) against the Flax model."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from ov3.export import hf, testing  # noqa: E402
from ov3.export.__main__ import main as export_main  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    tok = testing.train_tokenizer(root / "tokenizer.json")
    spec = testing.tiny_spec()
    fresh = testing.init_params(spec)
    return {"root": root, "tok": tok, "spec": spec, "fresh": fresh, "perturbed": testing.perturb(fresh, seed=2),
            "latents": testing.random_latents(seed=1),
            "ids": tok.encode_batch(list(testing.TEXTS[2:]), spec.text_len)}


def _load(cls, folder, **kwargs):
    model, info = cls.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {})
    assert not problems, problems     # every tensor used, none missing, none mis-shaped
    return model.eval()


@pytest.mark.parametrize("which", ["fresh", "perturbed"])
def test_hf_export_matches_flax(setup, which, tmp_path):
    params, spec = setup[which], setup["spec"]
    ref = testing.reference_outputs(spec, params, setup["latents"], setup["ids"])
    hf.export(tmp_path, testing.tiny_config(), params, spec, setup["root"] / "tokenizer.json", beit=True)
    vit = _load(transformers.AutoModel, tmp_path / "vision", add_pooling_layer=False)
    # transformers has no AutoModel entry for "siglip_text_model" configs: the stock class itself.
    text_model = _load(transformers.SiglipTextModel, tmp_path / "text")
    beit = _load(transformers.AutoModelForImageClassification, tmp_path / "vision_beit")
    assert type(vit).__name__ == "ViTModel" and type(text_model).__name__ == "SiglipTextModel"
    assert type(beit).__name__ == "BeitForImageClassification"
    latents = torch.from_numpy(np.ascontiguousarray(setup["latents"].transpose(0, 3, 1, 2)))
    with torch.no_grad():
        out = vit(pixel_values=latents, output_hidden_states=True)
        tokens = out.hidden_states[-1][:, 1:]
        # The README's 3-line recipe for the pooled embedding.
        proj = safetensors_torch.load_file(str(tmp_path / "vision" / hf.POOLING_HEAD_NAME))["proj"]
        pooled = vit.layernorm(tokens.mean(1)) @ proj
        text = text_model(input_ids=torch.from_numpy(setup["ids"]).long()).pooler_output
        b = beit(pixel_values=latents, output_hidden_states=True)
    errs = {"vit tokens": testing.max_err(tokens, ref["tokens"]), "vit+recipe pooled": testing.max_err(pooled, ref["pooled"]),
            "siglip text": testing.max_err(text, ref["text"]), "beit logits=pooled": testing.max_err(b.logits, ref["pooled"]),
            "beit tokens": testing.max_err(b.hidden_states[-1][:, 1:], ref["tokens"])}
    print(f"transformers {which}: max abs error {errs}")
    assert max(errs.values()) <= TOL, errs
    assert out.pooler_output is None
    # No stock ViTModel output is the pooled embedding: last_hidden_state is ln_post per token.
    assert testing.max_err(out.last_hidden_state[:, 1:].mean(1) @ proj, ref["pooled"]) > 1e-3
    # A plain AutoModel load (with the default pooler) still gives the same tokens.
    plain = transformers.AutoModel.from_pretrained(str(tmp_path / "vision")).eval()
    with torch.no_grad():
        assert testing.max_err(plain(pixel_values=latents, output_hidden_states=True).hidden_states[-1][:, 1:],
                               ref["tokens"]) <= TOL


def test_hf_cli_tokenizer_and_card(setup, tmp_path):
    work = testing.write_workdir(tmp_path / "run", testing.tiny_config(), setup["perturbed"],
                                 tokenizer=setup["root"] / "tokenizer.json")
    out = tmp_path / "export"
    assert export_main(["--workdir", str(work), "--out", str(out), "--format", "hf"]) == 0
    assert not (out / "vision_beit").exists()
    tok = transformers.AutoTokenizer.from_pretrained(str(out / "text"))
    texts = list(testing.TEXTS) + ["a much longer caption " * 5, "Ünïcödé & [SEP] inside"]
    enc = tok(texts, padding="max_length", truncation=True, max_length=setup["spec"].text_len, return_tensors="pt")
    assert set(enc) == {"input_ids"}                 # no attention_mask: the tower was trained without
    np.testing.assert_array_equal(enc["input_ids"].numpy(), setup["tok"].encode_batch(texts, setup["spec"].text_len))
    # model_max_length makes padding="max_length" alone enough.
    np.testing.assert_array_equal(tok(texts[:1], padding="max_length", truncation=True)["input_ids"],
                                  setup["tok"].encode_batch(texts[:1], setup["spec"].text_len))
    processor = transformers.AutoImageProcessor.from_pretrained(str(out / "vision"))
    from PIL import Image
    pixels = processor(images=[Image.new("RGB", (100, 80), (255, 0, 128))], return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, testing.IMAGE_SIZE, testing.IMAGE_SIZE)
    np.testing.assert_allclose(pixels[0, :, 0, 0].numpy(), [1.0, -1.0, 128 / 127.5 - 1], atol=1e-6)
    card = (out / "README.md").read_text()
    assert "add_pooling_layer=False" in card and "posterior.mean * 0.3611" in card
    cfg = testing.read_json(out / "vision" / "config.json")
    assert (cfg["num_channels"], cfg["image_size"], cfg["patch_size"], cfg["layer_norm_eps"]) == (16, 8, 2, 1e-6)


def test_trained_checkpoint_runs_as_the_readme_llava_recipe(tmp_path, monkeypatch):
    """4 real steps of ov3.train, exported by the CLI. The README's LLaVA tower (diffusers VAE:
    posterior mean x scaling_factor -> ViTModel tokens), its pooled-embedding recipe and
    SiglipTextModel with the exported tokenizer reproduce ov3.inference.Encoder on images and texts."""
    diffusers = pytest.importorskip("diffusers")
    from ov3 import train
    from ov3.inference import Encoder
    from tests.helpers import make_assets, tiny_config
    data, vae_dir = make_assets(tmp_path)
    work, out = tmp_path / "run", tmp_path / "export"
    train.train(tiny_config(data, vae_dir), work)
    # Export elsewhere, where the VAE folder cannot be read: the facts come from the workdir.
    vae_dir.rename(tmp_path / "vae_elsewhere")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert export_main(["--workdir", str(work), "--out", str(out), "--format", "hf"]) == 0
    (tmp_path / "vae_elsewhere").rename(vae_dir)
    want = json.loads((vae_dir / "config.json").read_text())["scaling_factor"]
    assert json.loads((out / "vae_config.json").read_text())["scaling_factor"] == want != 0.3611
    card = (out / "README.md").read_text()
    assert f"posterior.mean * {want}" in card and str(tmp_path) not in card, card

    enc = Encoder.from_workdir(work)
    images = np.random.default_rng(0).uniform(-1, 1, (3, enc.image_size, enc.image_size, 3)).astype(np.float32)
    pooled, tokens = (np.asarray(x) for x in enc.encode_images(images))
    texts = ["a red circle", "two blue squares and a green cross on a white background"]
    text = np.asarray(enc.encode_text(texts))

    vae = diffusers.AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    vit = _load(transformers.AutoModel, out / "vision", add_pooling_layer=False)
    text_model = _load(transformers.SiglipTextModel, out / "text")
    tok = transformers.AutoTokenizer.from_pretrained(str(out / "text"))
    proj = safetensors_torch.load_file(str(out / "vision" / hf.POOLING_HEAD_NAME))["proj"]
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        got_tokens = vit(pixel_values=z, output_hidden_states=True).hidden_states[-1][:, 1:]
        got_pooled = vit.layernorm(got_tokens.mean(1)) @ proj
        ids = tok(texts, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
        got_text = text_model(input_ids=ids).pooler_output
    errs = {"tokens (VAE + ViTModel)": testing.max_err(got_tokens, tokens),
            "pooled": testing.max_err(got_pooled, pooled), "text": testing.max_err(got_text, text)}
    print(f"\ntrained checkpoint, README recipe vs ov3.inference: max abs error {errs}")
    assert max(errs.values()) <= TOL, errs
    assert np.abs(tokens).max() > 0.1 and np.abs(text).max() > 0.01  # real outputs, not zeros
