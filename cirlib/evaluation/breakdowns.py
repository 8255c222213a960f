"""Where a model's recall comes from, and which of its misses are not misses, on the generated benchmarks.

A benchmark number averages over very different queries; the generated ``scenes`` benchmark keeps
every image's scene graph and every query's constraints, and ``fashion`` every rendering's
attributes (``cirlib_meta.json``), so they can say

- what each query asks to change (:func:`query_edits`): recolour, resize, replace, move, a count
  change, an added or removed kind of object, the background or the view, read from the
  differences between the reference and target graphs that the caption's constraints depend on;
- whether a FashionIQ-format triplet's unmentioned attribute is the reference's or differs too
  (:func:`unsaid_differences`): what decides whether the reference image helps a query;
- how a metric splits over those edit types, or over any other per-query grouping such as the
  FashionIQ categories (:func:`breakdown`, with bootstrap intervals from
  :mod:`cirlib.evaluation.bootstrap`);
- which retrieved images meet every constraint of the caption without being a labelled target
  (:func:`false_negatives`): correct answers the benchmark counts as wrong;
- how much a CIRCO-format caption alone can find (:func:`caption_oracle`): the text-only baseline's
  ceiling, which tells a benchmark whose captions say too little from a model that cannot match them;
- whether a FashionIQ-format ranking found the target's attributes or the target itself
  (:func:`lookalike_recall`): the gallery holds renderings of other garments with exactly the target's
  attributes, which no caption can tell from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from cirlib.data.datasets import CIRCO_ASPECTS, CIRSplit
from cirlib.data.synth import fashion, scenes
from cirlib.data.synth.scenes.captions import concept_name
from cirlib.data.synth.scenes.graph import satisfies
from cirlib.evaluation.bootstrap import Interval, PerQuery
from cirlib.evaluation.metrics import group_members
from cirlib.evaluation.protocols import per_query_score_metrics

__all__ = ["EDIT_TYPES", "FASHION_LOOKS", "UNSAID_GROUPS", "FalseNegatives", "QueryEdit", "breakdown",
           "caption_oracle", "false_negatives", "lookalike_recall", "query_edits", "unsaid_differences"]

EDIT_TYPES: tuple[str, ...] = ("recolour", "resize", "replace", "move", "count", "add", "remove", "background",
                               "view")
"""The kinds of change a caption can ask for, from the most local (one attribute of one object) to the most
global (the whole scene). They are the generator's edits (:class:`~cirlib.data.synth.scenes.sampler.Edit`)
as its captions say them: an added or removed object is a ``count`` change when its kind is in both
images ("has two bags instead of one"), ``add`` when the kind is new, ``remove`` when it disappears."""

_ATTRIBUTE_TYPES: dict[str, tuple[str, ...]] = {  # edit type -> the object fields it changes
    "recolour": ("colour",),
    "resize": ("size",),
    "replace": ("kind",),
    "move": ("cell", "x", "y"),
}
_RECORD_FIELDS: dict[str, tuple[str, str, str]] = {  # dataset -> (query id, reference, target) of a meta record
    "cirr": ("pairid", "reference", "target"),
    "circo": ("id", "reference_img_id", "target_img_id"),
}


@dataclass(frozen=True)
class QueryGraphs:
    """One query's meta record with the scene graphs of its reference and target."""

    record: Mapping
    reference: dict
    target: dict


def _scenes_meta(split: CIRSplit, meta: Mapping | None) -> Mapping:
    """``meta``, or the split root's ``cirlib_meta.json``, once it is known to hold scene graphs."""
    if split.dataset not in _RECORD_FIELDS:
        raise ValueError(f"scene graphs exist only for CIRR and CIRCO splits of the generated scenes benchmark, "
                         f"got {split!r}")
    meta = scenes.load_meta(split.root) if meta is None else meta
    if meta.get("generator") != scenes.GENERATOR:
        raise ValueError(f"meta was written by {meta.get('generator')!r}, not {scenes.GENERATOR!r}: it holds no "
                         "scene graphs")
    return meta


