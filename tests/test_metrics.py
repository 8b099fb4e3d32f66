"""Metrics on hand-made cases with known answers, and against scikit-learn / brute force where one exists."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from sklearn.metrics import (
    f1_score,
    mean_absolute_error,
    precision_recall_fscore_support,
    roc_auc_score,
)

from raydar.kinds.caption import normalise_name
from raydar.kinds.points import match_radius, match_within_radius
from raydar.metrics import score
from raydar.kinds import (
    BoxesTask,
    CaptionTask,
    MultilabelTask,
    PointsTask,
    RegressionTask,
)

POINTS = PointsTask(kind="points", instruction="find cells", match_radius=0.03,
                    ontology={"explicit": {"description": "dark", "aliases": ["clear"]},
                              "implicit": {"description": "faint"}})
R = 0.03 * math.sqrt(2)  # the radius in normalised units (fraction of the unit square's diagonal)


def pts(*items) -> dict:
    return {"points": [{"label": c, "x": x, "y": y, **({"score": s} if s is not None else {})}
                       for c, x, y, *rest in items for s in [rest[0] if rest else None]]}


# ---------------------------------------------------------------- points


def test_two_perfect_points_and_one_two_radii_off_give_two_thirds():
    truth = pts(("explicit", 0.2, 0.2), ("implicit", 0.5, 0.5), ("explicit", 0.8, 0.8))
    pred = pts(("explicit", 0.2, 0.2), ("implicit", 0.5, 0.5), ("explicit", 0.8 + 2 * R, 0.8))
    m = score(POINTS, [pred], [truth])
    assert m["overall"]["tp"] == 2 and m["overall"]["fp"] == 1 and m["overall"]["fn"] == 1
    assert m["overall"]["precision"] == pytest.approx(2 / 3)
    assert m["overall"]["recall"] == pytest.approx(2 / 3)
    assert m["overall"]["f1"] == pytest.approx(2 / 3)
    assert m["per_class"]["implicit"]["f1"] == 1.0
    assert m["per_class"]["explicit"]["precision"] == pytest.approx(0.5)
    assert m["count"]["mae"] == 0.0  # three points either way
    assert m["headline"] == {"metric": "overall.f1", "value": m["overall"]["f1"], "higher_is_better": True}
    json.dumps(m)


def test_a_point_just_inside_the_radius_matches_and_just_outside_does_not():
    truth = pts(("explicit", 0.5, 0.5))
    inside = score(POINTS, [pts(("explicit", 0.5 + 0.99 * R, 0.5))], [truth])
    outside = score(POINTS, [pts(("explicit", 0.5 + 1.01 * R, 0.5))], [truth])
    assert inside["overall"]["tp"] == 1 and outside["overall"]["tp"] == 0


def test_hungarian_matching_finds_the_most_pairs_where_nearest_first_would_not():
    # p0 is nearest to t0, but p1 can only reach t0: nearest-first gives 1 pair, the best matching 2.
    true = np.array([[0.0, 0.0], [1.4, 0.0]])
    pred = np.array([[0.5, 0.0], [-0.8, 0.0]])
    assert sorted(match_within_radius(pred, true, 1.0)) == [(0, 1), (1, 0)]


def test_matching_count_equals_brute_force_on_random_sets():
    rng = np.random.default_rng(0)
    for _ in range(40):
        pred = rng.random((int(rng.integers(0, 5)), 2))
        true = rng.random((int(rng.integers(0, 5)), 2))
        radius = float(rng.uniform(0.05, 0.5))
        pairs = match_within_radius(pred, true, radius)
        assert len({a for a, _ in pairs}) == len(pairs) == len({b for _, b in pairs})
        assert all(np.hypot(*(pred[a] - true[b])) <= radius for a, b in pairs)
        small, large = (pred, true) if len(pred) <= len(true) else (true, pred)
        best = max(sum(np.hypot(*(small[i] - large[j])) <= radius for i, j in enumerate(perm))
                   for perm in itertools.permutations(range(len(large)), len(small)))
        assert len(pairs) == best


def test_class_aware_and_class_agnostic_metrics_agree_with_scikit_learn():
    truth = [pts(("explicit", 0.1, 0.1), ("implicit", 0.5, 0.5), ("implicit", 0.9, 0.9)),
             pts(("explicit", 0.3, 0.7))]
    pred = [pts(("explicit", 0.1, 0.1), ("explicit", 0.5, 0.5), ("implicit", 0.2, 0.9)),  # right, wrong class, invented
            pts(("explicit", 0.3 + R / 2, 0.7))]
    m = score(POINTS, pred, truth)
    # class-aware: explicit tp 2 (one per image), fp 1 (the wrong-class one); implicit tp 0, fn 2, fp 1
    assert (m["per_class"]["explicit"]["tp"], m["per_class"]["explicit"]["fp"], m["per_class"]["explicit"]["fn"]) == (2, 1, 0)
    assert (m["per_class"]["implicit"]["tp"], m["per_class"]["implicit"]["fp"], m["per_class"]["implicit"]["fn"]) == (0, 1, 2)
    # class-agnostic: 3 located, 1 invented, 1 missed
    assert (m["detection"]["tp"], m["detection"]["fp"], m["detection"]["fn"]) == (3, 1, 1)
    labels = m["confusion"]["labels"]
    assert labels == ["explicit", "implicit", "none"]
    assert m["confusion"]["matrix"] == [[2, 0, 0], [1, 0, 1], [0, 1, 0]]
    # scikit-learn on the matched label pairs gives the same per-class numbers
    y_true = ["explicit", "explicit", "implicit", "implicit", "none"]
    y_pred = ["explicit", "explicit", "explicit", "none", "implicit"]
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=["explicit", "implicit"], zero_division=0)
    for k, c in enumerate(["explicit", "implicit"]):
        assert m["per_class"][c]["precision"] == pytest.approx(p[k])
        assert m["per_class"][c]["recall"] == pytest.approx(r[k])
        assert m["per_class"][c]["f1"] == pytest.approx(f[k])
    assert m["f1_macro"] == pytest.approx(f1_score(y_true, y_pred, labels=["explicit", "implicit"], average="macro"))


def test_count_error_failed_predictions_and_aliases():
    truth = [pts(("explicit", 0.1, 0.1), ("explicit", 0.3, 0.3), ("implicit", 0.6, 0.6)), pts(), pts(("implicit", 0.4, 0.4))]
    pred = [pts(("clear", 0.1, 0.1), ("implicit", 0.6, 0.6)), pts(("implicit", 0.5, 0.5)), None]
    m = score(POINTS, pred, truth)
    assert m["failed"] == 1 and m["n_images"] == 3
    assert m["overall"]["tp"] == 2  # "clear" is an alias of explicit
    assert m["count"]["mae"] == pytest.approx(mean_absolute_error([3, 0, 1], [2, 1, 0]))
    assert m["count"]["bias"] == pytest.approx(-1 / 3)
    assert m["count"]["per_class_mae"]["implicit"] == pytest.approx(mean_absolute_error([1, 0, 1], [1, 1, 0]))


def test_precision_and_recall_against_the_score_threshold():
    truth = pts(("explicit", 0.2, 0.2), ("explicit", 0.6, 0.6))
    pred = pts(("explicit", 0.2, 0.2, 0.9), ("explicit", 0.6, 0.6, 0.4), ("implicit", 0.9, 0.1, 0.2))
    m = score(POINTS, [pred], [truth])
    curve = m["curve"]
    at = {t: k for k, t in enumerate(curve["thresholds"])}
    assert (curve["precision"][at[0.0]], curve["recall"][at[0.0]]) == (pytest.approx(2 / 3), 1.0)
    assert (curve["precision"][at[0.3]], curve["recall"][at[0.3]]) == (1.0, 1.0)
    assert (curve["precision"][at[0.5]], curve["recall"][at[0.5]]) == (1.0, 0.5)
    assert (curve["precision"][at[1.0]], curve["recall"][at[1.0]]) == (0.0, 0.0)
    assert score(POINTS, [pred], [truth], score_threshold=0.3)["overall"]["f1"] == 1.0


def test_image_sizes_make_distances_pixels_on_non_square_images():
    truth = pts(("explicit", 0.5, 0.2))
    pred = pts(("explicit", 0.5, 0.4))  # 0.2 of the height: 20 px of a 1000 x 100 image
    assert match_radius(POINTS, (1000, 100)) == pytest.approx(0.03 * math.hypot(1000, 100))
    assert score(POINTS, [pred], [truth], sizes=[(1000, 100)])["overall"]["tp"] == 1
    assert score(POINTS, [pred], [truth])["overall"]["tp"] == 0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="one per image"):
        score(POINTS, [pts()], [pts(), pts()])
    with pytest.raises(ValueError, match=r"predictions\[1\].*unknown class 'mast'"):
        score(POINTS, [pts(), pts(("mast", 0.1, 0.1))], [pts(), pts()])
    with pytest.raises(ValueError, match=r"truths\[0\] is None"):
        score(POINTS, [pts()], [None])


# ---------------------------------------------------------------- boxes

BOXES = BoxesTask(kind="boxes", instruction="find things",
                  ontology={"cat": {"description": "a cat"}, "dog": {"description": "a dog"}})


def boxes(*items) -> dict:
    return {"objects": [{"label": c, "box": list(b), **({"score": s[0]} if s else {})} for c, b, *s in items]}


def test_coco_map_of_perfect_boxes_is_one():
    truth = [boxes(("cat", (0.1, 0.1, 0.4, 0.4)), ("dog", (0.5, 0.5, 0.9, 0.8))), boxes(("dog", (0.2, 0.3, 0.6, 0.9)))]
    m = score(BOXES, truth, truth)
    assert m["map"] == pytest.approx(1.0) and m["map50"] == pytest.approx(1.0)
    assert m["per_class"]["cat"]["ap"] == pytest.approx(1.0) and m["per_class"]["dog"]["n_true"] == 2
    json.dumps(m)


def test_coco_ap_of_one_hit_one_false_positive_and_one_miss():
    # Ranked: the hit (0.9), then a false positive (0.8); one of two true boxes never found.
    # Precision is 1 up to recall 0.5, then nothing: 51 of COCO's 101 recall points -> AP = 51/101 at every IoU.
    truth = [boxes(("cat", (0.1, 0.1, 0.3, 0.3)), ("cat", (0.6, 0.6, 0.9, 0.9)))]
    pred = [boxes(("cat", (0.1, 0.1, 0.3, 0.3), 0.9), ("cat", (0.35, 0.0, 0.5, 0.2), 0.8))]
    m = score(BOXES, pred, truth)
    assert m["map"] == pytest.approx(51 / 101) and m["map50"] == pytest.approx(51 / 101)
    assert m["per_class"]["dog"]["ap"] is None  # no dog anywhere: undefined, not 0


def test_coco_map_of_a_box_with_iou_062_counts_three_of_ten_thresholds():
    truth = [boxes(("dog", (0.0, 0.0, 0.5, 0.5)))]
    pred = [boxes(("dog", (0.0, 0.0, 0.5, 0.31), 1.0))]  # IoU = 0.155 / 0.25 = 0.62: matched at 0.50, 0.55, 0.60
    m = score(BOXES, pred, truth)
    assert (m["map50"], m["map75"]) == (pytest.approx(1.0), pytest.approx(0.0))
    assert m["map"] == pytest.approx(0.3)


def test_coco_map_with_nothing_predicted_is_zero_and_failed_are_counted():
    truth = [boxes(("cat", (0.1, 0.1, 0.3, 0.3)))]
    m = score(BOXES, [None], truth)
    assert m["map"] == 0.0 and m["failed"] == 1 and m["per_class"]["cat"]["ap"] == 0.0


# ---------------------------------------------------------------- caption

CAPTION = CaptionTask(kind="caption", instruction="name it",
                      ontology={"Cheburashka": {"description": "big ears", "aliases": ["Чебурашка"]},
                                "Gena": {"description": "crocodile", "aliases": ["Crocodile Gena"]}})


def test_caption_entity_exact_alias_and_mentioned():
    truths = [{"entity": "Cheburashka", "caption": "x"}, {"entity": "Gena", "caption": "x"},
              {"entity": "Gena", "caption": "x"}, {"entity": "Cheburashka", "caption": "x"}]
    preds = [{"entity": "  cheburashka ", "caption": "Cheburashka sits on a box."},    # exact after normalising
             {"entity": "crocodile  GENA", "caption": "A green crocodile."},           # alias, not in caption
             {"entity": "Kolobok", "caption": "Crocodile Gena plays the accordion."},  # wrong, but mentioned
             None]                                                                     # failed: wrong
    m = score(CAPTION, preds, truths)
    assert (m["exact"], m["alias"], m["mentioned"]) == (0.25, 0.5, 0.5)
    assert m["per_entity"]["Gena"] == {"n": 2, "exact": 0, "alias": 1, "mentioned": 1,
                                       "exact_rate": 0.0, "alias_rate": 0.5, "mentioned_rate": 0.5}
    assert m["failed"] == 1 and normalise_name(" «Чебурашка» ") == "чебурашка"


# ---------------------------------------------------------------- multilabel

MULTI = MultilabelTask(kind="multilabel", instruction="findings", threshold=0.5,
                       ontology={"effusion": {"description": "fluid"}, "mass": {"description": "lump"},
                                 "hernia": {"description": "rare"}})


def test_multilabel_counts_f1_and_auroc_agree_with_scikit_learn():
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    p = np.array([[0.9, 0.2, 0.1], [0.8, 0.7, 0.0], [0.4, 0.6, 0.3], [0.1, 0.55, 0.2]])
    names = list(MULTI.ontology)
    truths = [{"probabilities": dict(zip(names, map(float, row)))} for row in y]
    preds = [{"probabilities": dict(zip(names, map(float, row)))} for row in p]
    m = score(MULTI, preds, truths)
    eff = m["per_class"]["effusion"]
    assert (eff["tp"], eff["fp"], eff["fn"], eff["tn"]) == (1, 1, 1, 1)
    assert eff["auroc"] == 0.75  # positive above negative in 3 of 4 pairs
    for k, c in enumerate(names[:2]):
        assert m["per_class"][c]["auroc"] == pytest.approx(roc_auc_score(y[:, k], p[:, k]))
    assert m["per_class"]["hernia"]["auroc"] is None and m["classes_without_auroc"] == ["hernia"]
    assert m["auroc_macro"] == pytest.approx(np.mean([roc_auc_score(y[:, k], p[:, k]) for k in range(2)]))
    assert m["auroc_micro"] == pytest.approx(roc_auc_score(y.ravel(), p.ravel()))
    y_pred = (p >= 0.5).astype(int)
    assert m["f1_micro"] == pytest.approx(f1_score(y, y_pred, average="micro", zero_division=0))
    assert m["f1_macro"] == pytest.approx(f1_score(y, y_pred, average="macro", zero_division=0))
    assert m["per_class"]["mass"]["fp"] == 1 and m["per_class"]["hernia"]["tn"] == 4
    json.dumps(m)


# ---------------------------------------------------------------- regression

REGRESSION = RegressionTask(kind="regression", instruction="estimate",
                            targets={"calories": {"description": "energy", "unit": "kcal", "max": 1000},
                                     "proteins": {"description": "protein", "unit": "g", "max": 100}})


def test_regression_mae_and_rmse_per_target():
    truths = [{"values": {"calories": 100, "proteins": 10}}, {"values": {"calories": 200, "proteins": 20}}]
    preds = [{"values": {"calories": 110, "proteins": 10}}, {"values": {"calories": 170, "proteins": 30}}]
    m = score(REGRESSION, preds, truths)
    assert m["per_target"]["calories"]["mae"] == pytest.approx(20.0)
    assert m["per_target"]["calories"]["rmse"] == pytest.approx(math.sqrt((100 + 900) / 2))
    assert m["per_target"]["proteins"]["mae"] == pytest.approx(5.0)
    assert m["mae_normalised_mean"] == pytest.approx((20 / 1000 + 5 / 100) / 2)
    assert m["headline"]["higher_is_better"] is False
