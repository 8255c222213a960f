"""Zero-shot baselines and modality-redundancy curves on the real-format fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cirlib.evaluation import baselines
from cirlib.models.backbone import load_backbone
from cirlib.models.features import SplitFeatures, encode_split


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(pretrained=None, device="cpu", seed=0)


def test_encode_split_reuses_gallery_rows_for_references(tiny, fixture_splits, tmp_path: Path) -> None:
    split = fixture_splits["cirr"]
    f = encode_split(tiny, split, cache_dir=tmp_path, progress=False)
    assert f.gallery.shape == (len(split.gallery), tiny.embed_dim)
    assert f.reference.shape == f.text.shape == (len(split.queries), tiny.embed_dim)
    for row, q in enumerate(split.queries):
        assert torch.equal(f.reference[row], f.gallery[split.gallery.index(q.reference)])


def test_baselines_table_shape_and_sum_definition(tiny, fixture_splits, tmp_path: Path) -> None:
    table, per_query = baselines.evaluate_baselines(tiny, fixture_splits, cache_dir=tmp_path)
    assert list(table.index) == ["image", "text", "sum"]
    assert sorted(per_query) == sorted((b, m) for b in ("cirr", "circo", "fashioniq") for m in table.index)
    for (bench, method), result in per_query.items():  # the per-query values behind every number
        for metric in ("R@10", "mAP@10", "average", "avg"):
            if f"{bench} {metric}" in table.columns:
                expected = table.loc[method, f"{bench} {metric}"]
                assert result.mean(metric) == pytest.approx(expected), (bench, method, metric)
    for col in ("fashioniq R@10", "fashioniq average", "cirr R@1", "cirr Rsubset@1", "circo mAP@10"):
        assert col in table.columns
    assert ((table >= 0) & (table <= 100)).all().all()
    image, text = torch.randn(4, 8), torch.randn(4, 8)
    expected = F.normalize(F.normalize(image, dim=-1) + F.normalize(text, dim=-1), dim=-1)
    assert torch.allclose(baselines.BASELINES["sum"](image, text), expected, atol=1e-6)
    with pytest.raises(ValueError, match="unknown baseline"):
        baselines.evaluate_baselines(tiny, fixture_splits, methods=("oracle",))


def test_redundancy_curves_with_hand_made_features(fixture_splits) -> None:
    split = fixture_splits["cirr"]
    g = len(split.gallery)
    gallery = torch.eye(g, 16)
    targets = [split.gallery.index(q.target) for q in split.queries]
    refs = [split.gallery.index(q.reference) for q in split.queries]
    feats = SplitFeatures(
        gallery=gallery,
        reference=gallery[refs] + 0.01 * gallery[targets],  # closest: itself (excluded), then the target
        text=-gallery[targets] + 0.001,                        # points away from the target: never first
    )
    curves = baselines.redundancy_curves({"cirr": split}, {"cirr": feats}, ks=(1, g - 1))
    i2i = curves[(curves.modality == "I2I")].set_index("K")["recall"]
    t2i = curves[(curves.modality == "T2I")].set_index("K")["recall"]
    assert i2i[1] == 100.0 and t2i[1] == 0.0
    assert t2i[g - 1] == 100.0  # everything but the excluded reference fits in the top G-1
