"""Loaders for FashionIQ, CIRR and CIRCO in their public on-disk layouts.

Every notebook handles the three benchmarks through one record type (:class:`Query` inside a
:class:`CIRSplit`), whether a root is an embedded benchmark generated under ``data/`` or a real
dataset the user downloaded. Paths and field names are those of the official releases
as read by the CLIP4Cir and SEARLE code:

FashionIQ ``<root>/``
    ``captions/cap.<category>.<split>.json``: ``[{"candidate", "target", "captions": [c1, c2]}]``
    (``test``: no ``"target"``); ``image_splits/split.<category>.<split>.json``: ``[name, ...]``;
    ``images/<name>.jpg`` (the real release; ``<name>.png`` is accepted too).
CIRR ``<root>/``
    ``cirr/captions/cap.rc2.<split>.json``: ``[{"pairid", "reference", "target_hard",
    "target_soft", "caption", "img_set": {"id", "members", "reference_rank", "target_rank"}}]``
    (``test1``: no ``target_*``); ``cirr/image_splits/split.rc2.<split>.json``:
    ``{name: "./dev/<name>.png"}`` with paths relative to ``<root>``.
CIRCO ``<root>/``
    ``annotations/<split>.json``: ``[{"id", "reference_img_id", "target_img_id",
    "relative_caption", "shared_concept", "gt_img_ids", "semantic_aspects"}]`` (``test``: only
    ``id``, ``reference_img_id``, ``relative_caption``, ``shared_concept``);
    ``COCO2017_unlabeled/annotations/image_info_unlabeled2017.json`` (the gallery:
    ``{"images": [{"id", "file_name"}, ...]}``) and ``COCO2017_unlabeled/unlabeled2017/<file_name>``.

Real releases are not clean: FashionIQ has thousands of dead image links, so missing image files
are counted and skipped with one warning per split (never an error); a few captions are empty
(16 in FashionIQ, one in CIRR test1), so those queries are kept, as in the official evaluation,
with one warning. FashionIQ triplets without exactly two captions are kept with one warning too.
Malformed annotations (not UTF-8, not JSON, missing or mistyped fields) raise
:class:`AnnotationError` naming file, entry and field. Names of image files that are directories,
dangling links or other non-regular files count as missing: decoding them would fail or block.
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cirlib.core.digests import sized_digests
from cirlib.core.io import fingerprint

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
FASHIONIQ_SPLITS = ("train", "val", "test")
CIRR_SPLITS = ("train", "val", "test1")
CIRCO_SPLITS = ("val", "test")
# The semantic aspects a CIRCO query is tagged with (``semantic_aspects``), in the spelling and order
# of the official CIRCO annotations and evaluation script (iSEARLE Table I).
CIRCO_ASPECTS = (
    "cardinality",
    "addition",
    "negation",
    "direct_addressing",
    "compare_change",
    "comparative_statement",
    "statement_with_conjunction",
    "spatial_relations_background",
    "viewpoint",
)
FASHIONIQ_N_CAPTIONS = 2  # relative captions per triplet in the real release

# The widest aspect ratio (long side / short side) an image may have. Padding pipelines grow with
# the square of the long side (a 20000x1 PNG of a few hundred bytes needs gigabytes), and no
# photograph of the benchmarks comes near it.
MAX_ASPECT_RATIO = 50.0

FASHIONIQ_LAYOUT = (
    "a FashionIQ root holds captions/cap.<category>.<split>.json, "
    "image_splits/split.<category>.<split>.json and images/<name>.jpg"
)
CIRR_LAYOUT = (
    "a CIRR root holds cirr/captions/cap.rc2.<split>.json, cirr/image_splits/split.rc2.<split>.json "
    "and the image folders train/<k>/, dev/, test1/ they point to"
)
CIRCO_LAYOUT = (
    "a CIRCO root holds annotations/<split>.json, "
    "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json and COCO2017_unlabeled/unlabeled2017/*.jpg"
)


class AnnotationError(ValueError):
    """An annotation file is not valid JSON or an entry lacks a field / has the wrong type."""


class ImageLoadError(OSError):
    """An image file is missing, corrupt, not an image, or too large to decode safely."""


class MissingImagesWarning(UserWarning):
    """Some referenced image files are absent; they (and the queries needing them) were skipped."""


class EmptyCaptionWarning(UserWarning):
    """Some queries have an empty caption; they were kept, as the official evaluations do."""


class CaptionCountWarning(UserWarning):
    """Some FashionIQ triplets do not have exactly two captions; they were kept as written."""


@dataclass(frozen=True)
class Query:
    """One CIR query, whatever the dataset."""

    reference: str  # image name (CIRCO ids as str(int))
    captions: tuple[str, ...]  # FashionIQ: 2 relative captions as written; CIRR/CIRCO: 1
    target: str | None = None  # None on test splits
    ground_truths: tuple[str, ...] = ()  # every valid target: CIRCO gt_img_ids; else (target,) or ()
    group: tuple[str, ...] = ()  # CIRR img_set members that exist on disk (Recall_subset)
    pair_id: int | None = None  # CIRR pairid / CIRCO id
    shared_concept: str | None = None  # CIRCO
    semantic_aspects: tuple[str, ...] = ()  # CIRCO val (snake_case in the real release)
    category: str | None = None  # FashionIQ dress type
    # CIRCO: how many ground truths were annotated, images missing on disk included. The official
    # mAP@K divides by min(K, this), so a dead link costs the query instead of silently helping it.
    n_ground_truths: int | None = None


@dataclass(repr=False)
class CIRSplit:
    """The queries and gallery of one split, restricted to images that exist on disk."""

    dataset: str  # "fashioniq" | "cirr" | "circo"
    split: str
    root: Path
    queries: list[Query]
    gallery: list[str]  # names of the split's gallery images that exist on disk, file order
    image_paths: dict[str, Path]  # name -> file, for every gallery and query image that exists
    n_missing: int  # distinct image files referenced but absent (counted + warned)

    def __repr__(self) -> str:  # the default repr would print every query in a notebook cell
        return (
            f"CIRSplit({self.dataset}/{self.split}: {len(self.queries)} queries, "
            f"{len(self.gallery)} gallery images, {self.n_missing} missing, root={str(self.root)!r})"
        )

    def images_digest(self) -> str:
        """Fingerprint of the split's images (names and bytes), not of where they lie: a checkpoint trained on
        them stays valid when the project or the dataset moves, and goes stale when an image changes."""
        names, paths = zip(*sorted(self.image_paths.items())) if self.image_paths else ((), ())
        return fingerprint([(name, digest) for name, (_, digest) in zip(names, sized_digests(paths))])


# ----------------------------------------------------------------------------------- public API


def load_fashioniq(root: str | os.PathLike, category: str, split: str) -> CIRSplit:
    """Read one FashionIQ category/split: 2 captions per triplet, gallery = the split file."""
    _check_choice("FashionIQ category", category, FASHIONIQ_CATEGORIES)
    _check_choice("FashionIQ split", split, FASHIONIQ_SPLITS)
    root = _check_root(root, FASHIONIQ_LAYOUT)
    cap_path = root / "captions" / f"cap.{category}.{split}.json"
    split_path = root / "image_splits" / f"split.{category}.{split}.json"
    entries = _read_list(cap_path, FASHIONIQ_LAYOUT)
    gallery = _read_list(split_path, FASHIONIQ_LAYOUT)
    for i, name in enumerate(gallery):
        _expect(name, "str", f"{split_path}[{i}]")

    queries, empty, odd_count = [], [], []
    for i, entry in enumerate(entries):
        where = f"{cap_path}[{i}]"
        _expect(entry, "object", where)
        captions = _field(entry, "captions", "str list", where)
        if not all(c.strip() for c in captions):
            empty.append(f"{where} field 'captions'")
        if len(captions) != FASHIONIQ_N_CAPTIONS:
            odd_count.append(f"{where} field 'captions' has {len(captions)}")
        target = _field(entry, "target", "str", where, optional=split == "test")
        queries.append(
            Query(
                reference=_field(entry, "candidate", "str", where),
                captions=tuple(captions),
                target=target,
                ground_truths=(target,) if target is not None else (),
                category=category,
            )
        )
    _warn_empty(empty, cap_path)
    if odd_count:
        n = len(odd_count)
        warnings.warn(
            f"{n} {'triplet does' if n == 1 else 'triplets do'} not have {FASHIONIQ_N_CAPTIONS} captions in "
            f"{cap_path} (e.g. {odd_count[0]}); kept, with their captions as written",
            CaptionCountWarning,
            stacklevel=2,
        )

    images = root / "images"
    listing = _DirListing()

    def locate(name: str) -> tuple[Path | None, str]:  # (existing file, else where it was expected)
        for ext in _FIQ_EXTS:
            if listing.has(images, f"{name}{ext}"):
                return images / f"{name}{ext}", ""
        return None, str(images / f"{name}{_FIQ_EXTS[0]}")

    return _assemble("fashioniq", split, root, queries, gallery, locate)


def load_cirr(root: str | os.PathLike, split: str) -> CIRSplit:
    """Read one CIRR split: group = img_set members, ground_truths = (target_hard,)."""
    _check_choice("CIRR split", split, CIRR_SPLITS, hint=" (CIRR's test split is called 'test1')")
    root = _check_root(root, CIRR_LAYOUT)
    cap_path = root / "cirr" / "captions" / f"cap.rc2.{split}.json"
    split_path = root / "cirr" / "image_splits" / f"split.rc2.{split}.json"
    entries = _read_list(cap_path, CIRR_LAYOUT)
    name_to_rel = _read_json(split_path, CIRR_LAYOUT)
    _expect(name_to_rel, "object", str(split_path))
    for name, rel in name_to_rel.items():
        _expect(rel, "str", f"{split_path}[{name!r}]")

    queries, empty = [], []
    for i, entry in enumerate(entries):
        where = f"{cap_path}[{i}]"
        _expect(entry, "object", where)
        caption = _field(entry, "caption", "str", where)
        if not caption.strip():
            empty.append(f"{where} field 'caption'")
        img_set = _field(entry, "img_set", "object", where)
        members = _field(img_set, "members", "str list", f"{where}.img_set")
        target = _field(entry, "target_hard", "str", where, optional=split == "test1")
        queries.append(
            Query(
                reference=_field(entry, "reference", "str", where),
                captions=(caption,),
                target=target,
                ground_truths=(target,) if target is not None else (),
                group=tuple(members),
                pair_id=_field(entry, "pairid", "int", where),
            )
        )
    _warn_empty(empty, cap_path)

    listing = _DirListing()

    def locate(name: str) -> tuple[Path | None, str]:
        rel = name_to_rel.get(name)
        if rel is None:
            return None, f"{name} (not listed in {split_path})"
        path = root / rel
        return (path if listing.has(path.parent, path.name) else None), str(path)

    return _assemble("cirr", split, root, queries, list(name_to_rel), locate)


def load_circo(root: str | os.PathLike, split: str) -> CIRSplit:
    """Read one CIRCO split: ids as str, ground_truths = gt_img_ids, gallery = all COCO unlabeled."""
    _check_choice("CIRCO split", split, CIRCO_SPLITS)
    root = _check_root(root, CIRCO_LAYOUT)
    ann_path = root / "annotations" / f"{split}.json"
    info_path = root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
    entries = _read_list(ann_path, CIRCO_LAYOUT)
    info = _read_json(info_path, CIRCO_LAYOUT)
    _expect(info, "object", str(info_path))
    images = _field(info, "images", "list", str(info_path))
    id_to_file: dict[str, str] = {}
    for i, img in enumerate(images):
        where = f"{info_path}[images][{i}]"
        _expect(img, "object", where)
        id_to_file[str(_field(img, "id", "int", where))] = _field(img, "file_name", "str", where)

    queries, empty = [], []
    for i, entry in enumerate(entries):
        where = f"{ann_path}[{i}]"
        _expect(entry, "object", where)
        caption = _field(entry, "relative_caption", "str", where)
        if not caption.strip():
            empty.append(f"{where} field 'relative_caption'")
        target = _field(entry, "target_img_id", "int", where, optional=split == "test")
        gts = _field(entry, "gt_img_ids", "int list", where, optional=target is None)
        if target is not None and target not in gts:
            raise AnnotationError(f"{where}: field 'gt_img_ids' does not contain target_img_id {target}")
        aspects = _field(entry, "semantic_aspects", "list", where, optional=True) or []
        for j, aspect in enumerate(aspects):
            _expect(aspect, "str", f"{where}.semantic_aspects[{j}]")
        queries.append(
            Query(
                reference=str(_field(entry, "reference_img_id", "int", where)),
                captions=(caption,),
                target=str(target) if target is not None else None,
                ground_truths=tuple(str(g) for g in gts or ()),
                n_ground_truths=len(set(gts)) if gts else None,
                pair_id=_field(entry, "id", "int", where),
                shared_concept=_field(entry, "shared_concept", "str", where),
                semantic_aspects=tuple(aspects),
            )
        )
    _warn_empty(empty, ann_path)

    image_dir = root / "COCO2017_unlabeled" / "unlabeled2017"
    listing = _DirListing()

    def locate(name: str) -> tuple[Path | None, str]:
        file_name = id_to_file.get(name)
        if file_name is None:
            return None, f"image id {name} (not listed in {info_path})"
        if listing.has(image_dir, file_name):
            return image_dir / file_name, ""
        return None, str(image_dir / file_name)

    return _assemble("circo", split, root, queries, list(id_to_file), locate)


def query_text(query: Query, rng: np.random.Generator | None = None) -> str:
    """The text half of a query as the model sees it.

    CIRR/CIRCO: the caption as written. FashionIQ (CLIP4Cir convention): each caption stripped of
    surrounding ``. ? ,`` and spaces, empty ones skipped, joined as ``"C1 and c2"`` with the first
    letter upper-cased (only that letter; CLIP4Cir's ``str.capitalize`` also lower-cases the rest,
    which open_clip's tokenizer does anyway). With ``rng`` (CLIP4Cir's training augmentation) one
    of four equally likely variants: both captions in either order, or either caption alone.
    """
    if query.category is None and len(query.captions) == 1:
        return query.captions[0]
    parts = [p for p in (c.strip(_FIQ_STRIP) for c in query.captions) if p]
    if rng is not None and len(parts) > 1:
        order = rng.permutation(len(parts))
        keep = len(parts) if rng.random() < 0.5 else 1
        parts = [parts[i] for i in order[:keep]]
    if not parts:
        return ""
    return " and ".join([parts[0][:1].upper() + parts[0][1:], *parts[1:]])


def open_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image fully into RGB, or raise :class:`ImageLoadError` naming the file.

    Transparent images (RGBA, LA, palette with transparency) are composited on white, the
    background of product photos, instead of PIL's default black; 16-bit greyscale is rescaled
    instead of clipped; 32-bit float images, which have no agreed range, are refused. Images of
    more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels or with an aspect ratio beyond
    :data:`MAX_ASPECT_RATIO` are refused before decoding (decompression bombs); the error says how
    to allow the former. Directories, FIFOs and other non-regular files are refused unopened.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode  # follows links: a dangling one is FileNotFoundError
        if not stat.S_ISREG(mode):
            raise ImageLoadError(f"{path}: not a regular file ({_file_kind(mode)}), cannot be an image")
        with warnings.catch_warnings():  # PIL warns between 1x and 2x its limit; check_image_size refuses
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        rgb = None
        try:
            check_image_size(im.size, str(path))
            im.load()  # decodes, and closes the file of a single-frame image
            rgb = to_rgb(im)  # an RGB image itself: no copy (a third of the decode time)
            if rgb is im and getattr(im, "is_animated", False):
                rgb = im.copy()  # a multi-frame file stays open until closed below
            return rgb
        finally:
            if rgb is not im:
                im.close()
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageLoadError(
            f"{path}: refusing to decode a suspiciously large image ({err}); if you trust the file, "
            "raise PIL.Image.MAX_IMAGE_PIXELS before loading it"
        ) from err
    except FileNotFoundError as err:
        raise ImageLoadError(f"{path}: image file does not exist") from err
    except (OSError, SyntaxError, ValueError) as err:  # PIL.UnidentifiedImageError is an OSError
        raise ImageLoadError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from err


def check_image_size(size: tuple[int, int], where: str) -> None:
    """Refuse an image size that would exhaust memory: the pixel limit, then the aspect-ratio limit.

    Raises :class:`ImageLoadError` naming ``where`` (a file, or a description of the image).
    ``PIL.Image.MAX_IMAGE_PIXELS = None`` lifts the pixel limit, as it does PIL's own guard.
    """
    w, h = size
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and w * h > limit:
        raise ImageLoadError(
            f"{where}: refusing to decode a {w}x{h} image ({w * h} pixels, more than "
            f"PIL.Image.MAX_IMAGE_PIXELS = {limit}); if you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS "
            "before loading it"
        )
    if min(w, h) < 1 or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise ImageLoadError(
            f"{where}: refusing a {w}x{h} image, its aspect ratio is beyond "
            f"cirlib.data.datasets.MAX_ASPECT_RATIO = {MAX_ASPECT_RATIO:g}:1 (padding it would take "
            "memory growing with the square of its long side)"
        )


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


# ------------------------------------------------------------------------------------- internals

_FIQ_STRIP = ".?, "  # what CLIP4Cir strips from both ends of each FashionIQ caption
_FIQ_EXTS = (".jpg", ".png")  # real release, embedded benchmark

_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "str": ("a string", lambda v: isinstance(v, str)),
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "object": ("a JSON object", lambda v: isinstance(v, dict)),
    "list": ("a list", lambda v: isinstance(v, list)),
    "str list": (
        "a non-empty list of strings",
        lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v),
    ),
    "int list": (
        "a non-empty list of integers",
        lambda v: isinstance(v, list)
        and bool(v)
        and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
    ),
}


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _expect(value: Any, kind: str, what: str) -> Any:
    desc, ok = _KINDS[kind]
    if not ok(value):
        raise AnnotationError(f"{what}: expected {desc}, got {_type_name(value)} {value!r:.60}")
    return value


def _field(entry: dict, key: str, kind: str, where: str, optional: bool = False) -> Any:
    """``entry[key]`` checked against ``kind``; errors name the entry and the field."""
    if key not in entry:
        if optional:
            return None
        raise AnnotationError(f"{where}: missing field {key!r}")
    return _expect(entry[key], kind, f"{where}: field {key!r}")


def _check_choice(what: str, value: str, valid: tuple[str, ...], hint: str = "") -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}{hint}")


def _check_root(root: str | os.PathLike, layout: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a directory; {layout}")
    return root


def _read_json(path: Path, layout: str) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file {path} does not exist; {layout}") from None
    except OSError as err:  # a directory, unreadable, ...
        raise AnnotationError(f"{path}: cannot read annotation file ({type(err).__name__}: {err})") from err
    text = decode_utf8(raw, path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise AnnotationError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from err


def decode_utf8(raw: bytes, path: Path) -> str:
    """JSON annotation bytes -> text, or :class:`AnnotationError` naming the file and the offending byte.

    The official releases are UTF-8; a file re-saved as UTF-16 or latin-1 would otherwise fail
    with a bare ``UnicodeDecodeError`` naming no file.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(raw) > 1 and (raw[0] == 0 or raw[1] == 0)):
            guess = " (it looks like UTF-16)"
        else:
            guess = " (latin-1 or another 8-bit encoding?)"
        raise AnnotationError(
            f"{path}: not UTF-8 text{guess}: byte 0x{raw[err.start]:02x} at offset {err.start} "
            f"({err.reason}); annotation files must be UTF-8"
        ) from err


