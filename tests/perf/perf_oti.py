"""Per-image cost of OTI batched over images against one image at a time.

The frozen text encoder runs once per step for a whole batch, so a batch of images costs little more
than one image. Goal: batched per-image time at most 1/10 of one-at-a-time (the method reports 35 s
vs 1.1 s per image on a GPU). Both runs use the same steps, templates, noise and L_gpt phrases;
one-at-a-time is timed on ``--single`` images and scaled per image. Weights and features are
random (speed does not depend on them).

    .venv/bin/python tests/perf/perf_oti.py [--images 64] [--single 4] [--steps 20] [--model NAME]
"""

from __future__ import annotations

import argparse

import torch

from cirlib.methods.oti import OTIConfig, oti
from cirlib.models.backbone import TINY_MODEL, load_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images in the batched run (one batch)")
    parser.add_argument("--single", type=int, default=4, help="images run one at a time")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default=TINY_MODEL)
    args = parser.parse_args()

    backbone = load_backbone(args.model, None, device="auto")
    features = torch.randn(args.images, backbone.embed_dim, generator=torch.Generator().manual_seed(0))
    words = ["dress", "shirt", "bag", "shoe"]
    concepts = [words[i % len(words)] for i in range(args.images)]
    phrases = {w: [f"a photo of {w} that is red", f"a photo of {w} that has dots"] for w in words}
    config = OTIConfig.for_tiny(steps=args.steps, progress=False)
    oti(backbone, features[:2], concepts[:2], phrases, config)  # warm-up (allocator, phrase features)

    batched = oti(backbone, features, concepts, phrases, OTIConfig.for_tiny(
        steps=args.steps, batch_size=args.images, progress=False)).seconds / args.images
    single = oti(backbone, features[: args.single], concepts[: args.single], phrases, OTIConfig.for_tiny(
        steps=args.steps, batch_size=1, progress=False)).seconds / args.single

    print(f"\n{args.model} on {backbone.device}, {torch.get_num_threads()} threads; {args.steps} steps, L_gpt on")
    print(f"{'mode':<28}{'s/image':>10}{'ratio':>8}")
    print(f"{'one image at a time':<28}{single:>10.3f}{1:>8.2f}")
    print(f"{f'batched ({args.images} per batch)':<28}{batched:>10.3f}{batched / single:>8.3f}")
    print(f"goal batched <= 1/10 of single: {'met' if batched <= single / 10 else 'NOT met'} "
          f"(x{single / batched:.1f} faster per image)")


if __name__ == "__main__":
    main()
