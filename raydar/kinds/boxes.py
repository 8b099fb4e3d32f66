"""Boxes: objects with a class, a box and a description in context, plus question/answer pairs about the
image (the object-annotation seed).

Label: `{"objects": [{"label", "box": [x1, y1, x2, y2], "description", "score"}], "qa": [{"question",
"answer"}]}`, box corners normalised to [0, 1].

Metric: COCO mAP by `pycocotools.cocoeval.COCOeval` (mAP@[.5:.95], mAP50, mAP75, AR@100, AP per class and
the precision-recall curve at IoU 0.5). Boxes are scaled to a 1000 x 1000 image; IoU does not change
under scaling each axis, so the numbers are those of the original pixels.

Fusion: `ensemble_boxes.weighted_boxes_fusion` with `task.iou_threshold` and the weights; its `score`
('avg') is the weighted share of the ensemble that found the box. Each fused box keeps the description
of the member box that overlaps it most (ties: the heavier, better-scored member); `qa` comes from the
heaviest member that has any.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Literal

import numpy as np
from pydantic import Field

from raydar.fusion import rescaled_backing
from raydar.kinds.base import AnswerError, ClassTaskSection, LocatedObjectsKind, item_score, items_of, unit_interval

COCO_SCALE = 1000.0


class BoxesTask(ClassTaskSection):
    kind: Literal["boxes"]
    describe_objects: bool = Field(default=True, description="Ask for a description of each object.")
    questions_per_image: int = Field(default=0, ge=0, description="Q&A pairs to ask the teacher for.")
    iou_threshold: float = Field(default=0.5, gt=0, lt=1, description="IoU for fusion of boxes.")


class Boxes(LocatedObjectsKind):
    """`{"objects": [{"label", "box": [x1, y1, x2, y2], "description", "score"}], "qa": [...]}`."""

    name = "boxes"
    section = BoxesTask
    objects_key = "objects"
    spec: BoxesTask

    # ------------------------------------------------------------ schema, prompt and parser
    def _format_help(self) -> str:
        desc = ', "description": "<what it is and what it is doing>"' if self.spec.describe_objects else ""
        qa = (
            f' Also give {self.spec.questions_per_image} question-answer pairs about the image in "qa": '
            '[{"question": "...", "answer": "..."}].'
            if self.spec.questions_per_image
            else ""
        )
        return (
            f"Classes:\n{self.classes.describe(self.spec.ontology)}\n\n"
            'Answer format: {"objects": [{"label": "<class>", "box": [x1, y1, x2, y2]' + desc + "}, ...]}"
            f"; box corners are {self._coordinate_words()}, (x1, y1) top-left, (x2, y2) bottom-right.{qa}"
        )

    def empty(self) -> dict:
        return {"objects": [], "qa": []}

    def _from_teacher(self, value: Any, width: int, height: int) -> Any:
        objects = []
        for item in items_of(value, "objects"):
            box = item.get("box")
            if not isinstance(box, list) or len(box) != 4:
                raise AnswerError(f"box must be [x1, y1, x2, y2]: {item!r}")
            extents = (width, height, width, height)
            objects.append(
                {**item, "box": [self._to_unit(v, e, "box") for v, e in zip(box, extents)]}
            )
        qa = value.get("qa", []) if isinstance(value, dict) else []
        return {"objects": objects, "qa": qa}

    def _to_answer(self, label: dict, width: int, height: int) -> dict:
        objects = []
        for o in sorted(label["objects"], key=lambda o: (o["box"][1], o["box"][0])):  # reading order
            box = [self._from_unit(v, e) for v, e in zip(o["box"], (width, height, width, height))]
            item = {"label": o["label"], "box": box}
            if self.spec.describe_objects:
                item["description"] = o["description"]
            objects.append(item)
        answer: dict = {"objects": objects}
        if self.spec.questions_per_image:
            answer["qa"] = label["qa"]
        return answer

    def validate(self, label: Any) -> dict:
        objects = []
        for item in items_of(label, "objects"):
            box = item.get("box")
            if not isinstance(box, list) or len(box) != 4 or "label" not in item:
                raise AnswerError(f"an object needs label and box [x1, y1, x2, y2]: {item!r}")
            x1, y1, x2, y2 = (unit_interval(v, "box") for v in box)
            if x2 <= x1 or y2 <= y1:
                raise AnswerError(f"box corners out of order: {box!r}")
            objects.append(
                {
                    "label": self.classes.canonical(item["label"]),
                    "box": [x1, y1, x2, y2],
                    "description": str(item.get("description", "")),
                    "score": item_score(item),
                }
            )
        qa = []
        for pair in label.get("qa", []) if isinstance(label, dict) else []:
            if not isinstance(pair, dict) or not {"question", "answer"} <= set(pair):
                raise AnswerError(f"a Q&A pair needs question and answer: {pair!r}")
            qa.append({"question": str(pair["question"]), "answer": str(pair["answer"])})
        return {"objects": objects, "qa": qa}

    def moved(self, label: dict, move) -> dict:
        objects = []
        for o in label["objects"]:
            (ax, ay), (bx, by) = move(*o["box"][:2]), move(*o["box"][2:])
            objects.append({**o, "box": [min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)]})
        return {**label, "objects": objects}

    # ------------------------------------------------------------ metric
    def score(self, predictions: list[dict], truths: list[dict], *, sizes=None, score_threshold: float = 0.0) -> dict:
        return boxes_metrics(self.spec, predictions, truths, score_threshold=score_threshold)

    # ------------------------------------------------------------ fusion
    def fuse(self, members, *, min_score: float = 0.0) -> dict:
        return fuse_boxes(self.spec, members, min_score=min_score)

    def agreement(self, members) -> float:
        unit = [(name, 1.0, {"objects": [{**o, "score": 1.0} for o in label["objects"]]})
                for name, _, label in members]
        backing = [o["score"] for o in fuse_boxes(self.spec, unit)["objects"]]  # = boxes in the cluster / k, at most 1
        return rescaled_backing(backing, len(members))

    # ------------------------------------------------------------ knowledge base
    def document(self, label: dict) -> list[str]:
        parts = super().document(label)
        parts += [f"{o['label']}: {o['description']}." for o in label["objects"] if o.get("description")]
        parts += [f"Q: {qa['question']} A: {qa['answer']}" for qa in label.get("qa", [])]
        return parts

    # ------------------------------------------------------------ report
    definition = (
        "COCO metrics by pycocotools: mAP averages AP over IoU thresholds 0.50:0.05:0.95; mAP50 and mAP75 at "
        "one threshold; AR@100 is the recall with up to 100 boxes per image."
    )

    def table_columns(self) -> list[tuple[tuple, str]]:
        return [(("map",), "mAP"), (("map50",), "mAP50"), (("map75",), "mAP75"), (("mar100",), "AR@100"),
                (("failed",), "failed")]

    def report_per_class(self, page, members: dict) -> None:
        fields = [("ap", "AP"), ("ap50", "AP50"), ("n_true", "true"), ("n_predicted", "predicted")]
        page.per_class_table("Per class", list(self.spec.ontology), "per_class", fields)

    def report_curves(self, page, members: dict) -> None:
        if any(members[n].get("pr_curve_iou50", {}).get("recall") for n in page.names):
            page.add("<h2>Precision against recall at IoU 0.5</h2>")
            page.figure("pr_curve_iou50.png", _plot_pr_curves(members, page.names),
                        "COCO precision-recall at IoU 0.5, averaged over classes")

    def draw(self, ax, label: dict, colour: str, width: int, height: int, markers: str) -> str:
        from matplotlib.patches import Rectangle

        for o in label.get("objects", []):
            x1, y1, x2, y2 = o["box"]
            ax.add_patch(Rectangle((x1 * width, y1 * height), (x2 - x1) * width, (y2 - y1) * height, fill=False,
                                   edgecolor=colour, lw=1.6))
            ax.text(x1 * width, y1 * height, o["label"], color="white", fontsize=6, va="bottom",
                    bbox={"facecolor": colour, "edgecolor": "none", "pad": 1})
        n = len(label.get("objects", []))
        return f"{n} object{'s' * (n != 1)}"


# ---------------------------------------------------------------- metric


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


# ---------------------------------------------------------------- fusion


def fuse_boxes(task, members, *, min_score: float = 0.0) -> dict:
    """Weighted boxes fusion (ensemble-boxes), descriptions from the best-overlapping member box."""
    from ensemble_boxes import weighted_boxes_fusion

    classes = list(task.ontology)
    index = {c: k for k, c in enumerate(classes)}
    # A box scored 0 carries no vote; WBF would divide by its zero weight.
    kept = [[o for o in label["objects"] if o["score"] > 0] for _, _, label in members]
    boxes, scores, labels = weighted_boxes_fusion(
        [np.array([o["box"] for o in objs], dtype=float).reshape(-1, 4) for objs in kept],
        [np.array([o["score"] for o in objs], dtype=float) for objs in kept],
        [np.array([index[o["label"]] for o in objs], dtype=float) for objs in kept],
        weights=[w for _, w, _ in members],
        iou_thr=task.iou_threshold, skip_box_thr=0.0, conf_type="avg",
    )
    objects = []
    for box, score, k in zip(boxes, scores, labels):
        if score < min_score:
            continue
        label = classes[int(k)]
        box = [float(v) for v in box]
        candidates = [(_iou(box, o["box"]), w * o["score"], o) for (_, w, _), objs in zip(members, kept)
                      for o in objs if o["label"] == label]
        description = max(candidates, key=lambda c: (c[0], c[1]))[2]["description"] if candidates else ""
        objects.append({"label": label, "box": box, "description": description, "score": float(min(1.0, score))})
    qa = next((label["qa"] for _, _, label in members if label.get("qa")), [])
    return {"objects": objects, "qa": qa}


def _iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ---------------------------------------------------------------- report


def _plot_pr_curves(members: dict, names: list[str]):
    from raydar.report import member_colour, new_figure

    fig = new_figure(5.5, 4)
    ax = fig.add_subplot()
    for name in names:
        curve = members[name].get("pr_curve_iou50") or {}
        if curve.get("recall"):
            pairs = [(r, p) for r, p in zip(curve["recall"], curve["precision"]) if p is not None]
            if pairs:
                ax.plot(*zip(*pairs), color=member_colour(name, names), label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    return fig
