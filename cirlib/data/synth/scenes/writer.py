"""Writing the ``scenes`` benchmark: CIRR image sets and the CIRCO gallery, in their public layouts."""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from cirlib.core.io import file_sha256, fingerprint, write_json
from cirlib.data import fashion_mnist
from cirlib.data.synth.meta import META_FILE, peek_meta, read_meta, write_meta
from cirlib.data.synth.scenes.captions import Change, describe_change, describe_target, sentence, with_context
from cirlib.data.synth.scenes.config import CIRCO_SPLITS, CIRR_SPLITS, ScenesBenchConfig
from cirlib.data.synth.scenes.drawing import ImageWriter, SceneRenderer
from cirlib.data.synth.scenes.graph import ITEM_KINDS, Scene, is_valid, satisfies
from cirlib.data.synth.scenes.sampler import Sampler, apply_edit

GENERATOR = "cirlib.data.synth.scenes"
VERSION = 5  # 2: official CIRCO aspect spelling; 3: CIRR captions are sentences, concepts unnamed;
# 4: larger objects, CIRR families of look-alike sets and captions naming the target, CIRCO clauses
# around an unnamed shared object (drawing removals more often) and look-alike distractors; 5: CIRR targets
# shown with 2-4 incidental changes and 70 % absolute captions, twice as many CIRCO look-alikes
CIRCO_MAX_ID = 581_929  # COCO 2017 unlabeled ids are at most this large
PARTIAL_MARKER = ".cirlib_partial"  # present while a root is being (re)generated
# CIRCO draws removals twice as often: a CIRCO caption needs an object both images share, which
# leaves few removals sayable, and a removal is what its negation aspect ("has no coats") needs
CIRCO_EDIT_WEIGHTS = {**Sampler.EDIT_WEIGHTS, "remove": 0.3}



# (slice, slices) of the Fashion-MNIST split each part draws items from: CIRR train uses the train
# set; CIRR val, CIRR test1 and CIRCO use disjoint thirds of the test set (no item in two of them).
_POOL_SLICE: dict[str, tuple[int, int]] = {"train": (0, 1), "val": (0, 3), "test1": (1, 3), "circo": (2, 3)}


def _item_pools(labels: np.ndarray, part: int, parts: int) -> dict[str, np.ndarray]:
    """Indices per item kind, restricted to one of ``parts`` disjoint slices of the split."""
    idx = np.arange(len(labels))
    keep = idx % parts == part
    return {kind: idx[keep & (labels == label)] for label, kind in ITEM_KINDS.items()}


def _fmnist_fingerprint() -> dict[str, str]:
    folder = fashion_mnist.ensure_fashion_mnist()
    return {name: file_sha256(folder / name) for name in fashion_mnist.FILES}


def _config_fingerprint(config: ScenesBenchConfig) -> str:
    return fingerprint({"generator": GENERATOR, "version": VERSION, "config": asdict(config),
                        "fashion_mnist": _fmnist_fingerprint()})


def _reset(root: Path, generated: Iterable[str]) -> None:
    """Clear what an earlier run (other config, or interrupted) left, so no stale file survives.

    Only folders this generator wrote are touched: a root that holds other files (say, a real
    CIRR download passed by mistake) is refused rather than emptied.
    """
    marker = root / PARTIAL_MARKER
    meta = peek_meta(root)
    ours = marker.exists() or (meta is not None and meta.get("generator") == GENERATOR)
    if root.is_dir() and any(root.iterdir()) and not ours:
        raise RuntimeError(f"refusing to overwrite {root}: it holds files not written by {GENERATOR}")
    for name in (*generated, META_FILE):
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    root.mkdir(parents=True, exist_ok=True)
    marker.touch()


def _finish(root: Path, meta: dict, writer: ImageWriter) -> None:
    """Write the meta file last (after every image is on disk): it marks the root complete."""
    writer.drain()
    write_meta(root, meta)
    (root / PARTIAL_MARKER).unlink()