def _read_list(path: Path, layout: str) -> list:
    return _expect(_read_json(path, layout), "list", str(path))


def _warn_empty(empty: list[str], path: Path) -> None:
    if empty:
        n = len(empty)
        warnings.warn(
            f"{n} {'query has' if n == 1 else 'queries have'} an empty caption in {path} "
            f"(e.g. {empty[0]}); kept, as the official evaluations do",
            EmptyCaptionWarning,
            stacklevel=3,
        )


_WHITE = (255, 255, 255, 255)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB as :func:`open_image` documents; an RGB image is returned itself, uncopied."""
    if im.mode == "F":  # 32-bit float (TIFF): convert("RGB") would clip its values to 0/1, i.e. black
        raise ValueError(
            "32-bit float image (mode F): its value range is not defined, so it has no 8-bit RGB "
            "equivalent; convert it to an 8- or 16-bit image first"
        )
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit greyscale PNGs
        grey = np.clip(np.asarray(im, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


class _DirListing:
    """Existence checks through one directory listing per folder.

    Real roots hold 10^4-10^5 images, often on network storage, where one ``stat`` per file
    is slow; a listing per folder answers every check of a split at once. Only regular files
    count (links followed): a directory, dangling link or FIFO named like an image is missing,
    since decoding it would fail, or block forever on the FIFO. The listing's file types make
    that free for plain files; links cost one ``stat`` each.
    """

    def __init__(self) -> None:
        self._names: dict[str, frozenset[str]] = {}  # str keys: hashing Paths is slow at 10^5 calls

    def has(self, folder: Path, name: str) -> bool:
        key = str(folder)
        if key not in self._names:
            try:
                with os.scandir(key) as it:
                    self._names[key] = frozenset(e.name for e in it if _is_regular(e))
            except (FileNotFoundError, NotADirectoryError):
                self._names[key] = frozenset()
        return name in self._names[key]


def _is_regular(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()  # follows links; False for directories, FIFOs, dangling links
    except OSError:
        return False


def _assemble(
    dataset: str,
    split: str,
    root: Path,
    queries: list[Query],
    gallery: list[str],
    locate: Callable[[str], tuple[Path | None, str]],
) -> CIRSplit:
    """Keep what exists on disk; count, drop and report (once) what does not."""
    found: dict[str, Path] = {}
    missing: dict[str, str] = {}

    def exists(name: str) -> bool:
        if name not in found and name not in missing:
            path, expected = locate(name)
            if path is None:
                missing[name] = expected
            else:
                found[name] = path
        return name in found

    kept_gallery = [name for name in dict.fromkeys(gallery) if exists(name)]
    kept: list[Query] = []
    n_gt_dropped = 0
    for q in queries:  # check every referenced name (no short-circuit) so n_missing is complete
        reference_ok = exists(q.reference)
        target_ok = q.target is None or exists(q.target)
        group = tuple(m for m in q.group if exists(m))
        gts = tuple(g for g in q.ground_truths if exists(g))
        if not (reference_ok and target_ok):
            continue
        n_gt_dropped += len(q.ground_truths) - len(gts)
        if (group, gts) != (q.group, q.ground_truths):
            q = replace(q, group=group, ground_truths=gts)
        kept.append(q)

    if missing:
        n_ref = len(found) + len(missing)
        example = next(iter(missing.values()))
        msg = (
            f"{dataset} {split}: {len(missing)} of {n_ref} referenced images are missing "
            f"(e.g. {example}); skipped them, with the {len(queries) - len(kept)} of "
            f"{len(queries)} queries whose reference or target image is missing"
        )
        if n_gt_dropped:
            msg += f", and removed {n_gt_dropped} missing ids from ground truths"
        if not found:
            msg += f". No image was found at all: is {root} the dataset root?"
        warnings.warn(msg, MissingImagesWarning, stacklevel=3)

    return CIRSplit(dataset, split, root, kept, kept_gallery, found, len(missing))
