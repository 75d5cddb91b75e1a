"""Every path is a URL: a local path or anything fsspec opens (s3:// through s3fs).

S3-compatible endpoints are chosen with the standard AWS variables (AWS_ENDPOINT_URL, ...).
Writes are atomic: a reader sees the whole file or none. Locally that is write-then-rename;
an S3 object only appears once its upload completes, so one PUT is already atomic.
"""
from __future__ import annotations

import io
import os
import tempfile
import uuid
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, path


def join(url: str, *parts: str) -> str:
    return "/".join([str(url).rstrip("/"), *parts])


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"{url} does not exist")
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> None:
    """Write atomically: a temporary file renamed into place (local), or one PUT (object stores)."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=f".{uuid.uuid4().hex[:8]}")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        fs.pipe_file(path, data)


def save_torch(obj: Any, url: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(url, buf.getvalue())


def load_torch(url: str, map_location: str | torch.device = "cpu") -> Any:
    """Load tensors and plain containers only (weights_only=True: never unpickle code)."""
    return torch.load(io.BytesIO(read_bytes(url)), map_location=map_location, weights_only=True)
