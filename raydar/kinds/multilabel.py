"""Multilabel: a probability per finding of the ontology (the chest X-ray seed).

Label: `{"probabilities": {"<class>": p}}`; classes left out are 0.

Metric: a class is predicted present when its probability is >= `task.threshold` (truths are present at
>= 0.5). Per class TP/FP/FN/TN (`multilabel_confusion_matrix`), precision, recall, F1, AUROC
(`roc_auc_score`; `None` for a class whose truth has one value only, listed in `classes_without_auroc`),
and F1 / AUROC micro and macro.

Fusion: the weighted mean of each class's probability.

Head: `MultilabelHead` on the pooled hidden state, with BCE weighted per class by the training labels'
negatives over positives (seed 004's class-weighted loss).
"""

from __future__ import annotations

import math
import textwrap
from collections import Counter
from typing import Any, Literal

import numpy as np
from pydantic import Field

from raydar.fusion import rescaled_backing, weighted_mean
from raydar.kinds.base import AnswerError, ClassTaskSection, TaskKind, metadata_key, unit_interval, with_present
from raydar.metrics import THRESHOLDS, prf


class MultilabelTask(ClassTaskSection):
    kind: Literal["multilabel"]
    threshold: float = Field(default=0.5, gt=0, lt=1, description="Probability above which a class is present.")


class Multilabel(TaskKind):
    """`{"probabilities": {"<class>": p}}`: a probability per class; classes left out are 0."""

    name = "multilabel"
    section = MultilabelTask
    spec: MultilabelTask

    # ------------------------------------------------------------ schema, prompt and parser
    def _format_help(self) -> str:
        return (
            f"Findings:\n{self.classes.describe(self.spec.ontology)}\n\n"
            'Answer format: {"probabilities": {"<finding>": <probability 0-1>, ...}} with every finding listed.'
        )

    def empty(self) -> dict:
        return {"probabilities": {name: 0.0 for name in self.classes.names}}

    def validate(self, label: Any) -> dict:
        if not isinstance(label, dict) or not isinstance(label.get("probabilities"), dict):
            raise AnswerError('expected {"probabilities": {"<class>": p, ...}}')
        probs = {name: 0.0 for name in self.classes.names}
        for name, p in label["probabilities"].items():
            value = unit_interval(p, f"probability of {name}")
            probs[self.classes.canonical(name)] = value
        return {"probabilities": probs}

    def present(self, label: dict) -> list[str]:
        """The classes at or above the task's threshold."""
        return [name for name, p in label["probabilities"].items() if p >= self.spec.threshold]

    # ------------------------------------------------------------ metric
    def score(self, predictions: list[dict], truths: list[dict], *, sizes=None, score_threshold: float = 0.0) -> dict:
        return multilabel_metrics(self.spec, predictions, truths)

    # ------------------------------------------------------------ fusion
    def fuse(self, members, *, min_score: float = 0.0) -> dict:
        return {"probabilities": weighted_mean(members, "probabilities", list(self.spec.ontology))}

    def agreement(self, members) -> float:
        k = len(members)
        backing = [max(Counter(label["probabilities"][c] >= self.spec.threshold for _, _, label in members).values())
                   / k for c in self.spec.ontology]
        return rescaled_backing(backing, k)

    # ------------------------------------------------------------ knowledge base
    def metadata(self, label: dict) -> dict[str, Any]:
        meta = {metadata_key("p_", name): float(p) for name, p in label["probabilities"].items()}
        return with_present(meta, self.present(label))

    def document(self, label: dict) -> list[str]:
        ontology = self.spec.ontology
        present = [(n, p) for n, p in label["probabilities"].items() if p >= self.spec.threshold]
        if not present:
            return [f"No finding above {self.spec.threshold:g}."]
        return (["Findings: " + ", ".join(f"{n} ({p:.2f})" for n, p in present) + "."]
                + [f"{n}: {ontology[n].description}." for n, _ in present if n in ontology])

    def summary(self, label: dict) -> str:
        return ", ".join(self.present(label)) or "no finding"

    def confidence(self, label: dict, raw: Any) -> float | None:
        probs = list(label["probabilities"].values())
        return float(np.mean([max(p, 1 - p) for p in probs])) if probs else None

    # ------------------------------------------------------------ report
    definition = (
        "A class is predicted present at probability >= the task threshold. Per class TP/FP/FN/TN; "
        "F1 micro pools all classes, F1 macro averages them; AUROC by scikit-learn (a class whose truth "
        "has one value only has none)."
    )

    def table_columns(self) -> list[tuple[tuple, str]]:
        return [(("f1_micro",), "F1 micro"), (("f1_macro",), "F1 macro"), (("auroc_macro",), "AUROC macro"),
                (("auroc_micro",), "AUROC micro"), (("failed",), "failed")]

    def report_per_class(self, page, members: dict) -> None:
        from raydar.report import slug

        classes = list(self.spec.ontology)
        fields = [("tp", "TP"), ("fp", "FP"), ("fn", "FN"), ("tn", "TN"), ("precision", "P"), ("recall", "R"),
                  ("f1", "F1"), ("auroc", "AUROC")]
        page.per_class_table("Per class: TP / FP / FN / TN", classes, "per_class", fields)
        for name in page.names:
            if members[name].get("per_class"):
                page.figure(f"confusion_{slug(name)}.png",
                            _plot_confusion(name, members[name]["per_class"], classes),
                            f"Confusion matrices per class: {name}")

    def report_curves(self, page, members: dict) -> None:
        page.threshold_curves(members)

    def draw(self, ax, label: dict, colour: str, width: int, height: int, markers: str) -> str:
        text = ", ".join(c for c, p in label.get("probabilities", {}).items() if p >= self.spec.threshold) or "none"
        return textwrap.fill(textwrap.shorten(text, 60), 32)

    # ------------------------------------------------------------ student
    def head(self, hidden_size: int, *, point_head: bool = False):
        super().head(hidden_size, point_head=point_head)
        from raydar.heads import MultilabelHead

        return MultilabelHead(hidden_size, list(self.spec.ontology))

    def head_buffers(self, labels: list[dict]) -> dict[str, list[float]]:
        """Negatives over positives per class in the training labels: the BCE's positive weights (seed 004)."""
        from raydar.heads import MultilabelHead

        head = MultilabelHead(1, list(self.spec.ontology))
        head.fit_positive_weights(head.targets(labels, self.spec.threshold))
        return {"pos_weight": head.pos_weight.tolist()}


