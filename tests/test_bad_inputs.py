"""A corpus of bad inputs, generated small under tmp_path: none may pass silently or crash bare.

Each case ends one of three ways, and only these: a clear error (one of cirlib's error types, its
message naming the file and, where there is one, the field), a counted warning where skipping or
keeping is right (the message gives a count and names the file), or, for unusual but valid images,
a correct decoding. A case that hangs fails after ``_TIMEOUT_S`` instead of blocking the suite.
The parameter ids start with the outcome, so ``pytest -v`` reads off the totals.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
import resource
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cirlib.data import fashion_mnist
from cirlib.data.datasets import (
    AnnotationError,
    CaptionCountWarning,
    EmptyCaptionWarning,
    ImageLoadError,
    MissingImagesWarning,
    load_cirr,
    load_fashioniq,
    open_image,
)
from cirlib.data.pixels import PixelCache
from cirlib.data.preprocess import build_transform
from cirlib.models.backbone import TINY_MODEL, CheckpointError, load_backbone, save_backbone, sidecar_path

_TIMEOUT_S = 30


@dataclass(frozen=True)
class Case:
    """``make(tmp_path)`` builds the input and returns (action, strings the message must contain)."""

    make: Callable[[Path], tuple[Callable[[], Any], list[str]]]
    outcome: str  # "error" | "warning" | "decoded"
    kind: type  # the exception / warning class expected (unused for "decoded")


# ------------------------------------------------------------------------------------ generators


def _png(path: Path, size: tuple[int, int] = (8, 8), mode: str = "RGB", colour: Any = (9, 9, 9)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def _fiq(tmp: Path, entries: list | None = None, raw: bytes | None = None) -> Path:
    """A FashionIQ root, dress/val: 2 triplets over images a, b, c."""
    root = tmp / "fiq"
    for name in "abc":
        _png(root / "images" / f"{name}.png")
    entries = entries if entries is not None else [
        {"candidate": "a", "target": "b", "captions": ["is red", "has long sleeves"]},
        {"candidate": "b", "target": "c", "captions": ["is café brown", "shorter"]},
    ]
    cap = root / "captions" / "cap.dress.val.json"
    cap.parent.mkdir(parents=True)
    cap.write_bytes(raw if raw is not None else json.dumps(entries, ensure_ascii=False).encode())
    (root / "image_splits").mkdir()
    (root / "image_splits" / "split.dress.val.json").write_text(json.dumps(["a", "b", "c"]))
    return root


def _cap(root: Path) -> Path:
    return root / "captions" / "cap.dress.val.json"


def _fiq_text(tmp: Path, encoding: str) -> tuple[Callable, list[str]]:
    root = _fiq(tmp)
    text = _cap(root).read_text(encoding="utf-8")
    _cap(root).write_bytes(text.encode(encoding))
    return (lambda: load_fashioniq(root, "dress", "val")), [str(_cap(root)), "UTF-8"]


def _fiq_entries(tmp: Path, edit: Callable[[list], None], names: list[str]) -> tuple[Callable, list[str]]:
    entries = [
        {"candidate": "a", "target": "b", "captions": ["is red", "has long sleeves"]},
        {"candidate": "b", "target": "c", "captions": ["is blue", "shorter"]},
    ]
    edit(entries)
    root = _fiq(tmp, entries)
    return (lambda: load_fashioniq(root, "dress", "val")), [str(_cap(root)), *names]


def _fiq_image_replaced(tmp: Path, replace: Callable[[Path], None]) -> tuple[Callable, list[str]]:
    root = _fiq(tmp)
    image = root / "images" / "c.png"
    image.unlink()
    replace(image)
    return (lambda: load_fashioniq(root, "dress", "val")), [str(image.with_suffix(".jpg")), "1 of 3"]


def _opening(tmp: Path, build: Callable[[Path], Path], *names: str) -> tuple[Callable, list[str]]:
    path = build(tmp / "img")
    return (lambda: open_image(path)), [str(path), *names]


def _garbage(data: bytes, name: str) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
        return d / name

    return build


def _truncated_png(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    whole = d / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(whole)
    (d / "cut.png").write_bytes(whole.read_bytes()[:400])
    return d / "cut.png"


def _float_tiff(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), 0.75, np.float32), "F").save(d / "float.tif")
    return d / "float.tif"


def _fifo(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    os.mkfifo(d / "pipe.png")
    return d / "pipe.png"


def _dangling(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "link.png").symlink_to(d / "nowhere.png")
    return d / "link.png"


def _directory(d: Path) -> Path:
    (d / "folder.png").mkdir(parents=True)
    return d / "folder.png"


def _pixel_cache(tmp: Path, size: tuple[int, int], kind: str, *names: str) -> tuple[Callable, list[str]]:
    path = _png(tmp / "img" / f"{size[0]}x{size[1]}.png", size)

    def run() -> None:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        start = time.perf_counter()
        try:
            PixelCache([path], 224, kind, progress=False)
        finally:  # refused before padding: no gigabytes, no seconds
            assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss < 256 * 1024
            assert time.perf_counter() - start < 5

    return run, [str(path), *names]


def _over_pixel_limit(tmp: Path) -> tuple[Callable, list[str]]:
    """Between MAX_IMAGE_PIXELS and twice it, PIL itself only warns (a 12000x12000 image, scaled down):
    cirlib refuses it, and without PIL's warning printed first."""
    path = _png(tmp / "img" / "big.png", (120, 120))

    def run() -> None:
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = 10_000
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)  # would escape as the error
                open_image(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit

    return run, [str(path), "120x120", "MAX_IMAGE_PIXELS = 10000"]


def _padding_over_pixel_limit(tmp: Path) -> tuple[Callable, list[str]]:
    path = _png(tmp / "img" / "wide.png", (100, 40))

    def run() -> None:
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = 5_000  # the 100x40 image fits, its 100x100 square padding does not
        try:
            PixelCache([path], 16, "squarepad", progress=False)
        finally:
            Image.MAX_IMAGE_PIXELS = limit

    return run, [str(path), "100x100", "MAX_IMAGE_PIXELS"]


def _unfiled_image(tmp: Path) -> tuple[Callable, list[str]]:
    transform = build_transform("clip", 224, (0.0,) * 3, (1.0,) * 3)
    return (lambda: transform(Image.new("L", (20000, 1)))), ["20000x1", "aspect ratio"]


@functools.cache
def _tiny_state() -> dict[str, torch.Tensor]:
    """The tiny model's weights, which the checkpoint cases write in the form each needs."""
    model = load_backbone(TINY_MODEL, device="cpu").model
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _ckpt_shape(tmp: Path, name: str, key: str, shape: tuple[int, ...]) -> tuple[Callable, list[str]]:
    state = dict(_tiny_state())
    state[key] = torch.zeros(shape)
    path = tmp / name
    if name.endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)
    found = str(tuple(shape))
    expected = str(tuple(_tiny_state()[key].shape))
    return (lambda: load_backbone(TINY_MODEL, path, device="cpu")), [str(path), repr(key), expected, found]


