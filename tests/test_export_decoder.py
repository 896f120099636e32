"""The latent decoder as plain PyTorch (decoder_torch.py) against the Flax LatentDecoder."""

from __future__ import annotations

import ast
import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ov3.export import decoder, testing  # noqa: E402
from ov3.export.__main__ import main as export_main  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def setup():
    spec = testing.tiny_spec()
    fresh = testing.init_params(spec)
    return {"spec": spec, "fresh": fresh, "perturbed": testing.perturb(fresh, seed=3),
            "latents": testing.random_latents(seed=2)}


def _import_file(path):
    spec = importlib.util.spec_from_file_location("ov3_latent_decoder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("which", ["fresh", "perturbed"])
def test_torch_decoder_matches_flax(setup, which, tmp_path):
    params, spec = setup[which], setup["spec"]
    ref = testing.reference_outputs(spec, params, setup["latents"])
    decoder.export(tmp_path, testing.tiny_config(), params, spec)
    module = _import_file(tmp_path / decoder.MODULE_NAME)        # the file shipped in the export
    model = module.LatentDecoder.from_pretrained(tmp_path)
    # Noisy tokens too: the decoder is trained on z_u + sigma * eps.
    noisy = ref["tokens"] + 0.5 * np.random.default_rng(0).standard_normal(ref["tokens"].shape).astype(np.float32)
    ref_noisy = np.asarray(testing._apply_fns(spec)[2](params, noisy))
    with torch.no_grad():
        out = model(torch.from_numpy(ref["tokens"])).numpy()
        out_noisy = model(torch.from_numpy(noisy)).numpy()
    assert out.shape == (2, 16, testing.GRID, testing.GRID)          # NCHW, the encoder's input space
    errs = {"decoded": testing.max_err(out.transpose(0, 2, 3, 1), ref["decoded"]),
            "decoded(noisy)": testing.max_err(out_noisy.transpose(0, 2, 3, 1), ref_noisy)}
    print(f"torch decoder {which}: max abs error {errs}")
    assert max(errs.values()) <= TOL, errs
    cfg = testing.read_json(tmp_path / "config.json")
    assert (cfg["scaling_factor"], cfg["shift_factor"], cfg["patch"], cfg["grid"]) == (0.3611, 0.0, 2, 4)


def test_decoder_feeds_diffusers_vae_and_needs_no_ov3(setup, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    work = testing.write_workdir(tmp_path / "run", testing.tiny_config(), setup["perturbed"])
    out = tmp_path / "export"
    assert export_main(["--workdir", str(work), "--out", str(out), "--format", "decoder"]) == 0
    # The exported module imports only the standard library, torch and huggingface_hub.
    tree = ast.parse((out / decoder.MODULE_NAME).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "typing", "huggingface_hub", "torch"}, imported
    module = _import_file(out / decoder.MODULE_NAME)
    model = module.LatentDecoder.from_pretrained(out)
    vae = diffusers.AutoencoderKL(latent_channels=16, block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
                                  layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False,
                                  use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159).eval()
    tokens = torch.from_numpy(testing.reference_outputs(setup["spec"], setup["perturbed"], setup["latents"])["tokens"])
    with torch.no_grad():
        latents = model(tokens)
        raw = model.to_vae(latents)
        images = vae.decode(raw).sample
    assert images.shape == (2, 3, testing.IMAGE_SIZE, testing.IMAGE_SIZE)
    torch.testing.assert_close(raw, latents / 0.3611)           # latent_norm "scale": no shift
    assert "to_vae" in (out / "README.md").read_text()