def _split_evenly(total: int, parts: int) -> list[int]:
    return [(total * (i + 1)) // parts - (total * i) // parts for i in range(parts)]


def _cirr_family(sampler: Sampler, split: str, wanted: list[int], config: ScenesBenchConfig
                 ) -> list[tuple[list[Scene], list[tuple[int, int, Change]]]] | None:
    """``len(wanted)`` image sets of six drawn from one base scene, with up to ``wanted[k]`` queries in set k.

    Set k's own base is the first base with one incidental change (another item of the same kind,
    a moved or resized object, another background), and its other five members are edits of
    it, each shown with ``config.cirr_shown_changes`` incidental changes of its own that captions never
    mention (they are written from the clean edit). So the gallery holds over a dozen look-alikes of every
    reference, as CIRR's gallery holds many photos like each reference, and the reference image
    alone rarely finds the target. Queries
    go from a set's base to a member or back; each must single out its target among *every* image
    of the family (Recall_subset is well posed, and no look-alike in another set fits the caption).
    """
    first = sampler.scene(split)
    bases = [first] + [sampler.nuisance(first, 1) for _ in wanted[1:]]
    sets: list[list[Scene]] = []
    keys: set[str] = set()
    for base in bases:
        if base.key in keys:
            return None
        members = [base]
        keys.add(base.key)
        for _ in range(40):
            if len(members) == 6:
                break
            out = sampler.mutate(base, config.p_conjunction_cirr)
            if out is not None and out[0].key not in keys:
                members.append(out[0])
                keys.add(out[0].key)
        if len(members) < 6:
            return None
        sets.append(members)
    # what the gallery shows: every member but a set's base with incidental changes that no
    # caption mentions (another item of the same kind, a move, ...), as two photos of a scene differ
    lo, hi = config.cirr_shown_changes
    shown = [[members[0], *(sampler.nuisance(m, int(sampler.rng.integers(lo, hi + 1))) for m in members[1:])]
             for members in sets]
    if len({m.key for members in shown for m in members}) < 6 * len(sets):
        return None
    family = [m.attrs for members in shown for m in members]
    result = []
    for k, members in enumerate(sets):
        clean = [m.attrs for m in members]
        candidates = [(0, i) for i in range(1, 6)] + [(i, 0) for i in range(1, 6)]
        queries = []
        for c in sampler.rng.permutation(len(candidates)):
            if len(queries) == wanted[k]:
                break
            r, t = candidates[int(c)]
            absolute = sampler.rng.random() < config.p_absolute_cirr
            change = (describe_target(family[6 * k + r], family[6 * k + t], sampler.rng) if absolute  # what it shows
                      else describe_change(clean[r], clean[t], sampler.rng))  # the edit, as annotators see it
            if change is not None and not absolute and sampler.rng.random() < config.p_context_cirr:
                change = with_context(change, family[6 * k + t], sampler.rng) or change
            fits = [j for j, a in enumerate(family) if change is not None and satisfies(a, change.constraints)]
            if fits != [6 * k + t]:  # the shown target, and nothing else in the family (its reference neither)
                continue
            queries.append((r, t, change))
        result.append((shown[k], queries))
    return result


def _cirr_image_name(prefix: str, set_id: int, member: int) -> str:
    return f"{prefix}-{set_id}-{member // 2}-img{member % 2}"  # NLVR2-style, like "dev-147-1-img1"


def _write_cirr_set(root: Path, writer: ImageWriter, split: str, set_id: int, members: list[Scene],
                    queries: list[tuple[int, int, Change]], pairid: int, rng: np.random.Generator,
                    name_to_rel: dict[str, str], attributes: dict[str, dict], captions: list[dict],
                    records: list[dict]) -> int:
    """Draw one image set, append its images and queries to the split's lists; return the next pairid."""
    prefix = CIRR_SPLITS[split]
    names = [_cirr_image_name(prefix, set_id, m) for m in range(6)]
    folder = f"./train/{set_id % 100}" if split == "train" else f"./{prefix}"
    for name, scene in zip(names, members):
        rel = f"{folder}/{name}.png"
        writer.write(scene.attrs, root / rel, compress_level=1)
        name_to_rel[name] = rel
        attributes[name] = scene.attrs
    order = [int(i) for i in rng.permutation(6)]
    listed = [names[i] for i in order]
    for r, t, change in queries:
        img_set = {"id": set_id, "members": listed, "reference_rank": order.index(r)}
        entry: dict[str, Any] = {"pairid": pairid, "reference": names[r]}
        if split != "test1":
            entry |= {"target_hard": names[t], "target_soft": {names[t]: 1.0}}
            img_set["target_rank"] = order.index(t)
        entry |= {"caption": sentence(change.caption), "img_set": img_set}
        captions.append(entry)
        records.append({"pairid": pairid, "reference": names[r], "target": names[t],
                        "caption": entry["caption"], "aspects": list(change.aspects),
                        "constraints": list(change.constraints),
                        "shared_concept": change.shared_concept, "absolute": change.absolute,
                        "context": change.context})
        pairid += 1
    return pairid


def _generate_cirr(root: Path, config: ScenesBenchConfig, fp: str, labels: dict[str, np.ndarray],
                   writer: ImageWriter) -> dict[str, Any]:
    _reset(root, ("cirr", *CIRR_SPLITS.values()))
    attributes: dict[str, dict] = {}
    meta_queries: dict[str, list[dict]] = {}
    sizes: dict[str, dict[str, int]] = {}
    pairid = 0
    for s_index, split in enumerate(CIRR_SPLITS):
        fm = "train" if split == "train" else "test"
        pools = _item_pools(labels[fm], *_POOL_SLICE[split])
        sampler = Sampler(np.random.default_rng([config.seed, 1, s_index]), pools, fm, config)
        quotas = _split_evenly(config.cirr_queries[split], config.cirr_sets[split])
        name_to_rel: dict[str, str] = {}
        captions: list[dict] = []
        records: list[dict] = []
        debt = 0
        for first in tqdm(range(0, config.cirr_sets[split], config.cirr_family), desc=f"CIRR {split}", leave=False):
            set_ids = list(range(first, min(first + config.cirr_family, config.cirr_sets[split])))
            wanted = [quotas[i] for i in set_ids]
            wanted[0] += debt
            family = None
            while family is None:
                family = _cirr_family(sampler, split, wanted, config)
            debt = sum(wanted) - sum(len(q) for _, q in family)
            for set_id, (members, queries) in zip(set_ids, family):
                pairid = _write_cirr_set(root, writer, split, set_id, members, queries, pairid, sampler.rng,
                                         name_to_rel, attributes, captions, records)
        write_json(root / "cirr" / "captions" / f"cap.rc2.{split}.json", captions)
        write_json(root / "cirr" / "image_splits" / f"split.rc2.{split}.json", name_to_rel)
        meta_queries[split] = records
        sizes[split] = {"sets": config.cirr_sets[split], "queries": len(captions), "images": len(name_to_rel)}
    meta = {"generator": GENERATOR, "version": VERSION, "seed": config.seed, "sizes": sizes, "fingerprint": fp,
            "config": asdict(config), "attributes": attributes, "queries": meta_queries}
    _finish(root, meta, writer)
    return meta


def _ground_truths(gallery: list[dict], constraints: Sequence[dict], by_kind: dict[str, set[int]]) -> list[int]:
    """Indices of every gallery scene satisfying the constraints (pre-filtered by required kinds)."""
    need = [by_kind.get(c["kind"], set()) for c in constraints if c["op"] == "has" and c["min"] >= 1]
    candidates = set.intersection(*need) if need else set(range(len(gallery)))
    return sorted(i for i in candidates if satisfies(gallery[i], constraints))


def _generate_circo(root: Path, config: ScenesBenchConfig, fp: str, labels: dict[str, np.ndarray],
                    writer: ImageWriter) -> dict[str, Any]:
    _reset(root, ("annotations", "COCO2017_unlabeled"))
    sampler = Sampler(np.random.default_rng([config.seed, 2]), _item_pools(labels["test"], *_POOL_SLICE["circo"]),
                       "test", config, CIRCO_EDIT_WEIGHTS)
    scenes: list[Scene] = []
    keys: set[str] = set()

    def keep(scene: Scene) -> int | None:
        if scene.key in keys:
            return None
        keys.add(scene.key)
        scenes.append(scene)
        return len(scenes) - 1

    groups: list[tuple[str, int, int, Change]] = []
    for split in CIRCO_SPLITS:
        for _ in tqdm(range(config.circo_queries[split]), desc=f"CIRCO {split} queries", leave=False):
            while True:  # reference and target must be pictures not already in the gallery
                ref = sampler.scene(split)
                out = sampler.mutate(ref, config.p_conjunction_circo, style="circo")
                if out is None:
                    continue
                edited, edits, change = out
                # the target is another photo of the shared concept, not the reference's twin: three
                # incidental changes (other objects, places, background) that keep it a ground truth
                tgt = next((t for t in (sampler.nuisance(edited, 3) for _ in range(10))
                            if satisfies(t.attrs, change.constraints)), edited)
                if ref.key not in keys and tgt.key not in keys and ref.key != tgt.key:
                    break
            r_idx, t_idx = keep(ref), keep(tgt)
            groups.append((split, r_idx, t_idx, change))
            lo, hi = config.circo_extra_positives
            for _ in range(int(sampler.rng.integers(lo, hi + 1))):  # more true positives
                for _ in range(10):
                    cand = sampler.nuisance(tgt, 2)
                    if satisfies(cand.attrs, change.constraints) and keep(cand) is not None:
                        break
            near = [apply_edit(ref, e) for e in edits] if len(edits) > 1 else []  # half of a conjunction
            lo, hi = config.circo_near_misses
            for _ in range(int(sampler.rng.integers(lo, hi + 1))):  # the reference's look-alikes
                kind = sampler.rng.random()  # another edit, or one or several incidental changes
                other = sampler.mutate(ref, config.p_conjunction_circo) if kind < 0.3 else None
                near.append(other[0] if other is not None else sampler.nuisance(ref, 1 if kind < 0.8 else None))
            for cand in near:
                if cand is not None and is_valid(cand):
                    keep(cand)
    while len(scenes) < config.circo_gallery:  # unrelated scenes: easy negatives
        keep(sampler.scene("distractor"))

    ids = sorted(int(i) + 1 for i in sampler.rng.choice(CIRCO_MAX_ID, len(scenes), replace=False))
    ids = [ids[int(i)] for i in sampler.rng.permutation(len(ids))]  # no link between id order and groups
    gallery = [s.attrs for s in scenes]
    by_kind: dict[str, set[int]] = {}
    for i, a in enumerate(gallery):
        for o in a["objects"]:
            by_kind.setdefault(o["kind"], set()).add(i)

    image_dir = root / "COCO2017_unlabeled" / "unlabeled2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    info = []
    for img_id, attrs in tqdm(sorted(zip(ids, gallery), key=lambda p: p[0]), desc="CIRCO images", leave=False):
        file_name = f"{img_id:012d}.jpg"
        writer.write(attrs, image_dir / file_name, quality=92)
        info.append({"id": img_id, "file_name": file_name, "width": attrs["width"], "height": attrs["height"]})
    write_json(root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json",
               {"info": {"description": "cirlib scenes benchmark in the COCO 2017 unlabeled layout"}, "images": info},
               indent=None)

    meta_queries: dict[str, list[dict]] = {s: [] for s in CIRCO_SPLITS}
    annotations: dict[str, list[dict]] = {s: [] for s in CIRCO_SPLITS}
    for split, r_idx, t_idx, change in groups:
        qid = len(annotations[split])
        gts = _ground_truths(gallery, change.constraints, by_kind)
        gt_ids = [ids[t_idx]] + sorted(ids[i] for i in gts if i != t_idx)
        entry: dict[str, Any] = {"id": qid, "reference_img_id": ids[r_idx]}
        if split == "val":
            entry["target_img_id"] = ids[t_idx]
        entry |= {"relative_caption": change.caption, "shared_concept": change.shared_concept}
        if split == "val":
            entry |= {"gt_img_ids": gt_ids, "semantic_aspects": list(change.aspects)}
        annotations[split].append(entry)
        meta_queries[split].append({"id": qid, "reference_img_id": ids[r_idx], "target_img_id": ids[t_idx],
                                    "caption": change.caption, "aspects": list(change.aspects),
                                    "constraints": list(change.constraints), "shared_concept": change.shared_concept,
                                    "gt_img_ids": gt_ids})
    for split in CIRCO_SPLITS:
        write_json(root / "annotations" / f"{split}.json", annotations[split])
    sizes = {s: {"queries": len(annotations[s]),
                 "mean_ground_truths": round(float(np.mean([len(q["gt_img_ids"]) for q in meta_queries[s]] or [0])), 2)}
             for s in CIRCO_SPLITS}
    sizes["gallery"] = {"images": len(scenes)}
    meta = {"generator": GENERATOR, "version": VERSION, "seed": config.seed, "sizes": sizes, "fingerprint": fp,
            "config": asdict(config), "attributes": {str(i): a for i, a in zip(ids, gallery)}, "queries": meta_queries}
    _finish(root, meta, writer)
    return meta


def generate_scenes(root: str | Path, config: ScenesBenchConfig | None = None) -> Path:
    """Write ``root/CIRR`` and ``root/CIRCO`` (skipped when their fingerprints already match); return root.

    Each root's ``cirlib_meta.json`` holds the scene graph of every image under ``attributes``
    (keyed by CIRR name / CIRCO id as str; ``split`` is the CIRR split, or for CIRCO the query
    split an image was made for, or ``distractor``) and every query's caption, aspects and
    constraints under ``queries`` (CIRCO test ground truths included, for offline analyses).
    """
    config = config or ScenesBenchConfig()
    root = Path(root)
    fp = _config_fingerprint(config)
    todo = [name for name in ("CIRR", "CIRCO") if (peek_meta(root / name) or {}).get("fingerprint") != fp]
    if not todo:
        return root
    images, labels = {}, {}
    for split in ("train", "test"):
        images[split], labels[split] = fashion_mnist.load_split(split)
    with ImageWriter(SceneRenderer(images)) as writer:
        if "CIRR" in todo:
            _generate_cirr(root / "CIRR", config, fp, labels, writer)
        if "CIRCO" in todo:
            _generate_circo(root / "CIRCO", config, fp, labels, writer)
    return root



def load_meta(root: str | Path) -> dict[str, Any]:
    """The ``cirlib_meta.json`` of a CIRR or CIRCO root written by :func:`generate_scenes`."""
    return read_meta(root, {GENERATOR})
