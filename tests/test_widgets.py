"""The widgets' callbacks, driven as a browser would drive them (widget values, button clicks,
uploads) but without one, and the multi-turn session logic they share with notebook 09."""

from __future__ import annotations

import io
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_engine import _finished, course  # noqa: F401 - the course fixture (a project root of its own)

from cirlib.core import artifacts
from cirlib.models.backbone import save_backbone
from cirlib.models.combiner import combine_sum
from cirlib.models.phi import Phi
from cirlib.search.engine import CombineScorer, Retriever
from cirlib.search.session import (
    Session,
    SimulatedUser,
    attribute_describer,
    fixed_describer,
    simulate,
    target_ranks,
)
from cirlib.viz.widgets import MultiTurnSearch, RetrievalExplorer, history_figure

GREEN_FRAME = "4px solid #2ca02c"


@pytest.fixture
def retriever(fixture_splits, vit, tmp_path) -> Retriever:
    return Retriever(fixture_splits["cirr"], vit, CombineScorer(combine_sum), cache_dir=tmp_path)


def _shown(search: MultiTurnSearch) -> int:
    return sum(card.layout.display != "none" for card, _, _ in search.cards)


def _button(search: MultiTurnSearch, position: int, css: str):
    card = search.cards[position][0]
    return next(c for c in card.children if css in c._dom_classes)


# --------------------------------------------------------------------------------------------
# Multi-turn search
# --------------------------------------------------------------------------------------------


def test_multiturn_widget_turns(retriever, tmp_path, close_figures) -> None:
    search = MultiTurnSearch(retriever, k=4, start=2, figdir=tmp_path)
    assert retriever.gallery_names[2] in search.reference_label.value
    assert _shown(search) == 0 and search.reference_image.value  # a reference, no results yet

    search.search_button.click()  # an empty caption
    assert "caption is empty" in search.message.value and not search.session.turns

    search.caption.value = "a larger one on a white background"  # Enter in the caption box
    turn = search.session.turns[-1]
    assert _shown(search) == len(turn.hits) == 4
    assert "Is this what you were looking for?" in search.prompt.value
    assert 2 not in [h.index for h in turn.hits]  # the reference itself is not offered back

    before = search.reference_label.value
    _button(search, 1, "cirlib-choose").click()  # "change this": the next turn's reference
    assert search.session.reference.index == turn.hits[1].index
    assert search.reference_label.value != before and turn.hits[1].name in search.reference_label.value
    assert _shown(search) == 0 and search.caption.value == "" and len(search.history.children) == 1

    search.ask("with two dogs")
    second = search.session.turns[-1]
    assert second.reference.index == turn.hits[1].index
    assert not {2, turn.hits[1].index} & {h.index for h in second.hits}  # seen references left out
    _button(search, 0, "cirlib-accept").click()
    assert search.session.done and search.session.accepted == second.hits[0]
    assert "Found" in search.prompt.value and len(search.history.children) == 2
    search.ask("something else")
    assert "session is over" in search.message.value

    saved = search.save_history()
    assert saved == tmp_path / "09_multiturn_widget_history.png" and saved.stat().st_size > 0
    own = search.save_history(tmp_path / "mine.png")
    assert Image.open(own).format == "PNG"

    search.random_start.click()  # a new session from a random gallery image
    assert not search.session.turns and search.session.reference.index is not None


def test_multiturn_widget_upload(retriever) -> None:
    search = MultiTurnSearch(retriever, k=3, start=None)
    search.ask("is red")
    assert "Start from a gallery image" in search.message.value
    assert search._uploads is None  # no folder until something is uploaded: a killed kernel leaves none behind

    buffer = io.BytesIO()
    Image.open(retriever.gallery_paths[0]).save(buffer, format="png")
    content = buffer.getvalue()
    search.upload.value = ({"name": "my photo.png", "type": "image/png", "size": len(content),
                            "content": memoryview(content), "last_modified": datetime.now(timezone.utc)},)
    reference = search.session.reference
    assert reference.index is None and reference.name == "my photo" and "my photo" in search.reference_label.value
    assert Path(search._uploads.name, "my photo.png").read_bytes() == content
    search.ask("on a white background")
    assert _shown(search) == 3  # an outside image excludes nothing
    torch.testing.assert_close(retriever.encode_image(reference.image), retriever.gallery_features[0],
                               atol=1e-4, rtol=1e-4)

    search.upload.value = ({"name": "notes.png", "type": "image/png", "size": 4, "content": memoryview(b"text"),
                            "last_modified": datetime.now(timezone.utc)},)
    assert "cannot decode" in search.message.value
    assert search.session.reference is reference  # the bad upload changed nothing


def test_history_figure_marks_choices(retriever, close_figures) -> None:
    session = Session(retriever, 0, k=3)
    with pytest.raises(ValueError, match="no turns"):
        history_figure(session)
    first = session.ask("a larger one")
    session.choose(first.hits[0])
    second = session.ask("with a dog")
    session.accept(1)
    fig = history_figure(session, target=second.hits[1].index)
    assert len(fig.axes) == 2 * (3 + 2)
    labels = [ax.get_xlabel() for ax in fig.axes]
    assert "#1 chosen" in labels and "#2 accepted" in labels


