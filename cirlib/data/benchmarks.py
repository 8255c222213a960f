"""One entry point to the three benchmark roots the notebooks use.

By default the embedded benchmarks are generated (deterministically, idempotently) under
``data/`` (or ``data/quick`` for quick runs); a user with the real datasets passes their roots
instead and nothing else in the notebooks changes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

from cirlib.core import paths
from cirlib.data import datasets
from cirlib.data.fashion_mnist import ensure_fashion_mnist
from cirlib.data.synth.fashion import FashionBenchConfig, generate_fashion
from cirlib.data.synth.scenes import ScenesBenchConfig, generate_scenes


@dataclass(frozen=True)
class BenchmarkRoots:
    """Dataset roots in their public layouts: FashionIQ, CIRR and CIRCO."""

    fashioniq: Path
    cirr: Path
    circo: Path


def prepare_benchmarks(
    quick: bool = False,
    seed: int = 0,
    fashioniq_root: str | Path | None = None,
    cirr_root: str | Path | None = None,
    circo_root: str | Path | None = None,
) -> BenchmarkRoots:
    """Return the roots to use, generating the embedded benchmark for every root not given."""
    data = paths.data_dir(quick)
    needs_embedded = fashioniq_root is None or cirr_root is None or circo_root is None
    if needs_embedded:
        ensure_fashion_mnist()
    if fashioniq_root is None:
        cfg = FashionBenchConfig.quick() if quick else FashionBenchConfig()
        fashioniq_root = generate_fashion(data / "fashion", replace(cfg, seed=seed))
    if cirr_root is None or circo_root is None:
        cfg = ScenesBenchConfig.quick() if quick else ScenesBenchConfig()
        scenes = generate_scenes(data / "scenes", replace(cfg, seed=seed))
        cirr_root = cirr_root if cirr_root is not None else scenes / "CIRR"
        circo_root = circo_root if circo_root is not None else scenes / "CIRCO"
    return BenchmarkRoots(Path(fashioniq_root), Path(cirr_root), Path(circo_root))



def load_splits(roots: BenchmarkRoots, split: str = "val") -> dict[str, datasets.CIRSplit]:
    """All evaluation splits of one kind, keyed ``fashioniq/<category>``, ``cirr``, ``circo``.

    CIRR calls its test split ``test1``; CIRCO has no train split (it is a zero-shot benchmark),
    so ``split="train"`` returns FashionIQ and CIRR only.
    """
    out = {
        f"fashioniq/{cat}": datasets.load_fashioniq(roots.fashioniq, cat, split)
        for cat in datasets.FASHIONIQ_CATEGORIES
    }
    out["cirr"] = datasets.load_cirr(roots.cirr, "test1" if split == "test" else split)
    if split != "train":
        out["circo"] = datasets.load_circo(roots.circo, split)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the embedded benchmarks (idempotent).")
    parser.add_argument("--quick", action="store_true", help="tiny sizes used by the test suite")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    roots = prepare_benchmarks(quick=args.quick, seed=args.seed)
    for name, root in vars(roots).items():
        print(f"{name:9s} {root}")


if __name__ == "__main__":
    main()
