"""transformers export: stock ViTModel / SiglipTextModel / BeitForImageClassification loaded with
AutoModel* from the exported folders (no custom code) against the Flax model."""

from __future__ import annotations

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
