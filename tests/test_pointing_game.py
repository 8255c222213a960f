"""The Grad-CAM pointing game on the ``scenes`` benchmark: object boxes, edited objects, the way back
from the encoder input to the stored image, and the game's scores and figure."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from matplotlib.patches import Rectangle
from PIL import Image

from cirlib.data import datasets
from cirlib.data.preprocess import build_transform, pipeline_geometry
from cirlib.data.synth import scenes as bs
from cirlib.data.synth.scenes import Scene, SceneObject, ScenesBenchConfig
from cirlib.data.synth.scenes.drawing import OBJECT_SIDE, object_box
from cirlib.data.synth.scenes.graph import edited_objects
from cirlib.data.synth.scenes.sampler import Edit, apply_edit
from cirlib.evaluation import analysis
from cirlib.models.combiner import combine_sum
from cirlib.viz import plots

pytestmark = pytest.mark.usefixtures("close_figures")

@pytest.fixture(scope="module")
def cirr_val(tmp_path_factory: pytest.TempPathFactory) -> datasets.CIRSplit:
    root = bs.generate_scenes(tmp_path_factory.mktemp("scenes"), ScenesBenchConfig.quick())
    return datasets.load_cirr(root / "CIRR", "val")


@pytest.fixture(scope="module")
def regions(cirr_val) -> dict[int, analysis.EditedRegion | None]:
    return analysis.edited_regions(cirr_val)


def obj(i: int, kind: str, colour: str, cell: tuple[int, int], size: str = "large",
        jitter: tuple[float, float] = (0.0, 0.0)) -> SceneObject:
    return SceneObject(i, kind, colour, size, cell, jitter, 0 if kind in bs.ITEM_KINDS.values() else None)


def scene(*objects: SceneObject, size: tuple[int, int] = (128, 85), grid: tuple[int, int] = (2, 3),
          **view: bool) -> Scene:
    return Scene("val", "test", *size, grid, "light grey", "dots", tuple(objects), **view)


# ------------------------------------------------------------------------------------ object boxes


def test_object_box_hand_computed() -> None:
    s = scene(obj(0, "star", "red", (0, 1)), obj(1, "bag", "green", (1, 0), "small"))
    a = s.attrs
    # cell = min(128 / 3, 85 / 2) = 42.5 px; large: round(42.5 * 0.98) = 42 px, centred on x = 64, y = 21.25
    assert object_box(a, a["objects"][0]) == (43, 0, 85, 42)
    # small: round(42.5 * 0.62) = 26 px, centred on x = 21.33, y = 63.75: left round(8.33), top round(50.75)
    assert object_box(a, a["objects"][1]) == (8, 51, 34, 77)
    # seen mirrored the bag's centre is at 1 - 1/6 of the width: the box flips about the vertical axis
    m = replace(s, mirrored=True).attrs
    assert object_box(m, m["objects"][1]) == (128 - 34, 51, 128 - 8, 77)
    # a close-up magnifies by 1.35 about the centre: side round(42.5 * 0.98 * 1.35) = 56 px, centre y =
    # 0.5 - 0.25 * 1.35 = 0.1625 of 85 px, so the square starts at round(13.81 - 28) = -14, clipped to 0
    z = replace(s, close_up=True).attrs
    assert round(42.5 * OBJECT_SIDE["large"] * 1.35) == 56
    assert object_box(z, z["objects"][0]) == (36, 0, 92, -14 + 56)


def _drawn(renderer: bs.SceneRenderer, attrs: dict, o: dict) -> np.ndarray:
    """Pixels that change when the object is left out of the picture."""
    without = {**attrs, "objects": [x for x in attrs["objects"] if x is not o]}
    return np.any(np.asarray(renderer(attrs)) != np.asarray(renderer(without)), axis=-1)


@pytest.mark.parametrize("view", [{}, {"mirrored": True}, {"close_up": True}, {"mirrored": True, "close_up": True}])
@pytest.mark.parametrize("canvas", [((128, 85), (2, 3)), ((85, 128), (3, 2)), ((96, 96), (2, 2))])
def test_object_box_holds_what_the_renderer_draws(view: dict, canvas: tuple) -> None:
    renderer = bs.SceneRenderer()  # items come from the Fashion-MNIST test split
    size, grid = canvas
    s = scene(obj(0, "sneaker", "red", (0, 0), jitter=(-0.1, -0.1)),  # near the corner: clipped in a close-up
              obj(1, "trousers", "navy blue", (1, 1), "small", (0.05, -0.08)),
              obj(2, "circle", "orange", (grid[0] - 1, 0), "large", (0.1, 0.1)),
              obj(3, "triangle", "purple", (0, grid[1] - 1), "small"), size=size, grid=grid, **view)
    attrs = s.attrs
    for o in attrs["objects"]:
        x0, y0, x1, y1 = object_box(attrs, o)
        rows, cols = np.nonzero(_drawn(renderer, attrs, o))
        assert rows.size, o
        assert x0 <= cols.min() and cols.max() < x1 and y0 <= rows.min() and rows.max() < y1, (o, (x0, y0, x1, y1))
        # the drawing spans its square along its longer side (items are fitted with a 3 % margin)
        across = (cols.max() - cols.min() + 1) / (x1 - x0), (rows.max() - rows.min() + 1) / (y1 - y0)
        clipped = x0 == 0 or y0 == 0 or x1 == size[0] or y1 == size[1]
        assert max(across) >= (0.5 if clipped else 0.85), (o, across)
        if o["kind"] == "circle":  # a shape fills its square in both directions
            assert min(across) >= 0.85, (o, across)


# --------------------------------------------------------------------------------- edited objects

REF = scene(obj(0, "bag", "red", (0, 0)), obj(1, "star", "navy blue", (1, 2), "small"), obj(2, "coat", "green", (0, 2)))
SHARED = [{"op": "has", "kind": "star", "colour": "navy blue", "min": 1},
          {"op": "background", "colour": "light grey", "pattern": "dots"}]


def ids(ref: Scene, tgt: Scene, constraints: list[dict]) -> list[int]:
    assert bs.satisfies(tgt.attrs, constraints) and not bs.satisfies(ref.attrs, constraints)
    return [o["id"] for o in edited_objects(ref.attrs, tgt.attrs, constraints)]


def test_edited_objects_of_each_edit() -> None:
    recoloured = apply_edit(REF, Edit("recolour", 0, "yellow"))
    assert ids(REF, recoloured, [*SHARED, {"op": "has", "kind": "bag", "colour": "yellow", "min": 1}]) == [0]
    replaced = apply_edit(REF, Edit("replace", 0, ("sandal", 5)))
    assert ids(REF, replaced, [*SHARED, {"op": "has", "kind": "bag", "min": 0, "max": 0},
                               {"op": "has", "kind": "sandal", "colour": "red", "min": 1}]) == [0]
    resized = apply_edit(REF, Edit("resize", 1, "large"))
    assert ids(REF, resized, [{"op": "has", "kind": "star", "size": "large", "min": 1}]) == [1]
    moved = apply_edit(REF, Edit("move", 1, ((1, 0), (0.0, 0.0))))
    assert ids(REF, moved, [*SHARED, {"op": "has", "kind": "star", "region": "left", "min": 1}]) == [1]
    removed = apply_edit(REF, Edit("remove", 2))
    assert ids(REF, removed, [*SHARED, {"op": "has", "kind": "coat", "min": 0, "max": 0}]) == [2]
    # an added object is not in the reference; a background change concerns no object
    added = apply_edit(REF, Edit("add", value=obj(3, "heart", "pink", (1, 1))))
    assert ids(REF, added, [*SHARED, {"op": "has", "kind": "heart", "colour": "pink", "min": 1}]) == []
    background = replace(REF, background="lavender")
    assert ids(REF, background, [{"op": "background", "colour": "lavender"}]) == []
    # a conjunction edits two objects
    both = apply_edit(recoloured, Edit("remove", 2))
    assert ids(REF, both, [*SHARED, {"op": "has", "kind": "bag", "colour": "yellow", "min": 1},
                           {"op": "has", "kind": "coat", "min": 0, "max": 0}]) == [0, 2]


def test_incidental_changes_are_not_edits() -> None:
    # the shown target also has the star resized and the coat moved: no constraint speaks of them
    shown = apply_edit(apply_edit(apply_edit(REF, Edit("recolour", 0, "yellow")), Edit("resize", 1, "large")),
                       Edit("move", 2, ((1, 1), (0.05, 0.0))))
    assert ids(REF, shown, [*SHARED, {"op": "has", "kind": "bag", "colour": "yellow", "min": 1}]) == [0]
    # an absolute caption describes the whole target: every difference it states counts
    described = [{"op": "has", "kind": "bag", "colour": "yellow", "size": "large", "min": 1, "max": 1},
                 {"op": "has", "kind": "star", "colour": "navy blue", "size": "large", "min": 1, "max": 1},
                 {"op": "objects", "min": 3, "max": 3}]
    assert ids(REF, shown, described) == [0, 1]
    # the shown reference gained a heart (id 3) and the edit adds a coat that gets the same id: the
    # heart is not the coat (no edit changes both kind and colour), so nothing is pointable
    ref = apply_edit(REF, Edit("add", value=obj(3, "heart", "pink", (1, 1))))
    tgt = apply_edit(REF, Edit("add", value=obj(3, "sneaker", "orange", (1, 1))))
    assert ids(ref, tgt, [{"op": "has", "kind": "sneaker", "colour": "orange", "min": 1}]) == []


def test_edited_regions_of_a_generated_split(cirr_val, regions) -> None:
    meta = bs.load_meta(cirr_val.root)
    assert sorted(regions) == list(range(len(cirr_val.queries)))
    pointable = {i: r for i, r in regions.items() if r is not None}
    assert 0.3 * len(regions) < len(pointable) < len(regions)  # additions, backgrounds and views are not
    records = {r["pairid"]: r for r in meta["queries"]["val"]}
    for i, region in pointable.items():
        record = records[cirr_val.queries[i].pair_id]
        ref, tgt = meta["attributes"][record["reference"]], meta["attributes"][record["target"]]
        stored = Image.open(cirr_val.image_paths[record["reference"]]).size
        assert region.size == (ref["width"], ref["height"]) == stored
        by_id = {o["id"]: o for o in ref["objects"]}
        t_ids = {o["id"]: o for o in tgt["objects"]}
        for oid, box in zip(region.object_ids, region.boxes):
            assert box == object_box(ref, by_id[oid])
            assert 0 <= box[0] < box[2] <= region.size[0] and 0 <= box[1] < box[3] <= region.size[1]
            other = t_ids.get(oid)  # each edited object differs from its namesake in the target, or is gone
            assert other is None or any(other[k] != by_id[oid][k] for k in ("kind", "colour", "size", "cell"))


def test_edited_regions_refuse_foreign_queries(cirr_val) -> None:
    meta = bs.load_meta(cirr_val.root)
    wrong = {**meta, "queries": {"val": [{**r, "reference": "dev-0-0-img0" if r["reference"] != "dev-0-0-img0"
                                          else "dev-0-0-img1"} for r in meta["queries"]["val"]]}}
    q = cirr_val.queries[0]
    with pytest.raises(ValueError, match=rf"query 0 \(pairid {q.pair_id}\) .* reference '{q.reference}'"):
        analysis.edited_regions(cirr_val, wrong)
    with pytest.raises(ValueError, match="not 'cirlib.data.synth.scenes'"):
        analysis.edited_regions(cirr_val, {**meta, "generator": "cirlib.data.synth.fashion"})
    with pytest.raises(ValueError, match="CIRR split"):
        analysis.edited_regions(replace(cirr_val, dataset="circo"))


def test_edited_region_contains_and_area() -> None:
    region = analysis.EditedRegion((10, 10), (0, 1), ((0, 0, 4, 4), (2, 2, 6, 6)))
    assert region.area_fraction == pytest.approx((16 + 16 - 4) / 100)  # the overlap counts once
    assert region.contains(3.9, 0.0) and region.contains(5.5, 5.5)
    assert not region.contains(4.0, 1.0) and not region.contains(6.0, 5.0)  # right edges are outside
    assert not region.contains(float("nan"), float("nan"))


# --------------------------------------------------------------------- encoder input -> stored image


@pytest.mark.parametrize("kind", ["targetpad", "squarepad", "clip"])
@pytest.mark.parametrize("size", [(128, 85), (85, 128), (96, 96), (128, 64)])
def test_cam_on_image_undoes_the_preprocessing(kind: str, size: tuple[int, int]) -> None:
    w, h = size
    spot = (round(0.6 * w), round(0.4 * h))  # a bright 5x5 square, as the encoder gets to see it
    picture = np.zeros((h, w, 3), np.uint8)
    picture[spot[1] - 2 : spot[1] + 3, spot[0] - 2 : spot[0] + 3] = 255
    seen = build_transform(kind, 64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(Image.fromarray(picture))[0]
    heat = analysis.cam_on_image(seen, size, kind)
    assert heat.shape == (h, w) and heat.dtype == np.float32
    row, col = np.unravel_index(np.nanargmax(heat), heat.shape)
    assert abs(col - spot[0]) <= 2 and abs(row - spot[1]) <= 2
    # NaN exactly where the crop cut the image: pixel centres outside the pipeline's visible box
    left, top, right, bottom = pipeline_geometry(size, kind, 64).visible_box
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
    visible = ((ys >= top) & (ys < bottom))[:, None] & ((xs >= left) & (xs < right))[None, :]
    assert np.array_equal(np.isfinite(heat), visible)
    assert visible.all() == (kind == "squarepad" or w == h)  # targetpad crops what is beyond its ratio
    with pytest.raises(ValueError, match="square map"):
        analysis.cam_on_image(np.zeros((64, 32)), size, kind)


# -------------------------------------------------------------------------------- the pointing game


def test_pointing_game_scores_and_baselines(vit, cirr_val, regions) -> None:
    game = analysis.pointing_game(vit, combine_sum, cirr_val, regions, batch_size=16)
    pointable = sorted(i for i, r in regions.items() if r is not None)
    assert game.query_indices == tuple(pointable) and game.peaks.shape == (len(pointable), 2)
    chosen = [regions[i] for i in pointable]
    for r, (x, y), hit in zip(chosen, game.peaks, game.hits):
        assert np.isnan(x) or (0 < x < r.size[0] and 0 < y < r.size[1])
        assert hit == r.contains(x, y)
    n = len(pointable)
    assert (game.gradcam.hits, game.gradcam.n) == (int(game.hits.sum()), n)
    assert game.gradcam.rate.estimate == pytest.approx(100 * game.hits.mean())
    assert game.gradcam.rate.low <= game.gradcam.rate.estimate <= game.gradcam.rate.high
    centre = [r.contains(r.size[0] / 2, r.size[1] / 2) for r in chosen]
    assert game.centre.hits == sum(centre) and game.centre.n == n
    assert game.chance == pytest.approx(100 * np.mean([r.area_fraction for r in chosen]))
    assert 0 < game.chance < 100
    table = game.table()
    assert list(table.index) == ["Grad-CAM peak", "image centre", "uniform random point"]
    assert table.loc["uniform random point", "hit rate"] == game.chance
    assert table.loc["Grad-CAM peak", "hits"] == game.gradcam.hits
    # a subsample: seeded, a subset, and the same queries the examples show
    few = analysis.pointing_game(vit, combine_sum, cirr_val, regions, n=5, seed=3)
    assert len(few.query_indices) == 5 and set(few.query_indices) <= set(pointable)
    assert np.array_equal(few.hits, game.hits[[pointable.index(i) for i in few.query_indices]])
    none = {i: None for i in regions}
    with pytest.raises(ValueError, match="nothing to point at"):
        analysis.pointing_game(vit, combine_sum, cirr_val, none)


def test_a_map_on_the_edited_object_always_hits(vit, cirr_val, regions, monkeypatch) -> None:
    """Maps that light up the edited objects' boxes, pushed through the real preprocessing, score 100 %:
    the way back from the encoder input (padding, resize, crop) lands inside the boxes."""
    pointable = sorted(i for i, r in regions.items() if r is not None)
    planted = []
    for i in pointable:
        w, h = regions[i].size
        mask = np.zeros((h, w, 3), np.uint8)
        for x0, y0, x1, y1 in regions[i].boxes:
            mask[y0:y1, x0:x1] = 255
        planted.append(build_transform("targetpad", vit.image_size, (0.0,) * 3, (1.0,) * 3)(Image.fromarray(mask))[0])
    queue = iter(planted)

    def fake_gradcam(backbone, combine_fn, reference_pixels, texts, target_features=None):
        return np.stack([next(queue).numpy() for _ in texts])

    monkeypatch.setattr(analysis, "gradcam_batch", fake_gradcam)
    game = analysis.pointing_game(vit, combine_sum, cirr_val, regions, batch_size=7)
    cut = [i for i, r in zip(pointable, planted) if r.max() == 0]  # boxes wholly cropped away by targetpad
    assert game.gradcam.hits == len(pointable) - len(cut) and game.gradcam.hits > 0.9 * len(pointable)


def test_pointing_examples_and_their_figure(vit, cirr_val, regions) -> None:
    rows, marks = analysis.pointing_examples(vit, combine_sum, cirr_val, regions, n=3, seed=3)
    game = analysis.pointing_game(vit, combine_sum, cirr_val, regions, n=3, seed=3)
    assert [m.hit for m in marks] == game.hits.tolist()
    assert np.allclose([m.peak for m in marks], game.peaks, equal_nan=True)
    for (image, caption, heat), i in zip(rows, game.query_indices):
        assert image.size == regions[i].size and heat.shape == image.size[::-1]
        assert caption == cirr_val.queries[i].captions[0]
    layer = analysis.gradcam_layer(vit)
    fig = plots.gradcam_grid(rows, layer, marks=marks)
    assert len(fig.axes) == 9 and "edited objects" in fig._suptitle.get_text()
    for row, mark in enumerate(marks):
        ax = fig.axes[3 * row + 2]
        boxes = [p for p in ax.patches if isinstance(p, Rectangle)]
        assert len(boxes) == len(mark.boxes)
        assert boxes[0].get_xy() == (mark.boxes[0][0] - 0.5, mark.boxes[0][1] - 0.5)
        assert ax.get_xlabel() == f"Grad-CAM: {'hit' if mark.hit else 'miss'}"
        assert len(ax.lines) == int(np.isfinite(mark.peak).all())
    with pytest.raises(ValueError, match="2 marks for 3 rows"):
        plots.gradcam_grid(rows, layer, marks=marks[:2])


def test_pointing_game_needs_targets(vit, cirr_val, regions) -> None:
    i = next(i for i, r in regions.items() if r is not None)
    queries = list(cirr_val.queries)
    queries[i] = replace(queries[i], target=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        blind = replace(cirr_val, queries=queries)
    with pytest.raises(ValueError, match=rf"query {i} \(pairid {queries[i].pair_id}\) .* has no target"):
        analysis.pointing_game(vit, combine_sum, blind, {i: regions[i]})


def test_pointing_game_checks_image_sizes(vit, cirr_val, regions) -> None:
    i = next(i for i, r in regions.items() if r is not None)
    shrunk = {i: replace(regions[i], size=(regions[i].size[0] - 1, regions[i].size[1]))}
    with pytest.raises(ValueError, match=rf"query {i}: the scene graph of reference"):
        analysis.pointing_game(vit, combine_sum, cirr_val, shrunk)


def test_batched_pixels_match_single_queries(vit, cirr_val) -> None:
    """The pointing game's batched inputs are what :func:`analysis.reference_input` gives one at a time."""
    batch = analysis._query_batch(vit, cirr_val, [0, 1], "targetpad")
    for row, i in enumerate([0, 1]):
        pixels, _ = analysis.reference_input(vit, cirr_val.image_paths[cirr_val.queries[i].reference])
        assert torch.equal(batch.pixels[row], pixels[0])
