"""Images as uint8 N x C x H x W pixels (as decoded; float32 in [-1, 1] where code made them), int64
labels, and int64 dataset ids; the floats are made from the pixels where a batch is used.

Sources: parquet files in the Hugging Face layout (`img: struct<bytes, path>`, `label`, and an
optional `index` that names the row's position in the original split), from a local path or any
fsspec URL; or torchvision's CIFAR-10, CIFAR-100 and SVHN folders. An image is known by its id:
the `index` column where the file carries it (ids >= 0, each once; -1 in every row means unknown), otherwise
its row number. `catalog` names a config's subset by ids and labels alone (`read_catalog` reads them
from a parquet file, `subset` chooses); `decode` turns the image bytes of the chosen rows into pixels,
on the driver (`read_images`) or in Ray Data tasks (the attack engine).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError

from ..config import DataConfig
from ..errors import InputError
from ..method.pixels import uint8_hwc, unit_range
from . import storage


class DataError(InputError):
    """Data that cannot be used as asked; the message names the file and the problem."""


@dataclass
class ImageSet:
    data: torch.Tensor  # N x C x H x W (channels-last in memory as decoded): uint8 pixels, or float32 in [-1, 1]
    labels: torch.Tensor  # N int64
    ids: torch.Tensor  # N int64

    def __len__(self) -> int:
        return self.labels.shape[0]

    def floats(self, rows=None, device: str | torch.device | None = None) -> torch.Tensor:
        """These rows (all for None) as float32 in [-1, 1], made on `device` from the pixels, on each call."""
        data = self.data if rows is None else self.data[torch.as_tensor(rows, dtype=torch.int64)]
        return unit_range(data, device)

    def pixels(self) -> np.ndarray:
        """uint8 N x H x W x C (the stored pixels, no copy, when they are uint8)."""
        return uint8_hwc(self.data)

    def take(self, rows) -> "ImageSet":
        rows = torch.as_tensor(rows, dtype=torch.int64)
        return ImageSet(self.data[rows], self.labels[rows], self.ids[rows])


@dataclass
class Catalog:
    """A parquet file's images by id and label, without their pixels: what the subset is chosen from."""

    url: str
    rows: np.ndarray  # row numbers in the file
    labels: torch.Tensor
    ids: torch.Tensor
    indexed: bool  # ids are the file's `index` column (else its row numbers)

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, rows) -> "Catalog":
        rows = np.asarray(rows, dtype=np.int64)
        return Catalog(self.url, self.rows[rows], self.labels[rows], self.ids[rows], self.indexed)


def _open(url: str) -> pq.ParquetFile:
    """The parquet file at `url`, read by ranges: only the columns asked for travel."""
    try:
        f = storage.open_file(url)
        with storage.explain_unreachable(url):
            return pq.ParquetFile(f)
    except InputError:
        raise
    except FileNotFoundError:
        raise DataError(f"data file {url} does not exist") from None
    except Exception as err:  # pyarrow raises several kinds
        raise DataError(f"data file {url} is not a readable parquet file: {err}") from None