def _where(split: CIRSplit, i: int) -> str:
    """How errors name query ``i``: its index, pairid (CIRCO: id) and split."""
    return f"query {i} ({_RECORD_FIELDS[split.dataset][0]} {split.queries[i].pair_id}) of {split!r}"


def query_graphs(split: CIRSplit, meta: Mapping | None = None) -> list[QueryGraphs]:
    """Each query's metadata record and scene graphs (``meta``, default: the split root's metadata file),
    matched by pairid / CIRCO id and checked: same reference and target, and a target that meets its own
    constraints. Every analysis that reads the generated scene graphs starts here."""
    meta = _scenes_meta(split, meta)
    key, ref_field, tgt_field = _RECORD_FIELDS[split.dataset]
    records = {r[key]: r for r in meta["queries"].get(split.split, [])}
    attributes = meta["attributes"]
    out = []
    for i, q in enumerate(split.queries):
        record = records.get(q.pair_id)
        where = _where(split, i)
        if record is None or str(record[ref_field]) != q.reference:
            raise ValueError(f"{where} has no record with that {key} and reference {q.reference!r} in "
                             f"meta['queries'][{split.split!r}]")
        target = str(record[tgt_field])
        if q.target is not None and target != q.target:
            raise ValueError(f"{where}: meta field {tgt_field!r} is {target!r} but the split's target is {q.target!r}")
        missing = [name for name in (q.reference, target) if name not in attributes]
        if missing:
            raise ValueError(f"{where}: meta['attributes'] has no scene graph of {missing}")
        graphs = QueryGraphs(record, attributes[q.reference], attributes[target])
        if not satisfies(graphs.target, record["constraints"]):
            raise ValueError(f"{where}: its target {target!r} does not meet its own 'constraints'; the metadata "
                             "does not describe this split")
        out.append(graphs)
    return out


# ------------------------------------------------------------------------------ edit types


@dataclass(frozen=True)
class _Difference:
    """One difference between a reference and a target graph, as a unit that can be applied alone."""

    type: str
    changed: int | None = None  # the object whose attribute fields change (attribute types)
    dropped: tuple[int, ...] = ()  # reference objects it removes
    added: tuple[int, ...] = ()  # target objects it adds


def _matched(ref: dict, tgt: dict) -> dict[int, dict]:
    """Reference object id -> the same object in the target.

    Objects match by id unless both kind and colour differ (no edit changes both: the id names two
    unrelated objects), as in :func:`~cirlib.data.synth.scenes.graph.edited_objects`; then objects left
    over on both sides pair up within a kind, in id order: a bag that went and another bag that came
    read as one bag changed, not as a count that stayed the same.
    """
    t_objs = {o["id"]: o for o in tgt["objects"]}
    matched = {o["id"]: t_objs[o["id"]] for o in ref["objects"]
               if o["id"] in t_objs and (o["kind"] == t_objs[o["id"]]["kind"]
                                         or o["colour"] == t_objs[o["id"]]["colour"])}
    taken = {t["id"] for t in matched.values()}
    for kind in {o["kind"] for o in ref["objects"]}:
        gone = [o for o in ref["objects"] if o["kind"] == kind and o["id"] not in matched]
        came = [o for o in tgt["objects"] if o["kind"] == kind and o["id"] not in taken]
        matched |= {o["id"]: t for o, t in zip(gone, came)}
    return matched


