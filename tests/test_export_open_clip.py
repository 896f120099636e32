"""open_clip export and import against open_clip's real CLIP / VisionTransformer / TextTransformer.

open_clip imports torchvision (and ftfy) at import time; neither is installed here. If the real
import fails, `real_open_clip()` imports it once with tiny stand-ins for exactly the names it
touches at import time — torchvision.ops.misc.FrozenBatchNorm2d (an isinstance target),
torchvision.transforms.{Normalize, Compose, ...} (placeholder classes; ToTensor is subclassed),
InterpolationMode (an enum used in default arguments), torchvision.transforms.functional (an
empty module), ftfy.fix_text (identity; the tokenizer's text cleaning) — and then removes them
from sys.modules again, so no other test ever sees them. None of them is used to build or run a
model: those are open_clip's own torch modules.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from ov3.errors import Ov3Error  # noqa: E402
import jax  # noqa: E402

from ov3.export import import_open_clip, testing  # noqa: E402
from ov3.export import open_clip as oc_export  # noqa: E402
from ov3.export.__main__ import main as export_main  # noqa: E402

TOL = 1e-4
_STAND_INS = ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
              "torchvision.transforms.functional", "ftfy")


def _stand_in_modules() -> dict[str, types.ModuleType]:
    class Unavailable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("torchvision stand-in: image transforms are not available in tests")

    mods = {name: types.ModuleType(name) for name in _STAND_INS}
    mods["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    transforms = mods["torchvision.transforms"]
    for name in ("Normalize", "Compose", "RandomResizedCrop", "ToTensor", "Resize", "CenterCrop",
                 "ColorJitter", "Grayscale"):
        setattr(transforms, name, type(name, (Unavailable,), {}))
    transforms.InterpolationMode = enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC")
    transforms.functional = mods["torchvision.transforms.functional"]
    mods["torchvision"].ops, mods["torchvision.ops"].misc = mods["torchvision.ops"], mods["torchvision.ops.misc"]
    mods["torchvision"].transforms = transforms
    mods["ftfy"].fix_text = lambda text: text
    return mods


def real_open_clip():
    if "open_clip" in sys.modules and hasattr(sys.modules["open_clip"], "CLIP"):
        return sys.modules["open_clip"]
    try:
        return importlib.import_module("open_clip")
    except ImportError:
        pass
    except Exception as e:  # e.g. another test's partial torchvision shim
        if "torchvision" not in str(e):
            raise
    for name in [n for n in sys.modules if n == "open_clip" or n.startswith("open_clip.")]:
        del sys.modules[name]
    saved = {name: sys.modules.pop(name, None) for name in _STAND_INS}
    try:
        # transformers probes importlib.util.find_spec("torchvision") when first imported; let it
        # see the truth (absent) before the stand-ins go in.
        importlib.import_module("transformers")
        sys.modules.update(_stand_in_modules())
        return importlib.import_module("open_clip")
    except ImportError as e:
        pytest.skip(f"open_clip is not installed ({e}); pip install --no-deps open_clip_torch")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.fixture(scope="module")
def open_clip():
    return real_open_clip()


@pytest.fixture(scope="module")
def loader(open_clip):
    """The loader file shipped with every export, imported as a module."""
    spec = importlib.util.spec_from_file_location("load_ov3_open_clip",
                                                  Path(oc_export.__file__).with_name("open_clip_loader.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("oc")
    tok = testing.train_tokenizer(root / "tokenizer.json")
    spec = testing.tiny_spec()
    fresh = testing.init_params(spec)
    return {"root": root, "tok": tok, "spec": spec, "fresh": fresh, "perturbed": testing.perturb(fresh),
            "latents": testing.random_latents(), "ids": tok.encode_batch(list(testing.TEXTS[:2]), spec.text_len)}


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("which", ["fresh", "perturbed"])
def test_open_clip_export_matches_flax(setup, loader, which, tmp_path):
    params, spec = setup[which], setup["spec"]
    ref = testing.reference_outputs(spec, params, setup["latents"], setup["ids"])
    oc_export.export(tmp_path, testing.tiny_config(), params, spec, setup["root"] / "tokenizer.json")
    model = loader.load(tmp_path)
    with torch.no_grad():
        pooled, tokens = loader.encode_image_tokens(model, _nchw(setup["latents"]))
        pooled_clip = model.encode_image(_nchw(setup["latents"]))
        text = model.encode_text(torch.from_numpy(setup["ids"]).long())
    errs = {"tokens": testing.max_err(tokens, ref["tokens"]), "pooled": testing.max_err(pooled, ref["pooled"]),
            "pooled(encode_image)": testing.max_err(pooled_clip, ref["pooled"]),
            "text": testing.max_err(text, ref["text"])}
    print(f"open_clip {which}: max abs error {errs}")
    assert max(errs.values()) <= TOL, errs
    # Every LayerNorm got eps 1e-6 from norm_kwargs; open_clip's own default is 1e-5.
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {1e-6}
    assert model.logit_scale.detach().item() == pytest.approx(float(params["logit_scale"]), abs=1e-6)


def test_default_eps_error_is_measurable(setup, open_clip, loader, tmp_path):
    """What goes wrong if the config's norm_kwargs are dropped (open_clip's eps 1e-5)."""
    params, spec = setup["perturbed"], setup["spec"]
    ref = testing.reference_outputs(spec, params, setup["latents"], setup["ids"])
    oc_export.export(tmp_path, testing.tiny_config(), params, spec, None)
    cfg = testing.read_json(tmp_path / oc_export.CONFIG_NAME)["model_cfg"]
    for tower in ("vision_cfg", "text_cfg"):
        del cfg[tower]["norm_kwargs"]
    model = open_clip.CLIP(**cfg)
    model.visual.conv1 = torch.nn.Conv2d(16, 64, kernel_size=2, stride=2, bias=False)
    model.load_state_dict(loader.safetensors.torch.load_file(str(tmp_path / oc_export.WEIGHTS_NAME)))
    with torch.no_grad():
        pooled, tokens = loader.encode_image_tokens(model.eval(), _nchw(setup["latents"]))
        text = model.encode_text(torch.from_numpy(setup["ids"]).long())
    errs = {"tokens": testing.max_err(tokens, ref["tokens"]), "pooled": testing.max_err(pooled, ref["pooled"]),
            "text": testing.max_err(text, ref["text"])}
    print(f"open_clip with default eps 1e-5: max abs error {errs}")
    assert max(errs.values()) > 0  # measurable, not hidden by float32 noise


def test_cli_from_workdir_and_tokenizer(setup, loader, tmp_path):
    work = testing.write_workdir(tmp_path / "run", testing.tiny_config(), setup["perturbed"], step=7,
                                 tokenizer=setup["root"] / "tokenizer.json")
    out = tmp_path / "export"
    assert export_main(["--workdir", str(work), "--out", str(out), "--format", "open_clip"]) == 0
    for name in ("open_clip_model.safetensors", "open_clip_config.json", "load_ov3_open_clip.py",
                 "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "posterior.mean * 0.3611" in card and "no shift" in card
    cfg = testing.read_json(out / "open_clip_config.json")
    v = cfg["model_cfg"]["vision_cfg"]
    assert (v["image_size"], v["patch_size"], v["pool_type"], v["no_ln_pre"]) == (8, 2, "avg", True)
    assert cfg["ov3"]["in_chans"] == 16
    texts = list(testing.TEXTS) + ["a much longer caption " * 5]
    ids = loader.tokenizer(out)(texts)
    np.testing.assert_array_equal(ids.numpy(), setup["tok"].encode_batch(texts, setup["spec"].text_len))
    # Same weights as exporting the params directly.
    model = loader.load(out)
    assert torch.equal(model.visual.proj, torch.from_numpy(setup["perturbed"]["encoder"]["proj"]["kernel"]))
    # What the card warns about: open_clip's own loader (hf-hub: / local-dir: read the same
    # files) builds a 3-channel stem, and these 16-channel weights do not load into it.
    assert 'Not `open_clip.create_model("hf-hub:ORG/NAME")`' in card
    with pytest.raises(RuntimeError, match=r"visual\.conv1\.weight"):
        loader.open_clip.create_model(f"local-dir:{out}")


def test_cli_errors(tmp_path, capsys):
    assert export_main(["--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                        "--format", "open_clip"]) == 2
    assert "config.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- import


def _released_like(open_clip, seed: int, pos: str = "learnable") -> torch.nn.Module:
    """open_clip's real CLIP at mu sizes with conv1 patched to 16 input channels, every tensor
    random (learned positions, non-zero class row), as a released OV3 checkpoint would be."""
    torch.manual_seed(seed)
    vision = dict(image_size=8, patch_size=2, width=64, layers=2, head_width=16, mlp_ratio=4.0, no_ln_pre=True,
                  pool_type="avg", final_ln_after_pool=True, pos_embed_type=pos, norm_kwargs={"eps": 1e-6})
    text_cfg = dict(context_length=testing.TEXT_LEN, vocab_size=testing.VOCAB_SIZE, width=64, heads=4, layers=2,
                    no_causal_mask=True, pool_type="last", norm_kwargs={"eps": 1e-6})
    model = open_clip.CLIP(embed_dim=64, vision_cfg=vision, text_cfg=text_cfg)
    model.visual.conv1 = torch.nn.Conv2d(16, 64, kernel_size=2, stride=2, bias=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _state(model: torch.nn.Module, text: bool) -> dict[str, np.ndarray]:
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    return sd if text else {k: v for k, v in sd.items() if k.startswith("visual.")}


def test_import_matches_open_clip_and_round_trips(setup, open_clip):
    model = _released_like(open_clip, seed=3)
    sd = _state(model, text=True)
    spec = testing.tiny_spec()
    imported = import_open_clip.from_state_dict(sd, spec, grid=testing.GRID)
    params = import_open_clip.merge(testing.init_params(spec), imported)
    ids = np.random.default_rng(0).integers(1, testing.VOCAB_SIZE, (2, testing.TEXT_LEN)).astype(np.int32)
    ref = testing.reference_outputs(spec, params, setup["latents"], ids)
    with torch.no_grad():
        model.visual.output_tokens = True
        pooled, tokens = model.visual(_nchw(setup["latents"]))
        text = model.encode_text(torch.from_numpy(ids).long())
    errs = {"tokens": testing.max_err(tokens, ref["tokens"]), "pooled": testing.max_err(pooled, ref["pooled"]),
            "text": testing.max_err(text, ref["text"])}
    print(f"open_clip -> ov3 import: max abs error {errs}")
    assert max(errs.values()) <= TOL, errs
    # import -> export is the identity on the weights (bit-exact), and export -> import too.
    back = oc_export.state_dict(params)
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v.reshape(back[k].shape), err_msg=k)
    again = import_open_clip.from_state_dict(back, spec, grid=testing.GRID)
    flat = jax.tree_util.tree_leaves_with_path
    for (path, a), (_, b) in zip(flat(again), flat({k: params[k] for k in again}), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_import_vision_only_file_and_config_warnings(setup, open_clip, tmp_path):
    from safetensors.numpy import save_file

    model = _released_like(open_clip, seed=4, pos="sin_cos_2d")
    sd = _state(model, text=False)
    save_file(sd, str(tmp_path / "open_clip_model.safetensors"))
    spec = testing.tiny_spec()
    imported = import_open_clip.load(tmp_path / "open_clip_model.safetensors", spec, grid=testing.GRID)
    assert set(imported) == {"encoder"}
    np.testing.assert_array_equal(imported["encoder"]["positional_embedding"], sd["visual.positional_embedding"])
    # A config declaring open_clip's default eps and tanh GELU: imported, with a warning.
    (tmp_path / "open_clip_config.json").write_text(
        '{"model_cfg": {"vision_cfg": {"no_ln_pre": true, "pool_type": "avg", "final_ln_after_pool": true},'
        ' "text_cfg": {"pool_type": "last", "no_causal_mask": true, "act_kwargs": {"approximate": "tanh"}}}}')
    with pytest.warns(UserWarning, match="eps 1e-05"):
        import_open_clip.load(tmp_path / "open_clip_model.safetensors", spec, grid=testing.GRID)


def test_import_mismatch_lists_every_shape(setup, open_clip, tmp_path):
    sd = _state(_released_like(open_clip, seed=5), text=True)
    # open_clip training checkpoints (epoch_N.pt): {"state_dict": {"module.<key>": tensor}}.
    torch.save({"state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in sd.items()}}, tmp_path / "epoch_1.pt")
    from_pt = import_open_clip.load(tmp_path / "epoch_1.pt", testing.tiny_spec(), testing.GRID)
    np.testing.assert_array_equal(from_pt["text"]["token_embedding"]["embedding"], sd["token_embedding.weight"])
    spec = testing.tiny_spec(vocab_size=300)                  # vocabulary differs
    with pytest.raises(Ov3Error) as e:
        import_open_clip.from_state_dict(sd, spec, grid=testing.GRID)
    assert "text.token_embedding.weight: checkpoint (128, 64), expected (300, 64)" in str(e.value)
    # Vision only still imports.
    assert set(import_open_clip.from_state_dict(sd, spec, testing.GRID, towers=("encoder",))) == {"encoder"}
    with pytest.raises(Ov3Error) as e:                         # 128 px configured, 64 px checkpoint
        import_open_clip.from_state_dict(sd, spec, grid=16, towers=("encoder",))
    msg = str(e.value)
    assert "visual.positional_embedding: checkpoint (17, 64), expected (65, 64)" in msg
    assert "config.image_size=64" in msg
    with pytest.raises(Ov3Error, match="visual.ln_pre.weight: not in the ov3 model"):
        import_open_clip.from_state_dict({**sd, "visual.ln_pre.weight": np.ones(64, np.float32)},
                                         spec, testing.GRID, towers=("encoder",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import_open_clip.from_state_dict(sd, testing.tiny_spec(), testing.GRID)


def test_unreadable_checkpoint_is_one_line(tmp_path):
    """A .pth cut short by an interrupted download, and a .safetensors that is not one."""
    torch.save({"visual.proj": torch.zeros(4, 4)}, tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    for name in ("cut.pth", "bad.safetensors"):
        with pytest.raises(Ov3Error, match=rf"^open_clip checkpoint {tmp_path / name} cannot be read \(\w+: .*\); "
                                           "download it again") as e:
            import_open_clip.read_state_dict(tmp_path / name)
        assert "\n" not in str(e.value)
