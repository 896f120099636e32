"""Scale-out defaults: the hybrid (DCN x ICI) mesh, the per-platform XLA flags, the input
pipeline's worker count. No compilation; the mesh is laid out over stand-in devices that carry
what `mesh_utils.create_hybrid_device_mesh` reads (slice and process index)."""

from __future__ import annotations

import dataclasses

import ml_collections
import pytest

from ov3 import sharding, xla_flags
from ov3.data import pipeline
from ov3.errors import Ov3Error


@dataclasses.dataclass(frozen=True)
class Device:
    id: int
    process_index: int
    slice_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def _mesh(**axes):
    return ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "dcn_data": 1, **axes})


@pytest.mark.parametrize("granule", ["slice_index", "process_index"])  # multi-slice TPU, multi-node GPU
def test_fsdp_stays_inside_a_slice_or_node(granule):
    # 2 slices/nodes of 4 devices, listed interleaved: the grid must still group them.
    devices = [Device(i, i % 2, i % 2 if granule == "slice_index" else 0) for i in range(8)]
    grid = sharding.device_grid(_mesh(data=2, fsdp=-1, dcn_data=2), devices)
    assert grid.shape == (2, 4, 1)
    for row in range(2):  # one data row = one slice/node; its fsdp devices all there
        assert len({getattr(d, granule) for d in grid[row].ravel()}) == 1
    assert {getattr(grid[0, 0, 0], granule), getattr(grid[1, 0, 0], granule)} == {0, 1}
    with pytest.raises(Ov3Error, match="dcn_data=4 must divide the data axis"):
        sharding.device_grid(_mesh(data=2, fsdp=-1, dcn_data=4), devices)
    with pytest.raises(Ov3Error, match="dcn_data=2: .*number of TPU slices"):
        sharding.device_grid(_mesh(data=2, fsdp=-1, dcn_data=2), [Device(i, 0, 0) for i in range(8)])


def test_platform_flags_merge_with_the_users():
    env = {"JAX_PLATFORMS": "cuda", "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false --foo=1"}
    set_ = xla_flags.apply(env)
    flags = env["XLA_FLAGS"].split()
    assert set_ == {"XLA_FLAGS": env["XLA_FLAGS"]}
    assert "--xla_gpu_enable_latency_hiding_scheduler=false" in flags and "--foo=1" in flags  # the user's win
    assert "--xla_gpu_enable_pipelined_all_gather=true" in flags
    assert xla_flags.apply(env) == {}  # idempotent
    tpu = {"JAX_PLATFORMS": "tpu"}
    xla_flags.apply(tpu)
    assert "--xla_tpu_enable_async_collective_fusion=true" in tpu["LIBTPU_INIT_ARGS"].split() and "XLA_FLAGS" not in tpu
    assert xla_flags.apply({"JAX_PLATFORMS": "cpu"}) == {}


def test_worker_count_follows_the_platform():
    assert pipeline.default_config().worker_count == -1
    assert pipeline.auto_worker_count("cpu", 64) == 0  # the CPU step needs the cores
    assert pipeline.auto_worker_count("gpu", 208) == 32 and pipeline.auto_worker_count("tpu", 8) == 2
