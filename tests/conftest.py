"""Test-wide setup: 8 fake CPU devices (set before JAX is imported anywhere), so sharding
tests can build (data=8) and (data=2, fsdp=2, tensor=2) meshes on one CPU."""

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests build the same small programs many times (each train() run compiles its step):
# the persistent compilation cache turns the repeats into cache hits.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "ov3-jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs real processes (tests/test_reliability.py); "
                                       "still part of the default run, deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def gcs():
    """fake-gcs-server on 127.0.0.1 for the whole session (tests/gcs.py); gcs.bucket(name) -> "gs://name"."""
    from tests.gcs import FakeGCS
    with FakeGCS() as server:
        yield server
