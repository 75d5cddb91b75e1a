import hashlib
import io
import os
import stat

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from distributed_ebm.config import AttackConfig, DataConfig, build, load_config
from distributed_ebm.errors import ConfigError
from distributed_ebm.method.pixels import uint8_hwc
from distributed_ebm.store import storage
from distributed_ebm.store.data import DataError, read_images, read_parquet, read_torchvision, subset

from .conftest import TEST_EXACT


def _png(size, value=0):
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write(path, rows, **extra_cols):
    table = pa.table({"img": [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(rows)],
                      "label": list(range(len(rows))), **extra_cols})
    pq.write_table(table, path)


def test_exact_test_images_are_the_real_pixels(exact_test):
    assert exact_test.floats().shape == (1000, 3, 32, 32) and exact_test.floats().dtype == torch.float32
    assert exact_test.floats().min() == -1 and exact_test.floats().max() == 1
    # ../shared/datasets/README.md: sha256 of the decoded uint8 HWC pixels, file order
    assert hashlib.sha256(uint8_hwc(exact_test.floats()).tobytes()).hexdigest() == \
        "da362006b99671213d1a5d856cab2bedf64d40bad4501630ee60f4ceb2d3ec7f"
    assert exact_test.ids.tolist() == list(range(1000))
    assert np.bincount(exact_test.labels.numpy()).tolist() == [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]


def test_pixels_round_trip_exactly_through_method_pixels():
    """Every uint8 value -> float in [-1, 1] -> uint8 is itself, in both layouts and through ImageSet; the floats
    are 2 p / 255 - 1 computed independently in float64, and out-of-range floats clamp to the ends."""
    from distributed_ebm.method.pixels import uint8_pixels, unit_range, unit_range_hwc
    from distributed_ebm.store.data import ImageSet

    p = torch.arange(256, dtype=torch.uint8).reshape(4, 4, 4, 4)  # N x H x W x C, every value once
    x = unit_range(p)
    assert x.dtype == torch.float32
    assert torch.allclose(x.double(), p.double() * 2 / 255 - 1, rtol=0, atol=1e-6)
    assert torch.equal(uint8_pixels(x), p)
    assert uint8_pixels(p) is p  # pixels stay pixels
    assert torch.equal(uint8_pixels(torch.tensor([-3.0, 2.0])), torch.tensor([0, 255], dtype=torch.uint8))
    chw = unit_range_hwc(p.numpy())
    assert chw.shape == (4, 4, 4, 4) and torch.equal(chw, x.permute(0, 3, 1, 2))
    assert np.array_equal(uint8_hwc(chw), p.numpy()) and np.array_equal(uint8_hwc(chw.double()), p.numpy())
    pixels = ImageSet(p.permute(0, 3, 1, 2), torch.zeros(4, dtype=torch.int64), torch.arange(4))
    floats = ImageSet(pixels.floats(), pixels.labels, pixels.ids)
    assert torch.equal(pixels.floats([2, 0]), chw[[2, 0]]) and np.array_equal(floats.pixels(), p.numpy())
    assert np.shares_memory(pixels.pixels(), p.numpy())  # the stored pixels, not a copy


def test_subsets(exact_test):
    assert subset(exact_test, count=5).ids.tolist() == [0, 1, 2, 3, 4]
    sub = subset(exact_test, indices=[7, 3, 999])
    assert sub.ids.tolist() == [7, 3, 999] and torch.equal(sub.floats()[1], exact_test.floats()[3])
    r1, r2 = subset(exact_test, random=20, seed=1), subset(exact_test, random=20, seed=1)
    assert torch.equal(r1.ids, r2.ids) and len(set(r1.ids.tolist())) == 20
    assert not torch.equal(r1.ids, subset(exact_test, random=20, seed=2).ids)
    with pytest.raises(DataError, match=r"ids \[5000\] are not in the data"):
        subset(exact_test, indices=[1, 5000])
    with pytest.raises(DataError, match="data.count = 2000 but the data hold only 1000 images"):
        subset(exact_test, count=2000)


def test_ids_fall_back_to_row_numbers(tmp_path):
    _write(tmp_path / "a.parquet", [_png(32)] * 3, index=[-1, -1, -1])
    assert read_parquet(str(tmp_path / "a.parquet")).ids.tolist() == [0, 1, 2]
    _write(tmp_path / "b.parquet", [_png(32)] * 3, index=[10, 20, 30])
    assert read_parquet(str(tmp_path / "b.parquet")).ids.tolist() == [10, 20, 30]


def test_pixels_map_to_minus_one_one(tmp_path):
    _write(tmp_path / "a.parquet", [_png(32, 0), _png(32, 255), _png(32, 51)])
    x = read_parquet(str(tmp_path / "a.parquet")).floats()
    assert x[0].eq(-1).all() and x[1].eq(1).all() and torch.allclose(x[2], torch.tensor(2 * 51 / 255 - 1))


def test_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_parquet(str(tmp_path / "missing.parquet"))
    pq.write_table(pa.table({"image": [b"x"], "y": [1]}), tmp_path / "wrong.parquet")
    with pytest.raises(DataError, match="expected the Hugging Face image layout"):
        read_parquet(str(tmp_path / "wrong.parquet"))
    _write(tmp_path / "big.parquet", [_png(32), _png(64)])
    with pytest.raises(DataError, match="row 1 is 64x64 pixels, expected 32x32"):
        read_parquet(str(tmp_path / "big.parquet"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        read_parquet(str(tmp_path / "junk.parquet"))
    with pytest.raises(ConfigError, match="data.name = 'mnist'"):
        load_config(AttackConfig, None, ["ebm=x.pt", "data.format=torchvision", "data.name=mnist"])
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        read_torchvision("mnist", str(tmp_path), "train")
    with pytest.raises(DataError, match="does not exist .set data.download=true"):
        read_torchvision("cifar10", str(tmp_path / "none"), "train")
    with pytest.raises(DataError, match="cifar10 .train. not found under"):
        read_torchvision("cifar10", str(tmp_path), "train")



def test_parquet_from_s3(s3_bucket, exact_test):
    url = f"{s3_bucket}/data/test-exact-1000.parquet"
    with open(TEST_EXACT, "rb") as f:
        storage.write_bytes(url, f.read())
    cfg = build(DataConfig, {"path": url, "indices": [3, 4, 5]})
    sub = read_images(cfg)
    assert (torch.equal(sub.floats(), exact_test.floats()[3:6])
            and sub.labels.tolist() == exact_test.labels[3:6].tolist())


def test_atomic_writes_leave_no_temporary_and_the_mode_a_plain_write_gives(tmp_path):
    """Outputs are written to a temporary file and renamed; mkstemp makes that file 0600, which left every summary,
    plot and checkpoint unreadable to the rest of a team on a shared filesystem."""
    storage.write_bytes(str(tmp_path / "out" / "a.json"), b"{}")
    plain = tmp_path / "plain"
    plain.write_bytes(b"{}")
    assert os.listdir(tmp_path / "out") == ["a.json"]
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "a.json").st_mode) == stat.S_IMODE(plain.stat().st_mode)
