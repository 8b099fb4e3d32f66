"""Fusion and agreement on cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ensemble_boxes import weighted_boxes_fusion

from raydar.fusion import agreement, fuse
from raydar.kinds import (
    BoxesTask,
    CaptionTask,
    MultilabelTask,
    PointsTask,
    RegressionTask,
)

POINTS = PointsTask(kind="points", instruction="find cells", match_radius=0.03,
                    ontology={"explicit": {"description": "dark"}, "implicit": {"description": "faint"}})
R = 0.03 * math.sqrt(2)
EQUAL = {"finetuned": 1.0, "rag": 1.0}


def pt(label, x, y, score=None) -> dict:
    return {"label": label, "x": x, "y": y, **({"score": score} if score is not None else {})}


def test_two_members_agreeing_give_one_point_with_score_one():
    a = {"points": [pt("explicit", 0.50, 0.50)]}
    b = {"points": [pt("explicit", 0.50 + R / 2, 0.50)]}
    fused = fuse(POINTS, {"finetuned": a, "rag": b}, EQUAL)
    assert len(fused["points"]) == 1
    p = fused["points"][0]
    assert p["label"] == "explicit" and p["score"] == pytest.approx(1.0)
    assert (p["x"], p["y"]) == (pytest.approx(0.50 + R / 4), pytest.approx(0.50))  # the mean position
    assert agreement(POINTS, {"finetuned": a, "rag": b}) == 1.0


def test_disagreeing_members_keep_each_point_at_half_score_unless_filtered():
    a = {"points": [pt("explicit", 0.2, 0.2), pt("implicit", 0.7, 0.7)]}
    b = {"points": [pt("explicit", 0.2, 0.2)]}
    fused = fuse(POINTS, {"finetuned": a, "rag": b}, EQUAL)
    assert [(p["label"], p["score"]) for p in fused["points"]] == [("explicit", 1.0), ("implicit", 0.5)]
    assert len(fuse(POINTS, {"finetuned": a, "rag": b}, EQUAL, min_score=0.6)["points"]) == 1
    assert agreement(POINTS, {"finetuned": a, "rag": b}) == pytest.approx(0.5)  # one of two objects agreed
    assert agreement(POINTS, {"finetuned": {"points": [pt("explicit", 0.1, 0.1)]},
                              "rag": {"points": [pt("explicit", 0.9, 0.9)]}}) == 0.0


def test_weights_tip_the_label_vote_and_the_position():
    a = {"points": [pt("explicit", 0.40, 0.40)]}
    b = {"points": [pt("implicit", 0.40 + R * 0.8, 0.40)]}
    heavy_a = fuse(POINTS, {"finetuned": a, "rag": b}, {"finetuned": 3.0, "rag": 1.0})["points"]
    heavy_b = fuse(POINTS, {"finetuned": a, "rag": b}, {"finetuned": 1.0, "rag": 3.0})["points"]
    assert [p["label"] for p in heavy_a] == ["explicit"] and [p["label"] for p in heavy_b] == ["implicit"]
    assert heavy_a[0]["x"] == pytest.approx(0.40 + R * 0.8 / 4) and heavy_a[0]["score"] == pytest.approx(1.0)
    assert agreement(POINTS, {"finetuned": a, "rag": b}) == 0.0  # same place, different class


def test_member_scores_count_and_missing_scores_are_one():
    a = {"points": [pt("explicit", 0.3, 0.3, score=0.4)]}
    b = {"points": [pt("explicit", 0.8, 0.8)]}
    fused = [(p["x"], p["score"]) for p in fuse(POINTS, {"finetuned": a, "rag": b}, EQUAL)["points"]]
    assert fused == [(0.8, 0.5), (0.3, pytest.approx(0.2))]  # best first


def test_a_failed_member_is_absent_and_the_rest_carry_the_vote():
    a = {"points": [pt("implicit", 0.6, 0.1)]}
    fused = fuse(POINTS, {"finetuned": a}, EQUAL)  # rag failed: not in results
    assert fused["points"] == [{"label": "implicit", "x": 0.6, "y": 0.1, "score": 1.0}]
    assert fuse(POINTS, {"finetuned": a, "rag": None}, EQUAL) == fused
    assert agreement(POINTS, {"finetuned": a}) == 1.0


def test_a_member_contributes_at_most_one_point_per_cluster():
    a = {"points": [pt("explicit", 0.50, 0.50), pt("explicit", 0.50 + R * 0.6, 0.50)]}  # two touching cells
    b = {"points": [pt("explicit", 0.50 + R * 0.3, 0.50)]}
    fused = fuse(POINTS, {"finetuned": a, "rag": b}, EQUAL)["points"]
    assert sorted(p["score"] for p in fused) == [0.5, 1.0]


def test_zero_weight_members_are_ignored_and_bad_inputs_are_named():
    a = {"points": [pt("explicit", 0.5, 0.5)]}
    b = {"points": [pt("implicit", 0.2, 0.2)]}
    assert fuse(POINTS, {"finetuned": a, "rag": b}, {"finetuned": 1.0, "rag": 0.0})["points"][0]["score"] == 1.0
    with pytest.raises(ValueError, match="no member to fuse"):
        fuse(POINTS, {}, EQUAL)
    with pytest.raises(ValueError, match="weight of member 'rag'"):
        fuse(POINTS, {"finetuned": a, "rag": b}, {"rag": -1.0})
    with pytest.raises(ValueError, match="member 'rag'.*unknown class"):
        fuse(POINTS, {"finetuned": a, "rag": {"points": [pt("mast", 0.1, 0.1)]}}, EQUAL)


# ---------------------------------------------------------------- boxes

BOXES = BoxesTask(kind="boxes", instruction="find", iou_threshold=0.5,
                  ontology={"cat": {"description": "a cat"}, "dog": {"description": "a dog"}})


def test_boxes_agreeing_fuse_to_one_box_as_ensemble_boxes_does():
    a = {"objects": [{"label": "cat", "box": [0.1, 0.1, 0.5, 0.5], "description": "a sleeping cat", "score": 0.9}]}
    b = {"objects": [{"label": "cat", "box": [0.12, 0.1, 0.5, 0.54], "description": "cat", "score": 0.7}]}
    fused = fuse(BOXES, {"finetuned": a, "rag": b}, {"finetuned": 2.0, "rag": 1.0})
    boxes, scores, labels = weighted_boxes_fusion([[a["objects"][0]["box"]], [b["objects"][0]["box"]]],
                                                  [[0.9], [0.7]], [[0], [0]], weights=[2.0, 1.0], iou_thr=0.5)
    assert len(fused["objects"]) == 1 and labels.tolist() == [0]
    obj = fused["objects"][0]
    assert obj["box"] == pytest.approx(boxes[0].tolist()) and obj["score"] == pytest.approx(scores[0])
    assert obj["score"] == pytest.approx((2 * 0.9 + 0.7) / 3)  # the weighted share
    assert obj["label"] == "cat" and obj["description"] == "a sleeping cat"
    assert agreement(BOXES, {"finetuned": a, "rag": b}) == 1.0


def test_boxes_disagreeing_on_place_or_class_stay_apart():
    a = {"objects": [{"label": "cat", "box": [0.1, 0.1, 0.4, 0.4]}]}
    b = {"objects": [{"label": "dog", "box": [0.1, 0.1, 0.4, 0.4]}, {"label": "dog", "box": [0.6, 0.6, 0.9, 0.9]}]}
    fused = fuse(BOXES, {"finetuned": a, "rag": b}, EQUAL)["objects"]
    assert sorted((o["label"], o["score"]) for o in fused) == [("cat", 0.5), ("dog", 0.5), ("dog", 0.5)]
    assert agreement(BOXES, {"finetuned": a, "rag": b}) == 0.0
    assert fuse(BOXES, {"rag": b}, EQUAL)["objects"][0]["score"] == 1.0  # finetuned failed


# ---------------------------------------------------------------- caption, multilabel, regression


def test_caption_weighted_vote_for_the_entity():
    task = CaptionTask(kind="caption", instruction="name", ontology={"Gena": {"description": "crocodile"},
                                                                     "Kolobok": {"description": "bun"}})
    a = {"entity": "Gena", "caption": "Gena sings.", "score": 0.9}
    b = {"entity": "kolobok", "caption": "A round bun."}
    assert fuse(task, {"finetuned": a, "rag": b}, EQUAL) == {"entity": "Kolobok", "caption": "A round bun.",
                                                           "score": 0.5}
    heavy = fuse(task, {"finetuned": a, "rag": b}, {"finetuned": 2.0, "rag": 1.0})
    assert heavy == {"entity": "Gena", "caption": "Gena sings.", "score": pytest.approx(1.8 / 3)}
    assert agreement(task, {"finetuned": a, "rag": b}) == 0.0
    assert agreement(task, {"finetuned": a, "rag": {**b, "entity": "GENA"}}) == 1.0


def test_multilabel_weighted_mean_of_probabilities():
    task = MultilabelTask(kind="multilabel", instruction="x", threshold=0.5,
                          ontology={"mass": {"description": "m"}, "effusion": {"description": "e"}})
    a = {"probabilities": {"mass": 0.9, "effusion": 0.2}}
    b = {"probabilities": {"mass": 0.3}}  # a class left out is 0
    fused = fuse(task, {"finetuned": a, "rag": b}, {"finetuned": 3.0, "rag": 1.0})
    assert fused["probabilities"] == {"mass": pytest.approx((2.7 + 0.3) / 4), "effusion": pytest.approx(0.15)}
    assert agreement(task, {"finetuned": a, "rag": b}) == 0.5  # agree on effusion, not on mass


def test_regression_weighted_mean_and_spread():
    task = RegressionTask(kind="regression", instruction="x",
                          targets={"calories": {"description": "kcal", "max": 1000}})
    a, b = {"values": {"calories": 400}}, {"values": {"calories": 600}}
    assert fuse(task, {"finetuned": a, "rag": b}, {"finetuned": 1.0, "rag": 3.0}) == {"values": {"calories": 550.0}}
    assert agreement(task, {"finetuned": a, "rag": b}) == pytest.approx(0.8)
    assert np.isclose(agreement(task, {"finetuned": a, "rag": a}), 1.0)
