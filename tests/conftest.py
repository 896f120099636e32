"""Test-wide setup: 8 fake CPU devices (set before JAX is imported anywhere), so sharding
tests can build (data=8) and (data=2, fsdp=2, tensor=2) meshes on one CPU."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
