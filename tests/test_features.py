"""Batched feature extraction and its on-disk cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cirlib.core.device import autocast
from cirlib.data.preprocess import transform_for
from cirlib.models.features import (
    encode_in_batches,
    encode_pixels,
    image_cache_key,
    image_features,
    prefetched_batches,
    text_features,
)


class CountingBackbone:
    """The Backbone API subset features.py uses, with a cheap deterministic encoder that counts calls."""

    image_size = 24
    mean = (0.5, 0.4, 0.3)
    std = (0.2, 0.25, 0.3)
    embed_dim = 6
    device = torch.device("cpu")

    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.fingerprint = self.image_fingerprint = self.text_fingerprint = f"counting-{seed}"
        self.model = torch.nn.ModuleDict(
            {
                "image": torch.nn.Linear(3 * 4 * 4, self.embed_dim),
                "text": torch.nn.EmbeddingBag(97, self.embed_dim),
            }
        )
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        self.image_calls = 0
        self.text_calls = 0

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        assert not self.model.training
        self.image_calls += 1
        return self.model["image"](torch.nn.functional.adaptive_avg_pool2d(pixels, 4).flatten(1))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[ord(c) % 97 for c in t.ljust(12)[:12]] for t in texts])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.text_calls += 1
        return self.model["text"](tokens)


def _write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(10, 90, 2))
        path = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return _write_images(tmp_path / "images", 11)


def _direct(backbone: CountingBackbone, paths: list[Path], kind: str = "targetpad") -> torch.Tensor:
    transform = transform_for(backbone, kind)
    pixels = torch.stack([transform(Image.open(p)) for p in paths])
    with torch.no_grad(), autocast(backbone.device):  # the arithmetic image_features uses here
        return backbone.model["image"](torch.nn.functional.adaptive_avg_pool2d(pixels, 4).flatten(1)).float()


def test_image_features_match_direct_encoding(images):
    backbone = CountingBackbone()
    feats = image_features(backbone, images, batch_size=4, progress=False)
    assert feats.shape == (11, 6) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert backbone.image_calls == 3  # 4 + 4 + 3
    torch.testing.assert_close(feats, _direct(backbone, images))
    reversed_feats = image_features(backbone, images[::-1], batch_size=4, progress=False)
    torch.testing.assert_close(reversed_feats, feats.flip(0))


def test_batch_size_and_workers_do_not_change_results(images):
    backbone = CountingBackbone()
    reference = image_features(backbone, images, batch_size=64, progress=False)
    for batch_size in (1, 3):
        torch.testing.assert_close(image_features(backbone, images, batch_size=batch_size, progress=False), reference)
    torch.testing.assert_close(image_features(backbone, images, batch_size=5, num_workers=1, progress=False), reference)


def test_training_flag_is_restored(images):
    backbone = CountingBackbone()
    backbone.model.train()
    image_features(backbone, images[:2], progress=False)
    text_features(backbone, ["a"], progress=False)
    assert backbone.model.training


def test_cache_hit_skips_the_encoder(images, tmp_path):
    backbone = CountingBackbone()
    cache = tmp_path / "cache"
    first = image_features(backbone, images, batch_size=4, cache_dir=cache, progress=False)
    calls = backbone.image_calls
    second = image_features(backbone, images, batch_size=7, cache_dir=cache, progress=False)
    assert backbone.image_calls == calls
    assert torch.equal(first, second)
    assert [p.suffix for p in cache.iterdir()] == [".safetensors"]  # one file, no temp leftovers


@pytest.mark.parametrize(
    "change",
    [
        {"transform_kind": "clip"},
        {"transform_kind": "squarepad"},
        {"target_ratio": 1.5},
        {"backbone": CountingBackbone(seed=1)},
        {"paths": "subset"},
    ],
    ids=["clip", "squarepad", "ratio", "weights", "file-list"],
)
def test_cache_invalidation(images, tmp_path, change):
    cache = tmp_path / "cache"
    base = CountingBackbone()
    image_features(base, images, cache_dir=cache, progress=False)
    change = dict(change)
    backbone = change.pop("backbone", base)
    paths = images[:-1] if change.pop("paths", None) else images
    calls = backbone.image_calls
    feats = image_features(backbone, paths, cache_dir=cache, progress=False, **change)
    assert backbone.image_calls > calls
    assert feats.shape[0] == len(paths)
    assert len(list(cache.glob("*.safetensors"))) == 2


def test_cache_key_names_the_arithmetic(images, monkeypatch):
    """Features computed in bf16 are never served to a run that would compute them in fp32."""
    from cirlib.core import device

    backbone = CountingBackbone()
    keys = {}
    for native in (True, False):
        monkeypatch.delenv(device.PRECISION_ENV, raising=False)  # simulate the default switch
        monkeypatch.setattr(device, "native_cpu_bf16", lambda native=native: native)
        keys[native] = image_cache_key(backbone, images)
    assert keys[True] != keys[False]
    assert image_cache_key(backbone, images, amp=False) == keys[False]  # amp off: fp32 wherever it runs


def test_changed_image_file_is_recomputed(images, tmp_path):
    backbone = CountingBackbone()
    cache = tmp_path / "cache"
    before = image_features(backbone, images, cache_dir=cache, progress=False)
    key = image_cache_key(backbone, images)
    Image.new("RGB", (40, 40), "red").save(images[5])
    os.utime(images[5], ns=(1_000_000_000, 1_000_000_000))  # differ from the original even on coarse clocks
    assert image_cache_key(backbone, images) != key
    calls = backbone.image_calls
    after = image_features(backbone, images, cache_dir=cache, progress=False)
    assert backbone.image_calls > calls
    assert torch.equal(after[:5], before[:5]) and torch.equal(after[6:], before[6:])
    assert not torch.allclose(after[5], before[5])


def test_cache_key_ignores_batching_but_not_file_order(images):
    backbone = CountingBackbone()
    assert image_cache_key(backbone, images) == image_cache_key(backbone, [str(p) for p in images])
    assert image_cache_key(backbone, images) != image_cache_key(backbone, images[::-1])


def test_cache_key_survives_moving_the_files(images, tmp_path):
    backbone = CountingBackbone()
    moved = Path(shutil.copytree(images[0].parent, tmp_path / "moved"))
    copies = [moved / p.name for p in images]
    assert image_cache_key(backbone, copies) == image_cache_key(backbone, images)
    copies[3].write_bytes(images[4].read_bytes())  # one file's bytes differ: its entry is stale
    assert image_cache_key(backbone, copies) != image_cache_key(backbone, images)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-key"])
def test_corrupt_cache_is_recomputed_with_a_warning(images, tmp_path, damage):
    backbone = CountingBackbone()
    cache = tmp_path / "cache"
    first = image_features(backbone, images, cache_dir=cache, progress=False)
    (cache_file,) = cache.iterdir()
    if damage == "garbage":
        cache_file.write_bytes(b"not a safetensors file")
    elif damage == "truncated":
        cache_file.write_bytes(cache_file.read_bytes()[:-10])
    else:  # a valid file made for other inputs, renamed onto this key
        other = tmp_path / "other"
        image_features(backbone, images[:-1], cache_dir=other, progress=False)
        (other_file,) = other.iterdir()
        other_file.replace(cache_file)
    calls = backbone.image_calls
    with pytest.warns(UserWarning, match="feature cache .* is unusable.*recomputing"):
        again = image_features(backbone, images, cache_dir=cache, progress=False)
    assert backbone.image_calls > calls
    torch.testing.assert_close(again, first)
    calls = backbone.image_calls
    image_features(backbone, images, cache_dir=cache, progress=False)  # the rewritten file is good
    assert backbone.image_calls == calls


def test_failed_extraction_leaves_no_cache_file(images, tmp_path):
    backbone = CountingBackbone()
    cache = tmp_path / "cache"
    images[7].write_bytes(b"\x89PNG but not really")
    with pytest.raises(OSError, match="img007.png"):
        image_features(backbone, images, batch_size=2, cache_dir=cache, progress=False)
    assert not cache.exists() or list(cache.iterdir()) == []


@pytest.mark.parametrize("cached", [True, False])
def test_missing_image_names_the_file(images, tmp_path, cached):
    cache_dir = tmp_path if cached else None
    with pytest.raises(OSError, match="nope.png"):
        image_features(CountingBackbone(), images + [tmp_path / "nope.png"], cache_dir=cache_dir, progress=False)


def test_empty_inputs():
    backbone = CountingBackbone()
    assert image_features(backbone, [], progress=False).shape == (0, 6)
    assert text_features(backbone, [], progress=False).shape == (0, 6)
    assert encode_in_batches(backbone.encode_image, [], backbone.device).shape == (0, 0)


def test_text_features():
    backbone = CountingBackbone()
    texts = [f"a {c} striped dress number {i}" for i, c in enumerate(["red", "blue", "navy"] * 5)]
    feats = text_features(backbone, texts, batch_size=4, progress=False)
    assert feats.shape == (15, 6) and feats.dtype == torch.float32
    assert backbone.text_calls == 4
    torch.testing.assert_close(text_features(backbone, texts, batch_size=256, progress=False), feats)
    torch.testing.assert_close(text_features(backbone, texts[3:4], progress=False), feats[3:4])
    with pytest.raises(TypeError, match="single string"):
        text_features(backbone, "a red dress")


def test_text_cache_hit_skips_the_encoder_and_is_keyed_by_weights_precision_and_strings(tmp_path, monkeypatch):
    backbone = CountingBackbone()
    cache = tmp_path / "cache"
    texts = ["is red", "has stripes", "is long"]
    first = text_features(backbone, texts, batch_size=2, cache_dir=cache, progress=False)
    assert backbone.text_calls == 2
    second = text_features(backbone, texts, batch_size=256, cache_dir=cache, progress=False)
    assert backbone.text_calls == 2 and torch.equal(first, second)
    assert [p.suffix for p in cache.iterdir()] == [".safetensors"]  # one entry, no temp leftovers
    # another order, other strings, other weights and another precision are other entries
    text_features(backbone, texts[::-1], cache_dir=cache, progress=False)
    assert backbone.text_calls == 3
    text_features(backbone, ["is red", "has dots", "is long"], cache_dir=cache, progress=False)
    assert backbone.text_calls == 4
    other = CountingBackbone(seed=1)
    assert not torch.equal(text_features(other, texts, cache_dir=cache, progress=False), first)
    assert other.text_calls == 1
    monkeypatch.setattr("cirlib.models.features.precision", lambda device, amp: "bf16")
    text_features(backbone, texts, cache_dir=cache, progress=False)
    assert backbone.text_calls == 5
    assert len(list(cache.iterdir())) == 5


def test_damaged_text_cache_is_recomputed_with_a_warning(tmp_path):
    backbone = CountingBackbone()
    cache = tmp_path / "cache"
    first = text_features(backbone, ["is blue", "is green"], cache_dir=cache, progress=False)
    (entry,) = cache.iterdir()
    entry.write_bytes(entry.read_bytes()[:40])
    with pytest.warns(UserWarning, match="unusable"):
        again = text_features(backbone, ["is blue", "is green"], cache_dir=cache, progress=False)
    assert backbone.text_calls == 2 and torch.equal(again, first)


def test_with_the_real_tiny_backbone(images, tmp_path):
    from cirlib.models.backbone import load_backbone

    backbone = load_backbone()
    feats = image_features(backbone, images, batch_size=4, cache_dir=tmp_path, progress=False)
    assert feats.shape == (len(images), backbone.embed_dim) and feats.dtype == torch.float32
    transform = transform_for(backbone, "targetpad")
    with torch.no_grad(), autocast(backbone.device):
        direct = backbone.model.encode_image(torch.stack([transform(Image.open(p)) for p in images[:3]])).float()
    torch.testing.assert_close(feats[:3], direct, atol=1e-5, rtol=1e-4)

    texts = ["a red dress", "a navy blue shirt with stripes", "is longer"]
    text = text_features(backbone, texts, batch_size=2, progress=False)
    assert text.shape == (3, backbone.embed_dim)
    with torch.no_grad(), autocast(backbone.device):
        torch.testing.assert_close(text, backbone.encode_text(texts).float())

    key = image_cache_key(backbone, images)
    with torch.no_grad():
        backbone.model.visual.proj.mul_(2)  # "training" changed the weights
    backbone.refresh_fingerprint()
    assert image_cache_key(backbone, images) != key
    torch.testing.assert_close(image_features(backbone, images, cache_dir=tmp_path, progress=False), 2 * feats)


def test_decoded_route_matches_files_and_shares_their_cache(images, tmp_path):
    """``decoded=True`` decodes once into a pixel cache; its features are the file route's."""
    backbone = CountingBackbone()
    cache = tmp_path / "cache"
    from_files = image_features(backbone, images, batch_size=4, progress=False)
    decoded = image_features(backbone, images, batch_size=4, cache_dir=cache, progress=False, decoded=True)
    torch.testing.assert_close(decoded, from_files, atol=1e-6, rtol=0)
    assert sorted(p.suffix for p in cache.iterdir()) == [".npy", ".safetensors"]
    calls = backbone.image_calls
    again = image_features(backbone, images, cache_dir=cache, progress=False)  # file route, same key
    assert backbone.image_calls == calls and torch.equal(again, decoded)
    other = CountingBackbone(seed=1)  # another model reuses the decoded pixels, not the features
    torch.testing.assert_close(
        image_features(other, images, cache_dir=cache, progress=False, decoded=True),
        image_features(other, images, progress=False),
        atol=1e-6,
        rtol=0,
    )
    assert len(list(cache.glob("pixels-*.npy"))) == 1
    from_pixels = image_features(backbone, images, progress=False, decoded=True)
    torch.testing.assert_close(from_pixels, from_files, atol=1e-6, rtol=0)


