"""Why the Combiner trains on cached features: one epoch three ways, same triplets, same Combiner.

1. ``re-encode (files)``: what CLIP4Cir's ``combiner_train.py`` does, every batch decodes and
   preprocesses the reference and target images and runs the frozen encoders on them and on the
   captions, then takes one Combiner step;
2. ``re-encode (pixels)``: the same with images pre-decoded (:class:`cirlib.data.pixels.PixelCache`),
   i.e. the encoders' share of the cost alone;
3. ``cached features``: :func:`cirlib.methods.combiner_training.train_combiner` on features extracted once
   (:func:`cirlib.methods.combiner_training.build_combiner_data`; its one-off cost is printed separately).

The Combiner is ``CombinerConfig.for_tiny()``'s (widths 2d / 4d) or, with ``--paper-widths``,
CLIP4Cir's 4d / 8d. Goal: a cached epoch at least 50x cheaper than a re-encoding one. Times are the
best of ``--repeats`` rounds with the methods interleaved, which spreads the noise of a shared
machine evenly. Weights are random (speed does not depend on them).

    /tmp/v1/bin/python tests/perf/perf_combiner.py [--triplets 512] [--batch-size 256] [--model NAME]
        [--paper-widths]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from cirlib.core.device import autocast
from cirlib.core.training import batch_slices
from cirlib.data.datasets import CIRSplit, Query, query_text
from cirlib.data.pixels import PixelCache
from cirlib.data.preprocess import transform_for
from cirlib.methods.combiner_training import CombinerConfig, CombinerData, build_combiner_data, train_combiner
from cirlib.methods.losses import batch_contrastive_loss
from cirlib.models.backbone import TINY_MODEL, Backbone, load_backbone


def toy_split(folder: Path, n_triplets: int, seed: int = 0) -> CIRSplit:
    """FashionIQ-style triplets over ``n_triplets`` PNGs of 80-320 px sides (aspect ratios up to 4)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i in range(n_triplets):
        w, h = (int(v) for v in rng.integers(80, 321, 2))
        yy, xx = np.mgrid[0:h, 0:w]
        pixels = (rng.integers(0, 256, 3) + 60 * np.sin(xx[..., None] / rng.uniform(5, 30) + yy[..., None] / 9)) % 256
        paths[f"img{i:05d}"] = folder / f"img{i:05d}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(paths[f"img{i:05d}"])
    names = list(paths)
    words = ["red", "striped", "longer", "with a star", "dotted", "darker", "sleeveless", "checked"]
    queries = [
        Query(
            reference=names[i],
            captions=(f"is {rng.choice(words)}", f"make it {rng.choice(words)}"),
            target=names[int(rng.integers(n_triplets))],
            category="dress",
        )
        for i in range(n_triplets)
    ]
    return CIRSplit("fashioniq", "train", folder, queries, names, paths, 0)


def reencode_epoch(
    backbone: Backbone, split: CIRSplit, config: CombinerConfig, images: Callable[[list[str]], torch.Tensor]
) -> None:
    """One Combiner epoch that encodes every batch's images and captions with the frozen backbone."""
    combiner = config.build(backbone.embed_dim).to(backbone.device)
    optimizer = torch.optim.AdamW(combiner.parameters(), lr=config.lr)
    rng = np.random.default_rng(0)
    order = torch.randperm(len(split.queries), generator=torch.Generator().manual_seed(0))
    for rows in batch_slices(order, config.batch_size):
        queries = [split.queries[i] for i in rows.tolist()]
        with torch.no_grad(), autocast(backbone.device, config.amp):
            ref = backbone.encode_image(images([q.reference for q in queries]))
            tgt = backbone.encode_image(images([q.target for q in queries]))
            txt = backbone.encode_text([query_text(q, rng) for q in queries])
        with autocast(backbone.device, config.amp):  # the arithmetic train_combiner uses
            query = combiner(ref, txt)
        loss = batch_contrastive_loss(query, tgt, config.scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triplets", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=CombinerConfig.for_tiny().batch_size)
    parser.add_argument("--model", default=TINY_MODEL)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paper-widths", action="store_true", help="CLIP4Cir's 4d/8d, not for_tiny()'s 2d/4d")
    args = parser.parse_args()

    backbone = load_backbone(args.model, None, device="auto")
    widths = {"projection_factor": 4.0, "hidden_factor": 8.0} if args.paper_widths else {}
    config = CombinerConfig.for_tiny(epochs=1, batch_size=args.batch_size, **widths)
    with tempfile.TemporaryDirectory() as tmp:
        split = toy_split(Path(tmp) / "images", args.triplets)
        transform = transform_for(backbone, "targetpad")
        row = {name: i for i, name in enumerate(split.gallery)}
        pixels = PixelCache([split.image_paths[n] for n in split.gallery], backbone.image_size, "targetpad")

        def from_files(names: list[str]) -> torch.Tensor:
            return torch.stack([transform(Image.open(split.image_paths[n])) for n in names])

        def from_pixels(names: list[str]) -> torch.Tensor:
            return pixels.batch([row[n] for n in names], backbone.mean, backbone.std, backbone.device)

        start = time.perf_counter()
        data: CombinerData = build_combiner_data(split, backbone)
        extraction = time.perf_counter() - start

        def no_validation(combine) -> dict[str, float]:
            return {"average": 0.0}

        methods: dict[str, Callable[[], object]] = {
            "re-encode (files)": lambda: reencode_epoch(backbone, split, config, from_files),
            "re-encode (pixels)": lambda: reencode_epoch(backbone, split, config, from_pixels),
            "cached features": lambda: train_combiner(data, no_validation, config),
        }
        best = {name: float("inf") for name in methods}
        for _ in range(args.repeats):
            for name, fn in methods.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)

    n = len(split.queries)
    n_params = sum(p.numel() for p in config.build(data.feature_dim).parameters())
    print(
        f"\n{args.model} (d={backbone.embed_dim}) on {backbone.device}, {torch.get_num_threads()} threads; "
        f"{n} triplets, batch {args.batch_size}, Combiner {config.variant} ({n_params / 1e6:.1f} M params)"
    )
    print(f"{'method':<22}{'s/epoch':>10}{'triplets/s':>12}{'speed-up':>10}")
    slowest = best["re-encode (files)"]
    for name, seconds in best.items():
        print(f"{name:<22}{seconds:>10.3f}{n / seconds:>12.0f}{slowest / seconds:>9.0f}x")
    print(f"one-off feature extraction for the cache: {extraction:.2f} s "
          f"(= {extraction / best['cached features']:.0f} cached epochs)")


if __name__ == "__main__":
    main()
