"""What every task kind shares: the spec section's base, the answer parser's tolerance, the coordinate
conventions, and `TaskKind`, the base of the five kinds.

Labels are stored with coordinates normalised to [0, 1] of the image. A teacher may answer in its own
convention (fractions, 0-1000 integers, pixels of the image it was sent); the parser converts at this
boundary and nowhere else. Parsers are tolerant of prose and code fences around the JSON, and strict
on the schema: an unknown class, a missing field or a coordinate off the image is an error.

A kind owns every rule that differs between kinds: its spec section, label schema, teacher prompt,
answer parser, fine-tuning target, augmentation moves, metric, fusion rule, knowledge-base document and
metadata, report drawing, and the head it trains. The modules per concern (raydar.metrics, raydar.fusion,
raydar.kb, raydar.report, raydar.heads) call the kind; nothing outside raydar/kinds/ branches on a kind's
name. Heavy libraries (scipy, scikit-learn, pycocotools, matplotlib, torch) are imported inside the
methods that use them, so that reading a spec stays cheap.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

COORDINATE_SCALES = {"normalized": None, "per_mille": 1000.0, "pixels": "image"}


class AnswerError(ValueError):
    """A teacher answer that does not fit the task's schema."""


# ---------------------------------------------------------------- the spec's `task` section


