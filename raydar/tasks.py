"""Task kinds: for each kind of label, its schema, the teacher prompt and the parser of an answer.

Labels are stored with coordinates normalised to [0, 1] of the image. A teacher may answer in its own
convention (fractions, 0-1000 integers, pixels of the image it was sent); the parser converts at this
boundary and nowhere else. Parsers are tolerant of prose and code fences around the JSON, and strict
on the schema: an unknown class, a missing field or a coordinate off the image is an error.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from raydar.spec import BoxesTask, CaptionTask, MultilabelTask, PointsTask, RegressionTask

COORDINATE_SCALES = {"normalized": None, "per_mille": 1000.0, "pixels": "image"}


class AnswerError(ValueError):
    """A teacher answer that does not fit the task's schema."""


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


class _ClassNames:
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


class TaskKind:
    """Base of the five kinds. `coordinates` is the teacher's convention for positions."""

    name: str

    def __init__(self, spec, coordinates: str = "normalized") -> None:
        if coordinates not in COORDINATE_SCALES:
            raise ValueError(f"coordinates must be one of {', '.join(COORDINATE_SCALES)}, got {coordinates!r}")
        self.spec = spec
        self.coordinates = coordinates
        self.classes = _ClassNames(spec.ontology) if hasattr(spec, "ontology") else None

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

    def answer_text(self, label: dict, width: int, height: int) -> str:
        """The answer a model should give for `label` (the fine-tuning target), in this kind's JSON format
        and this object's coordinate convention for an image of `width` x `height` pixels as the model
        sees it. `parse(answer_text(label))` gives the label back, up to the convention's rounding."""
        return json.dumps(self._to_answer(self.validate(label), width, height), ensure_ascii=False)

    def _to_answer(self, label: dict, width: int, height: int) -> dict:
        return label

    def moved(self, label: dict, move) -> dict:
        """`label` for the image turned or flipped by `move`, a map of normalised (x, y) to (x, y).
        Kinds without positions are unchanged."""
        return label

    def empty(self) -> dict:
        raise NotImplementedError

    def _from_teacher(self, value: Any, width: int, height: int) -> Any:
        return value

    def _format_help(self) -> str:
        raise NotImplementedError

    # coordinates -------------------------------------------------------
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


def _unit(value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise AnswerError(f"{what} is not a number: {value!r}") from None
    if not (-0.02 <= v <= 1.02):  # a little slack for rounding at the border
        raise AnswerError(f"{what} = {v} is off the image (expected 0..1 after conversion)")
    return min(1.0, max(0.0, v))


def _score(item: dict) -> float:
    score = item.get("score", item.get("confidence", 1.0))
    try:
        s = float(score)
    except (TypeError, ValueError):
        raise AnswerError(f"score is not a number: {score!r}") from None
    return min(1.0, max(0.0, s))


def _items(value: Any, key: str) -> list:
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


class Points(TaskKind):
    """`{"points": [{"label", "x", "y", "score"}]}`: one point per object, at its centre."""

    name = "points"
    spec: PointsTask

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
        for item in _items(value, "points"):
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
        for item in _items(label, "points"):
            if "x" not in item or "y" not in item or "label" not in item:
                raise AnswerError(f"a point needs label, x and y: {item!r}")
            points.append(
                {
                    "label": self.classes.canonical(item["label"]),
                    "x": _unit(item["x"], "x"),
                    "y": _unit(item["y"], "y"),
                    "score": _score(item),
                }
            )
        return {"points": points}


class Boxes(TaskKind):
    """`{"objects": [{"label", "box": [x1, y1, x2, y2], "description", "score"}], "qa": [...]}`."""

    name = "boxes"
    spec: BoxesTask

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
        for item in _items(value, "objects"):
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
        for item in _items(label, "objects"):
            box = item.get("box")
            if not isinstance(box, list) or len(box) != 4 or "label" not in item:
                raise AnswerError(f"an object needs label and box [x1, y1, x2, y2]: {item!r}")
            x1, y1, x2, y2 = (_unit(v, "box") for v in box)
            if x2 <= x1 or y2 <= y1:
                raise AnswerError(f"box corners out of order: {box!r}")
            objects.append(
                {
                    "label": self.classes.canonical(item["label"]),
                    "box": [x1, y1, x2, y2],
                    "description": str(item.get("description", "")),
                    "score": _score(item),
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


class Caption(TaskKind):
    """`{"entity": "<name>", "caption": "<text>"}`: which known entity is shown, described."""

    name = "caption"
    spec: CaptionTask

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


class Multilabel(TaskKind):
    """`{"probabilities": {"<class>": p}}`: a probability per class; classes left out are 0."""

    name = "multilabel"
    spec: MultilabelTask

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
            value = _unit(p, f"probability of {name}")
            probs[self.classes.canonical(name)] = value
        return {"probabilities": probs}


class Regression(TaskKind):
    """`{"values": {"<target>": number}}`: every target, in its unit."""

    name = "regression"
    spec: RegressionTask

    def _format_help(self) -> str:
        lines = "\n".join(f"- {n}: {t.description} ({t.unit})" for n, t in self.spec.targets.items())
        return f"Targets:\n{lines}\n\n" 'Answer format: {"values": {"<target>": <number>, ...}} with every target.'

    def empty(self) -> dict:
        return {"values": {name: 0.0 for name in self.spec.targets}}

    def validate(self, label: Any) -> dict:
        if not isinstance(label, dict) or not isinstance(label.get("values"), dict):
            raise AnswerError('expected {"values": {"<target>": number, ...}}')
        given = {str(k).strip().lower(): v for k, v in label["values"].items()}
        values = {}
        for name, target in self.spec.targets.items():
            if name.lower() not in given:
                raise AnswerError(f"missing target {name!r}")
            try:
                v = float(given[name.lower()])
            except (TypeError, ValueError):
                raise AnswerError(f"{name} is not a number: {given[name.lower()]!r}") from None
            if not math.isfinite(v):
                raise AnswerError(f"{name} is not finite: {v}")
            if v < target.min:
                raise AnswerError(f"{name} = {v} is below its minimum {target.min}")
            values[name] = v
        return {"values": values}


_KINDS = {cls.name: cls for cls in (Points, Boxes, Caption, Multilabel, Regression)}


def task_kind(task_spec, coordinates: str = "normalized") -> TaskKind:
    """The kind object for a spec's `task` section."""
    return _KINDS[task_spec.kind](task_spec, coordinates)
