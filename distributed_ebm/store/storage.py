"""Every path is a URL: a local path or anything fsspec opens (s3:// through s3fs).

S3-compatible endpoints are chosen with the standard AWS variables (AWS_ENDPOINT_URL, ...).
Writes are atomic: a reader sees the whole file or none. Locally that is write-then-rename;
an S3 object only appears once its upload completes, so one PUT is already atomic.

Model files are read without unpickling code: tensors with `weights_only=True` (torch reads the legacy, pre-zip
serialization of torch 1.4 this way too; a file that needs anything else is refused in one line), `.pt2` programs
with `torch.export.load`, which deserializes a graph of ATen operators, not Python objects (`read_source`).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import uuid
import zipfile
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from ..errors import InputError


@contextlib.contextmanager
def explain_unreachable(url: str):
    """Turn an object store's failure (no credentials, no endpoint, access denied) into one line."""
    try:
        yield
    except (FileNotFoundError, IsADirectoryError, InputError):
        raise
    except Exception as err:
        module = type(err).__module__
        if "://" not in str(url) or not (module.startswith(("botocore", "aiobotocore", "s3fs", "aiohttp"))
                                        or isinstance(err, (PermissionError, OSError))):
            raise
        first = str(err).splitlines()[0] if str(err) else ""
        raise InputError(f"{url}: cannot reach it ({type(err).__name__}: {first}); set AWS_ACCESS_KEY_ID, "
                         "AWS_SECRET_ACCESS_KEY and, for an S3-compatible server, AWS_ENDPOINT_URL") from None


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, path


def is_local(url: str) -> bool:
    """Whether `url` names this machine's filesystem (a path or file://), not an object store."""
    return "://" not in str(url) or str(url).startswith("file://")


def join(url: str, *parts: str) -> str:
    return "/".join([str(url).rstrip("/"), *parts])


def exists(url: str) -> bool:
    """Asks the store now: s3fs answers from a listing it cached earlier, which misses what other processes (a Ray
    worker on another node) wrote since."""
    fs, path = filesystem(url)
    with explain_unreachable(url):
        if not isinstance(fs, LocalFileSystem):
            fs.invalidate_cache(path)
        return fs.exists(path)


def open_file(url: str):
    """The file at `url`, open for reading by ranges (only the bytes read travel)."""
    fs, path = filesystem(url)
    with explain_unreachable(url):
        if not fs.exists(path):
            raise FileNotFoundError(f"{url} does not exist")
        if fs.isdir(path):
            raise InputError(f"{url} is a folder, not a file")
        return fs.open(path, "rb")


def read_bytes(url: str) -> bytes:
    with open_file(url) as f, explain_unreachable(url):
        return f.read()


def check_destination(url: str, what: str, folder: bool = False) -> None:
    """Fail now, not after the work, when nothing can be written at `url` (a file to write, or with `folder`
    a folder to write into): a local path under a file, a file where a folder is meant, a read-only folder,
    an unreachable bucket."""
    fs, path = filesystem(url)
    if not isinstance(fs, LocalFileSystem):
        bucket = path.split("/")[0]
        try:
            with explain_unreachable(url):
                fs.ls(bucket, detail=False)  # exists() hides a missing credential; listing does not
        except FileNotFoundError:
            raise InputError(f"{what} {url}: bucket {bucket} does not exist") from None
        return
    if folder and os.path.isfile(path):
        raise InputError(f"{what} {url} is a file; it must be a folder (or not exist yet)")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent != os.path.abspath(path) and not os.path.isdir(parent):
        raise InputError(f"{what} {url}: {parent} is a file, so nothing can be written under it")
    # the folder made, a file written in it and removed, and the folders made removed again (a job that fails
    # later leaves nothing): os.access says yes to root everywhere (/proc, read-only mounts)
    where = os.path.abspath(path) if folder else os.path.dirname(os.path.abspath(path))
    made, up = [], where
    while not os.path.exists(up):
        made.append(up)
        up = os.path.dirname(up)
    probe = os.path.join(where, f".debm-write-probe-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(where, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0")
        os.unlink(probe)
    except OSError as err:
        raise InputError(f"{what} {url}: nothing can be written in {where} ({err.strerror or err})") from None
    finally:
        for folder_made in made:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(folder_made)


_UMASK = os.umask(0o022)  # read once, at import (setting it is the only way to read it), and put back
os.umask(_UMASK)


def write_bytes(url: str, data: bytes) -> None:
    """Write atomically: a temporary file renamed into place (local), or one PUT (object stores)."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=f".{uuid.uuid4().hex[:8]}")
        try:
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600: give the file the mode a plain open() would
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
        with explain_unreachable(url):
            fs.pipe_file(path, data)


def save_torch(obj: Any, url: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(url, buf.getvalue())


def load_torch(url: str, map_location: str | torch.device = "cpu") -> Any:
    """Load tensors and plain containers only (weights_only=True: never unpickle code). A file that
    is not such a checkpoint fails with one line of our own: torch's message suggests the unsafe way."""
    return torch_from_bytes(read_bytes(url), url, map_location)


def torch_from_bytes(raw: bytes, url: str, map_location: str | torch.device = "cpu") -> Any:
    """`load_torch` of bytes already read from `url` (which messages name)."""
    try:
        return torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    except Exception as err:
        why = "it is empty" if not raw else f"{type(err).__name__}"
        raise InputError(f"checkpoint {url} cannot be read ({why}): it is not a PyTorch checkpoint of tensors "
                         "(truncated, corrupt, or holding objects other than tensors, which are never unpickled)") \
            from None


def is_exported(raw: bytes) -> bool:
    """Whether `raw` is a `torch.export.save` archive (a zip holding models/model.json)."""
    if not zipfile.is_zipfile(io.BytesIO(raw)):
        return False
    return any(n.endswith("models/model.json") for n in zipfile.ZipFile(io.BytesIO(raw)).namelist())


def read_source(url: str) -> tuple[object, str]:
    """(content, SHA-256 of the file): an exported program's module, or tensors and plain containers."""
    raw = read_bytes(url)
    sha = hashlib.sha256(raw).hexdigest()
    if is_exported(raw):
        try:
            return torch.export.load(io.BytesIO(raw)).module(), sha
        except Exception as err:
            raise InputError(f"{url} cannot be read by torch.export.load ({type(err).__name__})") from None
    return torch_from_bytes(raw, url), sha
