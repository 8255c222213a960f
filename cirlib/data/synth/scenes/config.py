"""Sizes and knobs of the generated ``scenes`` benchmark (part of its fingerprint)."""

from __future__ import annotations

from dataclasses import dataclass, field

CIRR_SPLITS: dict[str, str] = {"train": "train", "val": "dev", "test1": "test1"}  # split -> name prefix / folder
CIRCO_SPLITS: tuple[str, ...] = ("val", "test")


@dataclass(frozen=True)
class ScenesBenchConfig:
    """Sizes and knobs of the generated benchmark (the default is CIRR-lite, ~1 min on 2 cores)."""

    seed: int = 0
    long_side: int = 128
    min_objects: int = 1
    max_objects: int = 4
    # CIRR: image sets of 6 per split and queries spread over them; every ``cirr_family`` sets are
    # variations of one base scene (look-alikes of each reference elsewhere in the gallery)
    cirr_sets: dict[str, int] = field(default_factory=lambda: {"train": 1100, "val": 420, "test1": 250})
    cirr_family: int = 5
    # incidental changes of each shown set member (inclusive range): with two to four, the target looks
    # less like its reference than the reference's other look-alikes do, so the reference image misleads
    cirr_shown_changes: tuple[int, int] = (2, 4)
    cirr_queries: dict[str, int] = field(default_factory=lambda: {"train": 4400, "val": 1000, "test1": 300})
    # CIRCO: queries per split; the shared gallery is filled with distractor scenes up to this size (when the
    # queries' targets, positives and look-alikes leave room: at the default sizes they alone fill ~8,600)
    circo_queries: dict[str, int] = field(default_factory=lambda: {"val": 200, "test": 100})
    circo_gallery: int = 6500
    circo_extra_positives: tuple[int, int] = (0, 6)  # nuisance variants of the target, inclusive range
    circo_near_misses: tuple[int, int] = (24, 32)  # the reference's look-alikes: other edits, incidental changes
    p_conjunction_cirr: float = 0.4  # CIRR: 43.7% of captions are conjunctions, CIRCO: 76.2%
    p_conjunction_circo: float = 0.7
    p_absolute_cirr: float = 0.7  # CIRR captions that name the target's content rather than the change
    p_context_cirr: float = 0.5  # CIRR captions of a change that also name what it leaves alone

    @classmethod
    def quick(cls, seed: int = 0) -> ScenesBenchConfig:
        """A tiny benchmark for tests and smoke runs (a few seconds)."""
        return cls(
            seed=seed,
            long_side=64,
            # 40 validation queries each: a quick run's CIRR and CIRCO numbers move in steps of 2.5
            # points, not 8-10, and a broken protocol shows (tests/test_notebook_results.py)
            cirr_sets={"train": 12, "val": 20, "test1": 6},
            cirr_queries={"train": 36, "val": 40, "test1": 8},
            circo_queries={"val": 40, "test": 6},
            circo_gallery=700,
        )

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 4, got {self.min_objects}, {self.max_objects}")
        if self.long_side < 32:
            raise ValueError(f"long_side must be at least 32 px, got {self.long_side}")
        if set(self.cirr_sets) != set(CIRR_SPLITS) or set(self.cirr_queries) != set(CIRR_SPLITS):
            raise ValueError(f"cirr_sets and cirr_queries need exactly the splits {list(CIRR_SPLITS)}")
        for name in ("cirr_shown_changes", "circo_extra_positives", "circo_near_misses"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi or (name == "cirr_shown_changes" and lo < 1):
                raise ValueError(f"{name} must be an inclusive range lo <= hi (lo >= 1 for shown changes), "
                                 f"got {(lo, hi)}")
        if set(self.circo_queries) != set(CIRCO_SPLITS):
            raise ValueError(f"circo_queries needs exactly the splits {list(CIRCO_SPLITS)}")

