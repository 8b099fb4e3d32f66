"""Coordinate conventions at the model boundary: each family's answer text round-trips to the
normalised label, known values come out as the family writes them, and mixing conventions is caught."""

from __future__ import annotations

import json
import random

import pytest

from raydar.models.families import FAMILIES
from raydar.kinds import AnswerError, BoxesTask, CaptionTask, MultilabelTask, PointsTask, RegressionTask, kind_of

ONTOLOGY = {"explicit": {"description": "dark cell"}, "implicit": {"description": "faint cell"}}
POINTS = PointsTask(kind="points", instruction="Find cells.", ontology=ONTOLOGY)
BOXES = BoxesTask(kind="boxes", instruction="Find cells.", ontology=ONTOLOGY, questions_per_image=1)


def random_points(rng: random.Random, n: int = 20) -> dict:
    return {"points": [{"label": rng.choice(["explicit", "implicit"]), "x": rng.random(), "y": rng.random(),
                        "score": 1.0} for _ in range(n)]}


def random_boxes(rng: random.Random, n: int = 10) -> dict:
    objects = []
    for _ in range(n):
        x1, y1 = rng.uniform(0, 0.8), rng.uniform(0, 0.8)
        objects.append({"label": "explicit", "box": [x1, y1, x1 + rng.uniform(0.05, 0.2), y1 + rng.uniform(0.05, 0.2)],
                        "description": "a cell", "score": 1.0})
    return {"objects": objects, "qa": [{"question": "How many?", "answer": str(n)}]}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("original", [(224, 224), (1000, 500), (333, 777)])
def test_points_and_boxes_round_trip_through_each_family(family, original):
    fam = FAMILIES[family]
    w, h = fam.model_image_size(*original, max_pixels=401_408)
    tolerance = {"per_mille": 0.5 / 1000, "pixels": 0.5 / min(w, h), "normalized": 0.5e-2}[fam.coordinates] + 1e-9
    rng = random.Random(f"{family}{original}")
    for spec, label in ((POINTS, random_points(rng)), (BOXES, random_boxes(rng))):
        kind = kind_of(spec, fam.coordinates)
        back = kind.parse(kind.answer_text(label, w, h), w, h)
        key = "points" if "points" in label else "objects"
        # Answers list objects in reading order (top to bottom, then left to right).
        order = (lambda p: (p["y"], p["x"])) if key == "points" else (lambda o: (o["box"][1], o["box"][0]))
        assert len(back[key]) == len(label[key])
        for a, b in zip(sorted(label[key], key=order), back[key]):
            assert a["label"] == b["label"]
            values_a = [a["x"], a["y"]] if key == "points" else a["box"]
            values_b = [b["x"], b["y"]] if key == "points" else b["box"]
            assert max(abs(p - q) for p, q in zip(values_a, values_b)) <= tolerance
        if key == "objects":
            assert back["qa"] == label["qa"] and back["objects"][0]["description"] == "a cell"


def test_each_family_writes_positions_its_own_way():
    label = {"points": [{"label": "explicit", "x": 0.5, "y": 0.25}]}
    qwen2 = FAMILIES["qwen2_vl"]
    assert json.loads(kind_of(POINTS, qwen2.coordinates).answer_text(label, 224, 224))["points"][0] == {
        "label": "explicit", "x": 500, "y": 250}

    qwen25 = FAMILIES["qwen2_5_vl"]
    size = qwen25.model_image_size(1000, 500, max_pixels=401_408)
    assert size == (896, 448) and size[0] % 28 == 0 and size[1] % 28 == 0
    assert json.loads(kind_of(POINTS, qwen25.coordinates).answer_text(label, *size))["points"][0] == {
        "label": "explicit", "x": 448, "y": 112}

    llava = FAMILIES["llava"]
    assert llava.model_image_size(1000, 500, max_pixels=1) == (1000, 500)
    assert json.loads(kind_of(POINTS, llava.coordinates).answer_text(label, 1000, 500))["points"][0] == {
        "label": "explicit", "x": 0.5, "y": 0.25}


def test_reading_a_qwen2_vl_answer_as_fractions_is_caught_not_silently_wrong():
    label = {"points": [{"label": "explicit", "x": 0.5, "y": 0.25}]}
    text = kind_of(POINTS, "per_mille").answer_text(label, 224, 224)
    with pytest.raises(AnswerError, match="off the image"):
        kind_of(POINTS, "normalized").parse(text, 224, 224)


@pytest.mark.parametrize(
    ("spec", "label"),
    [
        (CaptionTask(kind="caption", instruction="Who?", ontology={"Cheburashka": {"description": "big ears"}}),
         {"entity": "Cheburashka", "caption": "Чебурашка с большими ушами"}),
        (MultilabelTask(kind="multilabel", instruction="Findings?", ontology={"effusion": {"description": "fluid"},
                                                                              "mass": {"description": "a mass"}}),
         {"probabilities": {"effusion": 0.9, "mass": 0.0}}),
        (RegressionTask(kind="regression", instruction="Nutrition?",
                        targets={"calories": {"description": "energy", "unit": "kcal", "max": 2500}}),
         {"values": {"calories": 431.5}}),
    ],
    ids=["caption", "multilabel", "regression"],
)
def test_kinds_without_positions_round_trip_exactly(spec, label):
    kind = kind_of(spec, "per_mille")
    text = kind.answer_text(label, 224, 224)
    assert kind.parse(text, 224, 224) == label
    assert "Чебурашка" in text or spec.kind != "caption"  # written as text, not \\u escapes


def test_a_label_that_does_not_fit_the_schema_is_not_turned_into_a_target():
    with pytest.raises(AnswerError, match="unknown class"):
        kind_of(POINTS).answer_text({"points": [{"label": "neutrophil", "x": 0.1, "y": 0.1}]}, 224, 224)
