"""Task kinds: one module per kind of label, each owning its rules (see raydar/kinds/base.py).

    kind = kind_of(spec.task, spec.teacher.coordinates)   # the kind object of a spec's `task` section
    label = kind.parse(answer_text, width, height)

Adding a kind is one new module (a `TaskSection` for the spec and a `TaskKind` subclass) and one line in
`KINDS` below; the spec's `task` union, the metrics, fusion, knowledge base, report and heads follow.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from raydar.kinds.base import COORDINATE_SCALES, AnswerError, ClassTaskSection, OntologyClass, TaskKind, TaskSection
from raydar.kinds.base import extract_json
from raydar.kinds.boxes import Boxes, BoxesTask
from raydar.kinds.caption import Caption, CaptionTask
from raydar.kinds.multilabel import Multilabel, MultilabelTask
from raydar.kinds.points import Points, PointsTask
from raydar.kinds.regression import Regression, RegressionTarget, RegressionTask

KINDS: dict[str, type[TaskKind]] = {kind.name: kind for kind in (Points, Boxes, Caption, Multilabel, Regression)}

# The spec's `task` section: one model per kind, told apart by its `kind` field.
TaskSpec = Annotated[Union[tuple(kind.section for kind in KINDS.values())], Field(discriminator="kind")]


def kind_of(task_spec, coordinates: str = "normalized") -> TaskKind:
    """The kind object for a spec's `task` section; `coordinates` is the teacher's (or model's) convention."""
    return KINDS[task_spec.kind](task_spec, coordinates)


__all__ = [
    "COORDINATE_SCALES", "KINDS", "AnswerError", "Boxes", "BoxesTask", "Caption", "CaptionTask", "ClassTaskSection",
    "Multilabel", "MultilabelTask", "OntologyClass", "Points", "PointsTask", "Regression", "RegressionTarget",
    "RegressionTask", "TaskKind", "TaskSection", "TaskSpec", "extract_json", "kind_of",
]
