"""Metrics per task kind, computed with the libraries the field trusts, never re-implemented.

`score(task, predictions, truths)` is the entry point: one label per image in the same order, a failed
prediction (`None`) scored as the kind's empty label and counted in `failed`. It returns a plain,
JSON-serialisable dict with `kind`, `n_images`, `failed`, the kind's metrics and a `headline`
(`{"metric", "value", "higher_is_better"}`: the one number a summary line prints).

- points: predicted and true points are matched one-to-one within a radius by the Hungarian algorithm
  (`scipy.optimize.linear_sum_assignment`; the most pairs, then the least total distance). The radius is
  `task.match_radius` times the image diagonal. With image sizes (`sizes=[(width, height), ...]`)
  distances are in pixels; without, in normalised units, where the diagonal of the unit square is
  sqrt(2) — the same thing for square images such as the demo's. Class-aware matching (a point only
  matches a true point of its class) gives TP/FP/FN, precision, recall and F1 per class and overall
  (micro); class-agnostic matching gives detection-only P/R/F1 and a confusion matrix of the matched
  labels with a `none` row and column for misses and inventions. Count error: MAE and mean signed
  error of the number of points per image (scikit-learn). Precision and recall are also given against
  a score threshold (points below it are dropped and the matching redone), for the report's curve.
- boxes: COCO mAP by `pycocotools.cocoeval.COCOeval` (mAP@[.5:.95], mAP50, mAP75, AR@100, AP per
  class and the precision-recall curve at IoU 0.5). Boxes are scaled to a 1000 x 1000 image; IoU
  does not change under scaling each axis, so the numbers are those of the original pixels.
- caption: the entity named correctly: `exact` (the predicted entity is the true one's name) and
  `alias` (its name or one of its ontology aliases), both after Unicode, case and whitespace
  normalisation, and `mentioned` (the caption text itself names it or an alias); rates overall and
  per entity.
- multilabel: a class is predicted present when its probability is >= `task.threshold` (truths are
  present at >= 0.5). Per class TP/FP/FN/TN (`multilabel_confusion_matrix`), precision, recall, F1,
  AUROC (`roc_auc_score`; `None` for a class whose truth has one value only, listed in
  `classes_without_auroc`), and F1 / AUROC micro and macro.
- regression: MAE and RMSE per target (scikit-learn), and MAE over the target's range.

Where a ratio has an empty denominator (no predictions, no truths) it is 0, as scikit-learn's
`zero_division=0`.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from sklearn.metrics import (
    confusion_matrix,
    f1_score,
    mean_absolute_error,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    root_mean_squared_error,
)

from raydar.tasks import AnswerError, task_kind

NONE_CLASS = "none"  # the confusion-matrix row / column for a missed or invented point
THRESHOLDS = tuple(round(t, 2) for t in np.linspace(0.0, 1.0, 21))  # the report's score-threshold grid
COCO_SCALE = 1000.0


def score(task, predictions: Sequence[dict | None], truths: Sequence[dict], *,
          sizes: Sequence[tuple[int, int]] | None = None, score_threshold: float = 0.0) -> dict:
    """The task kind's metrics of `predictions` against `truths` (same order, one label per image).

    `sizes` (width, height per image) makes point distances exact on non-square images; without it
    they are measured in normalised units. Points and boxes scored below `score_threshold` are dropped
    first (the curves still sweep every threshold).
    """
    if len(predictions) != len(truths):
        raise ValueError(f"predictions ({len(predictions)}) and truths ({len(truths)}) must be one per image, "
                         "in the same order")
    if sizes is not None and len(sizes) != len(truths):
        raise ValueError(f"sizes ({len(sizes)}) must give one (width, height) per image ({len(truths)})")
    kind = task_kind(task)
    failed = sum(p is None for p in predictions)
    if task.kind == "caption":  # an entity outside the ontology is a wrong answer, not a bad label
        preds = [p if p is not None else kind.empty() for p in predictions]
        for i, p in enumerate(preds):
            if not isinstance(p, dict):
                raise ValueError(f"predictions[{i}] must be a caption label {{'entity', 'caption'}}, got {p!r}")
        trues = _validated(kind, truths, "truths")
    else:
        preds = _validated(kind, [p if p is not None else kind.empty() for p in predictions], "predictions")
        trues = _validated(kind, truths, "truths")
    if task.kind == "points":
        result = points_metrics(task, preds, trues, sizes=sizes, score_threshold=score_threshold)
    elif task.kind == "boxes":
        result = boxes_metrics(task, preds, trues, score_threshold=score_threshold)
    elif task.kind == "caption":
        result = caption_metrics(task, preds, trues)
    elif task.kind == "multilabel":
        result = multilabel_metrics(task, preds, trues)
    elif task.kind == "regression":
        result = regression_metrics(task, preds, trues)
    else:  # pragma: no cover - TaskSpec's discriminator admits only the five kinds
        raise ValueError(f"unknown task kind {task.kind!r}")
    return {"kind": task.kind, "n_images": len(truths), "failed": failed, **result}


def _validated(kind, labels: Sequence[Any], what: str) -> list[dict]:
    out = []
    for i, label in enumerate(labels):
        if label is None:
            raise ValueError(f"{what}[{i}] is None; only predictions may be missing (a failed answer)")
        try:
            out.append(kind.validate(label))
        except AnswerError as e:
            raise ValueError(f"{what}[{i}] is not a valid {kind.name} label: {e}") from None
    return out


def _prf(tp: int, fp: int, fn: int) -> dict:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"tp": int(tp), "fp": int(fp), "fn": int(fn), "precision": precision, "recall": recall, "f1": f1}


# ---------------------------------------------------------------- points


def match_radius(task, size: tuple[int, int] | None = None) -> float:
    """The match radius in the units points are compared in: pixels for a (width, height), else normalised."""
    if size is None:
        return task.match_radius * math.sqrt(2.0)
    return task.match_radius * math.hypot(*size)


def match_within_radius(predicted: np.ndarray, true: np.ndarray, radius: float) -> list[tuple[int, int]]:
    """One-to-one pairs (predicted index, true index) no farther apart than `radius`: the most pairs
    there can be, and among those the least total distance (Hungarian algorithm)."""
    predicted = np.asarray(predicted, dtype=float).reshape(-1, 2)
    true = np.asarray(true, dtype=float).reshape(-1, 2)
    if not len(predicted) or not len(true):
        return []
    distance = cdist(predicted, true)
    feasible = distance <= radius
    # An infeasible pair costs more than any set of feasible pairs can, so the count is maximised first.
    too_far = radius * (min(distance.shape) + 1) + 1.0
    rows, cols = linear_sum_assignment(np.where(feasible, distance, too_far))
    return [(int(r), int(c)) for r, c in zip(rows, cols) if feasible[r, c]]


def _xy(points: list[dict], size: tuple[int, int] | None) -> np.ndarray:
    scale = np.array(size if size is not None else (1.0, 1.0), dtype=float)
    return np.array([[p["x"], p["y"]] for p in points], dtype=float).reshape(-1, 2) * scale


def _count_points(task, preds, trues, sizes, classes) -> tuple[dict, list[str], list[str]]:
    """Class-aware TP/FP/FN per class, and the (true, predicted) label pairs of class-agnostic matching."""
    counts = {c: [0, 0, 0] for c in classes}
    y_true: list[str] = []
    y_pred: list[str] = []
    for i, (pred, true) in enumerate(zip(preds, trues)):
        size = sizes[i] if sizes is not None else None
        radius = match_radius(task, size)
        for c in classes:
            p = [q for q in pred if q["label"] == c]
            t = [q for q in true if q["label"] == c]
            tp = len(match_within_radius(_xy(p, size), _xy(t, size), radius))
            counts[c][0] += tp
            counts[c][1] += len(p) - tp
            counts[c][2] += len(t) - tp
        pairs = match_within_radius(_xy(pred, size), _xy(true, size), radius)
        matched_p = {a for a, _ in pairs}
        matched_t = {b for _, b in pairs}
        for a, b in pairs:
            y_true.append(true[b]["label"])
            y_pred.append(pred[a]["label"])
        y_true += [q["label"] for j, q in enumerate(true) if j not in matched_t]
        y_pred += [NONE_CLASS] * (len(true) - len(matched_t))
        y_true += [NONE_CLASS] * (len(pred) - len(matched_p))
        y_pred += [q["label"] for j, q in enumerate(pred) if j not in matched_p]
    return counts, y_true, y_pred


def points_metrics(task, predictions: list[dict], truths: list[dict], *,
                   sizes: Sequence[tuple[int, int]] | None = None, score_threshold: float = 0.0) -> dict:
    """Matched precision / recall / F1 per class and overall, detection-only P/R/F1, the label confusion
    matrix, count error and the precision / recall curve against a score threshold (validated labels)."""
    classes = list(task.ontology)
    true_points = [t["points"] for t in truths]
    all_points = [p["points"] for p in predictions]

    def kept(threshold: float) -> list[list[dict]]:
        return [[q for q in pts if q.get("score", 1.0) >= threshold] for pts in all_points]

    pred_points = kept(score_threshold)
    counts, y_true, y_pred = _count_points(task, pred_points, true_points, sizes, classes)
    per_class = {c: _prf(*counts[c]) for c in classes}
    overall = _prf(*(sum(counts[c][k] for c in classes) for k in range(3)))
    detected = sum(a != NONE_CLASS and b != NONE_CLASS for a, b in zip(y_true, y_pred))
    detection = _prf(detected, sum(a == NONE_CLASS for a in y_true), sum(b == NONE_CLASS for b in y_pred))
    labels = classes + [NONE_CLASS]
    matrix = confusion_matrix(y_true, y_pred, labels=labels) if y_true else np.zeros((len(labels),) * 2, int)

    n_pred = np.array([len(p) for p in pred_points])
    n_true = np.array([len(t) for t in true_points])
    per_class_mae = {
        c: float(mean_absolute_error([sum(q["label"] == c for q in t) for t in true_points],
                                     [sum(q["label"] == c for q in p) for p in pred_points]))
        for c in classes
    }
    curve = {"thresholds": list(THRESHOLDS), "precision": [], "recall": [], "f1": []}
    for threshold in THRESHOLDS:
        c_counts, _, _ = _count_points(task, kept(threshold), true_points, sizes, classes)
        point = _prf(*(sum(c_counts[c][k] for c in classes) for k in range(3)))
        for key in ("precision", "recall", "f1"):
            curve[key].append(point[key])
    return {
        "match_radius": task.match_radius,
        "radius_units": "pixels (match_radius x image diagonal)" if sizes is not None
        else "normalised (match_radius x sqrt(2), the unit square's diagonal)",
        "score_threshold": score_threshold,
        "overall": overall,
        "per_class": per_class,
        "f1_macro": float(np.mean([per_class[c]["f1"] for c in classes])),
        "detection": detection,
        "confusion": {"labels": labels, "matrix": matrix.tolist(),
                      "rows": "true label", "columns": "predicted label"},
        "count": {
            "mae": float(mean_absolute_error(n_true, n_pred)),
            "bias": float(np.mean(n_pred - n_true)),
            "per_class_mae": per_class_mae,
            "true_total": int(n_true.sum()),
            "predicted_total": int(n_pred.sum()),
        },
        "curve": curve,
        "headline": {"metric": "overall.f1", "value": overall["f1"], "higher_is_better": True},
    }


# ---------------------------------------------------------------- boxes


def boxes_metrics(task, predictions: list[dict], truths: list[dict], *, score_threshold: float = 0.0) -> dict:
    """COCO mAP by pycocotools: mAP@[.5:.95], mAP50, mAP75, AR@100, AP per class and the PR curve at IoU 0.5."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    classes = list(task.ontology)
    category = {c: k + 1 for k, c in enumerate(classes)}  # COCO ids start at 1

    def coco_box(box: list[float]) -> list[float]:
        x1, y1, x2, y2 = (v * COCO_SCALE for v in box)
        return [x1, y1, x2 - x1, y2 - y1]

    images, annotations, detections = [], [], []
    for i, (pred, true) in enumerate(zip(predictions, truths)):
        images.append({"id": i + 1, "width": COCO_SCALE, "height": COCO_SCALE})
        for obj in true["objects"]:
            bbox = coco_box(obj["box"])
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": category[obj["label"]],
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
        for obj in pred["objects"]:
            if obj.get("score", 1.0) >= score_threshold:
                detections.append({"image_id": i + 1, "category_id": category[obj["label"]],
                                   "bbox": coco_box(obj["box"]), "score": float(obj.get("score", 1.0))})
    n_true = {c: sum(o["label"] == c for t in truths for o in t["objects"]) for c in classes}
    n_pred = {c: sum(d["category_id"] == category[c] for d in detections) for c in classes}
    empty = {
        "map": 0.0, "map50": 0.0, "map75": 0.0, "mar100": 0.0,
        "per_class": {c: {"ap": 0.0 if n_true[c] else None, "ap50": 0.0 if n_true[c] else None,
                          "n_true": n_true[c], "n_predicted": n_pred[c]} for c in classes},
        "pr_curve_iou50": {"recall": [], "precision": []},
    }
    if not annotations or not detections:  # COCOeval needs both; nothing found scores 0
        if not annotations:
            empty.update(map=None, map50=None, map75=None, mar100=None)
        return {**empty, "score_threshold": score_threshold,
                "headline": {"metric": "map", "value": empty["map"], "higher_is_better": True}}

    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": k, "name": c} for c, k in category.items()]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt.createIndex()
        dt = gt.loadRes(detections)
        evaluation = COCOeval(gt, dt, iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = evaluation.stats
    precision = evaluation.eval["precision"]  # [iou thresholds, recall points, classes, areas, max dets]

    def mean_defined(values: np.ndarray) -> float | None:
        values = values[values > -1]
        return float(values.mean()) if values.size else None

    per_class = {}
    for k, c in enumerate(classes):
        per_class[c] = {"ap": mean_defined(precision[:, :, k, 0, -1]), "ap50": mean_defined(precision[0, :, k, 0, -1]),
                        "n_true": n_true[c], "n_predicted": n_pred[c]}
    at50 = precision[0, :, :, 0, -1]
    curve = [float(row[row > -1].mean()) if (row > -1).any() else None for row in at50]
    return {
        "map": _coco_stat(stats[0]), "map50": _coco_stat(stats[1]), "map75": _coco_stat(stats[2]),
        "mar100": _coco_stat(stats[8]),
        "per_class": per_class,
        "pr_curve_iou50": {"recall": [float(r) for r in evaluation.params.recThrs], "precision": curve},
        "score_threshold": score_threshold,
        "headline": {"metric": "map", "value": _coco_stat(stats[0]), "higher_is_better": True},
    }


def _coco_stat(value: float) -> float | None:
    return None if value < 0 else float(value)  # pycocotools writes -1 where nothing defines the number


# ---------------------------------------------------------------- caption


def normalise_name(text: Any) -> str:
    """Unicode NFKC, case-folded, whitespace collapsed, quotes and punctuation at the ends stripped."""
    text = unicodedata.normalize("NFKC", str(text)).casefold()
    return " ".join(text.split()).strip(" \"'`.,;:!?()[]{}«»“”‘’")


def caption_metrics(task, predictions: list[dict], truths: list[dict]) -> dict:
    """Rates of the entity named exactly, by name or alias, and mentioned in the caption text."""
    names = {name: [normalise_name(name), *(normalise_name(a) for a in cls.aliases)]
             for name, cls in task.ontology.items()}
    per_entity = {name: {"n": 0, "exact": 0, "alias": 0, "mentioned": 0} for name in task.ontology}
    for pred, true in zip(predictions, truths):
        entity = true["entity"]
        said = normalise_name(pred.get("entity", ""))
        caption = " ".join(unicodedata.normalize("NFKC", str(pred.get("caption", ""))).casefold().split())
        row = per_entity[entity]
        row["n"] += 1
        row["exact"] += said == names[entity][0]
        row["alias"] += said in names[entity]
        row["mentioned"] += any(re.search(rf"(?<!\w){re.escape(n)}(?!\w)", caption) for n in names[entity] if n)
    n = max(1, len(truths))
    rates = {key: sum(r[key] for r in per_entity.values()) / n for key in ("exact", "alias", "mentioned")}
    for row in per_entity.values():
        for key in ("exact", "alias", "mentioned"):
            row[f"{key}_rate"] = row[key] / row["n"] if row["n"] else None
    return {**rates, "per_entity": per_entity,
            "headline": {"metric": "alias", "value": rates["alias"], "higher_is_better": True}}


# ---------------------------------------------------------------- multilabel


def multilabel_metrics(task, predictions: list[dict], truths: list[dict]) -> dict:
    """Per-class TP/FP/FN/TN, precision, recall, F1 and AUROC at `task.threshold`; micro and macro F1 / AUROC;
    micro precision / recall against the threshold."""
    classes = list(task.ontology)
    y_true = np.array([[t["probabilities"][c] >= 0.5 for c in classes] for t in truths], dtype=int)
    y_prob = np.array([[p["probabilities"][c] for c in classes] for p in predictions], dtype=float)
    y_true = y_true.reshape(-1, len(classes))
    y_prob = y_prob.reshape(-1, len(classes))
    y_pred = (y_prob >= task.threshold).astype(int)
    matrices = multilabel_confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
    per_class, aurocs = {}, {}
    for k, c in enumerate(classes):
        (tn, fp), (fn, tp) = matrices[k]
        row = _prf(tp, fp, fn)
        row["tn"] = int(tn)
        row["support"] = int(y_true[:, k].sum())
        row["auroc"] = (float(roc_auc_score(y_true[:, k], y_prob[:, k]))
                        if len(np.unique(y_true[:, k])) == 2 else None)
        per_class[c] = row
        if row["auroc"] is not None:
            aurocs[c] = row["auroc"]
    flat_true = y_true.ravel()
    micro_auroc = float(roc_auc_score(flat_true, y_prob.ravel())) if len(np.unique(flat_true)) == 2 else None
    curve = {"thresholds": list(THRESHOLDS), "precision": [], "recall": [], "f1": []}
    for threshold in THRESHOLDS:
        p, r, f, _ = precision_recall_fscore_support(flat_true, (y_prob.ravel() >= threshold).astype(int),
                                                     average="binary", zero_division=0)
        curve["precision"].append(float(p))
        curve["recall"].append(float(r))
        curve["f1"].append(float(f))
    f1_macro = float(f1_score(y_true, y_pred, average="macro", zero_division=0)) if len(y_true) else 0.0
    return {
        "threshold": task.threshold,
        "per_class": per_class,
        "f1_micro": float(f1_score(y_true, y_pred, average="micro", zero_division=0)) if len(y_true) else 0.0,
        "f1_macro": f1_macro,
        "auroc_macro": float(np.mean(list(aurocs.values()))) if aurocs else None,
        "auroc_micro": micro_auroc,
        "classes_without_auroc": [c for c in classes if per_class[c]["auroc"] is None],
        "confusion_layout": "per class [[tn, fp], [fn, tp]], rows true, columns predicted",
        "curve": curve,
        "headline": {"metric": "f1_macro", "value": f1_macro, "higher_is_better": True},
    }


# ---------------------------------------------------------------- regression


def regression_metrics(task, predictions: list[dict], truths: list[dict]) -> dict:
    """MAE and RMSE per target, and MAE as a share of the target's range (to compare targets)."""
    per_target = {}
    for name, target in task.targets.items():
        y_true = [t["values"][name] for t in truths]
        y_pred = [p["values"][name] for p in predictions]
        if not y_true:
            per_target[name] = {"mae": None, "rmse": None, "mae_normalised": None, "unit": target.unit}
            continue
        mae = float(mean_absolute_error(y_true, y_pred))
        per_target[name] = {"mae": mae, "rmse": float(root_mean_squared_error(y_true, y_pred)),
                            "mae_normalised": mae / (target.max - target.min), "unit": target.unit}
    normalised = [r["mae_normalised"] for r in per_target.values() if r["mae_normalised"] is not None]
    mean = float(np.mean(normalised)) if normalised else None
    return {"per_target": per_target, "mae_normalised_mean": mean,
            "headline": {"metric": "mae_normalised_mean", "value": mean, "higher_is_better": False}}
