"""Regression: named values read off an image, each in its unit (the nutrition seed).

Label: `{"values": {"<target>": number}}` with every target of the spec.

Metric: MAE and RMSE per target (scikit-learn), and MAE over the target's range (to compare targets).

Fusion: the weighted mean of each value. Agreement: 1 - the mean spread (max - min) of the members'
values over the target's range.

Head: `RegressionHead` on the pooled hidden state, each target scaled by its range.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from raydar.fusion import weighted_mean
from raydar.kinds.base import AnswerError, TaskKind, TaskSection, metadata_key


class RegressionTarget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = Field(description="What the value measures; goes into the teacher's prompt.")
    unit: str = Field(default="", description="Its unit (kcal, g, ...), shown with the value.")
    min: float = Field(default=0.0, description="Smallest plausible value; an answer below it is refused.")
    max: float = Field(description="Largest plausible value; used to normalise targets.")

    @model_validator(mode="after")
    def _range(self) -> RegressionTarget:
        if self.max <= self.min:
            raise ValueError(f"max ({self.max}) must be greater than min ({self.min})")
        return self


class RegressionTask(TaskSection):
    kind: Literal["regression"]
    targets: dict[str, RegressionTarget] = Field(description="Target name -> description, unit and range.")

    @field_validator("targets")
    @classmethod
    def _targets_not_empty(cls, value: dict[str, RegressionTarget]) -> dict[str, RegressionTarget]:
        if not value:
            raise ValueError("needs at least one target")
        return value


class Regression(TaskKind):
    """`{"values": {"<target>": number}}`: every target, in its unit."""

    name = "regression"
    section = RegressionTask
    spec: RegressionTask

    # ------------------------------------------------------------ schema, prompt and parser
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

    # ------------------------------------------------------------ metric
    def score(self, predictions: list[dict], truths: list[dict], *, sizes=None, score_threshold: float = 0.0) -> dict:
        return regression_metrics(self.spec, predictions, truths)

    # ------------------------------------------------------------ fusion
    def fuse(self, members, *, min_score: float = 0.0) -> dict:
        return {"values": weighted_mean(members, "values", list(self.spec.targets))}

    def agreement(self, members) -> float:
        spreads = []
        for name, target in self.spec.targets.items():
            values = [label["values"][name] for _, _, label in members]
            spreads.append(min(1.0, (max(values) - min(values)) / (target.max - target.min)))
        return float(1.0 - np.mean(spreads))

    # ------------------------------------------------------------ knowledge base
    def metadata(self, label: dict) -> dict[str, Any]:
        return {metadata_key("v_", name): float(v) for name, v in label["values"].items()}

    def document(self, label: dict) -> list[str]:
        return [", ".join(f"{n} {v:g} {self.spec.targets[n].unit}".strip() for n, v in label["values"].items()) + "."]

    def summary(self, label: dict) -> str:
        return ", ".join(f"{n} {v:g}" for n, v in label["values"].items())

    # ------------------------------------------------------------ report
    definition = "MAE and RMSE per target in its unit (scikit-learn); normalised MAE divides by the target's range."

    def table_columns(self) -> list[tuple[tuple, str]]:
        cols = []
        for name, target in self.spec.targets.items():
            unit = f" ({target.unit})" if target.unit else ""
            cols += [(("per_target", name, "mae"), f"{name} MAE{unit}"), (("per_target", name, "rmse"), f"{name} RMSE")]
        return cols + [(("mae_normalised_mean",), "normalised MAE"), (("failed",), "failed")]

    def is_rate(self, path: tuple) -> bool:
        return False

    def draw(self, ax, label: dict, colour: str, width: int, height: int, markers: str) -> str:
        text = ", ".join(f"{k} {v:.0f}" for k, v in label.get("values", {}).items())
        return textwrap.fill(textwrap.shorten(text, 60), 32)

    # ------------------------------------------------------------ student
    def head(self, hidden_size: int, *, point_head: bool = False):
        super().head(hidden_size, point_head=point_head)
        from raydar.heads import RegressionHead

        return RegressionHead(hidden_size, {n: (t.min, t.max) for n, t in self.spec.targets.items()})


# ---------------------------------------------------------------- metric


def regression_metrics(task, predictions: list[dict], truths: list[dict]) -> dict:
    """MAE and RMSE per target, and MAE as a share of the target's range (to compare targets)."""
    from sklearn.metrics import mean_absolute_error, root_mean_squared_error

    per_target = {}
    for name, target in task.targets.items():
        y_true = [t["values"][name] for t in truths]
        y_pred = [p["values"][name] for p in predictions]
        if not y_true:
            per_target[name] = {"mae": None, "rmse": None, "mae_normalised": None, "unit": target.unit}
            continue
        mae = float(mean_absolute_error(y_true, y_pred))
        per_target[name] = {"mae": mae, "rmse": float(root_mean_squared_error(y_true, y_pred)),
                            "mae_normalised": mae / (target.max - target.min), "unit": target.unit}
    normalised = [r["mae_normalised"] for r in per_target.values() if r["mae_normalised"] is not None]
    mean = float(np.mean(normalised)) if normalised else None
    return {"per_target": per_target, "mae_normalised_mean": mean,
            "headline": {"metric": "mae_normalised_mean", "value": mean, "higher_is_better": False}}