def test_encode_pixels_matches_image_features(images, tmp_path):
    """Training loops' path (pre-decoded pixels) gives the galleries' features, in ``rows`` order."""
    from cirlib.data.pixels import PixelCache

    backbone = CountingBackbone()
    cache = PixelCache(images, backbone.image_size, "squarepad", progress=False)
    reference = image_features(backbone, images, "squarepad", progress=False)
    assert torch.allclose(encode_pixels(backbone, cache, batch_size=4), reference, atol=1e-6)
    rows = [5, 0, 3]
    assert torch.allclose(encode_pixels(backbone, cache.tensor(), rows), reference[rows], atol=1e-6)
    assert encode_pixels(backbone, cache, rows=[]).shape == (0, backbone.embed_dim)


def test_pixel_cache_decodes_each_distinct_file_once(images, monkeypatch):
    """A corpus lists an image once per caption: every row is filled, each file decoded once."""
    from cirlib.data.pixels import PixelCache

    decoded = []
    original = PixelCache._decode_one
    monkeypatch.setattr(PixelCache, "_decode_one", lambda self, path: decoded.append(path) or original(self, path))
    paths = [images[2], images[0], images[2], images[1], images[0]]
    pixels = PixelCache(paths, 16, "squarepad", progress=False).tensor()
    assert sorted(map(str, decoded)) == sorted(map(str, images[:3]))
    single = PixelCache(images[:3], 16, "squarepad", progress=False).tensor()
    assert torch.equal(pixels, single[[2, 0, 2, 1, 0]])