def _differences(ref: dict, tgt: dict) -> list[_Difference]:
    """Every difference of the two graphs. A Fashion-MNIST item swapped for another of the same kind is none:
    no caption can say it; a view change moves objects without counting as their move."""
    matched = _matched(ref, tgt)
    same_view = ref["view"] == tgt["view"]
    diffs = []
    for o in ref["objects"]:
        t = matched.get(o["id"])
        if t is None:
            continue
        for kind, fields in _ATTRIBUTE_TYPES.items():
            moved = kind == "move" and (o["cell"] != t["cell"] or (same_view and (o["x"], o["y"]) != (t["x"], t["y"])))
            if moved or (kind != "move" and o[fields[0]] != t[fields[0]]):
                diffs.append(_Difference(kind, changed=o["id"]))
    dropped = [o for o in ref["objects"] if o["id"] not in matched]
    kept = {t["id"] for t in matched.values()}
    added = [o for o in tgt["objects"] if o["id"] not in kept]
    for kind in sorted({o["kind"] for o in dropped + added}):
        n_ref = sum(o["kind"] == kind for o in ref["objects"])
        n_tgt = sum(o["kind"] == kind for o in tgt["objects"])
        diffs.append(_Difference("add" if n_ref == 0 else "remove" if n_tgt == 0 else "count",
                                 dropped=tuple(o["id"] for o in dropped if o["kind"] == kind),
                                 added=tuple(o["id"] for o in added if o["kind"] == kind)))
    if ref["background"] != tgt["background"]:
        diffs.append(_Difference("background"))
    if not same_view:
        diffs.append(_Difference("view"))
    return diffs


def _apply(ref: dict, tgt: dict, diffs: Sequence[_Difference]) -> dict:
    """The reference graph with only ``diffs`` of the target's differences made."""
    matched = _matched(ref, tgt)
    t_objs = {o["id"]: o for o in tgt["objects"]}
    types = {d.type for d in diffs}
    dropped = {i for d in diffs for i in d.dropped}
    taken: dict[int, set[str]] = {}
    for d in diffs:
        if d.changed is not None:
            taken.setdefault(d.changed, set()).update(_ATTRIBUTE_TYPES[d.type])
    objects = []
    for o in ref["objects"]:
        if o["id"] in dropped:
            continue
        fields = taken.get(o["id"], set())
        t = matched.get(o["id"])
        if "view" in types and t is not None and t["cell"] == o["cell"]:  # seen from the target's view
            fields = fields | {"x", "y"}
        objects.append({**o, **{f: t[f] for f in fields}})
    objects += [t_objs[i] for d in diffs for i in d.added]
    return {**ref, "objects": objects,
            "background": (tgt if "background" in types else ref)["background"],
            "view": (tgt if "view" in types else ref)["view"]}


@dataclass(frozen=True)
class QueryEdit:
    """What one query asks to change, and whether its caption describes the whole target instead.

    ``types`` (in :data:`EDIT_TYPES` order) are the differences between the reference and the target
    graphs that the query's constraints depend on; ``primary`` is the first of them: when a query asks for
    several changes, it is filed under its most local one (an object's attribute before a count change
    before the background or the view), so a per-type table says how a model handles that edit in
    context. ``absolute`` marks a caption that describes the target ("A red bag and a star on a striped
    background"): its types are everything the description pins down that the reference lacks.
    """

    types: tuple[str, ...]
    absolute: bool

    @property
    def primary(self) -> str:
        return self.types[0]


def _edit(graphs: QueryGraphs) -> tuple[str, ...]:
    """The edit types of one query: a difference counts when, alone, it makes true a constraint the
    reference fails, or when the target would fail a constraint without it (an object an absolute caption
    leaves out must go, as the description counts the objects). Differences no constraint sees (shown
    images also differ by incidental changes no relative caption mentions) do not count. The types follow
    the shown graphs: a relative caption written from the clean edit ("on a checked background") gets a
    second type where the shown reference lacks an object the constraints take as shared."""
    ref, tgt, constraints = graphs.reference, graphs.target, graphs.record["constraints"]
    diffs = _differences(ref, tgt)
    failing = [c for c in constraints if not satisfies(ref, [c])]
    asked = {d.type for d in diffs
             if any(satisfies(_apply(ref, tgt, [d]), [c]) for c in failing)
             or not satisfies(_apply(ref, tgt, [x for x in diffs if x is not d]), constraints)}
    return tuple(t for t in EDIT_TYPES if t in asked)


