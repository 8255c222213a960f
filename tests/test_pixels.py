"""Pre-decoded image arrays: exact pipeline output, caching, invalidation and bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cirlib.core.digests import sized_digests
from cirlib.data.pixels import PixelCache, normalise
from cirlib.data.preprocess import build_transform


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """A tall red RGB image, a wide RGBA one and a greyscale square (the modes real data brings)."""
    folder = tmp_path / "images"
    folder.mkdir()
    specs = [("tall.png", Image.new("RGB", (20, 40), (200, 10, 10))),
             ("wide.png", Image.new("RGBA", (60, 30), (10, 200, 10, 255))),
             ("grey.png", Image.new("L", (16, 16), 128))]
    paths = []
    for name, img in specs:
        img.save(folder / name)
        paths.append(folder / name)
    return paths


def test_pixels_are_the_pipeline_output_times_255(images):
    cache = PixelCache(images, 32, "squarepad", progress=False)
    assert cache.array.dtype == np.uint8 and cache.array.shape == (3, 3, 32, 32) and len(cache) == 3
    tall = cache.tensor([0])[0]
    # squarepad of a 20x40 image: black bars left and right, the red image in the middle
    assert tall[:, 16, 0].tolist() == [0, 0, 0] and tall[:, 16, 16].tolist() == [200, 10, 10]
    assert cache.tensor([2])[0, :, 8, 8].tolist() == [128, 128, 128]  # greyscale -> three equal channels
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    transform = build_transform("squarepad", 32, mean, std)
    expected = torch.stack([transform(Image.open(p)) for p in images])
    assert torch.allclose(cache.batch([0, 1, 2], mean, std, torch.device("cpu")), expected, atol=1e-6)


def test_rows_select_and_order(images):
    cache = PixelCache(images, 16, "clip", progress=False)
    assert torch.equal(cache.tensor([2, 0]), cache.tensor()[[2, 0]])
    assert cache.tensor(torch.tensor([1])).shape == (1, 3, 16, 16)


def test_normalise_by_hand():
    pixels = torch.tensor([255, 0, 51], dtype=torch.uint8).view(1, 3, 1, 1)
    out = normalise(pixels, mean=(0.5, 0.5, 0.2), std=(0.25, 0.5, 0.1))
    assert out.flatten().tolist() == pytest.approx([2.0, -1.0, 0.0])


def test_cache_file_is_reused(images, tmp_path, monkeypatch):
    first = PixelCache(images, 32, "targetpad", cache_dir=tmp_path / "cache", progress=False)
    assert len(list((tmp_path / "cache").glob("pixels-*.npy"))) == 1
    monkeypatch.setattr(PixelCache, "_decode", lambda self, progress: pytest.fail("cache file not reused"))
    again = PixelCache(images, 32, "targetpad", cache_dir=tmp_path / "cache", progress=False)
    assert np.array_equal(np.asarray(again.array), np.asarray(first.array))


@pytest.mark.parametrize("change", ["kind", "size", "ratio", "order"])
def test_other_inputs_get_their_own_cache(images, tmp_path, change):
    base = {"paths": images, "image_size": 32, "transform_kind": "targetpad", "target_ratio": 1.25}
    PixelCache(**base, cache_dir=tmp_path, progress=False)
    other = dict(base)
    if change == "kind":
        other["transform_kind"] = "clip"
    elif change == "size":
        other["image_size"] = 16
    elif change == "ratio":
        other["target_ratio"] = 1.5
    else:
        other["paths"] = images[::-1]
    PixelCache(**other, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("pixels-*.npy"))) == 2


def test_a_changed_image_is_decoded_again(images, tmp_path):
    PixelCache(images, 16, "squarepad", cache_dir=tmp_path, progress=False)
    Image.new("RGB", (20, 40), (0, 0, 255)).save(images[0])
    st = os.stat(images[0])
    os.utime(images[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fresh = PixelCache(images, 16, "squarepad", cache_dir=tmp_path, progress=False)
    assert fresh.tensor([0])[0, :, 8, 8].tolist() == [0, 0, 255]


def test_corrupt_cache_is_rebuilt_with_a_warning(images, tmp_path):
    expected = PixelCache(images, 16, "squarepad", cache_dir=tmp_path, progress=False).tensor()  # a copy:
    (cache_file,) = tmp_path.glob("pixels-*.npy")  # the array itself maps the file damaged below
    cache_file.write_bytes(b"not an array")
    with pytest.warns(UserWarning, match="pixel cache .* is unusable.*recomputing"):
        again = PixelCache(images, 16, "squarepad", cache_dir=tmp_path, progress=False)
    assert torch.equal(again.tensor(), expected)


def test_missing_file_is_named(images, tmp_path):
    missing = tmp_path / "images" / "gone.png"
    with pytest.raises(OSError, match="gone.png"):
        PixelCache([*images, missing], 16, "squarepad", progress=False)
    with pytest.raises(FileNotFoundError, match="gone.png"):
        PixelCache([*images, missing], 16, "squarepad", cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(FileNotFoundError, match="gone.png"):
        sized_digests([missing])


def test_corrupt_image_is_named(images, tmp_path):
    bad = tmp_path / "images" / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(Exception, match="bad.png"):
        PixelCache([images[0], bad], 16, "squarepad", progress=False)


def _rewrite_keeping_size_and_mtime(path: Path, image: Image.Image) -> None:
    """What ``cp -p`` / ``rsync -t`` do: other bytes, same size, same mtime."""
    st = os.stat(path)
    image.save(path)
    assert os.stat(path).st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_same_size_same_mtime_rewrite_is_decoded_again(images, tmp_path):
    PixelCache(images, 16, "squarepad", cache_dir=tmp_path, progress=False)
    _rewrite_keeping_size_and_mtime(images[0], Image.new("RGB", (20, 40), (10, 10, 200)))
    fresh = PixelCache(images, 16, "squarepad", cache_dir=tmp_path, progress=False)
    assert fresh.tensor([0])[0, :, 8, 8].tolist() == [10, 10, 200]


def test_sized_digests_key_on_content_and_refuse_non_regular_files(images, tmp_path):
    (size, digest), *_ = sized_digests(images)
    assert size == images[0].stat().st_size and len(digest) == 32
    copy = tmp_path / "copy.png"
    copy.write_bytes(images[0].read_bytes())
    assert sized_digests([copy]) == [(size, digest)]  # same bytes, same entry, wherever the file lives
    assert sized_digests([images[1]]) != [(size, digest)]
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="pipe.png: not a regular file"):  # never opened: no hang
        sized_digests([fifo])
