"""Paths a user gives (workdir, data, tokenizer, VAE, LPIPS weights, init_from, ...): local
folders or gs:// URLs, through one abstraction, etils.epath (what orbax uses as well).

gs:// goes through fsspec's gcsfs (no TensorFlow): epath would switch to tf.io.gfile when
TensorFlow is installed (the `tf` extra), so that is turned off here and a run behaves the same
with or without it. Checkpoint arrays are written by tensorstore's own GCS driver (orbax).

gcsfs keeps no directory listings here: tensorstore, other hosts and other jobs (a reader of
metrics.jsonl, evaluate on a running workdir) write into the same bucket behind its back, and a
cached listing would hide their objects (the latest checkpoint step, say).

Emulators (tests): STORAGE_EMULATOR_HOST=http://HOST:PORT (gcsfs, google-cloud-storage) and
TENSORSTORE_GCS_HTTP_URL=http://HOST:PORT (tensorstore) point everything at a fake GCS.
"""

from __future__ import annotations

import io
import os

os.environ.setdefault("EPATH_USE_TF", "false")  # before epath picks a backend (read per call)

import fsspec  # noqa: E402
from etils import epath  # noqa: E402

from ov3.errors import Ov3Error  # noqa: E402

fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)

Path = epath.Path
SCHEMES = ("gs://",)


def path(p: str | os.PathLike) -> epath.Path:
    """`p` as an epath.Path: a local path, or a gs://bucket/... URL (any other scheme: Ov3Error)."""
    text = os.fspath(p)
    if "://" in text and not text.startswith(SCHEMES):
        raise Ov3Error(f"{text}: only local paths and gs://bucket/... URLs are supported.")
    return epath.Path(text)


def is_remote(p: str | os.PathLike) -> bool:
    """True for an object-store URL (gs://...): no rename, no append, no free-space figure."""
    return os.fspath(p).startswith(SCHEMES)


def absolute(p: str | os.PathLike) -> epath.Path:
    """A local path made absolute (orbax wants one); a URL as it is."""
    return path(p) if is_remote(p) else path(os.path.abspath(os.fspath(p)))


def makedirs(p: str | os.PathLike) -> None:
    """mkdir -p for a local folder; nothing on gs://, which has no folders (and where gcsfs's
    makedirs would create a missing bucket instead of failing)."""
    if not is_remote(p):
        path(p).mkdir(parents=True, exist_ok=True)


def files_under(folder: str | os.PathLike) -> list[epath.Path]:
    """Every file below `folder`, recursively, sorted (epath has no rglob)."""
    top, found = path(folder), []
    for root, _, names in top.walk():
        root = os.fspath(root)
        if is_remote(top) and not is_remote(root):  # fsspec's walk drops the scheme
            root = "gs://" + root.lstrip("/")
        found += [path(root) / name for name in names]
    return sorted(found)


def readable(p: str | os.PathLike) -> str | io.BytesIO:
    """What readers that take a local path or a file (torch.load, np.load) should get: the local
    path itself, or a gs:// object's bytes in memory."""
    return io.BytesIO(path(p).read_bytes()) if is_remote(p) else os.fspath(p)


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename a file or folder. GCS has no rename: there every object is copied in the bucket
    (server-side) and then deleted, which is not atomic; a missing dst folder is fine."""
    if is_remote(src):
        fsspec.filesystem("gs").mv(os.fspath(src), os.fspath(dst), recursive=True)
    else:
        path(src).rename(dst)


def copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy one (small) file between any two places, local or gs://."""
    path(dst).write_bytes(path(src).read_bytes())
