"""Images as float32 N x C x H x W tensors in [-1, 1], int64 labels, and int64 dataset ids.

Sources: parquet files in the Hugging Face layout (`img: struct<bytes, path>`, `label`, and an
optional `index` that names the row's position in the original split), from a local path or any
fsspec URL; or torchvision's CIFAR-10, CIFAR-100 and SVHN folders. An image is known by its id:
the `index` column where the file carries it, otherwise its row number.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from . import storage
from .config import DataConfig, InputError


class DataError(InputError):
    """Data that cannot be used as asked; the message names the file and the problem."""


@dataclass
class ImageSet:
    images: torch.Tensor  # N x C x H x W float32 in [-1, 1]
    labels: torch.Tensor  # N int64
    ids: torch.Tensor  # N int64

    def __len__(self) -> int:
        return self.labels.shape[0]

    def take(self, rows) -> "ImageSet":
        rows = torch.as_tensor(rows, dtype=torch.int64)
        return ImageSet(self.images[rows], self.labels[rows], self.ids[rows])


def to_unit_range(pixels_u8: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x C pixels p -> float32 N x C x H x W images x = 2 p / 255 - 1."""
    x = torch.from_numpy(np.ascontiguousarray(pixels_u8)).permute(0, 3, 1, 2).float()
    return x.div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Inverse of `to_unit_range`, clamped (for pictures)."""
    p = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return p.permute(0, 2, 3, 1).numpy()


def read_parquet(url: str, image_size: int = 32) -> ImageSet:
    """Decode a Hugging Face-layout image parquet file (local path or fsspec URL)."""
    try:
        raw = storage.read_bytes(url)
    except FileNotFoundError:
        raise DataError(f"data file {url} does not exist") from None
    try:
        table = pq.read_table(io.BytesIO(raw))
    except Exception as err:  # pyarrow raises several kinds
        raise DataError(f"data file {url} is not a readable parquet file: {err}") from None
    names = table.schema.names
    img_field = table.schema.field("img") if "img" in names else None
    if img_field is None or "label" not in names or not hasattr(img_field.type, "get_field_index") \
            or img_field.type.get_field_index("bytes") < 0:
        raise DataError(f"data file {url} has columns {names}; expected the Hugging Face image layout: "
                        "img: struct<bytes: binary, ...>, label: int (and optionally index: int)")
    if not pa.types.is_integer(table.schema.field("label").type):
        raise DataError(f"data file {url}: column label is {table.schema.field('label').type}, expected integers")
    if table.column("label").null_count:
        raise DataError(f"data file {url}: column label has {table.column('label').null_count} empty rows")
    blobs = table.column("img").combine_chunks().field("bytes").to_pylist()
    labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
    ids = np.arange(len(labels), dtype=np.int64)
    if "index" in names:
        index = np.asarray(table.column("index").to_pylist(), dtype=np.int64)
        if (index >= 0).all() and len(np.unique(index)) == len(index):
            ids = index
    pixels = np.empty((len(blobs), image_size, image_size, 3), dtype=np.uint8)
    for row, blob in enumerate(blobs):
        if blob is None:
            raise DataError(f"data file {url}: row {row} has no image bytes")
        try:
            with Image.open(io.BytesIO(blob)) as im:
                if im.size != (image_size, image_size):
                    raise DataError(f"data file {url}: row {row} is {im.size[0]}x{im.size[1]} pixels, "
                                    f"expected {image_size}x{image_size} (data.image_size)")
                pixels[row] = np.asarray(im.convert("RGB"))
        except DataError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:  # PIL's decoders raise these
            raise DataError(f"data file {url}: row {row}'s image bytes are not a readable image "
                            f"({type(err).__name__})") from None
    return ImageSet(to_unit_range(pixels), torch.from_numpy(labels), torch.from_numpy(ids))


def read_torchvision(name: str, root: str, split: str, download: bool = False) -> ImageSet:
    """torchvision's CIFAR-10 / CIFAR-100 / SVHN folders; downloads only when asked to."""
    import torchvision.datasets as tvd

    if not download and not os.path.isdir(root):
        raise DataError(f"{name} folder {root} does not exist (set data.download=true to fetch it)")
    try:
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            ds = cls(root, train=split == "train", download=download)
            pixels, labels = ds.data, np.asarray(ds.targets)
        elif name == "svhn":
            ds = tvd.SVHN(root, split=split, download=download)
            pixels, labels = ds.data.transpose(0, 2, 3, 1), np.asarray(ds.labels)
        else:
            raise DataError(f"unknown dataset {name!r}; known: cifar10, cifar100, svhn")
    except RuntimeError as err:
        raise DataError(f"{name} ({split}) not found under {root}: {err}") from None
    labels = torch.from_numpy(labels.astype(np.int64))
    return ImageSet(to_unit_range(pixels), labels, torch.arange(len(labels), dtype=torch.int64))


def select(data: ImageSet, count: int | None = None, indices: list[int] | None = None,
           random: int | None = None, seed: int = 0) -> ImageSet:
    """The first `count` images, the images with these ids, or a seeded random subset."""
    if indices is not None:
        position = {int(i): row for row, i in enumerate(data.ids.tolist())}
        missing = [i for i in indices if i not in position]
        if missing:
            raise DataError(f"data.indices: ids {missing[:5]}{'...' if len(missing) > 5 else ''} are not in the "
                            f"data (ids {int(data.ids.min())}..{int(data.ids.max())})")
        if not indices:
            raise DataError("data.indices is empty: the subset would hold no image")
        return data.take([position[i] for i in indices])
    if count is not None:
        if count > len(data):
            raise DataError(f"data.count = {count} but the data hold only {len(data)} images")
        return data.take(torch.arange(count))
    if random is not None:
        if random > len(data):
            raise DataError(f"data.random = {random} but the data hold only {len(data)} images")
        g = torch.Generator().manual_seed(seed)
        return data.take(torch.randperm(len(data), generator=g)[:random].sort().values)
    return data


def check_labels(data: ImageSet, classes: int, where: str) -> None:
    """Labels outside [0, classes) would be counted as errors: refuse them."""
    if len(data) and (int(data.labels.min()) < 0 or int(data.labels.max()) >= classes):
        bad = data.labels[(data.labels < 0) | (data.labels >= classes)]
        raise DataError(f"{where}: labels must lie in [0, {classes}) (classifier.num_classes), found {int(bad[0])} "
                        f"({len(bad)} images)")


def load(cfg: DataConfig) -> ImageSet:
    """The images a `DataConfig` names, subset applied."""
    if cfg.format == "parquet":
        data = read_parquet(cfg.path, cfg.image_size)
    else:
        data = read_torchvision(cfg.name, cfg.path, cfg.split, cfg.download)
        if data.images.shape[-1] != cfg.image_size:
            raise DataError(f"{cfg.name} images are {data.images.shape[-1]} pixels wide, data.image_size is {cfg.image_size}")
    if len(data) == 0:
        raise DataError(f"data file {cfg.path} holds no images")
    if cfg.exclude:
        held_out = set(cfg.exclude)
        data = data.take([k for k, i in enumerate(data.ids.tolist()) if i not in held_out])
    return select(data, cfg.count, cfg.indices, cfg.random, cfg.subset_seed)