# ---------------------------------------------------------------- metric


def multilabel_metrics(task, predictions: list[dict], truths: list[dict]) -> dict:
    """Per-class TP/FP/FN/TN, precision, recall, F1 and AUROC at `task.threshold`; micro and macro F1 / AUROC;
    micro precision / recall against the threshold."""
    from sklearn.metrics import f1_score, multilabel_confusion_matrix, precision_recall_fscore_support, roc_auc_score

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
        row = prf(tp, fp, fn)
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


# ---------------------------------------------------------------- report


def _plot_confusion(name: str, per_class: dict, classes: list[str]):
    from raydar.report import new_figure

    cols = min(5, len(classes))
    rows = math.ceil(len(classes) / cols)
    fig = new_figure(2.2 * cols, 2.2 * rows + 0.4)
    fig.suptitle(f"{name}: rows true (no, yes), columns predicted (no, yes)", fontsize=10)
    for k, c in enumerate(classes):
        ax = fig.add_subplot(rows, cols, k + 1)
        r = per_class[c]
        matrix = np.array([[r["tn"], r["fp"]], [r["fn"], r["tp"]]])
        ax.imshow(matrix, cmap="Blues", vmin=0)
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > matrix.max() / 2 else "black")
        ax.set_xticks([0, 1], ["no", "yes"], fontsize=7)
        ax.set_yticks([0, 1], ["no", "yes"], fontsize=7)
        ax.set_title(textwrap.shorten(c, 22), fontsize=9)
    fig.tight_layout()
    return fig
