"""Published numbers the course sets its own results beside, for orientation only.

They come from CLIP4Cir (Baldrati et al., ACM TOMM 2023), Tables 1 and 2: CLIP RN50 on the real
FashionIQ and CIRR validation sets; and from iSEARLE (Agnolucci et al., 2024), Tables II-IV: the
zero-shot baselines of CLIP ViT-B/32 on FashionIQ val, CIRR test and CIRCO test. The course's
numbers come from a tiny CLIP on the embedded
benchmarks, so only the *orderings* are comparable, never the values; every table that shows
both says so in its column labels.
"""

from __future__ import annotations

import pandas as pd

SOURCE = "CLIP4Cir (TOMM 2023) Tables 1-2, CLIP RN50, real FashionIQ / CIRR val"
ISEARLE_SOURCE = "iSEARLE (2024) Tables II-IV, CLIP ViT-B/32, FashionIQ val / CIRR test / CIRCO test"
# Zero-shot baselines: FashionIQ R@10 averaged over the categories, CIRR R@1, CIRCO mAP@10.
_ISEARLE_BASELINES = {
    "image": {"fashioniq R@10": 5.90, "cirr R@1": 6.89, "circo mAP@10": 1.60},
    "text": {"fashioniq R@10": 18.70, "cirr R@1": 21.81, "circo mAP@10": 2.67},
    "sum": {"fashioniq R@10": 14.78, "cirr R@1": 11.71, "circo mAP@10": 3.25},
}

_STAGE1 = ("zero-shot", "image", "text", "both")  # nothing, IFT, TFT, IFT + TFT
# FashionIQ: average over the three categories of R@10 and R@50 (Table 1, "Average" columns).
_FASHIONIQ = {
    "Sum": [(19.70, 38.26), (31.20, 54.19), (31.73, 55.39), (39.34, 63.05)],
    "Combiner": [(30.96, 53.56), (35.07, 57.78), (35.16, 58.47), (40.80, 64.20)],
}
# CIRR: R@1, R@5, R@10, R@50, Rsubset@1, Rsubset@2, Rsubset@3 (Table 2).
_CIRR_COLUMNS = ("R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2", "Rsubset@3")
_CIRR = {
    "Sum": [
        (21.38, 50.85, 64.00, 87.23, 54.48, 76.01, 87.16),
        (31.67, 66.08, 79.36, 95.38, 58.12, 78.42, 89.78),
        (32.72, 66.63, 79.22, 94.86, 67.21, 86.00, 93.81),
        (40.97, 74.70, 85.51, 96.94, 68.81, 86.96, 93.90),
    ],
    "Combiner": [
        (31.26, 64.79, 77.71, 95.31, 61.56, 81.08, 91.12),
        (34.01, 69.07, 81.77, 95.72, 62.78, 81.80, 91.41),
        (36.86, 71.32, 82.32, 96.24, 68.28, 86.51, 94.14),
        (42.05, 76.13, 86.51, 97.49, 70.15, 87.18, 94.40),
    ],
}


def clip4cir_main_table() -> pd.DataFrame:
    """Tables 1-2 in the layout of notebook 05's main table.

    Rows ``(stage-1, combining function)`` with stage-1 in ``zero-shot / image / text / both``;
    columns ``"fashioniq R@10"``, ``"fashioniq R@50"`` and ``"cirr <metric>"``, in percent.
    """
    rows = {}
    for cf in ("Sum", "Combiner"):
        for stage1, fiq, cirr in zip(_STAGE1, _FASHIONIQ[cf], _CIRR[cf]):
            row = {"fashioniq R@10": fiq[0], "fashioniq R@50": fiq[1]}
            row.update({f"cirr {m}": v for m, v in zip(_CIRR_COLUMNS, cirr)})
            rows[stage1, cf] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(["stage-1", "combining function"])


def side_by_side(
    ours: pd.DataFrame, columns: list[str], ours_label: str = "ours", paper_label: str = "paper"
) -> pd.DataFrame:
    """Our table and the paper's (:data:`SOURCE`) on the same rows and ``columns``, as two column groups.

    The labels are short because flattened markdown headers repeat them; say what each side is
    (data, backbone) next to the table.
    """
    paper = clip4cir_main_table()
    missing = [c for c in columns if c not in ours.columns or c not in paper.columns]
    if missing:
        raise KeyError(f"columns {missing} are not in both tables; ours has {list(ours.columns)}")
    return pd.concat({ours_label: ours[columns], paper_label: paper.loc[ours.index, columns]}, axis=1)


def isearle_baselines() -> pd.DataFrame:
    """iSEARLE's zero-shot baseline rows (image-only, text-only, image + text sum) in the layout of
    notebook 02's baseline table: rows ``image`` / ``text`` / ``sum``, columns
    ``"fashioniq R@10"``, ``"cirr R@1"``, ``"circo mAP@10"``, in percent (:data:`ISEARLE_SOURCE`)."""
    return pd.DataFrame.from_dict(_ISEARLE_BASELINES, orient="index").rename_axis("method")


__all__ = ["ISEARLE_SOURCE", "SOURCE", "clip4cir_main_table", "isearle_baselines", "side_by_side"]