def _ckpt_truncated(tmp: Path) -> tuple[Callable, list[str]]:
    path = tmp / "cut.safetensors"
    save_file(_tiny_state(), str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return (lambda: load_backbone(TINY_MODEL, path, device="cpu")), [str(path), "truncated"]


def _ckpt_sidecar(tmp: Path, damage: Callable[[Path], None], *names: str) -> tuple[Callable, list[str]]:
    backbone = load_backbone(TINY_MODEL, device="cpu")
    path = save_backbone(backbone, tmp / "tiny.safetensors", {"source": "test"})
    damage(path)
    return (lambda: load_backbone(TINY_MODEL, path, device="cpu")), [*names]


def _idx_gz(tmp: Path, damage: str) -> tuple[Callable, list[str]]:
    path = tmp / "train-labels-idx1-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 1, 0, 0, 0, 200]) + bytes(range(200)))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 20] if damage == "truncated" else b"<html>a mirror's error page</html>")
    return (lambda: fashion_mnist.read_idx(path)), [str(path), "not a valid gzip file",
                                                    "BadGzipFile" if damage == "corrupt" else "EOFError"]


def _stale_pixel_cache(tmp: Path) -> tuple[Callable, list[str]]:
    path = _png(tmp / "img" / "a.png")
    PixelCache([path], 16, "squarepad", cache_dir=tmp / "cache", progress=False)
    (cache,) = (tmp / "cache").glob("pixels-*.npy")
    cache.write_bytes(b"not an npy file")
    return (lambda: PixelCache([path], 16, "squarepad", cache_dir=tmp / "cache", progress=False)), [str(cache)]


def _decodes(build: Callable[[Path], Path], pixel: tuple[int, int, int]) -> Callable[[Path], tuple]:
    def make(tmp: Path) -> tuple[Callable, list[str]]:
        path = build(tmp / "img")

        def run() -> None:
            im = open_image(path)
            assert im.mode == "RGB" and all(abs(a - b) <= 1 for a, b in zip(im.getpixel((0, 0)), pixel))

        return run, []

    return make


def _save_array(name: str, array: np.ndarray, mode: str | None = None) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array, mode).save(d / name) if mode else Image.fromarray(array).save(d / name)
        return d / name

    return build