def query_edits(split: CIRSplit, meta: Mapping | None = None) -> list[QueryEdit]:
    """What each query of a CIRR (or CIRCO) split of the ``scenes`` benchmark asks to change, in query order.

    Graphs and constraints come from ``meta`` (default: the split root's ``cirlib_meta.json``), matched by
    pairid (CIRCO: id). ``[e.primary for e in query_edits(split)]`` labels the queries for
    :func:`breakdown`; ``[e.types for e in ...]`` files each query under every type it asks for.
    """
    edits = []
    for i, graphs in enumerate(query_graphs(split, meta)):
        types = _edit(graphs)
        if not types:
            raise ValueError(f"{_where(split, i)}: no difference between its reference and target graphs explains "
                             "its 'constraints' (does the reference already meet them?)")
        edits.append(QueryEdit(types, bool(graphs.record.get("absolute", False))))
    return edits


# ------------------------------------------------------------------------- unsaid differences

UNSAID_GROUPS: tuple[str, str] = ("unsaid attribute kept", "unsaid attribute differs")
"""A FashionIQ-format triplet's captions state two of a garment's three attributes; the third is the
reference's (kept: only the reference image says what it is) or differs too (left out by the annotator:
the reference's look-alikes mislead)."""


def unsaid_differences(splits: CIRSplit | Mapping[str, CIRSplit], meta: Mapping | None = None) -> list[str]:
    """One :data:`UNSAID_GROUPS` label per query of the generated ``fashion`` benchmark's ``splits``,
    in the order :func:`~cirlib.evaluation.protocols.per_query_splits` concatenates them (the
    mapping's order), for :func:`breakdown`.

    Which attribute the captions leave out is read back from them
    (:func:`cirlib.data.synth.fashion.unsaid_attribute`), whether it differs from the rendering
    attributes in ``meta`` (default: the first split root's metadata file).
    """
    group = {"": splits} if isinstance(splits, CIRSplit) else dict(splits)
    wrong = [repr(s) for s in group.values() if s.dataset != "fashioniq" or s.queries and s.queries[0].target is None]
    if wrong:
        raise ValueError(f"unsaid differences need labelled FashionIQ-format splits, got {', '.join(wrong)}")
    if not group:
        return []
    attributes = (fashion.load_meta(next(iter(group.values())).root) if meta is None else meta)["attributes"]
    labels = []
    for split in group.values():
        for i, q in enumerate(split.queries):
            missing = [name for name in (q.reference, q.target) if name not in attributes]
            if missing:
                raise ValueError(f"query {i} of {split!r}: meta['attributes'] has no rendering {missing}")
            ref, tgt = attributes[q.reference], attributes[q.target]
            try:
                unsaid = fashion.unsaid_attribute(q.captions, ref, tgt)
            except ValueError as err:
                raise ValueError(f"query {i} of {split!r}: {err}") from None
            labels.append(UNSAID_GROUPS[ref[unsaid] != tgt[unsaid]])
    return labels


# ------------------------------------------------------------------------------ breakdowns


def _groups(per_query: PerQuery, groups: Sequence[str | Sequence[str]] | None) -> dict[str, np.ndarray]:
    """Group name -> mask of its queries: the splits when ``groups`` is None, else each query's label(s),
    edit types in :data:`EDIT_TYPES` order and CIRCO aspects in the official order before other labels."""
    n = len(per_query.strata)
    if groups is None:
        return {name: per_query.strata == s for s, name in enumerate(per_query.names)}
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group labels for {n} queries: need one label (or tuple of labels) per query")
    return {name: mask.numpy() for name, mask in group_members(groups, (*EDIT_TYPES, *CIRCO_ASPECTS)).items()}


