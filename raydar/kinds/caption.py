"""Caption: which known entity an image shows, and a caption naming it (the cultural-entities seed).

Label: `{"entity": "<name>", "caption": "<text>"}`; the ontology lists the entities.

Metric: the entity named correctly: `exact` (the predicted entity is the true one's name) and `alias`
(its name or one of its ontology aliases), both after Unicode, case and whitespace normalisation, and
`mentioned` (the caption text itself names it or an alias); rates overall and per entity. An entity
outside the ontology is a wrong answer, not a bad label.

Fusion: the entity with the most weight x score wins; the caption is that of the heaviest, best-scored
member naming it; `score` = its weighted share.
"""

from __future__ import annotations

import re
import textwrap
import unicodedata
from collections import Counter, defaultdict
from typing import Any, Literal

from pydantic import Field

from raydar.fusion import rescaled_backing
from raydar.kinds.base import AnswerError, ClassTaskSection, TaskKind, with_present


class CaptionTask(ClassTaskSection):
    """The ontology lists the entities; a caption must name the entity shown."""

    kind: Literal["caption"]
    max_words: int = Field(default=60, gt=0, description="Upper bound on caption length asked of the teacher.")


class Caption(TaskKind):
    """`{"entity": "<name>", "caption": "<text>"}`: which known entity is shown, described."""

    name = "caption"
    section = CaptionTask
    spec: CaptionTask

    # ------------------------------------------------------------ schema, prompt and parser
    def _format_help(self) -> str:
        return (
            f"Entities:\n{self.classes.describe(self.spec.ontology)}\n\n"
            'Answer format: {"entity": "<entity name>", "caption": "<description of the image in at most '
            f'{self.spec.max_words} words, naming the entity>"}}.'
        )

    def empty(self) -> dict:
        return {"entity": "", "caption": ""}

    def validate(self, label: Any) -> dict:
        if not isinstance(label, dict) or "entity" not in label or "caption" not in label:
            raise AnswerError('expected {"entity": ..., "caption": ...}')
        caption = str(label["caption"]).strip()
        if not caption:
            raise AnswerError("empty caption")
        return {"entity": self.classes.canonical(label["entity"]), "caption": caption}

    def with_scores(self, label: dict, object_scores: list[float] | None, answer_score: float) -> dict:
        label["score"] = round(answer_score, 4)
        return label

    # ------------------------------------------------------------ metric
    def scored_predictions(self, predictions: list[dict]) -> list[dict]:
        for i, p in enumerate(predictions):  # an entity outside the ontology is a wrong answer, not a bad label
            if not isinstance(p, dict):
                raise ValueError(f"predictions[{i}] must be a caption label {{'entity', 'caption'}}, got {p!r}")
        return predictions

    def score(self, predictions: list[dict], truths: list[dict], *, sizes=None, score_threshold: float = 0.0) -> dict:
        return caption_metrics(self.spec, predictions, truths)

    # ------------------------------------------------------------ fusion
    def member_label(self, label: dict) -> dict:
        validated = self.validate(label)
        score = label.get("score", 1.0)  # the caption schema has no score of its own; keep the member's
        try:
            validated["score"] = min(1.0, max(0.0, float(score)))
        except (TypeError, ValueError):
            raise AnswerError(f"score is not a number: {score!r}") from None
        return validated

    def fuse(self, members, *, min_score: float = 0.0) -> dict:
        total = sum(w for _, w, _ in members)
        order = {c: k for k, c in enumerate(self.spec.ontology)}
        votes: dict[str, float] = defaultdict(float)
        for _, w, label in members:
            votes[label["entity"]] += w * label["score"]
        entity = max(votes, key=lambda e: (votes[e], -order[e]))
        backers = [(w * label["score"], w, label) for _, w, label in members if label["entity"] == entity]
        best = max(backers, key=lambda b: (b[0], b[1]))[2]
        return {"entity": entity, "caption": best["caption"], "score": min(1.0, votes[entity] / total)}

    def agreement(self, members) -> float:
        k = len(members)
        return rescaled_backing([max(Counter(label["entity"] for _, _, label in members).values()) / k], k)

    # ------------------------------------------------------------ knowledge base
    def metadata(self, label: dict) -> dict[str, Any]:
        return with_present({"entity": label["entity"]}, [label["entity"]])

    def document(self, label: dict) -> list[str]:
        entity = label["entity"]
        parts = [f"{entity}: {label['caption']}"]
        if entity in self.spec.ontology:
            parts.append(f"{entity}: {self.spec.ontology[entity].description}.")
        return parts

    def summary(self, label: dict) -> str:
        return label["entity"]

    # ------------------------------------------------------------ report
    definition = (
        "Entity exact: the answer names the true entity by its name; entity or alias: by its name or an "
        "alias from the ontology (case and spacing ignored); named in caption: the caption text names it."
    )

    def table_columns(self) -> list[tuple[tuple, str]]:
        return [(("exact",), "entity exact"), (("alias",), "entity or alias"), (("mentioned",), "named in caption"),
                (("failed",), "failed")]

    def report_per_class(self, page, members: dict) -> None:
        fields = [("n", "images"), ("exact_rate", "exact"), ("alias_rate", "alias"), ("mentioned_rate", "in caption")]
        page.per_class_table("Per entity", list(self.spec.ontology), "per_entity", fields)

    def draw(self, ax, label: dict, colour: str, width: int, height: int, markers: str) -> str:
        return textwrap.fill(textwrap.shorten(str(label.get("entity", "")), 60), 32)


# ---------------------------------------------------------------- metric


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