# --------------------------------------------------------------------------------------------
# Session logic (shared by the widget and notebook 09's scripted sessions)
# --------------------------------------------------------------------------------------------


def test_session_rules(retriever) -> None:
    session = Session(retriever, 0, k=2)
    with pytest.raises(RuntimeError, match="ask what to change first"):
        session.choose(0)
    first = session.ask("a larger one")
    session.ask("a smaller one")  # rephrasing replaces the unanswered turn
    assert len(session.turns) == 1 and session.turns[0].caption == "a smaller one" and first.caption != "a smaller one"
    with pytest.raises(IndexError, match="out of range"):
        session.choose(5)
    hit = session.turns[0].hits[1]
    assert session.choose(hit).index == hit.index and session.seen == [0, hit.index]
    session.ask("again")
    with pytest.raises(ValueError, match="not among"):
        session.accept(hit)  # the previous turn's result
    with pytest.raises(ValueError, match="at least 1"):
        Session(retriever, 0, k=0)


def test_simulated_user_finds_a_shown_target(retriever) -> None:
    split = retriever.split
    query = split.queries[0]
    target = retriever.gallery_names.index(query.target)
    ranking = retriever.ranking(query.reference, query.captions[0])
    k = ranking.rank(target)  # the target is in the first turn's top k: accepted at once
    session = simulate(Session(retriever, query.reference, k=k),
                       SimulatedUser(target, fixed_describer(query.captions[0])), turns=3)
    assert session.done and session.accepted.index == target and len(session.turns) == 1
    assert target_ranks(session, target) == [k]

    other = simulate(Session(retriever, query.reference, k=1), SimulatedUser(target, fixed_describer("a cat")), 3)
    for before, after in zip(other.turns, other.turns[1:]):  # each turn starts from the previous pick
        assert after.reference.index == before.chosen.index
    assert len(other.turns) == 3 or other.done


def test_attribute_describer_says_what_differs() -> None:
    attributes = {
        "ref": {"colour": "red", "pattern": "plain", "logo": "none", "category": "dress"},
        "target": {"colour": "navy blue", "pattern": "stripes", "logo": "star", "category": "dress"},
        "close": {"colour": "navy blue", "pattern": "stripes", "logo": "none", "category": "dress"},
        "twin": {"colour": "navy blue", "pattern": "stripes", "logo": "star", "category": "dress"},
    }
    from cirlib.search.engine import Reference

    describe = attribute_describer(attributes, "target", seed=0)
    two = describe(Reference("ref"))
    assert "navy blue" in two and re.search("strip", two) and "star" not in two  # at most two changes a turn
    assert "star" in describe(Reference("close"))
    assert describe(Reference("twin")) == "is a navy blue striped dress with a star print"


# --------------------------------------------------------------------------------------------
# Retrieval explorer
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::cirlib.data.datasets.MissingImagesWarning")  # the fixtures' dead links
def test_explorer_callbacks(course, vit) -> None:  # noqa: F811 - the imported fixture
    save_backbone(vit, artifacts.pretrained_checkpoint(True), {"test": True})
    explorer = RetrievalExplorer(course, k=3, splits=["fashioniq/dress", "cirr", "circo"])
    assert [key for _, key in explorer.method.options] == ["zero-shot-sum"]  # nothing else trained here
    assert explorer.query.value == 0 and "target rank" in explorer.status.value

    explorer.split.value = "cirr"
    split = course.val_splits["cirr"]
    assert len(explorer.query.options) == len(split.queries)
    explorer.query.value = 1
    hits = explorer.retriever.search_query(1, 3)
    query = split.queries[1]
    assert explorer.view.value.count("<img") == 1 + len(hits)
    assert explorer.view.value.count(GREEN_FRAME) == sum(h.name == query.target for h in hits)
    rank = int(explorer.retriever.target_ranks([1])[0])
    assert f"target rank <b class='cirlib-target-rank'>{rank}</b>" in explorer.status.value

    explorer.k.value = 1
    failures = explorer.failures()
    assert failures == [i for i, r in enumerate(explorer.target_ranks().tolist()) if r != 1]
    explorer.failures_only.value = True
    assert [v for _, v in explorer.query.options] == failures
    explorer.failure_button.click()
    assert explorer.query.value in failures and "✗" in explorer.status.value
    explorer.random_button.click()
    assert explorer.query.value in failures  # random among the listed failures

    explorer.split.value = "circo"
    circo = course.val_splits["circo"].queries[explorer.query.value]
    assert "semantic aspects" in explorer.view.value and circo.shared_concept in explorer.view.value
    on_disk = [g for g in circo.ground_truths if g in course.val_splits["circo"].image_paths]
    assert explorer.view.value.count(GREEN_FRAME) >= len(on_disk)  # every ground truth is shown

    phi = Phi.for_dims(vit.embed_dim, vit.token_embedding.embedding_dim).eval()
    _finished(phi, "phi", artifacts.phi_checkpoint(True, "fashioniq+cirr"), select=False)
    explorer.split.value = "cirr"  # the menu is rebuilt for the split's benchmark: phi is on disk now
    assert [key for _, key in explorer.method.options] == ["zero-shot-sum", "isearle"]
    explorer.method.value = "isearle"
    assert "iSEARLE" in explorer.status.value