def breakdown(
    results: PerQuery | Mapping[str, PerQuery],
    groups: Sequence[str | Sequence[str]] | None = None,
    metrics: Sequence[str] = ("R@1",),
    seed: int = 0,
) -> pd.DataFrame:
    """``metrics`` per group of queries with their 95 % bootstrap intervals, for one model or several.

    ``groups`` labels each query of ``results`` (e.g. ``[e.primary for e in query_edits(split)]``); a
    tuple of labels puts the query in each of its groups (rows then overlap). None groups by the
    PerQuery's splits, which for FashionIQ are its categories (:meth:`PerQuery.split`). Rows: the groups,
    then ``"all"``, the benchmark number; columns: ``n`` and, per model (name first when ``results`` is
    a mapping) and metric, the estimate and its ``95% low`` / ``95% high``. A group mixing splits
    averages their means, as the benchmark does.
    """
    models = {"": results} if isinstance(results, PerQuery) else dict(results)
    if not models:
        raise ValueError("no results to break down")
    first = next(iter(models.values()))
    for name, result in models.items():
        if not np.array_equal(result.strata, first.strata):
            raise ValueError(f"model {name!r} scores other queries than {next(iter(models))!r}")
    masks = _groups(first, groups) | {"all": np.ones(len(first.strata), dtype=bool)}
    rows = {}
    for group, keep in masks.items():
        row: dict[str, float] = {"n": int(keep.sum())}
        for name, result in models.items():
            part = result.subset(keep)
            for metric in metrics:
                interval = part.interval(metric, seed)
                column = f"{name} {metric}".strip()
                row |= {column: interval.estimate, f"{column} 95% low": interval.low,
                        f"{column} 95% high": interval.high}
        rows[group] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table["n"] = table["n"].astype(int)
    return table


# --------------------------------------------------------------------------- false negatives


@dataclass(frozen=True)
class FalseNegatives:
    """Retrieved images that meet every constraint of their query yet are not one of its labelled targets.

    The benchmark counts them as misses although the caption fits them. Per checked query
    (``query_indices``, aligned with ``ranked``): ``found`` lists them in rank order; ``top1_missed`` says
    the best result is not a labelled target and ``top1_false_negative`` that it nevertheless fits.
    ``share_of_misses`` is the percentage of top-1 misses that fit (None without a miss) and ``r1_gain``
    the points R@1 would gain if fitting images counted, both with 95 % bootstrap intervals over queries.
    """

    query_indices: tuple[int, ...]
    ranked: tuple[tuple[str, ...], ...]
    found: tuple[tuple[str, ...], ...]
    top1_missed: np.ndarray
    top1_false_negative: np.ndarray
    share_of_misses: Interval | None
    r1_gain: Interval

    def examples(self, n: int = 4) -> tuple[list[int], list[tuple[str, ...]]]:
        """Up to ``n`` queries whose top-1 is a false negative, as ``(query indices, rankings)`` for
        :func:`cirlib.viz.plots.retrieval_grid`."""
        rows = np.flatnonzero(self.top1_false_negative)[:n]
        return [self.query_indices[r] for r in rows], [self.ranked[r] for r in rows]


