"""The command line search and the Retriever-based submission files, on the real-format fixtures.

A course is set up on the fixtures in their real layouts (tests/real_layout.py) with a random-init
tiny CLIP saved where notebook 02 saves its own, under a temporary project root: nothing is written
to data/.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from PIL import Image
from real_layout import real_layout_roots

from cirlib.core import paths
from cirlib.core.artifacts import pretrained_checkpoint
from cirlib.course import Course, setup_course
from cirlib.models.backbone import save_backbone
from cirlib.search.__main__ import main
from cirlib.search.engine import Retriever
from cirlib.search.submission import submit_method, validate_circo, validate_cirr

CIRR_REFERENCE = "dev-10-0-img0"  # an image of the CIRR fixture's val gallery


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    return real_layout_roots(tmp_path_factory.mktemp("roots"))


@pytest.fixture(scope="module")
def course(roots, vit, tmp_path_factory) -> Course:
    """A quick course on the fixture roots whose "tiny CLIP" is a random-init one, under a scratch project
    root (set for the module's lifetime, so the command line finds the same checkpoint and caches)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(paths.ROOT_ENV, str(tmp_path_factory.mktemp("project")))
        save_backbone(vit, pretrained_checkpoint(True), {"test": "random init"})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fixtures' dead links and blank captions
            course = setup_course(quick=True, **roots)
            for kind in ("val", "test"):
                course.splits(kind)  # loaded (and cached) here, where their warnings are silenced
        yield course


@pytest.fixture
def cli(course, roots, capsys):
    """``main`` on the course's roots (the scratch project root stays set while ``course`` lives): its stdout."""

    def run(*argv: str) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            main([*argv, "--quick", *(f"--{key.replace('_', '-')}={path}" for key, path in roots.items())])
        return capsys.readouterr().out

    return run


def result_rows(out: str) -> list[list[str]]:
    """The printed table's rows after its header: [rank, score, name, file]."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:3] == ["rank", "score", "image"]) + 1
    return [line.split() for line in lines[start:] if line.strip() and not line.startswith("contact sheet")]


def test_cli_prints_the_engines_results(cli, course):
    out = cli("--reference", CIRR_REFERENCE, "--caption", "add a dog", "--benchmark", "cirr", "--k", "3")
    retriever = Retriever.for_method(course, "cirr", "cirr", "zero-shot-sum")
    hits = retriever.search(retriever.gallery_names.index(CIRR_REFERENCE), "add a dog", 3)
    assert result_rows(out) == [[str(rank), f"{h.score:.4f}", h.name, str(h.path)] for rank, h in enumerate(hits, 1)]
    assert CIRR_REFERENCE not in [h.name for h in hits]  # CIRR's protocol leaves the reference out
    assert "zero-shot-sum on cirr/val" in out and 'caption:   "add a dog"' in out
    assert "left out of the results as cirr ranks" in out


def test_cli_contact_sheet_from_an_outside_image(cli, course, roots, tmp_path):
    reference = tmp_path / "my photo.jpg"
    shutil.copy(roots["circo_root"] / "COCO2017_unlabeled" / "unlabeled2017" / "000000000101.jpg", reference)
    sheet = tmp_path / "sheets" / "out.png"
    out = cli("--reference", str(reference), "--caption", "has a cat", "--benchmark", "circo", "--k", "7",
              "--contact-sheet", str(sheet))
    rows = result_rows(out)
    assert [row[0] for row in rows] == [str(i) for i in range(1, 8)]  # the whole 7-image gallery, ranked
    assert [float(row[1]) for row in rows] == sorted((float(row[1]) for row in rows), reverse=True)
    assert f"reference: {reference}\n" in out
    assert f"contact sheet: {sheet}" in out
    with Image.open(sheet) as image:  # reference, caption and two rows of results
        assert image.format == "PNG" and image.width > image.height > 200


@pytest.mark.parametrize("argv, message", [
    (["--reference", "nope.png", "--caption", "add a dog"], "nope.png: image file does not exist"),
    (["--reference", CIRR_REFERENCE, "--caption", "  "], "--caption is empty"),
    (["--reference", CIRR_REFERENCE, "--caption", "add a dog", "--method", "combiner"],
     r"method 'combiner' is not available for cirr \(its trained artifacts are not on disk\); "
     r"available: \['zero-shot-sum'\]"),
    (["--reference", CIRR_REFERENCE, "--caption", "add a dog", "--k", "0"], "--k must be at least 1, got 0"),
    (["--reference", CIRR_REFERENCE, "--caption", "add a dog", "--contact-sheet", "out.jpg"],
     "--contact-sheet out.jpg: contact sheets are PNG files"),
])
def test_cli_bad_inputs_exit_with_a_message(cli, argv, message):
    with pytest.raises(SystemExit, match=f"^cirlib-search: error: {message}"):
        cli(*argv, "--benchmark", "cirr")


def test_cli_refuses_a_file_that_is_not_an_image(cli, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("not a picture")
    with pytest.raises(SystemExit, match=f"{fake}: cannot decode image"):
        cli("--reference", str(fake), "--caption", "add a dog", "--benchmark", "cirr")


def test_cli_unknown_method_lists_the_methods(cli, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli("--reference", CIRR_REFERENCE, "--caption", "add a dog", "--method", "magic")
    assert exit_info.value.code == 2
    assert "invalid choice: 'magic'" in capsys.readouterr().err


@pytest.mark.parametrize("benchmark", ["cirr", "circo"])
def test_submit_method_writes_the_retrievers_ranking(course, tmp_path, benchmark):
    paths_written = submit_method(course, "zero-shot-sum", benchmark, tmp_path)
    retriever = Retriever.for_method(course, benchmark, benchmark, "zero-shot-sum", kind="test")
    split = retriever.split
    top = retriever.search_queries(range(len(split.queries)), 50)
    expected = {str(q.pair_id): [h.name for h in hits] for q, hits in zip(split.queries, top)}
    if benchmark == "cirr":
        assert [p.name for p in paths_written] == ["zero-shot-sum.recall.json", "zero-shot-sum.recall_subset.json"]
        for path in paths_written:
            validate_cirr(path, split)
        recall = json.loads(paths_written[0].read_text())
        assert {k: v for k, v in recall.items() if k not in ("version", "metric")} == expected
    else:
        assert [p.name for p in paths_written] == ["zero-shot-sum.json"]
        validate_circo(paths_written[0], split)
        got = json.loads(paths_written[0].read_text())
        assert got == {k: [int(n) for n in names] for k, names in expected.items()}


def test_submit_method_needs_a_test_server(course, tmp_path):
    with pytest.raises(ValueError, match="'fashioniq' has no test server"):
        submit_method(course, "zero-shot-sum", "fashioniq", tmp_path)