class TaskSection(BaseModel):
    """The base of every kind's `task` section of a dataset spec."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instruction: str = Field(description="The task in one or two sentences, as the teacher should read it.")
    prompt: str | None = Field(
        default=None,
        description="Full teacher prompt; default: built from the instruction, ontology and answer format.",
    )


class OntologyClass(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = Field(description="What the class looks like; goes into the teacher's prompt.")
    aliases: list[str] = Field(default_factory=list, description="Other names a teacher may answer with.")


class ClassTaskSection(TaskSection):
    """A `task` section whose labels name classes of an ontology."""

    ontology: dict[str, OntologyClass] = Field(description="Class name -> description and aliases.")

    @field_validator("ontology")
    @classmethod
    def _ontology_valid(cls, value: dict[str, OntologyClass]) -> dict[str, OntologyClass]:
        if not value:
            raise ValueError("needs at least one class")
        owner: dict[str, str] = {}
        for name, item in value.items():
            for alias in {name.strip().lower(), *(a.strip().lower() for a in item.aliases)}:
                if owner.setdefault(alias, name) != name:
                    raise ValueError(f"{alias!r} names both {owner[alias]!r} and {name!r}")
        return value


# ---------------------------------------------------------------- answers


def extract_json(text: str) -> Any:
    """The first JSON object or array in `text`, skipping prose and ```json fences around it."""
    if not isinstance(text, str) or not text.strip():
        raise AnswerError("empty answer")
    candidates = [m.group(1) for m in re.finditer(r"```(?:json)?\s*(.*?)```", text, re.S)] + [text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        skip_until = -1  # inside a value that failed to decode (a cut-off answer) or one already rejected
        for match in re.finditer(r"[\[{]", candidate):
            if match.start() < skip_until:
                continue
            try:
                value, end = decoder.raw_decode(candidate, match.start())
            except json.JSONDecodeError as e:
                skip_until = max(skip_until, len(candidate) if e.pos <= match.start() else e.pos)
                continue
            if isinstance(value, dict) or (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
                return value
            skip_until = end  # a list of plain values, such as "[0, 1]" in prose
    raise AnswerError(f"no JSON object in answer: {_clip(text)}")


def _clip(text: str, n: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


class ClassNames:
    """Canonical class names, matched case-insensitively with aliases."""

    def __init__(self, ontology: dict) -> None:
        self.names = list(ontology)
        self._lookup = {}
        for name, cls in ontology.items():
            for alias in [name, *cls.aliases]:
                self._lookup[alias.strip().lower()] = name

    def canonical(self, value: Any) -> str:
        key = str(value).strip().lower()
        if key not in self._lookup:
            raise AnswerError(f"unknown class {value!r}; expected one of {', '.join(self.names)}")
        return self._lookup[key]

    def describe(self, ontology: dict) -> str:
        return "\n".join(f"- {name}: {cls.description}" for name, cls in ontology.items())


def unit_interval(value: Any, what: str) -> float:
    """A normalised coordinate or probability: a number in [0, 1], with a little slack for rounding."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise AnswerError(f"{what} is not a number: {value!r}") from None
    if not (-0.02 <= v <= 1.02):
        raise AnswerError(f"{what} = {v} is off the image (expected 0..1 after conversion)")
    return min(1.0, max(0.0, v))


def item_score(item: dict) -> float:
    """An object's `score` (or `confidence`), clipped to [0, 1]; 1.0 when it has none."""
    score = item.get("score", item.get("confidence", 1.0))
    try:
        s = float(score)
    except (TypeError, ValueError):
        raise AnswerError(f"score is not a number: {score!r}") from None
    return min(1.0, max(0.0, s))


def items_of(value: Any, key: str) -> list:
    """The list of objects under `key` (or `value` itself when it is the list)."""
    if isinstance(value, dict):
        if key not in value:
            raise AnswerError(f"expected a JSON object with {key!r}, got keys {sorted(value)}")
        value = value[key]
    if not isinstance(value, list):
        raise AnswerError(f"{key!r} must be a list, got {type(value).__name__}")
    for item in value:
        if not isinstance(item, dict):
            raise AnswerError(f"each of {key!r} must be an object, got {item!r}")
    return value


# ---------------------------------------------------------------- the kind


class TaskKind:
    """Base of the kinds. An instance holds the spec's `task` section (`self.spec`) and the teacher's
    coordinate convention (`coordinates`) its parser reads and its answers are written in."""

    name: ClassVar[str]
    section: ClassVar[type[TaskSection]]  # the spec's `task` section of this kind
    trains_point_head: ClassVar[bool] = False  # `student.point_head` is allowed
    objects_key: ClassVar[str | None] = None  # the label's list of located objects, for kinds that have one

    def __init__(self, spec, coordinates: str = "normalized") -> None:
        if coordinates not in COORDINATE_SCALES:
            raise ValueError(f"coordinates must be one of {', '.join(COORDINATE_SCALES)}, got {coordinates!r}")
        self.spec = spec
        self.coordinates = coordinates
        self.classes = ClassNames(spec.ontology) if hasattr(spec, "ontology") else None

    # ------------------------------------------------------------ schema, prompt and parser
    def prompt(self) -> str:
        if self.spec.prompt:
            return self.spec.prompt
        return f"{self.spec.instruction}\n\n{self._format_help()}\nAnswer with the JSON only."

    def parse(self, text: str, width: int, height: int) -> dict:
        """The label (normalised) from a teacher's answer about an image of `width` x `height` pixels."""
        return self.validate(self._from_teacher(extract_json(text), width, height))

    def validate(self, label: Any) -> dict:
        """Check a stored (normalised) label against the schema; returns it in canonical form."""
        raise NotImplementedError

    def empty(self) -> dict:
        raise NotImplementedError

    def answer_text(self, label: dict, width: int, height: int) -> str:
        """The answer a model should give for `label` (the fine-tuning target), in this kind's JSON format
        and this object's coordinate convention for an image of `width` x `height` pixels as the model
        sees it. `parse(answer_text(label))` gives the label back, up to the convention's rounding."""
        return json.dumps(self._to_answer(self.validate(label), width, height), ensure_ascii=False)

    def moved(self, label: dict, move) -> dict:
        """`label` for the image turned or flipped by `move`, a map of normalised (x, y) to (x, y).
        Kinds without positions are unchanged."""
        return label

    def with_scores(self, label: dict, object_scores: list[float] | None, answer_score: float) -> dict:
        """A parsed student answer with confidences: each located object's score from the tokens that
        wrote it (`object_scores`, else the whole answer's). Kinds without objects keep the label."""
        if self.objects_key is not None:
            items = label[self.objects_key]
            for item, score in zip(items, object_scores or [answer_score] * len(items)):
                item["score"] = round(score, 4)
        return label

    def _to_answer(self, label: dict, width: int, height: int) -> dict:
        return label

    def _from_teacher(self, value: Any, width: int, height: int) -> Any:
        return value

    def _format_help(self) -> str:
        raise NotImplementedError

    # ------------------------------------------------------------ metric
    def scored_predictions(self, predictions: list[dict]) -> list[dict]:
        """Predictions made ready for `score` (failed ones are already the empty label): validated."""
        from raydar.metrics import validated

        return validated(self, predictions, "predictions")

    def score(self, predictions: list[dict], truths: list[dict], *, sizes=None, score_threshold: float = 0.0) -> dict:
        """This kind's metrics (see raydar.metrics), with a `headline`."""
        raise NotImplementedError

    # ------------------------------------------------------------ fusion
    def member_label(self, label: dict) -> dict:
        """A member's label as fusion reads it: validated."""
        return self.validate(label)

    def fuse(self, members: list[tuple[str, float, dict]], *, min_score: float = 0.0) -> dict:
        """One label from (name, weight, validated label) of the members present, heaviest first."""
        raise NotImplementedError

    def agreement(self, members: list[tuple[str, float, dict]]) -> float:
        """How much the members (two or more) agree, in [0, 1]; see raydar.fusion."""
        raise NotImplementedError

    # ------------------------------------------------------------ knowledge base
    def metadata(self, label: dict) -> dict[str, Any]:
        """Filterable facts of a label: `type` (the classes present), counts, probabilities, values."""
        return {}

    def document(self, label: dict) -> list[str]:
        """The parts of the knowledge-base document: what the teacher found, in words a text query matches."""
        raise NotImplementedError

    def summary(self, label: dict) -> str:
        """A few words for tables: `2 explicit, 1 implicit`, the entity, the findings, the values."""
        raise NotImplementedError

    def confidence(self, label: dict, raw: Any) -> float | None:
        """The teacher's confidence from its label or raw answer, when the kind has one."""
        return None

    # ------------------------------------------------------------ report
    definition: ClassVar[str] = ""  # how the report's numbers are computed

    def table_columns(self) -> list[tuple[tuple, str]]:
        """The member table's columns: (key path in a member's metrics, heading)."""
        raise NotImplementedError

    def is_rate(self, path: tuple) -> bool:
        """Whether the metric at `path` is a rate in [0, 1] where higher is better."""
        return path not in (("failed",),)

    def report_per_class(self, page, members: dict) -> None:
        """The report's per-class section (raydar.report._Page)."""

    def report_curves(self, page, members: dict) -> None:
        """The report's curves section, when the kind has curves."""

    def draw(self, ax, label: dict, colour: str, width: int, height: int, markers: str) -> str:
        """Draw `label` on an image axis of `width` x `height`; returns text for the sample's title."""
        return ""

    def legend_handles(self, markers: str) -> list:
        """Extra legend entries of the samples grid (e.g. a marker per class)."""
        return []

    draws_on_image: ClassVar[bool] = False  # labels are drawn on the image: the samples grid has a legend

    # ------------------------------------------------------------ student
    def head(self, hidden_size: int, *, point_head: bool = False):
        """The head this kind trains beside its adapter, or None when the student answers in text."""
        if point_head:
            raise ValueError(f"point_head is for points tasks, not {self.name}")
        return None

    def head_buffers(self, labels: list[dict]) -> dict[str, list[float]] | None:
        """What the head learns from the training labels before training (e.g. class weights), or None."""
        return None

    # ------------------------------------------------------------ coordinates
    def _coordinate_words(self) -> str:
        return {
            "normalized": "fractions of the image width and height, from 0 to 1",
            "per_mille": "integers from 0 to 1000 across the image width and height",
            "pixels": "pixels of the image as you see it",
        }[self.coordinates]

    def _to_unit(self, value: Any, extent: int, what: str) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise AnswerError(f"{what} is not a number: {value!r}") from None
        if not math.isfinite(v):
            raise AnswerError(f"{what} is not finite: {value!r}")
        scale = COORDINATE_SCALES[self.coordinates]
        return v / (extent if scale == "image" else scale) if scale else v

    def _from_unit(self, v: float, extent: int) -> float | int:
        """A normalised coordinate in this convention: integers for 0-1000 and pixels, 2 decimals otherwise
        (a hundredth of the side: finer than a fixed-size encoder's input resolves, in few answer tokens)."""
        scale = COORDINATE_SCALES[self.coordinates]
        if scale is None:
            return round(v, 2)
        return int(round(v * (extent if scale == "image" else scale)))


def metadata_key(prefix: str, name: str) -> str:
    """`n_explicit`, `p_pleural_thickening`: a class or target name as a knowledge-base metadata key."""
    return prefix + (re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_") or "x")


def with_present(meta: dict[str, Any], present: list[str]) -> dict[str, Any]:
    """`meta` with `type`, the classes present (Chroma refuses empty lists: no key means none)."""
    return {**meta, "type": present} if present else meta


class LocatedObjectsKind(TaskKind):
    """A kind whose label is a list of located objects of ontology classes, under `objects_key`."""

    objects_key: ClassVar[str]
    draws_on_image = True

    def _counts(self, label: dict) -> dict[str, int]:
        counts = {name: 0 for name in self.spec.ontology}
        for item in label[self.objects_key]:
            counts[item["label"]] = counts.get(item["label"], 0) + 1
        return counts

    def metadata(self, label: dict) -> dict[str, Any]:
        counts = self._counts(label)
        meta = {"n_objects": len(label[self.objects_key]),
                **{metadata_key("n_", name): n for name, n in counts.items()}}
        return with_present(meta, [name for name, n in counts.items() if n])

    def document(self, label: dict) -> list[str]:
        # "2 explicit: <its description>. 1 implicit: <...>." in ontology order: a text query about what
        # things look like then ranks the entries where such things make up more of the image first
        ontology = self.spec.ontology
        counts = {name: sum(item["label"] == name for item in label[self.objects_key]) for name in ontology}
        return [f"{n} {name}: {ontology[name].description}." for name, n in counts.items() if n] or ["Nothing found."]

    def summary(self, label: dict) -> str:
        counts = {name: sum(item["label"] == name for item in label[self.objects_key]) for name in self.spec.ontology}
        return ", ".join(f"{n} {name}" for name, n in counts.items() if n) or "nothing"

    def confidence(self, label: dict, raw: Any) -> float | None:
        if not isinstance(raw, dict):
            return None
        scores = [i.get("score", i.get("confidence")) for i in raw.get(self.objects_key) or [] if isinstance(i, dict)]
        scores = [float(s) for s in scores if isinstance(s, (int, float))]
        return float(np.mean(scores)) if scores else None
