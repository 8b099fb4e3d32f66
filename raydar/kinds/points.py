"""Points: one point per object at its centre, with a class from the ontology (the mast-cell seed).

Label: `{"points": [{"label", "x", "y", "score"}]}`, coordinates normalised to [0, 1].

Metric: predicted and true points are matched one-to-one within a radius by the Hungarian algorithm
(`scipy.optimize.linear_sum_assignment`; the most pairs, then the least total distance). The radius is
`task.match_radius` times the image diagonal. With image sizes (`sizes=[(width, height), ...]`)
distances are in pixels; without, in normalised units, where the diagonal of the unit square is
sqrt(2) — the same thing for square images such as the demo's. Class-aware matching (a point only
matches a true point of its class) gives TP/FP/FN, precision, recall and F1 per class and overall
(micro); class-agnostic matching gives detection-only P/R/F1 and a confusion matrix of the matched
labels with a `none` row and column for misses and inventions. Count error: MAE and mean signed
error of the number of points per image (scikit-learn). Precision and recall are also given against
a score threshold (points below it are dropped and the matching redone), for the report's curve.

Fusion: the members' points are clustered class-agnostically within the match radius (in normalised
units sqrt(2) x `match_radius`). Members are taken heaviest first; each one's points are matched
one-to-one to the clusters so far by the Hungarian algorithm (`match_within_radius`), so a cluster holds
at most one point per member; unmatched points start clusters. Every cluster becomes a point:
position = mean weighted by weight x score, label = the label with the most weight x score, and
`score` = sum of weight x score of its members / W, i.e. the weighted share of the ensemble that
found it. Two equally weighted members that agree give score 1.0, a point only one found 0.5.
Nothing is dropped unless `min_score` says so (`spec.serving.score_threshold`).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any, Literal

import numpy as np
from pydantic import Field

from raydar.fusion import rescaled_backing
from raydar.kinds.base import AnswerError, ClassTaskSection, LocatedObjectsKind, item_score, items_of, unit_interval
from raydar.metrics import NONE_CLASS, THRESHOLDS, prf


class PointsTask(ClassTaskSection):
    kind: Literal["points"]
    match_radius: float = Field(
        default=0.03, gt=0, le=0.5, description="Match radius for metrics and fusion, fraction of the image diagonal."
    )


class Points(LocatedObjectsKind):
    """`{"points": [{"label", "x", "y", "score"}]}`: one point per object, at its centre."""

    name = "points"
    section = PointsTask
    objects_key = "points"
    trains_point_head = True
    spec: PointsTask

    # ------------------------------------------------------------ schema, prompt and parser
    def _format_help(self) -> str:
        return (
            f"Classes:\n{self.classes.describe(self.spec.ontology)}\n\n"
            'Answer format: {"points": [{"label": "<class>", "x": <x>, "y": <y>}, ...]} with one entry per '
            f"object at its centre; x and y are {self._coordinate_words()}, x from the left, y from the top. "
            'An image with none: {"points": []}.'
        )

    def empty(self) -> dict:
        return {"points": []}

    def _from_teacher(self, value: Any, width: int, height: int) -> Any:
        out = []
        for item in items_of(value, "points"):
            if "x" not in item or "y" not in item or "label" not in item:
                raise AnswerError(f"a point needs label, x and y: {item!r}")
            out.append(
                {
                    **item,
                    "x": self._to_unit(item["x"], width, "x"),
                    "y": self._to_unit(item["y"], height, "y"),
                }
            )
        return {"points": out}

    def _to_answer(self, label: dict, width: int, height: int) -> dict:
        # Reading order (top to bottom, then left to right): one right answer per image, not n! orders.
        ordered = sorted(label["points"], key=lambda p: (p["y"], p["x"]))
        return {"points": [
            {"label": p["label"], "x": self._from_unit(p["x"], width), "y": self._from_unit(p["y"], height)}
            for p in ordered
        ]}

    def moved(self, label: dict, move) -> dict:
        return {"points": [{**p, **dict(zip("xy", move(p["x"], p["y"])))} for p in label["points"]]}

    def validate(self, label: Any) -> dict:
        points = []
        for item in items_of(label, "points"):
            if "x" not in item or "y" not in item or "label" not in item:
                raise AnswerError(f"a point needs label, x and y: {item!r}")
            points.append(
                {
                    "label": self.classes.canonical(item["label"]),
                    "x": unit_interval(item["x"], "x"),
                    "y": unit_interval(item["y"], "y"),
                    "score": item_score(item),
                }
            )
        return {"points": points}

    # ------------------------------------------------------------ metric
    def score(self, predictions: list[dict], truths: list[dict], *, sizes=None, score_threshold: float = 0.0) -> dict:
        return points_metrics(self.spec, predictions, truths, sizes=sizes, score_threshold=score_threshold)

    # ------------------------------------------------------------ fusion
    def fuse(self, members, *, min_score: float = 0.0) -> dict:
        return fuse_points(self.spec, members, min_score=min_score)

    def agreement(self, members) -> float:
        k = len(members)
        clusters = cluster_points(self.spec, members)
        return rescaled_backing([max(Counter(p["label"] for _, _, p in c).values()) / k for c in clusters], k)

    # ------------------------------------------------------------ report
    definition = (
        "Points are matched one-to-one to true points within the match radius (Hungarian algorithm, "
        "scipy); a match must have the same class. Precision = TP / (TP + FP), recall = TP / (TP + FN), "
        "F1 their harmonic mean, over all classes (micro); F1 macro averages the classes. "
        "F1 ignoring class matches regardless of class. Count MAE: mean absolute error of the number "
        "of points per image."
    )

    def table_columns(self) -> list[tuple[tuple, str]]:
        return [(("overall", "precision"), "precision"), (("overall", "recall"), "recall"), (("overall", "f1"), "F1"),
                (("f1_macro",), "F1 macro"), (("detection", "f1"), "F1 ignoring class"),
                (("count", "mae"), "count MAE"), (("failed",), "failed")]

    def is_rate(self, path: tuple) -> bool:
        return path not in (("count", "mae"), ("failed",))

    def report_per_class(self, page, members: dict) -> None:
        fields = [("tp", "TP"), ("fp", "FP"), ("fn", "FN"), ("precision", "P"), ("recall", "R"), ("f1", "F1")]
        page.per_class_table("Per class", list(self.spec.ontology), "per_class", fields)
        confusions = {n: members[n]["confusion"] for n in page.names if members[n].get("confusion")}
        if confusions:
            page.figure("confusion.png", _plot_confusions(confusions),
                        "Confusion of matched labels per member: rows true, columns predicted; "
                        "none = missed (column) or invented (row)")

    def report_curves(self, page, members: dict) -> None:
        page.threshold_curves(members)

    def draw(self, ax, label: dict, colour: str, width: int, height: int, markers: str) -> str:
        order = {c: k for k, c in enumerate(self.spec.ontology)}
        size = max(5.0, match_radius(self.spec, (width, height)) * 0.9)
        for p in label.get("points", []):
            faint = p.get("score", 1.0) < 0.5
            ax.plot(p["x"] * width, p["y"] * height, marker=markers[order.get(p["label"], 0) % len(markers)],
                    markersize=size, fillstyle="none", color=colour, markeredgewidth=1.6,
                    alpha=0.55 if faint else 1.0)
        n = len(label.get("points", []))
        return f"{n} point{'s' * (n != 1)}"

    def legend_handles(self, markers: str) -> list:
        from matplotlib.lines import Line2D

        return [Line2D([], [], color="#333", marker=markers[k % len(markers)], ls="", fillstyle="none", label=c)
                for k, c in enumerate(self.spec.ontology)]

    # ------------------------------------------------------------ student
    def head(self, hidden_size: int, *, point_head: bool = False):
        if not point_head:
            return None
        from raydar.heads import PointsHead

        return PointsHead(hidden_size, list(self.spec.ontology))


# ---------------------------------------------------------------- matching


def match_radius(task, size: tuple[int, int] | None = None) -> float:
    """The match radius in the units points are compared in: pixels for a (width, height), else normalised."""
    if size is None:
        return task.match_radius * math.sqrt(2.0)
    return task.match_radius * math.hypot(*size)


def match_within_radius(predicted: np.ndarray, true: np.ndarray, radius: float) -> list[tuple[int, int]]:
    """One-to-one pairs (predicted index, true index) no farther apart than `radius`: the most pairs
    there can be, and among those the least total distance (Hungarian algorithm)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

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


