"""The ensemble: one label from the members' labels, and how much the members agree.

`fuse(task, results, weights)` takes member name -> label (members that failed are simply absent) and
member name -> weight (`spec.serving.weights`; a member not named there weighs 1.0, a member weighing 0
is ignored). It returns one label in the task kind's schema. A member's object without a `score`
counts as scored 1.0. W below is the total weight of the members present.

- points: the members' points are clustered class-agnostically within the match radius (the same
  radius as the metrics: `task.match_radius` x the image diagonal, in normalised units sqrt(2) x
  `match_radius`). Members are taken heaviest first; each one's points are matched one-to-one to the
  clusters so far by the Hungarian algorithm (`raydar.metrics.match_within_radius`), so a cluster holds
  at most one point per member; unmatched points start clusters. Every cluster becomes a point:
  position = mean weighted by weight x score, label = the label with the most weight x score, and
  `score` = sum of weight x score of its members / W, i.e. the weighted share of the ensemble that
  found it. Two equally weighted members that agree give score 1.0, a point only one found 0.5.
  Nothing is dropped unless `min_score` says so: filter with `spec.serving.score_threshold`.
- boxes: `ensemble_boxes.weighted_boxes_fusion` with `task.iou_threshold` and the weights; its
  `score` ('avg') is the same weighted share as for points. Each fused box keeps the description of
  the member box that overlaps it most (ties: the heavier, better-scored member); `qa` comes from the
  heaviest member that has any.
- caption: the entity with the most weight x score wins; the caption is that of the heaviest,
  best-scored member naming it; `score` = its weighted share.
- multilabel: the weighted mean of each class's probability.
- regression: the weighted mean of each value.

`agreement(task, results)` is in [0, 1], 1 when the members agree, and ignores weights: the mean, over
the objects (point clusters, fused boxes, classes, the entity), of the share of present members that
back the consensus, rescaled so that backing by only one of k members is 0: (share - 1/k) / (1 - 1/k).
For regression it is 1 - the mean spread (max - min) of the members' values over the target's range.
With one member present it is 1.0.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np

from raydar.metrics import match_radius, match_within_radius
from raydar.tasks import AnswerError, task_kind


def fuse(task, results: dict[str, dict], weights: dict[str, float], *, min_score: float = 0.0) -> dict:
    """One label from the members' labels (see the module docstring for each kind's rule).
    Points and boxes scored below `min_score` are left out."""
    members = _members(task, results, weights)
    if task.kind == "points":
        return fuse_points(task, members, min_score=min_score)
    if task.kind == "boxes":
        return fuse_boxes(task, members, min_score=min_score)
    if task.kind == "caption":
        return fuse_captions(task, members)
    if task.kind == "multilabel":
        return {"probabilities": _weighted_mean(members, "probabilities", list(task.ontology))}
    if task.kind == "regression":
        return {"values": _weighted_mean(members, "values", list(task.targets))}
    raise ValueError(f"unknown task kind {task.kind!r}")  # pragma: no cover


def agreement(task, results: dict[str, dict]) -> float:
    """How much the members agree, in [0, 1] (1 = they agree); weights do not count."""
    members = _members(task, results, {name: 1.0 for name in results}, need_weight=False)
    k = len(members)
    if k == 1:
        return 1.0
    if task.kind == "points":
        clusters = _cluster_points(task, members)
        backing = [max(Counter(p["label"] for _, _, p in cluster).values()) / k for cluster in clusters]
    elif task.kind == "boxes":
        unit = [(name, 1.0, {"objects": [{**o, "score": 1.0} for o in label["objects"]]})
                for name, _, label in members]
        backing = [o["score"] for o in fuse_boxes(task, unit)["objects"]]  # = boxes in the cluster / k, at most 1
    elif task.kind == "caption":
        backing = [max(Counter(label["entity"] for _, _, label in members).values()) / k]
    elif task.kind == "multilabel":
        backing = [max(Counter(label["probabilities"][c] >= task.threshold for _, _, label in members).values()) / k
                   for c in task.ontology]
    elif task.kind == "regression":
        spreads = []
        for name, target in task.targets.items():
            values = [label["values"][name] for _, _, label in members]
            spreads.append(min(1.0, (max(values) - min(values)) / (target.max - target.min)))
        return float(1.0 - np.mean(spreads))
    else:  # pragma: no cover
        raise ValueError(f"unknown task kind {task.kind!r}")
    if not backing:
        return 1.0  # no member found anything: they agree
    return float(np.mean([(b - 1 / k) / (1 - 1 / k) for b in backing]))


def _members(task, results: dict[str, dict], weights: dict[str, float],
             need_weight: bool = True) -> list[tuple[str, float, dict]]:
    """(name, weight, validated label) of the members present, heaviest first, then by name."""
    kind = task_kind(task)
    members = []
    for name, label in results.items():
        if label is None:
            continue
        weight = float(weights.get(name, 1.0))
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of member {name!r} must be a number >= 0, got {weights.get(name)!r}")
        if weight == 0:
            continue
        try:
            validated = kind.validate(label)
        except AnswerError as e:
            raise ValueError(f"member {name!r}: not a valid {task.kind} label: {e}") from None
        if task.kind == "caption":  # the caption schema has no score of its own; keep the member's
            validated["score"] = _caption_score(name, label)
        members.append((name, weight, validated))
    if not members:
        raise ValueError(f"no member to fuse: results from {sorted(results) or 'none'}, "
                         f"weights {weights}{' (all zero?)' if need_weight else ''}")
    return sorted(members, key=lambda m: (-m[1], m[0]))


def _caption_score(name: str, label: dict) -> float:
    try:
        score = float(label.get("score", 1.0))
    except (TypeError, ValueError):
        raise ValueError(f"member {name!r}: score is not a number: {label.get('score')!r}") from None
    return min(1.0, max(0.0, score))


def _weighted_mean(members, key: str, names: list[str]) -> dict[str, float]:
    total = sum(w for _, w, _ in members)
    return {n: float(sum(w * label[key][n] for _, w, label in members) / total) for n in names}


# ---------------------------------------------------------------- points


def _cluster_points(task, members) -> list[list[tuple[str, float, dict]]]:
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
    for cluster in _cluster_points(task, members):
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


# ---------------------------------------------------------------- boxes


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


# ---------------------------------------------------------------- caption


def fuse_captions(task, members) -> dict:
    """The entity with the most weight x score; the caption of the heaviest, best-scored member naming it."""
    total = sum(w for _, w, _ in members)
    order = {c: k for k, c in enumerate(task.ontology)}
    votes: dict[str, float] = defaultdict(float)
    for _, w, label in members:
        votes[label["entity"]] += w * label["score"]
    entity = max(votes, key=lambda e: (votes[e], -order[e]))
    backers = [(w * label["score"], w, label) for _, w, label in members if label["entity"] == entity]
    best = max(backers, key=lambda b: (b[0], b[1]))[2]
    return {"entity": entity, "caption": best["caption"], "score": min(1.0, votes[entity] / total)}
