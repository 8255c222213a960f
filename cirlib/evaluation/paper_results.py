"""Published numbers the course sets its own results beside, for orientation only.

They come from CLIP4Cir (Baldrati et al., ACM TOMM 2023), Tables 1 and 2: CLIP RN50 on the real
FashionIQ and CIRR validation sets; and from iSEARLE (Agnolucci et al., 2024), Tables II-V: the
zero-shot baselines, iSEARLE-OTI and iSEARLE of CLIP ViT-B/32 on FashionIQ val, CIRR test and CIRCO
test (Table V: CIRCO per semantic aspect); and from the candidate re-ranking paper (Liu et al., TMLR
2024), Tables 1-7: BLIP ViT-B filter and re-ranker on FashionIQ val and CIRR test / val. The course's
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


# iSEARLE Tables II-IV, B/32 rows: FashionIQ val average R@10 / R@50 (Table II), CIRR test R@1/5/10/50
# (Table III), CIRCO test mAP@5/10/25/50 (Table IV); Captioning used a CoCa captioner.
_ISEARLE_COLUMNS = ("fashioniq R@10", "fashioniq R@50", "cirr R@1", "cirr R@5", "cirr R@10", "cirr R@50",
                    "circo mAP@5", "circo mAP@10", "circo mAP@25", "circo mAP@50")
_ISEARLE_TABLE = {
    "image": (5.90, 13.37, 6.89, 22.99, 33.68, 59.23, 1.34, 1.60, 2.12, 2.41),
    "text": (18.70, 36.84, 21.81, 45.22, 57.42, 81.01, 2.56, 2.67, 2.98, 3.18),
    "sum": (14.78, 29.60, 11.71, 35.06, 48.94, 77.49, 2.65, 3.25, 4.14, 4.54),
    "captioning": (13.98, 28.62, 12.46, 35.04, 47.71, 77.35, 5.48, 5.77, 6.44, 6.85),
    "isearle-oti": (25.06, 44.79, 26.19, 55.18, 68.55, 90.65, 10.31, 10.94, 12.27, 13.01),
    "isearle": (24.40, 44.80, 25.23, 55.69, 68.05, 90.82, 10.58, 11.24, 12.51, 13.26),
}


# iSEARLE Table V, B/32: CIRCO test mAP@10 per semantic aspect (rows in CIRCO's aspect order).
_ISEARLE_ASPECTS = {
    "cardinality": (8.29, 9.50),
    "addition": (11.95, 11.64),
    "negation": (8.51, 7.48),
    "direct_addressing": (12.41, 12.94),
    "compare_change": (8.02, 8.08),
    "comparative_statement": (10.16, 9.81),
    "statement_with_conjunction": (10.46, 10.54),
    "spatial_relations_background": (11.74, 12.48),
    "viewpoint": (7.98, 7.45),
}


def isearle_baselines() -> pd.DataFrame:
    """iSEARLE's zero-shot baseline rows (image-only, text-only, image + text sum) in the layout of
    notebook 02's baseline table: rows ``image`` / ``text`` / ``sum``, columns
    ``"fashioniq R@10"``, ``"cirr R@1"``, ``"circo mAP@10"``, in percent (:data:`ISEARLE_SOURCE`)."""
    return pd.DataFrame.from_dict(_ISEARLE_BASELINES, orient="index").rename_axis("method")


def isearle_results() -> pd.DataFrame:
    """iSEARLE's B/32 rows of Tables II-IV in the layout of notebook 07's results table: rows
    ``image`` / ``text`` / ``sum`` / ``captioning`` / ``isearle-oti`` / ``isearle`` (the order of
    :data:`cirlib.methods.isearle.METHODS`), columns ``"fashioniq R@10"``, ``"fashioniq R@50"``,
    ``"cirr R@1"`` ... ``"cirr R@50"``, ``"circo mAP@5"`` ... ``"circo mAP@50"``, in percent
    (:data:`ISEARLE_SOURCE`). The paper's Captioning row used a real captioner (CoCa)."""
    return pd.DataFrame.from_dict(_ISEARLE_TABLE, orient="index", columns=list(_ISEARLE_COLUMNS)).rename_axis("method")


def isearle_aspects() -> pd.DataFrame:
    """iSEARLE Table V, B/32 columns: CIRCO test mAP@10 per semantic aspect, rows named as
    :data:`cirlib.data.datasets.CIRCO_ASPECTS`, columns ``isearle-oti`` and ``isearle`` (percent)."""
    frame = pd.DataFrame.from_dict(_ISEARLE_ASPECTS, orient="index", columns=["isearle-oti", "isearle"])
    return frame.rename_axis("aspect")


ISEARLE_SUPERVISED_SOURCE = ("iSEARLE (2024) Table XI, CLIP ViT-B/32: Combiner trained on FashionIQ (FIQ) or "
                             "CIRR, tested on both validation sets; FashionIQ averages over categories")
# Table XI: fashioniq R@10, R@50, cirr R@1, R@5, R@10.
_ISEARLE_SUPERVISED = {
    "Combiner-FIQ": (32.96, 54.55, 19.88, 48.05, 61.11),
    "Combiner-CIRR": (20.91, 40.40, 32.24, 65.46, 78.21),
    "iSEARLE-OTI": (25.06, 44.79, 25.57, 57.11, 70.46),
    "iSEARLE": (24.40, 44.80, 25.74, 57.35, 70.32),
}


