"""The report: files written, HTML well formed, every number in it equal to metrics.json, PNGs valid."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raydar.fusion import fuse
from raydar.metrics import score
from raydar.evaluation import Evaluation, MemberEvaluation
from raydar.report import write_report
from raydar.sources import read_ground_truth
from raydar.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
VOID = {"meta", "br", "img", "hr", "input", "link"}


class ReportParser(HTMLParser):
    """Checks that tags nest, and collects the numbers (data-key cells) and the embedded images."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.cells: list[tuple[list, str]] = []
        self.images: list[tuple[str, str]] = []
        self._key: list | None = None
        self._text = ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append((attrs["src"], attrs.get("data-file", "")))
        if tag not in VOID:
            self.stack.append(tag)
        if "data-key" in attrs:
            self._key, self._text = json.loads(attrs["data-key"]), ""

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        if self._key is not None and tag in ("td", "span", "th"):
            self.cells.append((self._key, self._text.strip()))
            self._key = None

    def handle_data(self, data):
        if self._key is not None:
            self._text += data


def check_report(path: Path) -> tuple[dict, ReportParser]:
    out = path.parent
    assert path.name == "report.html" and path.is_file()
    data = json.loads((out / "metrics.json").read_text())
    parser = ReportParser()
    parser.feed(path.read_text())
    parser.close()
    assert parser.stack == [], f"unclosed tags {parser.stack}"
    assert parser.cells, "no numbers found in the report"
    for key, text in parser.cells:
        value = data
        for k in key:
            value = value[k]
        if value is None:
            assert text == "—", (key, text)
        else:
            assert float(text) == pytest.approx(value, abs=0, rel=0), (key, text, value)
    assert parser.images
    for src, name in parser.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert (out / name).read_bytes() == png  # the PNG beside the HTML is the one embedded in it
        with Image.open(io.BytesIO(png)) as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] > 50 and img.size[1] > 50
    return data, parser


def test_points_report_numbers_equal_metrics_json(tmp_path, demo_folder):
    spec = load_spec(REPO / "datasets" / "demo_cells.yaml")
    records = read_ground_truth(demo_folder)[:5]
    truths = [r["label"] for r in records]
    finetuned = [{"points": t["points"][1:]} for t in truths]  # misses one cell per image
    rag = [{"points": t["points"] + [{"label": "implicit", "x": 0.05, "y": 0.95, "score": 0.3}]} for t in truths]
    base = [None] + [{"points": [{"label": "explicit", "x": 0.5, "y": 0.5}]} for _ in truths[1:]]
    ensemble = [fuse(spec.task, {"finetuned": f, "rag": r}, spec.serving.weights) for f, r in zip(finetuned, rag)]
    history = [{"step": s, "loss": 2.0 / (1 + s), **({"val_loss": 2.2 / (1 + s)} if s % 4 == 0 else {})}
               for s in range(17)]
    evaluation = Evaluation(
        split="test", truths=truths,
        members={"base": MemberEvaluation(base, description="untuned"), "finetuned": MemberEvaluation(finetuned),
                 "rag": MemberEvaluation(rag), "ensemble": MemberEvaluation(ensemble)},
        images=[str(demo_folder / r["file"]) for r in records], image_ids=[r["image_id"] for r in records],
        history=history, samples=3,
    )
    path = write_report(tmp_path / "report", spec, evaluation)
    data, parser = check_report(path)

    expected = score(spec.task, finetuned, truths)
    assert data["members"]["finetuned"]["overall"]["f1"] == round(expected["overall"]["f1"], 4)
    assert data["members"]["base"]["failed"] == 1
    assert data["before_after"]["before"] == "base" and data["before_after"]["after"] == "finetuned"
    shown = {tuple(k) for k, _ in parser.cells}
    assert ("members", "ensemble", "overall", "f1") in shown and ("before_after", "rows", 2, "delta") in shown
    assert ("members", "rag", "per_class", "implicit", "fp") in shown and ("history", 16, "loss") in shown
    files = {p.name for p in path.parent.iterdir()}
    assert {"samples.png", "loss_curves.png", "threshold_curves.png", "confusion.png", "members.png",
            "before_after.png"} <= files
    assert data["history"][-1]["loss"] == round(2.0 / 17, 4)