def false_negatives(
    split: CIRSplit,
    ranked: Sequence[Sequence[str]],
    meta: Mapping | None = None,
    query_indices: Sequence[int] | None = None,
    seed: int = 0,
) -> FalseNegatives:
    """Which of each query's retrieved images fit its caption without being labelled (:class:`FalseNegatives`).

    ``ranked[i]`` is the ranking (e.g. :func:`~cirlib.evaluation.analysis.top_k_names`) of query
    ``query_indices[i]`` (default: every query of the split). An image fits when its scene graph meets
    every constraint of the query (:func:`~cirlib.data.synth.scenes.graph.satisfies`); the labelled ones are
    the query's target and ground truths (CIRCO lists every fitting gallery image, so it should have none).
    Graphs come from ``meta`` (default: the split root's ``cirlib_meta.json``).
    """
    indices = list(range(len(split.queries))) if query_indices is None else list(query_indices)
    if len(ranked) != len(indices):
        raise ValueError(f"{len(ranked)} rankings for {len(indices)} queries")
    meta = _scenes_meta(split, meta)
    graphs, attributes = query_graphs(split, meta), meta["attributes"]
    found, missed, fits = [], [], []
    for i, names in zip(indices, ranked):
        if not names:
            raise ValueError(f"{_where(split, i)} has an empty ranking")
        q, constraints = split.queries[i], graphs[i].record["constraints"]
        labelled = set(q.ground_truths) | {q.target}
        unknown = [name for name in names if name not in attributes]
        if unknown:
            raise ValueError(f"{_where(split, i)}: meta['attributes'] has no scene graph of the retrieved "
                             f"{unknown[:3]}")
        found.append(tuple(name for name in names if name not in labelled
                           and satisfies(attributes[name], constraints)))
        missed.append(names[0] not in labelled)
        fits.append(bool(found[-1]) and found[-1][0] == names[0])
    top1_missed, top1_fits = np.array(missed, dtype=bool), np.array(fits, dtype=bool)

    def percent(values: np.ndarray) -> Interval:
        return PerQuery({"v": 100.0 * values}, np.zeros(len(values), dtype=np.int64)).interval("v", seed)

    return FalseNegatives(tuple(indices), tuple(tuple(r) for r in ranked), tuple(found), top1_missed, top1_fits,
                          percent(top1_fits[top1_missed]) if top1_missed.any() else None, percent(top1_fits))


# ------------------------------------------------------------------------------ caption oracle


def caption_oracle(split: CIRSplit, meta: Mapping | None = None, seed: int = 0) -> PerQuery:
    """Per-query metrics of a text-only query that reads its CIRCO-format caption perfectly.

    A CIRCO caption never names the shared concept, which only the reference image shows, so the
    caption alone can at best find the gallery images that meet its own constraints (the query's
    constraints after the first, which is the concept). The oracle ranks those first and every
    other image after them, each group in a random order drawn with ``seed``: the caption gives no
    reason to prefer one image it describes over another. Scored by the split's own protocol
    (reference kept), this is the ceiling of the text-only baseline on the benchmark: far above the
    measured text-only score, the captions say enough and the model does not match them to the images.
    """
    if split.dataset != "circo":
        raise ValueError(f"the caption oracle needs a CIRCO-format split (captions without the shared concept), "
                         f"got {split!r}")
    meta = _scenes_meta(split, meta)
    graphs, attributes = query_graphs(split, meta), meta["attributes"]
    missing = [name for name in split.gallery if name not in attributes]
    if missing:
        raise ValueError(f"meta['attributes'] has no scene graph of {len(missing)} gallery images of {split!r}, "
                         f"e.g. {missing[:3]}")
    gallery = [attributes[name] for name in split.gallery]
    described = torch.zeros(len(split.queries), len(gallery))
    for i, g in enumerate(graphs):
        concept, *caption = g.record["constraints"]
        shared = split.queries[i].shared_concept or g.record.get("shared_concept")
        if not (caption and concept.get("op") == "has" and {"kind", "colour"} <= concept.keys()
                and concept_name(concept) == shared):
            raise ValueError(f"{_where(split, i)}: its first constraint {concept} is not its shared concept "
                             f"{shared!r} followed by the caption's own constraints")
        described[i] = torch.tensor([satisfies(graph, caption) for graph in gallery], dtype=torch.float32)
    order = torch.rand(described.shape, generator=torch.Generator().manual_seed(seed)) * 0.5
    per_query = per_query_score_metrics(split, described + order)
    return PerQuery.from_splits({split.split: {k: v.numpy() for k, v in per_query.items()}})


# ------------------------------------------------------------------------------ look-alikes