def arrow_filesystem(url: str):
    """(pyarrow filesystem or None, path) for readers that take pyarrow's (Ray Data): the project's fsspec
    filesystem (s3fs and its AWS_* settings) wrapped, or None for a local path."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = storage.filesystem(url)
    return (None, os.path.abspath(path)) if "file" in fs.protocol else (PyFileSystem(FSSpecHandler(fs)), path)


def read_catalog(url: str) -> Catalog:
    """Ids and labels of a Hugging Face-layout image parquet file (local path or fsspec URL), checked."""
    pf = _open(url)
    schema = pf.schema_arrow
    names = schema.names
    img_field = schema.field("img") if "img" in names else None
    if img_field is None or "label" not in names or not hasattr(img_field.type, "get_field_index") \
            or img_field.type.get_field_index("bytes") < 0:
        raise DataError(f"data file {url} has columns {names}; expected the Hugging Face image layout: "
                        "img: struct<bytes: binary, ...>, label: int (and optionally index: int)")
    if not pa.types.is_integer(schema.field("label").type):
        raise DataError(f"data file {url}: column label is {schema.field('label').type}, expected integers")
    table = pf.read(columns=[c for c in ("label", "index") if c in names])
    if table.column("label").null_count:
        raise DataError(f"data file {url}: column label has {table.column('label').null_count} empty rows")
    labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
    ids, indexed = np.arange(len(labels), dtype=np.int64), False
    if "index" in names:  # the file names its images: every record and every key uses these ids, so they must hold
        column = table.column("index")
        if not pa.types.is_integer(schema.field("index").type) or column.null_count:
            raise DataError(f"data file {url}: its index column must hold an integer id for every row "
                            f"(type {schema.field('index').type}, {column.null_count} missing)")
        ids, indexed = np.asarray(column.to_pylist(), dtype=np.int64), True
        if (ids == -1).all():  # the layout's "unknown" for every row: the row numbers name the images
            ids, indexed = np.arange(len(labels), dtype=np.int64), False
        values, counts = np.unique(ids, return_counts=True)
        if (ids < 0).any():
            raise DataError(f"data file {url}: index holds the negative id {int(ids[ids < 0][0])} (row "
                            f"{int(np.flatnonzero(ids < 0)[0])}); image ids must be >= 0")
        if (counts > 1).any():
            twice = int(values[counts > 1][0])
            raise DataError(f"data file {url}: index names id {twice} {int(counts[counts > 1][0])} times (rows "
                            f"{np.flatnonzero(ids == twice)[:5].tolist()}); each image needs an id of its own")
    return Catalog(url, np.arange(len(labels), dtype=np.int64), torch.from_numpy(labels), torch.from_numpy(ids),
                   indexed)


def decode(blobs, image_size: int, url: str, rows=None, what: str = "row") -> np.ndarray:
    """Encoded images (PNG, JPEG, anything PIL reads) -> uint8 N x H x W x C; errors name the file and the
    image: `what` ("row", or "image id" where the ids are not row numbers) `rows[k]` (default k)."""
    pixels = np.empty((len(blobs), image_size, image_size, 3), dtype=np.uint8)
    for k, blob in enumerate(blobs):
        row = int(rows[k]) if rows is not None else k
        if blob is None:
            raise DataError(f"data file {url}: {what} {row} has no image bytes")
        try:
            with Image.open(io.BytesIO(blob)) as im:
                if im.size != (image_size, image_size):
                    raise DataError(f"data file {url}: {what} {row} is {im.size[0]}x{im.size[1]} pixels, "
                                    f"expected {image_size}x{image_size} (data.image_size)")
                pixels[k] = np.asarray(im.convert("RGB"))
        except DataError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:  # PIL's decoders raise these
            raise DataError(f"data file {url}: {what} {row}'s image bytes are not a readable image "
                            f"({type(err).__name__})") from None
    return pixels


def image_bytes(cat: Catalog) -> list:
    """The encoded images of the catalog's rows, in its order (only the `img` column is read)."""
    column = _open(cat.url).read(columns=["img"]).column("img").take(pa.array(cat.rows))
    return column.combine_chunks().field("bytes").to_pylist() if len(cat) else []


def read_rows(cat: Catalog, image_size: int = 32) -> ImageSet:
    """Decode the catalog's rows on this process."""
    pixels = decode(image_bytes(cat), image_size, cat.url, cat.rows)
    return ImageSet(torch.from_numpy(pixels).permute(0, 3, 1, 2), cat.labels.clone(), cat.ids.clone())


def read_parquet(url: str, image_size: int = 32) -> ImageSet:
    """Decode a whole Hugging Face-layout image parquet file (local path or fsspec URL)."""
    return read_rows(read_catalog(url), image_size)


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
    return ImageSet(torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2), labels,
                    torch.arange(len(labels), dtype=torch.int64))


def subset(data, count: int | None = None, indices: list[int] | None = None,
           random: int | None = None, seed: int = 0):
    """The first `count` images, the images with these ids, or a seeded random subset (of an
    `ImageSet` or a `Catalog`)."""
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


def catalog(cfg: DataConfig) -> Catalog | ImageSet:
    """The subset a `DataConfig` names, its pixels unread where the source allows: a parquet file's `Catalog`
    (ids and labels), or the images of a torchvision folder."""
    if cfg.format == "parquet":
        data = read_catalog(cfg.path)
    else:
        data = read_torchvision(cfg.name, cfg.path, cfg.split, cfg.download)
        if data.data.shape[-1] != cfg.image_size:
            raise DataError(f"{cfg.name} images are {data.data.shape[-1]} pixels wide, data.image_size is "
                            f"{cfg.image_size}")
    if len(data) == 0:
        raise DataError(f"data file {cfg.path} holds no images")
    if cfg.id_range is not None:
        low, high = cfg.id_range
        data = data.take([k for k, i in enumerate(data.ids.tolist()) if low <= i < high])
        if len(data) == 0:
            raise DataError(f"data.id_range = [{low}, {high}): no image of {cfg.path} has an id there")
    if cfg.exclude:
        held_out = set(cfg.exclude)
        data = data.take([k for k, i in enumerate(data.ids.tolist()) if i not in held_out])
    return subset(data, cfg.count, cfg.indices, cfg.random, cfg.subset_seed)


def read_images(cfg: DataConfig) -> ImageSet:
    """The images a `DataConfig` names, subset applied, in memory (only the chosen rows are decoded)."""
    data = catalog(cfg)
    return read_rows(data, cfg.image_size) if isinstance(data, Catalog) else data