def _image(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


CASES = {
    "multilabel": ("chest_xray.yaml", lambda task, rng: {"probabilities": {c: float(rng.random()) for c in task.ontology}},
                   lambda task, rng: {"probabilities": {c: float(rng.random() < 0.3) for c in task.ontology}}),
    "boxes": ("object_annotation.yaml",
              lambda task, rng: {"objects": [{"label": list(task.ontology)[0], "box": [0.1, 0.1, 0.5, 0.6],
                                              "score": float(rng.random())}]},
              lambda task, rng: {"objects": [{"label": list(task.ontology)[0], "box": [0.12, 0.1, 0.5, 0.55]}]}),
    "caption": ("cultural_entities.yaml",
                lambda task, rng: {"entity": list(task.ontology)[int(rng.integers(2))], "caption": "It is here."},
                lambda task, rng: {"entity": list(task.ontology)[0], "caption": f"{list(task.ontology)[0]} is here."}),
    "regression": ("nutrition.yaml",
                   lambda task, rng: {"values": {t: float(rng.uniform(0, 50)) for t in task.targets}},
                   lambda task, rng: {"values": {t: float(rng.uniform(0, 50)) for t in task.targets}}),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_every_kind_writes_a_report_whose_numbers_equal_metrics_json(tmp_path, kind):
    spec_file, predict, truth = CASES[kind]
    spec = load_spec(REPO / "datasets" / spec_file)
    assert spec.task.kind == kind
    rng = np.random.default_rng(0)
    truths = [truth(spec.task, rng) for _ in range(6)]
    members = {"base": MemberEvaluation([predict(spec.task, rng) for _ in truths]),
               "finetuned": MemberEvaluation([predict(spec.task, rng) for _ in truths[:-1]] + [None])}
    path = write_report(tmp_path, spec, Evaluation(truths=truths, members=members,
                                                   images=[_image(i) for i in range(6)], samples=2))
    data, parser = check_report(path)
    assert data["task"] == kind and data["members"]["finetuned"]["failed"] == 1
    assert "No training history" in path.read_text()
    if kind == "multilabel":
        assert (path.parent / "confusion_finetuned.png").is_file()
        first = list(spec.task.ontology)[0]
        assert ["members", "base", "per_class", first, "tn"] in [k for k, _ in parser.cells]


def test_a_bad_evaluation_is_refused_with_what_was_expected(tmp_path):
    spec = load_spec(REPO / "datasets" / "demo_cells.yaml")
    truth = {"points": []}
    with pytest.raises(ValueError, match="members"):
        write_report(tmp_path, spec, Evaluation(truths=[truth], members={}))
    with pytest.raises(ValueError, match=r"'finetuned'.*2 labels for 1 truths"):
        write_report(tmp_path, spec, Evaluation(truths=[truth], members={"finetuned": MemberEvaluation([truth, truth])}))
    with pytest.raises(ValueError, match="before_after"):
        write_report(tmp_path, spec, Evaluation(truths=[truth], members={"base": MemberEvaluation([truth])},
                                                before_after=("base", "finetuned")))


def test_the_reports_numbers_can_be_recomputed_from_its_per_image_predictions(tmp_path, demo_folder):
    """predictions.parquet holds every member's answer per image: F1 recomputed with scipy's Hungarian matching
    and mAP recomputed with pycocotools from it equal the report's."""
    import pyarrow.parquet as pq
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from scipy.optimize import linear_sum_assignment

    from cluster import StorageRoot
    from raydar.evaluation import write_report_to

    # points: the demo's cells, a member that misses one and invents one per image
    spec = load_spec(REPO / "datasets" / "demo_cells.yaml")
    records = read_ground_truth(demo_folder)[:6]
    truths = [r["label"] for r in records]
    guessed = [{"points": t["points"][1:] + [{"label": "implicit", "x": 0.9, "y": 0.1}]} for t in truths]
    sizes = [(r["width"], r["height"]) for r in records]
    evaluation = Evaluation(truths=truths, members={"finetuned": MemberEvaluation(guessed[:-1] + [None])},
                            image_ids=[r["image_id"] for r in records], sizes=sizes)
    write_report_to(StorageRoot(str(tmp_path / "points")), spec, evaluation)
    rows = pq.read_table(tmp_path / "points" / "predictions.parquet").to_pylist()
    assert len(rows) == 6 and rows[-1]["prediction"] is None and rows[0]["image_id"] == records[0]["image_id"]
    tp = fp = fn = 0
    for row in rows:
        pred = json.loads(row["prediction"])["points"] if row["prediction"] else []
        true = json.loads(row["truth"])["points"]
        radius = spec.task.match_radius * np.hypot(row["width"], row["height"])
        for cls in spec.task.ontology:
            p = np.array([[q["x"] * row["width"], q["y"] * row["height"]] for q in pred if q["label"] == cls])
            t = np.array([[q["x"] * row["width"], q["y"] * row["height"]] for q in true if q["label"] == cls])
            matched = 0
            if len(p) and len(t):
                cost = np.linalg.norm(p[:, None] - t[None], axis=-1)
                r, c = linear_sum_assignment(np.where(cost <= radius, cost, 1e9))
                matched = int(sum(cost[i, j] <= radius for i, j in zip(r, c)))
            tp, fp, fn = tp + matched, fp + len(p) - matched, fn + len(t) - matched
    report = json.loads((tmp_path / "points" / "metrics.json").read_text())
    assert report["members"]["finetuned"]["overall"]["f1"] == round(2 * tp / (2 * tp + fp + fn), 4)

    # boxes: mAP by pycocotools from the file
    spec = load_spec(REPO / "datasets" / "object_annotation.yaml")
    rng = np.random.default_rng(3)
    first = list(spec.task.ontology)[0]
    truths = [{"objects": [{"label": first, "box": [0.1, 0.1, 0.5, 0.6]}]} for _ in range(5)]
    preds = [{"objects": [{"label": first, "box": [0.1 + rng.uniform(0, 0.1), 0.1, 0.5, 0.6],
                           "score": float(rng.random())}]} for _ in range(5)]
    write_report_to(StorageRoot(str(tmp_path / "boxes")), spec,
                    Evaluation(truths=truths, members={"finetuned": MemberEvaluation(preds)}))
    rows = pq.read_table(tmp_path / "boxes" / "predictions.parquet").to_pylist()
    images, annotations, detections = [], [], []
    for i, row in enumerate(rows):
        images.append({"id": i + 1, "width": 1000, "height": 1000})
        for o in json.loads(row["truth"])["objects"]:
            x1, y1, x2, y2 = (v * 1000 for v in o["box"])
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        for o in json.loads(row["prediction"])["objects"]:
            x1, y1, x2, y2 = (v * 1000 for v in o["box"])
            detections.append({"image_id": i + 1, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                               "score": o["score"]})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": first}]}
    gt.createIndex()
    cocoeval = COCOeval(gt, gt.loadRes(detections), iouType="bbox")
    cocoeval.evaluate()
    cocoeval.accumulate()
    cocoeval.summarize()
    report = json.loads((tmp_path / "boxes" / "metrics.json").read_text())
    assert report["members"]["finetuned"]["map"] == round(float(cocoeval.stats[0]), 4)
    assert report["members"]["finetuned"]["map50"] == round(float(cocoeval.stats[1]), 4)
