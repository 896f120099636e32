"""Bad configs stop before anything compiles, with one message naming the key."""

import ml_collections
import pytest

from ov3 import config, sharding
from ov3.errors import Ov3Error


def test_base_config_is_valid():
    config.validate(config.base_config())


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c.update(image_size=100), "image_size=100 must be divisible by 16"),
    (lambda c: c.model.update(encoder="Z/2"), "model.encoder='Z/2'"),
    (lambda c: c.model.update(text="XL"), "model.text='XL'"),
    (lambda c: c.model.update(remat="some"), "model.remat='some' must be one of"),
    (lambda c: c.update(total_steps=0), "total_steps=0 must be positive"),
])
def test_bad_values(mutate, message):
    cfg = config.base_config()
    mutate(cfg)
    with pytest.raises(Ov3Error, match=message.replace("(", r"\(").replace("[", r"\[")):
        config.validate(cfg)


def test_unknown_key_names_the_closest_known_one():
    cfg = config.base_config()
    cfg.optim.learning_rate = 1.0
    cfg.batchsize = 3
    with pytest.raises(Ov3Error) as e:
        config.validate(cfg)
    assert "unknown config key 'optim.learning_rate'" in str(e.value)
    assert "unknown config key 'batchsize' (did you mean batch_size?)" in str(e.value)


def test_batch_not_divisible_by_mesh():
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=2, tensor=1)))
    sharding.check_batch(16, mesh)
    with pytest.raises(Ov3Error, match=r"batch_size=12 is not divisible by .* data\*fsdp=8"):
        sharding.check_batch(12, mesh)


@pytest.mark.parametrize("axes,message", [
    (dict(data=3, fsdp=1, tensor=1), "has 3 slots but there are 8 devices"),
    (dict(data=-1, fsdp=3, tensor=1), "cannot be split"),
    (dict(data=-1, fsdp=-1, tensor=1), "at most one -1"),
])
def test_bad_mesh(axes, message):
    with pytest.raises(Ov3Error, match=message):
        sharding.make_mesh(ml_collections.ConfigDict(axes))


def test_mesh_fill():
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=2)))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("override,message", [
    ("--config.optim.lr=1", "config.optim has no key 'lr'"),
    ("--config.batchsize=1", "did you mean config.batch_size?"),
    ("--config.image_size=100", "image_size=100 must be divisible by 16"),
])
def test_cli_reports_bad_overrides_without_traceback(override, message, tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "ov3.main", "--config", "configs/demo.py",
                          "--workdir", str(tmp_path / "w"), override],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
