"""The evaluation report: `report.html`, `metrics.json` and PNGs that a person opens from disk.

    from raydar.report import write_report
    path = write_report("out/report", spec, evaluation)   # -> out/report/report.html

The `evaluation` dict (what the evaluate job gathers; only `members` and `truths` are required):

    {
      "split": "test",                          # shown in the title
      "truths": [label, ...],                   # ground truth, one label per image, in the kind's schema
      "members": {                              # tables and plots follow this order
        "base":      {"predictions": [label | None, ...],   # same order as truths; None = failed answer
                      "metrics": {...},                     # optional: raydar.metrics.score(...) output;
                                                            #   computed from predictions when absent
                      "description": "untuned base"},       # optional, shown in the member table
        "finetuned": {...}, "rag": {...}, "ensemble": {...}, "teacher": {...},
      },
      "images": [path | bytes | None, ...],     # optional, same order: the samples grid draws them
      "image_ids": ["<sha256>", ...],           # optional, same order: captions in the samples grid
      "sizes": [[width, height], ...],          # optional, same order: passed to score() for points
      "history": [{"step": 10, "loss": 1.2, "val_loss": 1.4, "epoch": 1}, ...],  # optional, val_loss optional
      "before_after": ["base", "finetuned"],    # optional; by default base vs finetuned when both exist
      "samples": 6,                             # optional: images in the samples grid
      "notes": ["any line to show under the title"],
    }

`metrics.json` holds every number the HTML shows, rounded to 4 decimals: `{"dataset", "task", "split",
"n_images", "members": {name: metrics}, "headline": {name: value}, "ensemble_weights": {name: weight},
"before_after": {"before", "after", "rows": [{"metric", "key", "before", "after", "delta",
"higher_is_better"}]} | null, "history": [...], "generated_at"}`. Each
number in `report.html` sits in an element whose `data-key` is the JSON list of keys leading to it in
`metrics.json`, so a test (or a reader) can check that the two agree exactly.

Plots are drawn with matplotlib's Agg canvas (no display, no pyplot state), written as PNGs beside
the HTML and also embedded in it as data URIs, so `report.html` alone still shows everything.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from raydar.metrics import match_radius, score

MEMBER_COLOURS = {
    # bright against stained tissue (pink, purple), and told apart from each other and the truth's green
    "base": "#212121", "finetuned": "#1565c0", "rag": "#ff6d00", "ensemble": "#00b8d4", "teacher": "#ffab00",
}
EXTRA_COLOURS = ["#d50000", "#aeea00", "#6200ea", "#c51162", "#00bfa5"]
TRUTH_COLOUR = "#00c853"
DECIMALS = 4

# The member table's columns per kind: (key path in the member's metrics, heading).
TABLE_COLUMNS = {
    "points": [(("overall", "precision"), "precision"), (("overall", "recall"), "recall"), (("overall", "f1"), "F1"),
               (("f1_macro",), "F1 macro"), (("detection", "f1"), "F1 ignoring class"),
               (("count", "mae"), "count MAE"), (("failed",), "failed")],
    "boxes": [(("map",), "mAP"), (("map50",), "mAP50"), (("map75",), "mAP75"), (("mar100",), "AR@100"),
              (("failed",), "failed")],
    "caption": [(("exact",), "entity exact"), (("alias",), "entity or alias"), (("mentioned",), "named in caption"),
                (("failed",), "failed")],
    "multilabel": [(("f1_micro",), "F1 micro"), (("f1_macro",), "F1 macro"), (("auroc_macro",), "AUROC macro"),
                   (("auroc_micro",), "AUROC micro"), (("failed",), "failed")],
}
DEFINITIONS = {
    "points": "Points are matched one-to-one to true points within the match radius (Hungarian algorithm, "
              "scipy); a match must have the same class. Precision = TP / (TP + FP), recall = TP / (TP + FN), "
              "F1 their harmonic mean, over all classes (micro); F1 macro averages the classes. "
              "F1 ignoring class matches regardless of class. Count MAE: mean absolute error of the number "
              "of points per image.",
    "boxes": "COCO metrics by pycocotools: mAP averages AP over IoU thresholds 0.50:0.05:0.95; mAP50 and mAP75 at "
             "one threshold; AR@100 is the recall with up to 100 boxes per image.",
    "caption": "Entity exact: the answer names the true entity by its name; entity or alias: by its name or an "
               "alias from the ontology (case and spacing ignored); named in caption: the caption text names it.",
    "multilabel": "A class is predicted present at probability >= the task threshold. Per class TP/FP/FN/TN; "
                  "F1 micro pools all classes, F1 macro averages them; AUROC by scikit-learn (a class whose truth "
                  "has one value only has none).",
    "regression": "MAE and RMSE per target in its unit (scikit-learn); normalised MAE divides by the target's range.",
}


def write_report(out_dir: str | Path, spec, evaluation: dict) -> Path:
    """Write report.html, metrics.json and the PNGs into `out_dir`; returns the path of report.html."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = spec.task
    truths, members = _checked(evaluation)
    sizes = evaluation.get("sizes")
    metrics = {}
    for name, member in members.items():
        metrics[name] = member.get("metrics") or score(task, member["predictions"], truths, sizes=sizes)
    data = _rounded({
        "dataset": spec.name,
        "task": task.kind,
        "split": evaluation.get("split"),
        "n_images": len(truths),
        "members": metrics,
        "headline": {name: m.get("headline", {}).get("value") for name, m in metrics.items()},
        "ensemble_weights": dict(spec.serving.weights),
        "before_after": _before_after(task, metrics, evaluation.get("before_after")),
        "history": evaluation.get("history") or [],
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    (out / "metrics.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    page = _Page(out, data)
    page.section_title(spec, evaluation)
    page.section_members(task, members)
    page.section_before_after()
    page.section_per_class(task)
    page.section_curves(task)
    page.section_history()
    page.section_samples(task, evaluation, truths, members)
    page.section_definitions(task)
    path = out / "report.html"
    path.write_text(page.html(f"raydar report: {spec.name}"))
    return path


def _checked(evaluation: dict) -> tuple[list[dict], dict[str, dict]]:
    if not isinstance(evaluation, dict):
        raise ValueError(f"evaluation must be a dict (see raydar.report), got {type(evaluation).__name__}")
    truths = evaluation.get("truths")
    members = evaluation.get("members")
    if not isinstance(truths, list):
        raise ValueError("evaluation['truths'] must be a list of ground-truth labels, one per image")
    if not isinstance(members, dict) or not members:
        raise ValueError("evaluation['members'] must map each member name to {'predictions': [...]} (none given)")
    for name, member in members.items():
        if not isinstance(member, dict) or not isinstance(member.get("predictions", member.get("metrics")), (list, dict)):
            raise ValueError(f"evaluation['members'][{name!r}] needs 'predictions' (a list) or 'metrics'")
        preds = member.get("predictions")
        if preds is not None and len(preds) != len(truths):
            raise ValueError(f"evaluation['members'][{name!r}]['predictions'] has {len(preds)} labels for "
                             f"{len(truths)} truths; expected one per image in the same order")
    for key in ("images", "image_ids", "sizes"):
        if evaluation.get(key) is not None and len(evaluation[key]) != len(truths):
            raise ValueError(f"evaluation[{key!r}] has {len(evaluation[key])} entries for {len(truths)} truths")
    return truths, members


def _rounded(value: Any) -> Any:
    """JSON-ready: floats rounded to DECIMALS, numpy scalars unwrapped, NaN and infinities as None."""
    if isinstance(value, dict):
        return {str(k): _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return round(float(value), DECIMALS) if math.isfinite(value) else None
    return value


def _get(metrics: dict, path: tuple) -> Any:
    for key in path:
        if not isinstance(metrics, dict) or key not in metrics:
            return None
        metrics = metrics[key]
    return metrics


def _columns(task) -> list[tuple[tuple, str]]:
    if task.kind == "regression":
        cols = []
        for name, target in task.targets.items():
            unit = f" ({target.unit})" if target.unit else ""
            cols += [(("per_target", name, "mae"), f"{name} MAE{unit}"), (("per_target", name, "rmse"), f"{name} RMSE")]
        return cols + [(("mae_normalised_mean",), "normalised MAE"), (("failed",), "failed")]
    return TABLE_COLUMNS[task.kind]


def _before_after(task, metrics: dict, pair: list[str] | None) -> dict | None:
    if pair is None:
        if not {"base", "finetuned"} <= set(metrics):
            return None
        pair = ["base", "finetuned"]
    before, after = pair
    for name in pair:
        if name not in metrics:
            raise ValueError(f"evaluation['before_after'] names {name!r}, which is not a member ({sorted(metrics)})")
    rows = []
    for path, heading in _columns(task):
        b, a = _get(metrics[before], path), _get(metrics[after], path)
        delta = a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        rows.append({"metric": heading, "key": list(path), "before": b, "after": a, "delta": delta,
                     "higher_is_better": _is_rate(task, path)})
    return {"before": before, "after": after, "rows": rows}


def member_colour(name: str, order: list[str]) -> str:
    if name in MEMBER_COLOURS:
        return MEMBER_COLOURS[name]
    extras = [n for n in order if n not in MEMBER_COLOURS]
    return EXTRA_COLOURS[extras.index(name) % len(EXTRA_COLOURS)] if name in extras else EXTRA_COLOURS[0]


# ---------------------------------------------------------------- HTML


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # already rounded: the same digits as metrics.json
    return html.escape(str(value))


class _Page:
    """The HTML body, built section by section from the rounded metrics (never from unrounded numbers)."""

    def __init__(self, out: Path, data: dict) -> None:
        self.out = out
        self.data = data
        self.parts: list[str] = []
        self.names = list(data["members"])

    def cell(self, *path: Any, tag: str = "td") -> str:
        value: Any = self.data
        for key in path:
            if isinstance(value, dict):
                value = value.get(key)
            elif isinstance(value, list) and isinstance(key, int) and -len(value) <= key < len(value):
                value = value[key]
            else:
                value = None
        key = html.escape(json.dumps(list(path), ensure_ascii=False), quote=True)
        return f'<{tag} class="num" data-key="{key}">{_fmt(value)}</{tag}>'

    def figure(self, name: str, fig, alt: str, photo: bool = False) -> None:
        png = _png(fig, photo)
        (self.out / name).write_bytes(png)
        uri = "data:image/png;base64," + base64.b64encode(png).decode()
        self.parts.append(f'<figure><img src="{uri}" alt="{html.escape(alt)}" data-file="{html.escape(name)}">'
                          f'<figcaption>{html.escape(alt)} ({html.escape(name)})</figcaption></figure>')

    def add(self, text: str) -> None:
        self.parts.append(text)

    def html(self, title: str) -> str:
        body = "\n".join(self.parts)
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }}
h1 {{ margin-bottom: .2em; }} h2 {{ margin-top: 2em; border-bottom: 1px solid #ddd; }}
.meta {{ color: #555; }} .swatch {{ display: inline-block; width: .9em; height: .9em; border-radius: 2px;
       margin-right: .3em; vertical-align: -0.1em; }}
table {{ border-collapse: collapse; margin: .8em 0; font-size: 14px; }}
th, td {{ border: 1px solid #ddd; padding: 4px 9px; text-align: left; }}
th {{ background: #f4f4f6; }} td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr.best td.num {{ font-weight: 600; }} .up {{ color: #1b7f3b; }} .down {{ color: #b3261e; }}
figure {{ margin: 1em 0; }} figure img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ color: #666; font-size: 13px; }} details {{ margin: .5em 0; }}
</style></head>
<body>
{body}
</body></html>
"""

    # sections -----------------------------------------------------------
    def section_title(self, spec, evaluation: dict) -> None:
        d = self.data
        split = f" · {html.escape(str(d['split']))} split" if d["split"] else ""
        weights = ", ".join(f"{html.escape(k)} {self.cell('ensemble_weights', k, tag='span')}"
                            for k in d["ensemble_weights"])
        headline = ""
        first = next(iter(d["members"].values()))
        if first.get("headline"):
            h = first["headline"]
            cells = "".join(f"<th>{_swatch(n, self.names)}{html.escape(n)}</th>" for n in self.names)
            values = "".join(self.cell("headline", n) for n in self.names)
            better = "higher is better" if h.get("higher_is_better") else "lower is better"
            headline = (f"<p>Headline: <b>{html.escape(str(h.get('metric')))}</b> ({better})</p>"
                        f"<table><tr>{cells}</tr><tr>{values}</tr></table>")
        notes = "".join(f"<p class=meta>{html.escape(str(n))}</p>" for n in evaluation.get("notes") or [])
        self.add(f"<h1>{html.escape(spec.name)}</h1>"
                 f"<p class=meta>{html.escape(spec.task.kind)} task{split} · {self.cell('n_images', tag='span')} images · "
                 f"ensemble weights: {weights or 'equal'} · generated {html.escape(d['generated_at'])}</p>"
                 f"{notes}{headline}")

    def section_members(self, task, members: dict) -> None:
        columns = _columns(task)
        head = "<tr><th>member</th>" + "".join(f"<th>{html.escape(h)}</th>" for _, h in columns) + "</tr>"
        rows = []
        for name in self.names:
            desc = members[name].get("description")
            label = f"{_swatch(name, self.names)}{html.escape(name)}" + (
                f"<br><small>{html.escape(str(desc))}</small>" if desc else "")
            rows.append(f"<tr><td>{label}</td>"
                        + "".join(self.cell("members", name, *path) for path, _ in columns) + "</tr>")
        self.add(f"<h2>Metrics per member</h2><table>{head}{''.join(rows)}</table>")
        rates = [(path, h) for path, h in columns if path != ("failed",) and _is_rate(task, path)]
        if rates:
            self.figure("members.png", _plot_members(self.data["members"], rates, self.names),
                        "Metrics per member")

    def section_before_after(self) -> None:
        ba = self.data["before_after"]
        if not ba:
            return
        rows = []
        for i, row in enumerate(ba["rows"]):
            delta = row["delta"]
            better = delta is not None and (delta > 0) == row["higher_is_better"]
            cls = "" if not delta else (' class="up"' if better else ' class="down"')
            rows.append(f"<tr><td>{html.escape(row['metric'])}</td>{self.cell('before_after', 'rows', i, 'before')}"
                        f"{self.cell('before_after', 'rows', i, 'after')}"
                        f"{self.cell('before_after', 'rows', i, 'delta').replace('<td ', f'<td{cls} ', 1)}</tr>")
        self.add(f"<h2>Before vs after: {html.escape(ba['before'])} → {html.escape(ba['after'])}</h2>"
                 f"<table><tr><th>metric</th><th>{html.escape(ba['before'])}</th><th>{html.escape(ba['after'])}</th>"
                 f"<th>change</th></tr>{''.join(rows)}</table>")
        rates = [r for r in ba["rows"] if r["higher_is_better"]]
        if rates:
            self.figure("before_after.png", _plot_before_after(ba, rates, self.names), "Before vs after")

    def section_per_class(self, task) -> None:
        members = self.data["members"]
        if task.kind == "points":
            fields = [("tp", "TP"), ("fp", "FP"), ("fn", "FN"), ("precision", "P"), ("recall", "R"), ("f1", "F1")]
            self._per_class_table("Per class", list(task.ontology), "per_class", fields)
            confusions = {n: members[n]["confusion"] for n in self.names if members[n].get("confusion")}
            if confusions:
                self.figure("confusion.png", _plot_point_confusions(confusions),
                            "Confusion of matched labels per member: rows true, columns predicted; "
                            "none = missed (column) or invented (row)")
        elif task.kind == "boxes":
            fields = [("ap", "AP"), ("ap50", "AP50"), ("n_true", "true"), ("n_predicted", "predicted")]
            self._per_class_table("Per class", list(task.ontology), "per_class", fields)
        elif task.kind == "caption":
            fields = [("n", "images"), ("exact_rate", "exact"), ("alias_rate", "alias"), ("mentioned_rate", "in caption")]
            self._per_class_table("Per entity", list(task.ontology), "per_entity", fields)
        elif task.kind == "multilabel":
            fields = [("tp", "TP"), ("fp", "FP"), ("fn", "FN"), ("tn", "TN"), ("precision", "P"), ("recall", "R"),
                      ("f1", "F1"), ("auroc", "AUROC")]
            self._per_class_table("Per class: TP / FP / FN / TN", list(task.ontology), "per_class", fields)
            for name in self.names:
                if members[name].get("per_class"):
                    self.figure(f"confusion_{_slug(name)}.png",
                                _plot_multilabel_confusion(name, members[name]["per_class"], list(task.ontology)),
                                f"Confusion matrices per class: {name}")

    def _per_class_table(self, title: str, classes: list[str], key: str, fields: list[tuple[str, str]]) -> None:
        self.add(f"<h2>{html.escape(title)}</h2>")
        for name in self.names:
            if not self.data["members"][name].get(key):
                continue
            head = "<tr><th>class</th>" + "".join(f"<th>{h}</th>" for _, h in fields) + "</tr>"
            rows = "".join(
                f"<tr><td>{html.escape(c)}</td>"
                + "".join(self.cell("members", name, key, c, f) for f, _ in fields) + "</tr>"
                for c in classes
            )
            self.add(f"<details open><summary>{_swatch(name, self.names)}{html.escape(name)}</summary>"
                     f"<table>{head}{rows}</table></details>")

    def section_curves(self, task) -> None:
        members = self.data["members"]
        if task.kind in ("points", "multilabel"):
            if any(members[n].get("curve") for n in self.names):
                self.add("<h2>Precision and recall against the score threshold</h2>"
                         "<p class=meta>Solid: precision; dashed: recall. Predictions scored below the threshold "
                         "are dropped (points), or a class counts as present at or above it (multilabel).</p>")
                self.figure("threshold_curves.png", _plot_threshold_curves(members, self.names),
                            "Precision and recall against the threshold")
        elif task.kind == "boxes":
            if any(members[n].get("pr_curve_iou50", {}).get("recall") for n in self.names):
                self.add("<h2>Precision against recall at IoU 0.5</h2>")
                self.figure("pr_curve_iou50.png", _plot_pr_curves(members, self.names),
                            "COCO precision-recall at IoU 0.5, averaged over classes")

    def section_history(self) -> None:
        history = self.data["history"]
        self.add("<h2>Training</h2>")
        if not history:
            self.add("<p class=meta>No training history was given.</p>")
            return
        last = len(history) - 1
        val = [i for i, h in enumerate(history) if h.get("val_loss") is not None]
        cells = f"<tr><td>final training loss (step {self.cell('history', last, 'step', tag='span')})</td>" \
                f"{self.cell('history', last, 'loss')}</tr>"
        if val:
            cells += (f"<tr><td>final validation loss (step {self.cell('history', val[-1], 'step', tag='span')})</td>"
                      f"{self.cell('history', val[-1], 'val_loss')}</tr>")
        self.add(f"<table>{cells}</table>")
        self.figure("loss_curves.png", _plot_history(history), "Training and validation loss")

    def section_samples(self, task, evaluation: dict, truths: list[dict], members: dict) -> None:
        images = evaluation.get("images")
        self.add("<h2>Samples</h2>")
        with_preds = [n for n in self.names if members[n].get("predictions") is not None]
        if not images or not with_preds:
            self.add("<p class=meta>No images or predictions were given.</p>")
            return
        count = int(evaluation.get("samples", 6))
        chosen = [i for i, img in enumerate(images) if img is not None][:count]
        legend = " ".join(f"{_swatch(n, self.names)}{html.escape(n)}" for n in with_preds)
        self.add(f"<p class=meta><span class=swatch style='background:{TRUTH_COLOUR}'></span>ground truth · "
                 f"{legend}</p>")
        fig = _plot_samples(task, [images[i] for i in chosen], [truths[i] for i in chosen],
                            {n: [members[n]["predictions"][i] for i in chosen] for n in with_preds}, self.names,
                            [evaluation["image_ids"][i] for i in chosen] if evaluation.get("image_ids") else None)
        self.figure("samples.png", fig, "Sample images: ground truth, then each member", photo=True)

    def section_definitions(self, task) -> None:
        self.add(f"<h2>How the numbers are computed</h2><p>{html.escape(DEFINITIONS[task.kind])}</p>"
                 "<p class=meta>Failed answers count as empty predictions and are counted in “failed”. "
                 f"Numbers are rounded to {DECIMALS} decimals; metrics.json beside this file holds the same "
                 "numbers.</p>")


def _swatch(name: str, order: list[str]) -> str:
    return f"<span class=swatch style='background:{member_colour(name, order)}'></span>"


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def _is_rate(task, path: tuple) -> bool:
    return task.kind != "regression" and path not in (("count", "mae"), ("failed",))


# ---------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig, photo: bool = False) -> bytes:
    """PNG bytes; `photo` figures (image grids) at a lower resolution: noisy micrographs do not compress."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", dpi=80 if photo else 100)
    return buf.getvalue()


def _plot_members(members: dict, columns: list, names: list[str]):
    fig = _figure(max(6, 1.2 * len(columns) * max(1, len(names)) / 2), 3.6)
    ax = fig.add_subplot()
    width = 0.8 / len(names)
    x = np.arange(len(columns))
    for k, name in enumerate(names):
        values = [_get(members[name], path) for path, _ in columns]
        ax.bar(x + k * width - 0.4 + width / 2, [v if v is not None else 0 for v in values], width,
               label=name, color=member_colour(name, names))
    ax.set_xticks(x, [h for _, h in columns])
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1), frameon=False)
    return fig


def _plot_before_after(ba: dict, rows: list[dict], names: list[str]):
    rows = [r for r in rows if isinstance(r["before"], (int, float)) and isinstance(r["after"], (int, float))]
    fig = _figure(max(5, 1.3 * len(rows)), 3.4)
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    for k, which in enumerate(("before", "after")):
        name = ba[which]
        ax.bar(x + (k - 0.5) * 0.38, [r[which] for r in rows], 0.38, label=name, color=member_colour(name, names))
    ax.set_xticks(x, [r["metric"] for r in rows], rotation=20, ha="right")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1), frameon=False)  # beside the bars, never over one
    return fig


def _plot_history(history: list[dict]):
    fig = _figure(6.5, 3.6)
    ax = fig.add_subplot()
    steps = [h.get("step", i) for i, h in enumerate(history)]
    train = [(s, h["loss"]) for s, h in zip(steps, history) if h.get("loss") is not None]
    val = [(s, h["val_loss"]) for s, h in zip(steps, history) if h.get("val_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="training loss", color="#1f77b4")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="#d62728")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    return fig


def _plot_threshold_curves(members: dict, names: list[str]):
    fig = _figure(6.5, 3.8)
    ax = fig.add_subplot()
    for name in names:
        curve = members[name].get("curve")
        if not curve:
            continue
        colour = member_colour(name, names)
        ax.plot(curve["thresholds"], curve["precision"], "-", color=colour, label=f"{name} precision")
        ax.plot(curve["thresholds"], curve["recall"], "--", color=colour, label=f"{name} recall")
    ax.set_xlabel("score threshold")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1), frameon=False, fontsize=8)
    return fig


def _plot_pr_curves(members: dict, names: list[str]):
    fig = _figure(5.5, 4)
    ax = fig.add_subplot()
    for name in names:
        curve = members[name].get("pr_curve_iou50") or {}
        if curve.get("recall"):
            pairs = [(r, p) for r, p in zip(curve["recall"], curve["precision"]) if p is not None]
            if pairs:
                ax.plot(*zip(*pairs), color=member_colour(name, names), label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    return fig


def _plot_point_confusions(confusions: dict[str, dict]):
    n = len(confusions)
    size = len(next(iter(confusions.values()))["labels"])
    cols = min(n, 5)
    rows = math.ceil(n / cols)
    fig = _figure((0.8 + 0.75 * size) * cols, (0.9 + 0.75 * size) * rows)
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


def _plot_multilabel_confusion(name: str, per_class: dict, classes: list[str]):
    cols = min(5, len(classes))
    rows = math.ceil(len(classes) / cols)
    fig = _figure(2.2 * cols, 2.2 * rows + 0.4)
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


def _open_image(item):
    from PIL import Image

    img = Image.open(io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else item)
    img = img.convert("RGB")
    img.thumbnail((320, 320))
    return img


def _plot_samples(task, images: list, truths: list[dict], predictions: dict[str, list], names: list[str],
                  ids: list[str] | None):
    from matplotlib.lines import Line2D

    columns = ["ground truth", *predictions]
    fig = _figure(2.3 * len(columns), 2.45 * len(images) + 0.5)
    axes = fig.subplots(len(images), len(columns), squeeze=False)
    markers = "osD^vPX*"
    for row, item in enumerate(images):
        img = _open_image(item)
        w, h = img.size
        for col, column in enumerate(columns):
            ax = axes[row][col]
            ax.imshow(img, extent=(0, w, h, 0))
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            ax.set_xticks([])
            ax.set_yticks([])
            if column == "ground truth":
                label, colour = truths[row], TRUTH_COLOUR
            else:
                label, colour = predictions[column][row], member_colour(column, names)
            title = column if row == 0 else ""
            text = _draw_label(ax, task, label, colour, w, h, markers)
            if ids and col == 0:
                ax.set_ylabel(str(ids[row])[:10], fontsize=7)
            if text:
                title = (title + "\n" if title else "") + text
            ax.set_title(title, fontsize=8)
    if task.kind in ("points", "boxes"):
        handles = [Line2D([], [], color=TRUTH_COLOUR, lw=2, label="ground truth")]
        handles += [Line2D([], [], color=member_colour(n, names), lw=2, label=n) for n in predictions]
        if task.kind == "points":
            handles += [Line2D([], [], color="#333", marker=markers[k % len(markers)], ls="", fillstyle="none",
                               label=c) for k, c in enumerate(task.ontology)]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.04 if task.kind in ("points", "boxes") else 0, 1, 1))
    return fig


def _draw_label(ax, task, label: dict | None, colour: str, w: int, h: int, markers: str) -> str:
    """Draw a label on an image axis; returns text for the title (failed answers, captions, values)."""
    from matplotlib.patches import Rectangle

    if label is None:
        return "(failed)"
    if task.kind == "points":
        order = {c: k for k, c in enumerate(task.ontology)}
        size = max(5.0, match_radius(task, (w, h)) * 0.9)
        for p in label.get("points", []):
            faint = p.get("score", 1.0) < 0.5
            ax.plot(p["x"] * w, p["y"] * h, marker=markers[order.get(p["label"], 0) % len(markers)],
                    markersize=size, fillstyle="none", color=colour, markeredgewidth=1.6,
                    alpha=0.55 if faint else 1.0)
        n = len(label.get("points", []))
        return f"{n} point{'s' * (n != 1)}"
    if task.kind == "boxes":
        for o in label.get("objects", []):
            x1, y1, x2, y2 = o["box"]
            ax.add_patch(Rectangle((x1 * w, y1 * h), (x2 - x1) * w, (y2 - y1) * h, fill=False, edgecolor=colour, lw=1.6))
            ax.text(x1 * w, y1 * h, o["label"], color="white", fontsize=6, va="bottom",
                    bbox={"facecolor": colour, "edgecolor": "none", "pad": 1})
        n = len(label.get("objects", []))
        return f"{n} object{'s' * (n != 1)}"
    if task.kind == "caption":
        text = str(label.get("entity", ""))
    elif task.kind == "multilabel":
        text = ", ".join(c for c, p in label.get("probabilities", {}).items() if p >= task.threshold) or "none"
    else:
        text = ", ".join(f"{k} {v:.0f}" for k, v in label.get("values", {}).items())
    return textwrap.fill(textwrap.shorten(text, 60), 32)