class _Items(torch.utils.data.Dataset):
    """Item i is a 1-element tensor [i]; records which items were loaded, optionally failing on one."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at, self.loaded = n, fail_at, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.fail_at:
            raise OSError(f"cannot decode item {i}")
        self.loaded.append(i)
        return torch.tensor([i])


def test_prefetched_batches_keep_order_and_bound_the_look_ahead():
    data = _Items(10)
    batches = prefetched_batches(data, batch_size=3, depth=2)
    first = next(batches)
    assert first.flatten().tolist() == [0, 1, 2]
    assert max(data.loaded) <= 8  # at most `depth` batches beyond the one handed out
    rest = [b.flatten().tolist() for b in batches]
    assert rest == [[3, 4, 5], [6, 7, 8], [9]]
    assert [b.flatten().tolist() for b in prefetched_batches(_Items(0), 4)] == []
    inline = _Items(10)
    batches = prefetched_batches(inline, batch_size=3, depth=0)
    assert next(batches).flatten().tolist() == [0, 1, 2] and inline.loaded == [0, 1, 2]  # nothing ahead
    assert [b.flatten().tolist() for b in batches] == [[3, 4, 5], [6, 7, 8], [9]]


def test_prefetched_batches_raise_the_loading_error():
    for depth in (0, 2):
        with pytest.raises(OSError, match="item 4"):
            list(prefetched_batches(_Items(8, fail_at=4), batch_size=2, depth=depth))


def test_threaded_and_worker_decoding_agree(images):
    backbone = CountingBackbone()
    threaded = image_features(backbone, images, batch_size=4, progress=False)
    workers = image_features(backbone, images, batch_size=4, num_workers=1, progress=False)
    assert torch.equal(threaded, workers)


def test_same_size_same_mtime_rewrite_is_recomputed(images, tmp_path):
    """``cp -p`` or ``rsync -t`` keep size and mtime: the cache must notice the new bytes anyway."""
    backbone = CountingBackbone()
    bmp = tmp_path / "images" / "same.bmp"  # uncompressed: equal dimensions give equal file sizes
    Image.new("RGB", (40, 40), "blue").save(bmp)
    paths = [*images, bmp]
    before = image_features(backbone, paths, cache_dir=tmp_path / "cache", progress=False)
    st = os.stat(bmp)
    Image.new("RGB", (40, 40), "red").save(bmp)
    os.utime(bmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(bmp).st_size, os.stat(bmp).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    after = image_features(backbone, paths, cache_dir=tmp_path / "cache", progress=False)
    assert torch.equal(after[:-1], before[:-1]) and not torch.allclose(after[-1], before[-1])
    torch.testing.assert_close(after[-1:], _direct(backbone, [bmp]))


def test_weight_edits_change_the_cache_key_without_refresh(tmp_path):
    from cirlib.models.backbone import load_backbone

    backbone = load_backbone("cirlib-tiny-ViT", device="cpu")
    path = tmp_path / "a.png"
    Image.new("RGB", (30, 20), (1, 2, 3)).save(path)
    key = image_cache_key(backbone, [path])
    with torch.no_grad():
        backbone.model.visual.proj.mul_(2)
    assert image_cache_key(backbone, [path]) != key