def isearle_supervised() -> pd.DataFrame:
    """iSEARLE Table XI (:data:`ISEARLE_SUPERVISED_SOURCE`): rows ``Combiner-FIQ``, ``Combiner-CIRR``,
    ``iSEARLE-OTI``, ``iSEARLE``; columns ``"fashioniq R@10"``, ``"fashioniq R@50"``, ``"cirr R@1"``,
    ``"cirr R@5"``, ``"cirr R@10"`` (percent)."""
    columns = ["fashioniq R@10", "fashioniq R@50", "cirr R@1", "cirr R@5", "cirr R@10"]
    return pd.DataFrame.from_dict(_ISEARLE_SUPERVISED, orient="index", columns=columns).rename_axis("method")


RERANKING_SOURCE = ("Candidate re-ranking (TMLR 2024), BLIP ViT-B: Tables 1 (FashionIQ val), 2 (CIRR test), "
                    "3 (ablations, FashionIQ val), 5-6 (K, FashionIQ / CIRR val), 7 (target positions, val)")
# Tables 1-2: the filter F and the re-ranked R_K (K = 100 FashionIQ, 50 CIRR); FashionIQ averages over categories.
_RERANKING_MAIN = {
    "filter": {"fashioniq R@10": 46.15, "fashioniq R@50": 69.15, **dict(zip(
        (f"cirr {m}" for m in _CIRR_COLUMNS), (44.70, 76.59, 86.43, 97.18, 75.02, 89.92, 95.64)))},
    "re-ranked": {"fashioniq R@10": 51.17, "fashioniq R@50": 73.13, **dict(zip(
        (f"cirr {m}" for m in _CIRR_COLUMNS), (50.55, 81.75, 89.78, 97.18, 80.04, 91.90, 96.58)))},
}
# Table 3 (FashionIQ val, average R@10 / R@50), in the course's variant names.
_RERANKING_ABLATIONS = {
    "full": (51.17, 73.13),
    "w/o Encoder-t": (44.07, 70.21),
    "w/o Encoder-z_t": (40.96, 68.40),
    "w. Ref_CLS": (49.59, 72.38),
    "full-MLP merge": (49.80, 72.32),
    "dual feed-forward": (46.96, 72.02),
}
# Table 5 (FashionIQ val, average R@10 / R@50) and Table 6 (CIRR val, R@1) by K; K = 0 is the filter alone.
_RERANKING_K = {
    "fashioniq": {0: (46.15, 69.15), 50: (50.98, 69.15), 70: (51.20, 71.52), 90: (51.12, 72.60),
                  100: (51.17, 73.13), 150: (51.19, 73.46), 200: (51.14, 73.28)},
    "cirr": {0: (46.83,), 30: (53.03,), 40: (52.98,), 50: (53.24,), 100: (52.88,)},
}
# Table 7: mean target position (top 200) after the filter and after re-ranking.
_RERANKING_POSITIONS = {"fashioniq/dress": (28.74, 22.25), "fashioniq/shirt": (26.96, 20.42),
                        "fashioniq/toptee": (25.81, 18.74), "cirr": (5.32, 4.09)}


def reranking_results() -> pd.DataFrame:
    """Tables 1-2 of the re-ranking paper: rows ``filter`` and ``re-ranked``, columns as notebook 08's
    results (``"fashioniq R@10"``, ``"fashioniq R@50"``, ``"cirr R@1"`` ... ``"cirr Rsubset@3"``), percent."""
    return pd.DataFrame.from_dict(_RERANKING_MAIN, orient="index").rename_axis("stage")


def reranking_ablations() -> pd.DataFrame:
    """Table 3: the re-ranker's architecture ablations on FashionIQ val (average R@10 and R@50)."""
    frame = pd.DataFrame.from_dict(_RERANKING_ABLATIONS, orient="index", columns=["fashioniq R@10", "fashioniq R@50"])
    return frame.rename_axis("variant")


def reranking_k(benchmark: str) -> pd.DataFrame:
    """Tables 5-6: results by K (``0`` = the filter alone); FashionIQ average R@10 / R@50, CIRR val R@1."""
    columns = {"fashioniq": ["R@10", "R@50"], "cirr": ["R@1"]}[benchmark]
    frame = pd.DataFrame.from_dict(_RERANKING_K[benchmark], orient="index", columns=columns)
    return frame.rename_axis("K")


def reranking_positions() -> pd.DataFrame:
    """Table 7: mean initial and re-ranked target positions per validation split, with the difference."""
    frame = pd.DataFrame.from_dict(_RERANKING_POSITIONS, orient="index", columns=["initial", "re-ranked"])
    frame["difference"] = frame["initial"] - frame["re-ranked"]
    return frame.rename_axis("split")

__all__ = ["ISEARLE_SOURCE", "ISEARLE_SUPERVISED_SOURCE", "RERANKING_SOURCE", "SOURCE", "clip4cir_main_table",
           "isearle_aspects", "isearle_supervised",
           "isearle_baselines", "isearle_results", "reranking_ablations", "reranking_k", "reranking_positions",
           "reranking_results", "side_by_side"]
