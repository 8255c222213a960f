"""Throughput of ``cirlib.models.features.image_features`` against a plain open_clip loop.

The baseline is what one writes first: open each image with PIL, apply open_clip's own eval
preprocessing, stack a batch and call ``model.encode_image`` under ``torch.no_grad``, in the same
arithmetic as ours (``cirlib.core.device.autocast``: bf16 on a CPU with native bf16), so the ratio
measures the pipeline rather than the precision. Ours uses the
same batch size on the same generated images, with 0 and 1 DataLoader workers, for the ``clip``
pipeline (same pixels as the baseline) and ``targetpad``; then a second call served from the cache.

    /tmp/v1/bin/python tests/perf/perf_features.py [--n 500] [--batch-size 64] [--model NAME]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch
from PIL import Image

from cirlib.core.device import autocast
from cirlib.models.backbone import TINY_MODEL, Backbone, load_backbone
from cirlib.models.features import image_features

Key = tuple[str, str]  # (method, DataLoader workers)


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` PNGs of 80-320 px sides (aspect ratios up to 4), smooth enough to compress like photos."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(80, 321, 2))
        yy, xx = np.mgrid[0:h, 0:w]
        base = rng.integers(0, 256, 3)
        pixels = (base + 60 * np.sin(xx[..., None] / rng.uniform(5, 30) + yy[..., None] / rng.uniform(5, 30))) % 256
        path = folder / f"{i:05d}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def baseline(backbone: Backbone, paths: list[Path], batch_size: int) -> torch.Tensor:
    """The naive loop: per-image PIL open + open_clip preprocess, batched encode_image."""
    preprocess = open_clip.image_transform(backbone.image_size, is_train=False, mean=backbone.mean, std=backbone.std)
    model = backbone.model.eval()
    outputs = []
    with torch.no_grad(), autocast(backbone.device):
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([preprocess(Image.open(p)) for p in paths[start : start + batch_size]])
            outputs.append(model.encode_image(batch.to(backbone.device)).float().cpu())
    return torch.cat(outputs)


def cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (DataLoader workers exit after each call)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def interleaved_best(methods: dict[Key, Callable[[], torch.Tensor]], repeats: int) -> dict[Key, tuple[float, float]]:
    """Best (wall, CPU) seconds per method over ``repeats`` rounds, methods alternating within a round.

    On a shared machine wall time is noisy; alternating spreads the noise over the methods, and CPU
    time (which other processes do not inflate) is reported beside it.
    """
    best = {name: (float("inf"), float("inf")) for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            wall, cpu = time.perf_counter(), cpu_seconds()
            fn()
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default=TINY_MODEL)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    backbone = load_backbone(args.model, pretrained=None)
    threads = torch.get_num_threads()
    print(f"model {args.model} ({backbone.image_size} px) on {backbone.device}, torch threads {threads}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp) / "images", args.n)
        cache = Path(tmp) / "cache"

        def ours(kind: str, workers: int = 0, cache_dir: Path | None = None) -> Callable[[], torch.Tensor]:
            return lambda: image_features(
                backbone, paths, kind, batch_size=args.batch_size, num_workers=workers, cache_dir=cache_dir,
                progress=False,
            )

        # same pixels and model, so the same features: the comparison is about speed only
        torch.testing.assert_close(ours("clip")(), baseline(backbone, paths, args.batch_size), atol=1e-4, rtol=1e-4)
        ours("targetpad", cache_dir=cache)()  # fill the cache
        methods = {
            ("open_clip loop", "-"): lambda: baseline(backbone, paths, args.batch_size),
            ("image_features clip", "0"): ours("clip", 0),
            ("image_features clip", "1"): ours("clip", 1),
            ("image_features targetpad", "0"): ours("targetpad", 0),
            ("image_features targetpad", "1"): ours("targetpad", 1),
            ("image_features targetpad, cached", "-"): ours("targetpad", 0, cache),
        }
        seconds = interleaved_best(methods, args.repeats)

    base_wall, base_cpu = seconds[("open_clip loop", "-")]
    print(f"\n{args.n} images, batch {args.batch_size}, best of {args.repeats}; load average {os.getloadavg()[0]:.1f}")
    header = ("method", "workers", "wall s", "images/s", "speed-up", "CPU s", "CPU ratio")
    print("{:36s} {:>7s} {:>8s} {:>9s} {:>8s} {:>8s} {:>9s}".format(*header))
    for (name, workers), (wall, cpu) in seconds.items():
        print(
            f"{name:36s} {workers:>7s} {wall:8.2f} {args.n / wall:9.0f} {base_wall / wall:7.2f}x "
            f"{cpu:8.2f} {base_cpu / max(cpu, 1e-3):8.2f}x"
        )


if __name__ == "__main__":
    main()
