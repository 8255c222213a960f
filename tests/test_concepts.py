"""Concepts: the embedded vocabulary from the generators' tables, class-name lists, zero-shot top-k assignment."""

from __future__ import annotations

import warnings

import pytest
import torch

from cirlib.data import concepts as C
from cirlib.data.synth import render
from cirlib.data.synth.scenes import graph
from cirlib.models.backbone import TINY_MODEL, load_backbone


def test_fashion_vocabulary_comes_from_the_generator_tables():
    vocab = C.fashion_concepts()
    assert len(vocab) == len(set(vocab))
    assert {"dress", "shirt", "top", "red dress", "navy blue top", "striped dress", "polka-dot shirt",
            "star print", "triangle print"} <= set(vocab)
    assert all(f"{colour} dress" in vocab for colour in render.COLOURS)
    assert "none print" not in vocab and "toptee" not in vocab  # no absent print, nouns as captions say them


def test_scene_vocabulary_and_union():
    vocab = C.scene_concepts()
    assert len(vocab) == len(set(vocab))
    assert {"star", "ankle boot", "navy blue coat", "small bag", "large heart", "lavender background",
            "checked background"} <= set(vocab)
    assert set(graph.KINDS) <= set(vocab)
    union = C.embedded_concepts()
    assert len(union) == len(set(union)) == len(set(C.fashion_concepts()) | set(vocab))
    assert union.count("star") == 1


def test_image_concepts_are_in_the_vocabulary():
    garment = {"category": "toptee", "colour": "sky blue", "pattern": "dots", "logo": "heart"}
    assert C.image_concepts("fashion", garment) == ["top", "sky blue top", "polka-dot top", "heart print"]
    scene = {"background": {"colour": "light pink", "pattern": "stripes"},
             "objects": [{"kind": "sandal", "colour": "red", "size": "small"},
                         {"kind": "sandal", "colour": "red", "size": "large"}]}
    got = C.image_concepts("scenes", scene)
    assert got == ["sandal", "red sandal", "small sandal", "large sandal", "light pink background",
                   "striped background"]
    assert set(got) <= set(C.embedded_concepts())
    with pytest.raises(ValueError, match="cirr"):
        C.image_concepts("cirr", scene)


def test_class_names_from_text_and_open_images_csv(tmp_path):
    txt = tmp_path / "classes.txt"
    txt.write_text("Cat\n  Tabby   cat \nDog\n", encoding="utf-8")
    assert C.load_class_names(txt) == ["Cat", "Tabby cat", "Dog"]
    for header in ("", "LabelName,DisplayName\n"):
        csv_file = tmp_path / "oid.csv"
        csv_file.write_text(header + '/m/011k07,Tortoise\n/m/0120dh,"Sea turtle, green"\n', encoding="utf-8")
        assert C.load_class_names(csv_file) == ["Tortoise", "Sea turtle, green"]


def test_repeated_class_names_are_kept_once_and_counted(tmp_path):
    csv_file = tmp_path / "oid.csv"
    csv_file.write_text("/m/1,Tortoise\n/m/2,Cat\n/m/3,Tortoise\n/m/4,Cat\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="2 repeated class name"):
        assert C.load_class_names(csv_file) == ["Tortoise", "Cat"]


@pytest.mark.parametrize("name, text, match", [
    ("a.txt", "Cat\n   \nDog\n", r"a\.txt, line 2: empty class name"),
    ("b.csv", "/m/1,Cat\n/m/2,Dog,extra\n", r"b\.csv, line 2: expected 'MID,DisplayName'"),
    ("c.csv", "/m/1,Cat\n/m/2, \n", r"c\.csv, line 2: empty class name"),
    ("d.csv", "/m/1,Cat\n\n/m/2,Dog\n", r"d\.csv, line 2: empty row"),
    ("e.csv", "Cat\n", r"e\.csv, line 1: expected 'MID,DisplayName', got 'Cat'"),
    ("f.txt", "", r"f\.txt: no class names"),
])
def test_bad_class_lists_name_file_and_line(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        C.load_class_names(path)


def test_missing_or_binary_class_list(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        C.load_class_names(tmp_path / "nope.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00cat")
    with pytest.raises(ValueError, match="bin.txt: not UTF-8"):
        C.load_class_names(tmp_path / "bin.txt")


def test_top_k_on_constructed_features():
    names = ["bag", "coat", "star", "heart", "sandal"]
    concept_feats = torch.eye(5, 8) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0])[:, None]  # unnormalised, orthogonal
    images = torch.zeros(3, 8)
    images[0, [2, 4]] = torch.tensor([30.0, 10.0])  # mostly star, some sandal
    images[1, [0, 1, 3]] = torch.tensor([1.0, 5.0, 2.0])
    images[2, 3] = -1.0  # anti-heart: the other four tie at 0, heart is last
    out = C.top_k_concepts(images, concept_feats, names, k=2)
    assert out.indices[:2].tolist() == [[2, 4], [1, 3]]
    assert out.names[:2] == [["star", "sandal"], ["coat", "heart"]]
    expected = torch.tensor([30.0, 10.0]) / torch.tensor([30.0, 10.0]).norm()
    assert torch.allclose(out.scores[0], expected)
    assert "heart" not in out.names[2]
    assert C.top_k_concepts(images[:0], concept_feats, names, k=3).indices.shape == (0, 3)


def test_top_k_rejects_bad_inputs():
    feats = torch.randn(3, 4)
    with pytest.raises(ValueError, match="k=4"):
        C.top_k_concepts(feats, feats, ["a", "b", "c"], k=4)
    with pytest.raises(ValueError, match="repeat"):
        C.top_k_concepts(feats, feats, ["a", "b", "a"], k=1)
    with pytest.raises(ValueError, match="2 concept names for 3"):
        C.top_k_concepts(feats, feats, ["a", "b"], k=1)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        C.top_k_concepts(feats, torch.randn(3, 5), ["a", "b", "c"], k=1)


def test_assign_concepts_with_a_backbone_finds_the_concept_an_image_was_made_from():
    backbone = load_backbone(TINY_MODEL, device="cpu")
    names = ["red dress", "star print", "small bag", "lavender background", "ankle boot"]
    text = C.concept_features(backbone, names)
    assert text.shape == (5, backbone.embed_dim)
    order = [3, 0, 4, 1, 2]
    images = 2.5 * text[order] + 0.01 * torch.randn(5, text.shape[1], generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = C.assign_concepts(backbone, images, names, k=3)
    assert out.indices[:, 0].tolist() == order
    assert [row[0] for row in out.names] == [names[i] for i in order]
    assert all(len(set(row)) == 3 for row in out.names)