FASHION_LOOKS: tuple[str, ...] = ("category", "colour", "pattern", "logo")
"""The rendering attributes of the generated ``fashion`` benchmark that its captions can speak of. Two
renderings that agree on all of them differ only in the garment's shape, which no caption describes."""


def lookalike_recall(
    splits: CIRSplit | Mapping[str, CIRSplit],
    ranked: Tensor | Mapping[str, Tensor],
    ks: Sequence[int] = (10, 50),
    attributes: Sequence[str] = FASHION_LOOKS,
    meta: Mapping | None = None,
) -> PerQuery:
    """Per-query recall of the target and of its look-alikes in a FashionIQ-format ranking.

    A look-alike is a gallery image with the target's ``attributes`` (the target itself included).
    ``ranked[split]`` ``[Q, >= max(ks)]`` holds each query's best gallery indices, best first (a first
    stage's candidates, or those re-ordered by a re-ranker). Metrics, in percent: ``R@k`` (the target in
    the top k, the protocol's recall), ``look-alike R@k`` (any look-alike in the top k: the attributes
    were found), ``ceiling R@k`` (``100 * min(1, k / n)`` for ``n`` look-alikes: the expected recall of a
    ranking that puts every look-alike first in a random order, the best a model reading exactly
    ``attributes`` can do) and ``look-alikes`` (``n`` itself, a count). Attributes come from ``meta``
    (default: the first split root's ``cirlib_meta.json``).
    """
    group = {"": splits} if isinstance(splits, CIRSplit) else dict(splits)
    rankings = {"": ranked} if isinstance(ranked, Tensor) else dict(ranked)
    if set(rankings) != set(group):
        raise ValueError(f"rankings for splits {sorted(rankings)}, but the splits are {sorted(group)}")
    wrong = [repr(s) for s in group.values() if s.dataset != "fashioniq" or s.queries and s.queries[0].target is None]
    if wrong:
        raise ValueError(f"look-alike recall needs labelled FashionIQ-format splits, got {', '.join(wrong)}")
    if not group:
        raise ValueError("no splits to score")
    table = (fashion.load_meta(next(iter(group.values())).root) if meta is None else meta)["attributes"]
    per_split = {}
    for name, split in group.items():
        order = rankings[name]
        if order.ndim != 2 or len(order) != len(split.queries) or order.shape[1] < max(ks):
            raise ValueError(f"{split!r}: ranked must be [{len(split.queries)}, >= {max(ks)}], "
                             f"got {tuple(order.shape)}")
        unknown = [n for n in (*split.gallery, *(q.target for q in split.queries)) if n not in table]
        if unknown:
            raise ValueError(f"{split!r}: meta['attributes'] has no rendering {unknown[:3]}")
        missing = [a for a in attributes if a not in table[split.gallery[0]]]
        if missing:
            raise ValueError(f"renderings have no attribute {missing}; they have {sorted(table[split.gallery[0]])}")
        by_look: dict[tuple, set[int]] = {}  # gallery indices per combination of attributes
        for i, n in enumerate(split.gallery):
            by_look.setdefault(tuple(table[n][a] for a in attributes), set()).add(i)
        index = {n: i for i, n in enumerate(split.gallery)}
        values: dict[str, list[float]] = {m: [] for k in ks for m in (f"R@{k}", f"look-alike R@{k}", f"ceiling R@{k}")}
        values["look-alikes"] = []
        for q, row in zip(split.queries, order.tolist()):
            alike = by_look.get(tuple(table[q.target][a] for a in attributes), set())  # the target too, if shown
            values["look-alikes"].append(float(len(alike)))
            for k in ks:
                top = row[:k]
                values[f"R@{k}"].append(100.0 * (index.get(q.target, -1) in top))
                values[f"look-alike R@{k}"].append(100.0 * any(i in alike for i in top))
                values[f"ceiling R@{k}"].append(100.0 * min(1.0, k / len(alike)) if alike else 0.0)
        per_split[split.split if name == "" else name] = values
    return PerQuery.from_splits(per_split)
