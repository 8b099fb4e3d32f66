"""Metrics per task kind, computed with the libraries the field trusts, never re-implemented.

`score(task, predictions, truths)` is the entry point: one label per image in the same order, a failed
prediction (`None`) scored as the kind's empty label and counted in `failed`. It returns a plain,
JSON-serialisable dict with `kind`, `n_images`, `failed`, the kind's metrics and a `headline`
(`{"metric", "value", "higher_is_better"}`: the one number a summary line prints). Each kind's metrics
are defined in its module under raydar/kinds/:

- points: Hungarian matching within a radius (scipy), precision / recall / F1 per class and overall,
  a confusion matrix, count error, and precision / recall against a score threshold;
- boxes: COCO mAP by pycocotools;
- caption: the entity named correctly (exact, by alias, mentioned in the caption);
- multilabel: per-class TP/FP/FN/TN, F1 and AUROC (scikit-learn);
- regression: MAE and RMSE per target (scikit-learn).

Where a ratio has an empty denominator (no predictions, no truths) it is 0, as scikit-learn's
`zero_division=0`. This module holds what the kinds' metrics share; it imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

NONE_CLASS = "none"  # the confusion-matrix row / column for a missed or invented object
THRESHOLDS = tuple(round(k / 20, 2) for k in range(21))  # the report's score-threshold grid, 0 to 1 by 0.05


def score(task, predictions: Sequence[dict | None], truths: Sequence[dict], *,
          sizes: Sequence[tuple[int, int]] | None = None, score_threshold: float = 0.0) -> dict:
    """The task kind's metrics of `predictions` against `truths` (same order, one label per image).

    `sizes` (width, height per image) makes point distances exact on non-square images; without it
    they are measured in normalised units. Points and boxes scored below `score_threshold` are dropped
    first (the curves still sweep every threshold).
    """
    from raydar.kinds import kind_of  # the kinds build on this module's primitives

    if len(predictions) != len(truths):
        raise ValueError(f"predictions ({len(predictions)}) and truths ({len(truths)}) must be one per image, "
                         "in the same order")
    if sizes is not None and len(sizes) != len(truths):
        raise ValueError(f"sizes ({len(sizes)}) must give one (width, height) per image ({len(truths)})")
    kind = kind_of(task)
    failed = sum(p is None for p in predictions)
    preds = kind.scored_predictions([p if p is not None else kind.empty() for p in predictions])
    trues = validated(kind, truths, "truths")
    result = kind.score(preds, trues, sizes=sizes, score_threshold=score_threshold)
    return {"kind": kind.name, "n_images": len(truths), "failed": failed, **result}


def validated(kind, labels: Sequence[Any], what: str) -> list[dict]:
    """Every label validated by `kind`; the error names the first bad one by its index in `what`."""
    from raydar.kinds import AnswerError

    out = []
    for i, label in enumerate(labels):
        if label is None:
            raise ValueError(f"{what}[{i}] is None; only predictions may be missing (a failed answer)")
        try:
            out.append(kind.validate(label))
        except AnswerError as e:
            raise ValueError(f"{what}[{i}] is not a valid {kind.name} label: {e}") from None
    return out


def prf(tp: int, fp: int, fn: int) -> dict:
    """TP/FP/FN with precision, recall and F1 (0 where a denominator is empty)."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"tp": int(tp), "fp": int(fp), "fn": int(fn), "precision": precision, "recall": recall, "f1": f1}