def _drop(key: str, index: int = 0) -> Callable[[list], None]:
    return lambda entries: entries[index].pop(key)


def _set(key: str, value: Any, index: int = 0) -> Callable[[list], None]:
    return lambda entries: entries[index].__setitem__(key, value)


def _truncated_json(tmp: Path) -> tuple[Callable, list[str]]:
    root = _fiq(tmp, raw=b'[{"candidate": "a", "tar')
    return (lambda: load_fashioniq(root, "dress", "val")), [str(_cap(root)), "invalid JSON", "line 1"]


def _cirr_unknown_split(tmp: Path) -> tuple[Callable, list[str]]:
    (tmp / "cirr").mkdir()
    return (lambda: load_cirr(tmp / "cirr", "test")), ["CIRR split", "'test'", "test1"]


CASES: dict[str, Case] = {
    # images: clear errors naming the file
    "corrupt-jpeg": Case(lambda t: _opening(t, _garbage(b"\xff\xd8\xff\xe0 not a jpeg", "x.jpg"), "cannot decode"),
                         "error", ImageLoadError),
    "zero-byte-png": Case(lambda t: _opening(t, _garbage(b"", "empty.png"), "cannot decode"), "error", ImageLoadError),
    "html-as-jpeg": Case(lambda t: _opening(t, _garbage(b"<!DOCTYPE html><html>404</html>", "page.jpg"),
                                            "cannot decode"), "error", ImageLoadError),
    "truncated-png": Case(lambda t: _opening(t, _truncated_png, "cannot decode"), "error", ImageLoadError),
    "float-tiff": Case(lambda t: _opening(t, _float_tiff, "mode F"), "error", ImageLoadError),
    "absent-file": Case(lambda t: _opening(t, lambda d: d / "absent.png", "does not exist"), "error", ImageLoadError),
    "dangling-link": Case(lambda t: _opening(t, _dangling, "does not exist"), "error", ImageLoadError),
    "directory-as-image": Case(lambda t: _opening(t, _directory, "a directory"), "error", ImageLoadError),
    "fifo-as-image": Case(lambda t: _opening(t, _fifo, "a FIFO"), "error", ImageLoadError),
    "over-pixel-limit": Case(_over_pixel_limit, "error", ImageLoadError),
    "20000x1-targetpad": Case(lambda t: _pixel_cache(t, (20000, 1), "targetpad", "aspect ratio", "50:1"),
                              "error", ImageLoadError),
    "1x20000-clip": Case(lambda t: _pixel_cache(t, (1, 20000), "clip", "aspect ratio"), "error", ImageLoadError),
    "padding-over-pixel-limit": Case(_padding_over_pixel_limit, "error", ImageLoadError),
    "20000x1-not-from-a-file": Case(_unfiled_image, "error", ImageLoadError),
    # annotations: clear errors naming the file and the field
    "latin-1-annotations": Case(lambda t: _fiq_text(t, "latin-1"), "error", AnnotationError),
    "utf-16-annotations": Case(lambda t: _fiq_text(t, "utf-16"), "error", AnnotationError),
    "truncated-json": Case(_truncated_json, "error", AnnotationError),
    "missing-field": Case(lambda t: _fiq_entries(t, _drop("target", 1), ["[1]", "'target'"]), "error", AnnotationError),
    "mistyped-field": Case(lambda t: _fiq_entries(t, _set("captions", "one string"), ["[0]", "'captions'"]),
                           "error", AnnotationError),
    "no-captions": Case(lambda t: _fiq_entries(t, _set("captions", []), ["[0]", "'captions'"]),
                        "error", AnnotationError),
    "unknown-split": Case(_cirr_unknown_split, "error", ValueError),
    # checkpoints: clear errors naming the file, the parameter and both shapes
    "checkpoint-other-width": Case(lambda t: _ckpt_shape(t, "wide.safetensors", "positional_embedding", (32, 256)),
                                   "error", CheckpointError),
    "checkpoint-other-projection": Case(lambda t: _ckpt_shape(t, "proj.pt", "text_projection", (3, 3)),
                                        "error", CheckpointError),
    "truncated-safetensors": Case(_ckpt_truncated, "error", CheckpointError),
    "truncated-sidecar": Case(lambda t: _ckpt_sidecar(
        t, lambda p: sidecar_path(p).write_text(sidecar_path(p).read_text()[:40]),
        str(t / "tiny.safetensors.json"), "invalid JSON"), "error", CheckpointError),
    "altered-weights": Case(lambda t: _ckpt_sidecar(
        t, lambda p: p.write_bytes(p.read_bytes()[:-4] + b"\0\0\0\0"),
        str(t / "tiny.safetensors"), "sha256"), "error", CheckpointError),
    # compressed files
    "corrupt-gz": Case(lambda t: _idx_gz(t, "corrupt"), "error", ValueError),
    "truncated-gz": Case(lambda t: _idx_gz(t, "truncated"), "error", ValueError),
    # counted warnings: kept or skipped, never silently
    "empty-caption": Case(lambda t: _fiq_entries(t, _set("captions", ["", "shorter"]), ["1 query", "[0]"]),
                          "warning", EmptyCaptionWarning),
    "one-caption": Case(lambda t: _fiq_entries(t, _set("captions", ["shorter"]), ["1 triplet", "[0]", "has 1"]),
                        "warning", CaptionCountWarning),
    "three-captions": Case(lambda t: _fiq_entries(t, _set("captions", ["a", "b", "c"], 1),
                                                  ["1 triplet", "[1]", "has 3"]),
                           "warning", CaptionCountWarning),
    "missing-image": Case(lambda t: _fiq_image_replaced(t, lambda p: None), "warning", MissingImagesWarning),
    "dangling-link-image": Case(lambda t: _fiq_image_replaced(t, lambda p: p.symlink_to(p.parent / "gone.png")),
                                "warning", MissingImagesWarning),
    "directory-image": Case(lambda t: _fiq_image_replaced(t, lambda p: p.mkdir()), "warning", MissingImagesWarning),
    "fifo-image": Case(lambda t: _fiq_image_replaced(t, lambda p: os.mkfifo(p)), "warning", MissingImagesWarning),
    "corrupt-pixel-cache": Case(_stale_pixel_cache, "warning", UserWarning),
    # unusual but valid images: decoded correctly
    "rgba": Case(_decodes(_save_array("a.png", np.zeros((2, 2, 4), np.uint8), "RGBA"), (255, 255, 255)),
                 "decoded", object),
    "greyscale": Case(_decodes(_save_array("g.png", np.full((2, 2), 90, np.uint8), "L"), (90, 90, 90)),
                      "decoded", object),
    "16-bit-greyscale": Case(_decodes(_save_array("g16.png", np.full((2, 2), 65535, np.uint16)), (255, 255, 255)),
                             "decoded", object),
}

