"""Fashion-MNIST discovery and idx reading (numpy only)."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
from pathlib import Path

import numpy as np
import pytest

from cirlib.data import fashion_mnist as fm


def write_idx(path: Path, array: np.ndarray, magic: bytes | None = None) -> Path:
    """Write ``array`` (uint8) in the idx format, gzip-compressed when the name ends in .gz."""
    header = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    blob = header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(blob) if path.suffix == ".gz" else blob)
    return path


def write_fake_dataset(folder: Path, n_train: int = 5, n_test: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images = np.arange(n * 28 * 28, dtype=np.int64).reshape(n, 28, 28) % 251
        labels = np.arange(n) % 10
        image_file, label_file = fm.SPLIT_FILES[split]
        write_idx(folder / image_file, images)
        write_idx(folder / label_file, labels)


def test_read_idx_images_and_labels(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    got = fm.read_idx(write_idx(tmp_path / "x-idx3-ubyte.gz", images))
    assert got.dtype == np.uint8 and got.shape == (4, 28, 28)
    np.testing.assert_array_equal(got, images)
    labels = fm.read_idx(write_idx(tmp_path / "y-idx1-ubyte", np.array([3, 0, 6], np.uint8)))  # raw, not gz
    assert labels.shape == (3,) and labels.tolist() == [3, 0, 6]


def test_read_idx_rejects_bad_magic(tmp_path: Path) -> None:
    bad = write_idx(tmp_path / "bad.gz", np.zeros((2, 28, 28), np.uint8), magic=b"\x12\x34\x08\x03")
    with pytest.raises(ValueError, match="bad.gz.*magic"):
        fm.read_idx(bad)
    wrong_type = write_idx(tmp_path / "float.gz", np.zeros((2,), np.uint8), magic=b"\x00\x00\x0d\x01")
    with pytest.raises(ValueError, match="float.gz.*element type 0x0d"):
        fm.read_idx(wrong_type)


def test_read_idx_rejects_truncated_body(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "short", np.zeros((3, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"short.*\(3, 28, 28\)"):
        fm.read_idx(path)


def test_ensure_prefers_explicit_root_and_loads(tmp_path: Path) -> None:
    write_fake_dataset(tmp_path / "fm")
    assert fm.ensure_fashion_mnist(tmp_path / "fm") == tmp_path / "fm"
    images, labels = fm.load_split("train", tmp_path / "fm")
    assert images.shape == (5, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2, 3, 4]
    assert images[0, 0, 5] == 5 and images[1, 0, 0] == 784 % 251
    assert not labels.flags.writeable  # cached arrays are shared between callers
    with pytest.raises(ValueError, match="split"):
        fm.load_split("val", tmp_path / "fm")


def test_label_count_mismatch_names_file(tmp_path: Path) -> None:
    write_fake_dataset(tmp_path / "fm")
    write_idx(tmp_path / "fm" / fm.SPLIT_FILES["test"][1], np.zeros(7, np.uint8))
    with pytest.raises(ValueError, match="t10k-labels.*7 labels for 3 images"):
        fm.load_split("test", tmp_path / "fm")


def test_missing_everywhere_names_both_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("CIRLIB_ROOT", str(tmp_path / "project"))
    with pytest.raises(RuntimeError) as err:
        fm.ensure_fashion_mnist()
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message and "--download" in message
    assert str(tmp_path / "no-debian") in message and "fashion-mnist" in message
    # the project-local copy is found when the Debian one is absent
    write_fake_dataset(tmp_path / "project" / "data" / "fashion-mnist")
    assert fm.ensure_fashion_mnist() == tmp_path / "project" / "data" / "fashion-mnist"


def test_download_rejects_wrong_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tampered download is never kept; the error names every mirror tried."""
    monkeypatch.setattr(fm.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"not the dataset"))
    with pytest.raises(RuntimeError, match="SHA256") as err:
        fm.ensure_fashion_mnist(tmp_path / "dl", download=True)
    assert all(base in str(err.value) for base in fm.MIRRORS)
    assert list((tmp_path / "dl").iterdir()) == []


def test_download_keeps_matching_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"pretend official bytes"
    monkeypatch.setattr(fm, "SHA256", {name: hashlib.sha256(payload).hexdigest() for name in fm.FILES})
    urls: list[str] = []

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        urls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(fm.urllib.request, "urlopen", fake_urlopen)
    assert fm.ensure_fashion_mnist(tmp_path / "dl", download=True) == tmp_path / "dl"
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == sorted(fm.FILES)
    assert urls == [fm.MIRRORS[0] + name for name in fm.FILES]
    fm.ensure_fashion_mnist(tmp_path / "dl", download=True)  # complete: nothing fetched again
    assert len(urls) == 4


@pytest.mark.skipif(not fm.DEBIAN_DIR.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_real_data_shapes() -> None:
    images, labels = fm.load_split("test", fm.DEBIAN_DIR)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10  # the official test set is balanced
    train, train_labels = fm.load_split("train", fm.DEBIAN_DIR)
    assert train.shape == (60000, 28, 28) and set(np.unique(train_labels)) == set(range(10))
    assert len(fm.CLASS_NAMES) == 10 and fm.CLASS_NAMES[3] == "Dress" and fm.FASHIONIQ_CATEGORIES[3] == "dress"