# ---------------------------------------------------------------- metric


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
                   sizes=None, score_threshold: float = 0.0) -> dict:
    """Matched precision / recall / F1 per class and overall, detection-only P/R/F1, the label confusion
    matrix, count error and the precision / recall curve against a score threshold (validated labels)."""
    from sklearn.metrics import confusion_matrix, mean_absolute_error

    classes = list(task.ontology)
    true_points = [t["points"] for t in truths]
    all_points = [p["points"] for p in predictions]

    def kept(threshold: float) -> list[list[dict]]:
        return [[q for q in pts if q.get("score", 1.0) >= threshold] for pts in all_points]

    pred_points = kept(score_threshold)
    counts, y_true, y_pred = _count_points(task, pred_points, true_points, sizes, classes)
    per_class = {c: prf(*counts[c]) for c in classes}
    overall = prf(*(sum(counts[c][k] for c in classes) for k in range(3)))
    detected = sum(a != NONE_CLASS and b != NONE_CLASS for a, b in zip(y_true, y_pred))
    detection = prf(detected, sum(a == NONE_CLASS for a in y_true), sum(b == NONE_CLASS for b in y_pred))
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
        point = prf(*(sum(c_counts[c][k] for c in classes) for k in range(3)))
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


# ---------------------------------------------------------------- fusion