# Exceptions that name no file: none of them may escape.
_BARE = (UnicodeDecodeError, json.JSONDecodeError, gzip.BadGzipFile, EOFError, AssertionError, KeyError, TypeError)


def _alarm(_signum: int, _frame: Any) -> None:
    raise TimeoutError(f"the case blocked for more than {_TIMEOUT_S} s")


@pytest.mark.parametrize("name", [pytest.param(n, id=f"{c.outcome}-{n}") for n, c in CASES.items()])
def test_bad_input(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    action, must_name = case.make(tmp_path)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(_TIMEOUT_S)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if case.outcome == "error":
                with pytest.raises(Exception) as info:
                    action()
            else:
                action()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

    if case.outcome == "error":
        err = info.value
        assert isinstance(err, case.kind) and not isinstance(err, _BARE), f"{type(err).__name__}: {err}"
        for text in must_name:
            assert text in str(err), f"{text!r} not in: {err}"
    elif case.outcome == "warning":
        relevant = [w for w in caught if issubclass(w.category, case.kind)]
        assert len(relevant) == 1, [str(w.message) for w in caught]
        message = str(relevant[0].message)
        assert re.search(r"\d", message), f"not counted: {message}"
        for text in must_name:
            assert text in message, f"{text!r} not in: {message}"
    else:
        assert not [w for w in caught if "image" in str(w.message).lower()], [str(w.message) for w in caught]


def test_corpus_totals() -> None:
    outcomes = [c.outcome for c in CASES.values()]
    totals = {kind: outcomes.count(kind) for kind in ("error", "warning", "decoded")}
    assert sum(totals.values()) == len(CASES) >= 35
    assert totals["error"] >= 25 and totals["warning"] >= 7 and totals["decoded"] >= 3
