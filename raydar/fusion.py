"""The ensemble: one label from the members' labels, and how much the members agree.

`fuse(task, results, weights)` takes member name -> label (members that failed are simply absent) and
member name -> weight (`spec.serving.weights`; a member not named there weighs 1.0, a member weighing 0
is ignored). It returns one label in the task kind's schema. A member's object without a `score`
counts as scored 1.0. W below is the total weight of the members present. Each kind's rule lives in its
module under raydar/kinds/:

- points: the members' points clustered within the match radius (Hungarian matching, at most one point
  per member in a cluster); each cluster becomes a point at the weighted mean position, with the label of
  most weight x score and `score` = the weighted share of the ensemble that found it;
- boxes: weighted boxes fusion (ensemble-boxes), descriptions from the best-overlapping member box;
- caption: the entity with the most weight x score, the caption of its heaviest, best-scored backer;
- multilabel: the weighted mean of each class's probability;
- regression: the weighted mean of each value.

`agreement(task, results)` is in [0, 1], 1 when the members agree, and ignores weights: the mean, over
the objects (point clusters, fused boxes, classes, the entity), of the share of present members that
back the consensus, rescaled so that backing by only one of k members is 0: (share - 1/k) / (1 - 1/k).
For regression it is 1 - the mean spread (max - min) of the members' values over the target's range.
With one member present it is 1.0.
"""

from __future__ import annotations

import math


def fuse(task, results: dict[str, dict], weights: dict[str, float], *, min_score: float = 0.0) -> dict:
    """One label from the members' labels (see the module docstring for each kind's rule).
    Points and boxes scored below `min_score` are left out."""
    from raydar.kinds import kind_of  # the kinds build on this module's primitives

    kind = kind_of(task)
    return kind.fuse(_members(kind, results, weights), min_score=min_score)


def agreement(task, results: dict[str, dict]) -> float:
    """How much the members agree, in [0, 1] (1 = they agree); weights do not count."""
    from raydar.kinds import kind_of

    kind = kind_of(task)
    members = _members(kind, results, {name: 1.0 for name in results}, need_weight=False)
    if len(members) == 1:
        return 1.0
    return kind.agreement(members)


def rescaled_backing(backing: list[float], k: int) -> float:
    """The mean share of `k` members backing each consensus object, rescaled so that one backer is 0."""
    if not backing:
        return 1.0  # no member found anything: they agree
    return float(sum((b - 1 / k) / (1 - 1 / k) for b in backing) / len(backing))


def weighted_mean(members, key: str, names: list[str]) -> dict[str, float]:
    """The members' `label[key][name]` averaged with their weights, for each of `names`."""
    total = sum(w for _, w, _ in members)
    return {n: float(sum(w * label[key][n] for _, w, label in members) / total) for n in names}


def _members(kind, results: dict[str, dict], weights: dict[str, float],
             need_weight: bool = True) -> list[tuple[str, float, dict]]:
    """(name, weight, validated label) of the members present, heaviest first, then by name."""
    from raydar.kinds import AnswerError

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
            validated = kind.member_label(label)
        except AnswerError as e:
            raise ValueError(f"member {name!r}: not a valid {kind.name} label: {e}") from None
        members.append((name, weight, validated))
    if not members:
        raise ValueError(f"no member to fuse: results from {sorted(results) or 'none'}, "
                         f"weights {weights}{' (all zero?)' if need_weight else ''}")
    return sorted(members, key=lambda m: (-m[1], m[0]))