def cluster_points(task, members) -> list[list[tuple[str, float, dict]]]:
    """Clusters of (member, weight, point), at most one point per member each, within the match radius."""
    radius = match_radius(task)
    clusters: list[list[tuple[str, float, dict]]] = []
    centres: list[tuple[float, float]] = []
    for name, weight, label in members:
        points = label["points"]
        pairs = match_within_radius(np.array([[p["x"], p["y"]] for p in points]).reshape(-1, 2),
                                    np.array(centres).reshape(-1, 2), radius)
        matched = dict(pairs)
        for i, point in enumerate(points):
            if i in matched:
                clusters[matched[i]].append((name, weight, point))
                centres[matched[i]] = _centre(clusters[matched[i]])
            else:
                clusters.append([(name, weight, point)])
                centres.append((point["x"], point["y"]))
    return clusters


def _centre(cluster) -> tuple[float, float]:
    mass = np.array([w * p["score"] for _, w, p in cluster])
    if mass.sum() <= 0:
        mass = np.array([w for _, w, _ in cluster])
    xy = np.array([[p["x"], p["y"]] for _, _, p in cluster])
    x, y = (mass[:, None] * xy).sum(axis=0) / mass.sum()
    return float(x), float(y)


def fuse_points(task, members, *, min_score: float = 0.0) -> dict:
    """Cluster within the radius, weighted vote for the label, weighted share as the score."""
    total = sum(w for _, w, _ in members)
    order = {c: k for k, c in enumerate(task.ontology)}
    fused = []
    for cluster in cluster_points(task, members):
        votes: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for _, w, p in cluster:
            votes[p["label"]][0] += w * p["score"]
            votes[p["label"]][1] += w
        label = max(votes, key=lambda c: (votes[c][0], votes[c][1], -order[c]))
        score = min(1.0, sum(w * p["score"] for _, w, p in cluster) / total)
        if score >= min_score:
            x, y = _centre(cluster)
            fused.append({"label": label, "x": x, "y": y, "score": score})
    fused.sort(key=lambda p: (-p["score"], p["y"], p["x"]))
    return {"points": fused}


# ---------------------------------------------------------------- report


def _plot_confusions(confusions: dict[str, dict]):
    from raydar.report import new_figure

    n = len(confusions)
    size = len(next(iter(confusions.values()))["labels"])
    cols = min(n, 5)
    rows = math.ceil(n / cols)
    fig = new_figure((0.8 + 0.75 * size) * cols, (0.9 + 0.75 * size) * rows)
    for k, (name, conf) in enumerate(confusions.items()):
        labels, matrix = conf["labels"], np.array(conf["matrix"])
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(matrix, cmap="Blues", vmin=0)
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > matrix.max() / 2 else "black")
        ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=30)
        ax.set_yticks(range(len(labels)), labels if k % cols == 0 else [], fontsize=8)
        ax.set_xlabel("predicted", fontsize=8)
        if k % cols == 0:
            ax.set_ylabel("true", fontsize=8)
        ax.set_title(name, fontsize=10)
    fig.tight_layout()
    return fig
