"""Obtain and read Fashion-MNIST, the real product photos behind the embedded benchmarks.

The course never downloads anything by default: the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``) or a copy under ``data/fashion-mnist/`` is used. Only an
explicit ``download=True`` (CLI: ``python -m cirlib.data.fashion_mnist --download``) fetches Zalando's
official files, each checked against its SHA256 before it is kept.

The idx files are read with numpy alone (no torchvision datasets), so a malformed file gives an
error naming the file and what is wrong with it.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import os
import urllib.request
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from cirlib.core import paths
from cirlib.core.io import atomic_path, file_sha256

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHIONIQ_CATEGORIES: dict[int, str] = {0: "toptee", 3: "dress", 6: "shirt"}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

Split = Literal["train", "test"]
SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FILES: tuple[str, ...] = tuple(name for pair in SPLIT_FILES.values() for name in pair)

# Official download locations (Zalando's GitHub repository, then their S3 mirror).
MIRRORS: tuple[str, ...] = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)
# SHA256 of the official .gz files. The Debian package recompresses them without the gzip name
# field, so its .gz bytes differ; its deflate streams are identical, and restoring the official
# header reproduces Zalando's published MD5s exactly -- that is how these values were verified.
SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}

_IDX_DTYPES = {0x08: np.uint8}


def local_dir() -> Path:
    """The project-local copy, ``data/fashion-mnist/`` (also where ``--download`` writes)."""
    return paths.data_dir() / "fashion-mnist"


def _complete(d: Path) -> bool:
    return all((d / name).is_file() for name in FILES)


def ensure_fashion_mnist(root: str | os.PathLike | None = None, download: bool = False) -> Path:
    """Return a folder holding the four idx ``.gz`` files.

    With ``root`` only that folder is used (and downloaded into). Otherwise the Debian folder is
    preferred, then ``data/fashion-mnist/``. Nothing is fetched unless ``download`` is true.
    """
    candidates = [Path(root)] if root is not None else [DEBIAN_DIR, local_dir()]
    for d in candidates:
        if _complete(d):
            return d
    if not download:
        raise RuntimeError(
            "Fashion-MNIST not found in "
            + " or ".join(str(d) for d in candidates)
            + ". Either install the Debian package (`sudo apt-get install dataset-fashion-mnist`) "
            "or download the official files once with `python -m cirlib.data.fashion_mnist --download`."
        )
    dest = candidates[-1]
    for name in FILES:
        if not (dest / name).is_file():
            _download(name, dest / name)
    return dest


def _download(name: str, dest: Path) -> None:
    """Fetch one official file from the first mirror that answers; keep it only if its SHA256 matches."""
    errors = []
    for base in MIRRORS:
        url = base + name
        try:
            with atomic_path(dest) as tmp:
                with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
                    while block := resp.read(1 << 20):
                        out.write(block)
                got = file_sha256(tmp)
                if got != SHA256[name]:
                    raise ValueError(f"{url}: SHA256 {got} does not match the official {SHA256[name]}")
            return
        except (OSError, ValueError) as exc:
            errors.append(f"{url}: {exc}")
    raise RuntimeError(f"could not download {name}:\n  " + "\n  ".join(errors))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (gzip-compressed or raw) into a numpy array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:  # gzip's own errors name no file
        raise ValueError(
            f"{path}: not a valid gzip file ({type(err).__name__}: {err}); it is truncated or damaged "
            "(a downloaded copy can be deleted and fetched again)"
        ) from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: bad idx magic number {raw[:4].hex()!r} (expected 0x0000TTNN)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unsupported idx element type 0x{code:02x} (only unsigned byte 0x08)")
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: idx header truncated or without dimensions (ndim={ndim})")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: idx body has {len(raw) - header} bytes but the header shape {shape} needs {expected}"
        )
    return np.frombuffer(raw, dtype=_IDX_DTYPES[code], offset=header).reshape(shape)


@functools.lru_cache(maxsize=4)
def _load(split: str, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    image_file, label_file = (folder / name for name in SPLIT_FILES[split])
    images = read_idx(image_file)
    labels = read_idx(label_file).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{image_file}: expected images of shape [N, 28, 28], got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{label_file}: {labels.shape[0]} labels for {images.shape[0]} images")
    labels.setflags(write=False)
    return images, labels


def load_split(split: Split, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 [N, 28, 28]`` and labels ``int64 [N]`` of the official train or test split.

    Arrays are cached and read-only: several generators read the same split in one process.
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return _load(split, ensure_fashion_mnist(root).resolve())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Locate (or download) Fashion-MNIST.")
    parser.add_argument("--download", action="store_true", help="fetch the official files if absent")
    parser.add_argument("--root", type=Path, default=None, help="use (and download into) this folder")
    args = parser.parse_args(argv)
    print(ensure_fashion_mnist(args.root, download=args.download))


if __name__ == "__main__":
    main()
