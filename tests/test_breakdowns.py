"""Per-edit-type breakdowns and false negatives on hand-built scene graphs with known answers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cirlib.data.datasets import CIRSplit, Query
from cirlib.data.synth import scenes
from cirlib.evaluation.bootstrap import PerQuery
from cirlib.evaluation.breakdowns import (
    EDIT_TYPES,
    UNSAID_GROUPS,
    breakdown,
    caption_oracle,
    false_negatives,
    lookalike_recall,
    query_edits,
    unsaid_differences,
)
from cirlib.evaluation.metrics import per_aspect

GRID = (2, 2)


def obj(oid: int, kind: str, colour: str, size: str = "small", cell: tuple[int, int] = (0, 0)) -> dict:
    """An object at the centre of its cell of a 2x2 grid."""
    return {"id": oid, "kind": kind, "colour": colour, "size": size, "cell": list(cell),
            "x": (cell[1] + 0.5) / GRID[1], "y": (cell[0] + 0.5) / GRID[0]}


def scene(*objects: dict, background: str = "light grey", pattern: str = "plain", close_up: bool = False) -> dict:
    return {"split": "val", "fmnist": "test", "width": 64, "height": 64, "grid": list(GRID),
            "background": {"colour": background, "pattern": pattern},
            "view": {"mirrored": False, "close_up": close_up}, "objects": list(objects)}


def has(kind: str, lo: int = 1, hi: int | None = None, **attrs: str) -> dict:
    return {"op": "has", "kind": kind, **attrs, "min": lo} | ({"max": hi} if hi is not None else {})


BAG = obj(0, "bag", "red", "small", (0, 0))
STAR = obj(1, "star", "blue", "large", (1, 1))
REFERENCE = scene(BAG, STAR)
SHARED = [has("star", colour="blue"), {"op": "background", "colour": "light grey", "pattern": "plain"}]
ZOOMED = [{**o, "x": 0.5 + (o["x"] - 0.5) * 1.35, "y": 0.5 + (o["y"] - 0.5) * 1.35} for o in (BAG, STAR)]

# name -> (target graph, constraints, expected edit types, absolute): one case per edit type, then mixes
CASES: dict[str, tuple[dict, list[dict], tuple[str, ...], bool]] = {
    "recolour": (scene({**BAG, "colour": "green"}, STAR), [*SHARED, has("bag", colour="green")], ("recolour",), False),
    "resize": (scene({**BAG, "size": "large"}, STAR), [*SHARED, has("bag", size="large")], ("resize",), False),
    "replace": (scene({**BAG, "kind": "sneaker"}, STAR),
                [*SHARED, has("bag", 0, 0), has("sneaker", colour="red")], ("replace",), False),
    "move": (scene(obj(0, "bag", "red", "small", (0, 1)), STAR),
             [*SHARED, {"op": "has", "kind": "bag", "region": "right", "min": 1}], ("move",), False),
    "count": (scene(BAG, STAR, obj(2, "bag", "green", cell=(1, 0))), [*SHARED, has("bag", 2, 2)], ("count",), False),
    "add": (scene(BAG, STAR, obj(2, "heart", "yellow", cell=(1, 0))), [*SHARED, has("heart", colour="yellow")],
            ("add",), False),
    "remove": (scene(BAG), [has("bag", colour="red"), has("star", 0, 0)], ("remove",), False),
    "background": (scene(BAG, STAR, background="light blue"),
                   [has("bag", colour="red"), has("star", colour="blue"), {"op": "background", "colour": "light blue"}],
                   ("background",), False),
    "view": (scene(*ZOOMED, close_up=True), [*SHARED, {"op": "view", "close_up": True}], ("view",), False),
    # two edits: filed under the more local one
    "recolour + background": (scene({**BAG, "colour": "green"}, STAR, background="light blue"),
                              [has("star", colour="blue"), has("bag", colour="green"),
                               {"op": "background", "colour": "light blue"}], ("recolour", "background"), False),
    # the shown target also moved the star, which the caption does not mention
    "recolour, star moved": (scene({**BAG, "colour": "green"}, obj(1, "star", "blue", "large", (1, 0))),
                             [*SHARED, has("bag", colour="green")], ("recolour",), False),
    # another bag (new id) in another colour reads as the bag recoloured, not as a count that stayed
    "bag swapped": (scene(obj(5, "bag", "green", cell=(0, 0)), STAR), [*SHARED, has("bag", colour="green")],
                    ("recolour",), False),
    # an absolute caption pins down sizes, counts, background and view but no place: the star has to go
    # (the description counts two objects), the bag grows, a heart comes; the bag's move is not asked for
    "absolute": (scene(obj(0, "bag", "red", "large", (0, 1)), obj(2, "heart", "yellow", cell=(1, 0))),
                 [has("bag", 1, 1, colour="red", size="large"), has("heart", 1, 1, colour="yellow", size="small"),
                  {"op": "objects", "min": 2, "max": 2},
                  {"op": "background", "colour": "light grey", "pattern": "plain"}, {"op": "view", "close_up": False}],
                 ("resize", "add", "remove"), True),
}


def cirr_case(cases: dict[str, tuple[dict, list[dict], tuple[str, ...], bool]]) -> tuple[CIRSplit, dict]:
    """A CIRR val split with one query per case (pairid = its position) from the shared reference, and its meta."""
    attributes = {"ref": REFERENCE}
    queries, records = [], []
    for pairid, (name, (target, constraints, _, absolute)) in enumerate(cases.items()):
        attributes[name] = target
        queries.append(Query("ref", (name,), name, (name,), ("ref", name), pair_id=pairid))
        records.append({"pairid": pairid, "reference": "ref", "target": name, "caption": name,
                        "constraints": constraints, "absolute": absolute})
    split = CIRSplit("cirr", "val", Path("/nowhere"), queries, list(attributes), {}, 0)
    return split, {"generator": scenes.GENERATOR, "attributes": attributes, "queries": {"val": records}}


def test_edit_types_cover_the_generator_edits() -> None:
    assert set(EDIT_TYPES) == {*scenes.sampler.Sampler.EDIT_WEIGHTS, "count"}


@pytest.mark.parametrize("name", list(CASES))
def test_each_edit_type_is_read_off_the_graphs(name: str) -> None:
    split, meta = cirr_case({name: CASES[name]})
    (edit,) = query_edits(split, meta)
    _, _, types, absolute = CASES[name]
    assert edit.types == types
    assert edit.primary == types[0]
    assert edit.absolute is absolute


def test_edit_types_of_a_whole_split_in_query_order() -> None:
    split, meta = cirr_case(CASES)
    assert [e.types for e in query_edits(split, meta)] == [case[2] for case in CASES.values()]


def test_edit_types_refuse_foreign_splits_and_records() -> None:
    split, meta = cirr_case({"recolour": CASES["recolour"]})
    with pytest.raises(ValueError, match="only for CIRR and CIRCO"):
        query_edits(replace(split, dataset="fashioniq"), meta)
    with pytest.raises(ValueError, match="not 'cirlib.data.synth.scenes'"):
        query_edits(split, {**meta, "generator": "cirlib.data.synth.fashion"})
    stray = replace(split, queries=[replace(split.queries[0], pair_id=7)])
    with pytest.raises(ValueError, match=r"query 0 \(pairid 7\).*no record with that pairid"):
        query_edits(stray, meta)
    with pytest.raises(ValueError, match=r"query 0 \(pairid 0\).*no scene graph of \['recolour'\]"):
        query_edits(split, {**meta, "attributes": {"ref": REFERENCE}})
    other_target = replace(split, queries=[replace(split.queries[0], target="ref")])
    with pytest.raises(ValueError, match=r"query 0 \(pairid 0\).*'target' is 'recolour'"):
        query_edits(other_target, meta)


def test_a_target_must_meet_its_own_constraints() -> None:
    """The sanity check every analysis here rests on: the labelled target fits its caption."""
    target, constraints, types, absolute = CASES["recolour"]
    split, meta = cirr_case({"recolour": (target, [*constraints, has("heart")], types, absolute)})
    with pytest.raises(ValueError, match=r"query 0 \(pairid 0\).*target 'recolour' does not meet its own"):
        query_edits(split, meta)
    with pytest.raises(ValueError, match="does not meet its own 'constraints'"):
        false_negatives(split, [["recolour"]], meta)
    split, meta = cirr_case({"recolour": (target, SHARED, types, absolute)})
    with pytest.raises(ValueError, match=r"query 0 \(pairid 0\).*no difference .* explains its 'constraints'"):
        query_edits(split, meta)


# ------------------------------------------------------------------------------ breakdowns


def test_breakdown_by_edit_type() -> None:
    per_query = PerQuery({"R@1": np.array([100.0, 0, 100, 100, 0, 0])}, np.zeros(6, dtype=int), ("val",))
    table = breakdown(per_query, ["view", "recolour", "recolour", "add", "add", "add"])
    assert list(table.index) == ["recolour", "add", "view", "all"]
    assert list(table.columns) == ["n", "R@1", "R@1 95% low", "R@1 95% high"]
    assert table["n"].tolist() == [2, 3, 1, 6]
    assert table["R@1"].tolist() == pytest.approx([50.0, 100 / 3, 100.0, 50.0])
    assert (table["R@1 95% low"] <= table["R@1"]).all() and (table["R@1"] <= table["R@1 95% high"]).all()
    assert table.loc["all", "R@1 95% low"] == pytest.approx(per_query.interval("R@1").low)


def test_breakdown_files_a_query_under_each_of_its_types() -> None:
    per_query = PerQuery({"R@1": np.array([100.0, 0, 0])}, np.zeros(3, dtype=int))
    table = breakdown(per_query, [("resize", "background"), ("background",), "other"])
    assert table["n"].to_dict() == {"resize": 1, "background": 2, "other": 1, "all": 3}
    assert table.loc["background", "R@1"] == pytest.approx(50.0)


def test_breakdown_by_circo_aspect_has_per_aspects_rows_and_means() -> None:
    values = np.array([10.0, 20.0, 30.0, 40.0])
    aspects = [("negation", "cardinality"), ("negation",), ("addition",), ("cardinality", "addition")]
    table = breakdown(PerQuery({"mAP@10": values}, np.zeros(4, dtype=int)), aspects, metrics=["mAP@10"])
    means = per_aspect(torch.tensor(values), aspects)
    assert list(table.index) == [*means.index, "all"] == ["cardinality", "addition", "negation", "all"]
    assert table["mAP@10"].iloc[:-1].tolist() == pytest.approx(means["value"].tolist())
    assert table["n"].iloc[:-1].tolist() == means["queries"].tolist()


def test_breakdown_by_split_is_per_category() -> None:
    per_query = PerQuery.from_splits({"dress": {"R@10": [100.0, 0], "R@50": [100.0, 100]},
                                      "shirt": {"R@10": [0.0, 0, 100], "R@50": [100.0, 0, 100]}})
    table = breakdown(per_query, metrics=["R@10", "average"])
    assert list(table.index) == ["dress", "shirt", "all"]
    assert table.loc["shirt", "R@10"] == pytest.approx(per_query.split("shirt").mean("R@10"))
    assert table.loc["dress", "average 95% high"] == pytest.approx(per_query.split("dress").interval("average").high)
    assert table.loc["all", "average"] == pytest.approx(per_query.mean("average"))


def test_breakdown_of_several_models_side_by_side() -> None:
    strata = np.zeros(4, dtype=int)
    models = {"Combiner": PerQuery({"R@1": np.array([100.0, 100, 0, 100])}, strata),
              "Sum": PerQuery({"R@1": np.array([0.0, 100, 0, 0])}, strata)}
    table = breakdown(models, ["add", "add", "view", "view"])
    assert list(table.columns) == ["n", "Combiner R@1", "Combiner R@1 95% low", "Combiner R@1 95% high",
                                   "Sum R@1", "Sum R@1 95% low", "Sum R@1 95% high"]
    assert table.loc["add", ["Combiner R@1", "Sum R@1"]].tolist() == [100.0, 50.0]
    with pytest.raises(ValueError, match="3 group labels for 4 queries"):
        breakdown(models, ["add", "add", "view"])
    with pytest.raises(ValueError, match="'Sum' scores other queries"):
        breakdown({**models, "Sum": PerQuery({"R@1": np.zeros(3)}, np.zeros(3, dtype=int))}, ["a"] * 4)
    with pytest.raises(KeyError, match="'R@5' not computed"):
        breakdown(models, ["add"] * 4, ["R@5"])


# ------------------------------------------------------------------------- unsaid differences


def fashion_case() -> tuple[dict[str, CIRSplit], dict]:
    """Two dress queries and one shirt query; the first leaves a differing print unsaid."""
    def garment(colour: str, pattern: str = "plain", logo: str = "none") -> dict:
        return {"colour": colour, "pattern": pattern, "logo": logo}

    attributes = {"d0": garment("black"), "d1": garment("yellow", logo="heart"), "d2": garment("black", "stripes"),
                  "s0": garment("red", "dots"), "s1": garment("navy blue", "plain")}
    dress = [Query("d0", ("is yellow", "is still plain"), "d1", category="dress"),  # logo differs, unsaid
             Query("d0", ("has stripes", "keeps the black color"), "d2", category="dress")]  # logo kept, unsaid
    shirt = [Query("s0", ("make it navy blue", "make it plain"), "s1", category="shirt")]  # logo unsaid and kept
    splits = {f"fashioniq/{c}": CIRSplit("fashioniq", "val", Path("."), qs, [], {}, 0)
              for c, qs in (("dress", dress), ("shirt", shirt))}
    return splits, {"attributes": attributes}


def test_unsaid_differences_label_each_query_in_split_order() -> None:
    splits, meta = fashion_case()
    kept, differs = UNSAID_GROUPS
    assert unsaid_differences(splits, meta) == [differs, kept, kept]
    assert unsaid_differences(splits["fashioniq/shirt"], meta) == [kept]
    per_query = PerQuery.from_splits({"dress": {"R@10": [0.0, 100]}, "shirt": {"R@10": [100.0]}})
    table = breakdown(per_query, unsaid_differences(splits, meta), ["R@10"])
    assert table.loc[differs, "R@10"] == 0.0 and table.loc[kept, "n"] == 2


def test_unsaid_differences_refuse_what_they_cannot_read() -> None:
    splits, meta = fashion_case()
    dress = splits["fashioniq/dress"]
    with pytest.raises(ValueError, match="need labelled FashionIQ-format splits"):
        unsaid_differences(replace(dress, dataset="cirr"), meta)
    with pytest.raises(ValueError, match="need labelled FashionIQ-format splits"):
        unsaid_differences(replace(dress, queries=[replace(q, target=None) for q in dress.queries]), meta)
    with pytest.raises(ValueError, match=r"query 1 of .*has no rendering \['d2'\]"):
        unsaid_differences(dress, {"attributes": {k: v for k, v in meta["attributes"].items() if k != "d2"}})
    written = replace(dress, queries=[replace(dress.queries[0], captions=("is a yellow dress", "with a heart"))])
    with pytest.raises(ValueError, match="query 0 of .*state no attribute"):
        unsaid_differences(written, meta)


# ------------------------------------------------------------------------------- look-alikes


def lookalike_case() -> tuple[CIRSplit, dict]:
    """Six dresses: g0-g2 black plain (g2 with a heart), g3 black striped, g4 and g5 yellow plain."""
    def dress(colour: str, pattern: str = "plain", logo: str = "none") -> dict:
        return {"category": "dress", "colour": colour, "pattern": pattern, "logo": logo}

    attributes = {"g0": dress("black"), "g1": dress("black"), "g2": dress("black", logo="heart"),
                  "g3": dress("black", "stripes"), "g4": dress("yellow"), "g5": dress("yellow")}
    queries = [Query("g4", ("is black",), "g0", category="dress"),  # look-alikes g0, g1; g2 too when logos are unread
               Query("g0", ("has stripes",), "g3", category="dress")]  # g3 alone
    split = CIRSplit("fashioniq", "val", Path("."), queries, list(attributes), {}, 0)
    return split, {"attributes": attributes}


def test_lookalike_recall_by_hand() -> None:
    split, meta = lookalike_case()
    ranked = torch.tensor([[1, 2, 0, 3], [0, 1, 2, 3]])  # query 0 finds a look-alike first, its target third
    result = lookalike_recall({"dress": split}, {"dress": ranked}, ks=(1, 3), meta=meta)
    assert result.values["R@1"].tolist() == [0.0, 0.0] and result.values["R@3"].tolist() == [100.0, 0.0]
    assert result.values["look-alike R@1"].tolist() == [100.0, 0.0]
    assert result.values["look-alike R@3"].tolist() == [100.0, 0.0]
    assert result.values["look-alikes"].tolist() == [2.0, 1.0]
    assert result.values["ceiling R@1"].tolist() == [50.0, 100.0]  # one in two look-alikes, then the only one
    blind = lookalike_recall(split, ranked, ks=(1, 3), attributes=("category", "colour", "pattern"), meta=meta)
    assert blind.values["look-alikes"].tolist() == [3.0, 1.0]  # the heart no longer tells g2 apart
    assert blind.values["ceiling R@1"].tolist() == pytest.approx([100 / 3, 100.0])
    assert blind.mean("ceiling R@3") == 100.0 and blind.names == ("val",)


def test_lookalike_recall_refuses_what_it_cannot_read() -> None:
    split, meta = lookalike_case()
    ranked = torch.tensor([[1, 2, 0, 3], [0, 1, 2, 3]])
    with pytest.raises(ValueError, match="needs labelled FashionIQ-format splits"):
        lookalike_recall(replace(split, dataset="cirr"), ranked, meta=meta)
    with pytest.raises(ValueError, match=r"ranked must be \[2, >= 50\], got \(2, 4\)"):
        lookalike_recall(split, ranked, meta=meta)
    with pytest.raises(ValueError, match="rankings for splits"):
        lookalike_recall({"dress": split}, {"shirt": ranked}, ks=(1,), meta=meta)
    with pytest.raises(ValueError, match=r"has no rendering \['g5'\]"):
        lookalike_recall(split, ranked, ks=(1,), meta={"attributes": {k: v for k, v in meta["attributes"].items()
                                                                        if k != "g5"}})
    with pytest.raises(ValueError, match=r"no attribute \['print'\]"):
        lookalike_recall(split, ranked, ks=(1,), attributes=("colour", "print"), meta=meta)


# --------------------------------------------------------------------------- false negatives


def fn_case() -> tuple[CIRSplit, dict]:
    """Three queries asking for a green bag (pairids 0, 1) or a heart (2), a gallery that partly fits them."""
    fits = scene(obj(0, "bag", "green"), obj(1, "star", "blue", "large", (1, 1)), background="light blue")
    split, meta = cirr_case({"green": CASES["recolour"], "heart": CASES["add"]})
    meta["attributes"] |= {"fits": fits, "red": REFERENCE}
    queries = [*split.queries, replace(split.queries[0], pair_id=2)]
    meta["queries"]["val"].append({**meta["queries"]["val"][0], "pairid": 2})
    constraint = [has("bag", colour="green")]  # the shared background left out: "fits" has another one
    for record in meta["queries"]["val"]:
        record["constraints"] = constraint if record["target"] == "green" else record["constraints"]
    return replace(split, queries=queries, gallery=list(meta["attributes"])), meta


def test_false_negatives_are_fitting_results_not_labelled() -> None:
    split, meta = fn_case()
    found = false_negatives(split, [["fits", "green", "red"], ["heart", "fits"], ["red", "fits", "green"]], meta)
    assert found.found == (("fits",), (), ("fits",))
    assert found.top1_missed.tolist() == [True, False, True]
    assert found.top1_false_negative.tolist() == [True, False, False]
    assert found.share_of_misses.estimate == pytest.approx(50.0)
    assert found.r1_gain.estimate == pytest.approx(100 / 3)
    assert found.r1_gain.low <= found.r1_gain.estimate <= found.r1_gain.high
    assert found.examples() == ([0], [("fits", "green", "red")])


def test_false_negatives_of_chosen_queries_without_misses() -> None:
    split, meta = fn_case()
    found = false_negatives(split, [["heart"]], meta, query_indices=[1])
    assert found.query_indices == (1,)
    assert found.share_of_misses is None
    assert found.r1_gain.estimate == 0.0
    assert found.examples() == ([], [])


def test_circo_ground_truths_are_not_false_negatives() -> None:
    """CIRCO lists every fitting image as a ground truth, so a fitting result is a hit, not a false negative."""
    _, cirr_meta = fn_case()
    attributes = {"10": REFERENCE, "11": CASES["recolour"][0], "12": cirr_meta["attributes"]["fits"]}
    record = {"id": 0, "reference_img_id": 10, "target_img_id": 11, "constraints": [has("bag", colour="green")]}
    meta = {"generator": scenes.GENERATOR, "attributes": attributes, "queries": {"val": [record]}}
    query = Query("10", ("is green",), "11", ("11",), pair_id=0, n_ground_truths=1)
    split = CIRSplit("circo", "val", Path("/nowhere"), [query], list(attributes), {}, 0)
    assert false_negatives(split, [["12", "11"]], meta).found == (("12",),)
    listed = replace(split, queries=[replace(query, ground_truths=("11", "12"), n_ground_truths=2)])
    found = false_negatives(listed, [["12", "11"]], meta)
    assert found.found == ((),) and found.top1_missed.tolist() == [False]
    assert query_edits(listed, meta)[0].types == ("recolour",)


def test_false_negatives_refuse_bad_rankings() -> None:
    split, meta = fn_case()
    with pytest.raises(ValueError, match="2 rankings for 3 queries"):
        false_negatives(split, [["fits"], ["heart"]], meta)
    with pytest.raises(ValueError, match=r"query 1 \(pairid 1\).*empty ranking"):
        false_negatives(split, [["fits"], [], ["red"]], meta)
    with pytest.raises(ValueError, match=r"query 2 \(pairid 2\).*no scene graph of the retrieved \['ghost'\]"):
        false_negatives(split, [["fits"], ["heart"], ["ghost"]], meta)
    with pytest.raises(ValueError, match="only for CIRR and CIRCO"):
        false_negatives(replace(split, dataset="fashioniq"), [["fits"]] * 3, meta)


def oracle_case() -> tuple[CIRSplit, dict]:
    """Two CIRCO queries from the red-bag-and-blue-star reference, concept "a blue star" (never said):
    0 "has a green bag" describes three images, one of them with the star (its only ground truth);
    1 "has a yellow heart" describes only its two ground truths."""
    attributes = {
        "10": REFERENCE,
        "11": scene(obj(0, "bag", "green"), STAR),
        "12": scene(obj(0, "bag", "green")),
        "13": scene(obj(0, "bag", "green"), obj(2, "heart", "red", cell=(1, 0))),
        "14": scene(STAR, obj(2, "heart", "yellow", cell=(1, 0))),
        "15": scene(BAG, STAR, obj(2, "heart", "yellow", cell=(1, 0))),
        "16": scene(obj(2, "heart", "red", cell=(1, 0))),
    }
    star = has("star", colour="blue")
    records = [
        {"id": 0, "reference_img_id": 10, "target_img_id": 11, "constraints": [star, has("bag", colour="green")],
         "shared_concept": "a blue star"},
        {"id": 1, "reference_img_id": 10, "target_img_id": 14, "constraints": [star, has("heart", colour="yellow")],
         "shared_concept": "a blue star"},
    ]
    queries = [Query("10", ("has a green bag",), "11", ("11",), pair_id=0, shared_concept="a blue star"),
               Query("10", ("has a yellow heart",), "14", ("14", "15"), pair_id=1, shared_concept="a blue star")]
    split = CIRSplit("circo", "val", Path("/nowhere"), queries, list(attributes), {}, 0)
    return split, {"generator": scenes.GENERATOR, "attributes": attributes, "queries": {"val": records}}


def test_caption_oracle_ranks_what_the_caption_describes_first() -> None:
    split, meta = oracle_case()
    runs = [caption_oracle(split, meta, seed=seed) for seed in range(300)]
    for pq in runs:
        # query 1: its two ground truths are the only images described, so they take ranks 1-2 whatever the order
        assert pq.values["mAP@5"][1] == pytest.approx(100.0)
        # query 0: its ground truth is one of three described images, so it lands at rank 1, 2 or 3
        assert pq.values["mAP@5"][0] in (pytest.approx(100.0), pytest.approx(50.0), pytest.approx(100 / 3))
        assert pq.values["R@5"].tolist() == [100.0, 100.0]
    assert runs[7].values["mAP@5"].tolist() == caption_oracle(split, meta, seed=7).values["mAP@5"].tolist()
    # each of the three ranks equally likely: a mean AP of (1 + 1/2 + 1/3) / 3
    mean_ap = np.mean([pq.values["mAP@5"][0] for pq in runs])
    assert mean_ap == pytest.approx(100 * (1 + 1 / 2 + 1 / 3) / 3, abs=6.0)


def test_caption_oracle_refuses_what_it_cannot_read() -> None:
    split, meta = oracle_case()
    with pytest.raises(ValueError, match="needs a CIRCO-format split"):
        caption_oracle(cirr_case(CASES)[0], cirr_case(CASES)[1])
    records = meta["queries"]["val"]
    for constraints in ([has("bag", colour="green")],  # no caption constraint after the concept
                        [has("bag", colour="green"), has("star", colour="blue")]):  # concept not first
        bad = {**meta, "queries": {"val": [{**records[0], "constraints": constraints}, records[1]]}}
        with pytest.raises(ValueError, match=r"query 0 \(id 0\).*is not its shared concept 'a blue star'"):
            caption_oracle(split, bad)
    with pytest.raises(ValueError, match=r"no scene graph of 1 gallery images.*'ghost'"):
        caption_oracle(replace(split, gallery=[*split.gallery, "ghost"]), meta)
