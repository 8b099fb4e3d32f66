"""The evaluation report: `report.html`, `metrics.json` and PNGs that a person opens from disk.

    from raydar.evaluation import Evaluation, MemberEvaluation
    from raydar.report import write_report
    evaluation = Evaluation(truths=truths, members={"finetuned": MemberEvaluation(predictions)}, split="test")
    path = write_report("out/report", spec, evaluation)   # -> out/report/report.html

What is drawn comes from `raydar.evaluation.Evaluation` (truths, each member's predictions and metrics,
images, history); what each kind shows (its metric table, per-class tables, curves, how a label is drawn
on an image) comes from its module in raydar/kinds/.

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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from raydar.evaluation import Evaluation
from raydar.kinds import kind_of
from raydar.metrics import score

MEMBER_COLOURS = {
    # bright against stained tissue (pink, purple), and told apart from each other and the truth's green
    "base": "#212121", "finetuned": "#1565c0", "rag": "#ff6d00", "ensemble": "#00b8d4", "teacher": "#ffab00",
}
EXTRA_COLOURS = ["#d50000", "#aeea00", "#6200ea", "#c51162", "#00bfa5"]
TRUTH_COLOUR = "#00c853"
DECIMALS = 4

def write_report(out_dir: str | Path, spec, evaluation: Evaluation) -> Path:
    """Write report.html, metrics.json and the PNGs into `out_dir`; returns the path of report.html."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = spec.task
    kind = kind_of(task)
    if not isinstance(evaluation, Evaluation):
        raise ValueError(f"evaluation must be a raydar.evaluation.Evaluation, got {type(evaluation).__name__}")
    truths, members = evaluation.truths, evaluation.members
    metrics = {}
    for name, member in members.items():
        metrics[name] = member.metrics or score(task, member.predictions, truths, sizes=evaluation.sizes)
    data = _rounded({
        "dataset": spec.name,
        "task": kind.name,
        "split": evaluation.split,
        "n_images": len(truths),
        "members": metrics,
        "headline": {name: m.get("headline", {}).get("value") for name, m in metrics.items()},
        "ensemble_weights": dict(spec.serving.weights),
        "before_after": _before_after(kind, metrics, evaluation.before_after),
        "history": evaluation.history or [],
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    (out / "metrics.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    page = _Page(out, data)
    page.section_title(spec, evaluation)
    page.section_members(kind, members)
    page.section_before_after()
    kind.report_per_class(page, page.data["members"])
    kind.report_curves(page, page.data["members"])
    page.section_history()
    page.section_samples(kind, evaluation, truths, members)
    page.section_definitions(kind)
    path = out / "report.html"
    path.write_text(page.html(f"raydar report: {spec.name}"))
    return path


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


def _before_after(kind, metrics: dict, pair: list[str] | None) -> dict | None:
    if pair is None:
        if not {"base", "finetuned"} <= set(metrics):
            return None
        pair = ["base", "finetuned"]
    before, after = pair
    for name in pair:
        if name not in metrics:
            raise ValueError(f"evaluation['before_after'] names {name!r}, which is not a member ({sorted(metrics)})")
    rows = []
    for path, heading in kind.table_columns():
        b, a = _get(metrics[before], path), _get(metrics[after], path)
        delta = a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        rows.append({"metric": heading, "key": list(path), "before": b, "after": a, "delta": delta,
                     "higher_is_better": kind.is_rate(path)})
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
        notes = "".join(f"<p class=meta>{html.escape(str(n))}</p>" for n in evaluation.notes)
        self.add(f"<h1>{html.escape(spec.name)}</h1>"
                 f"<p class=meta>{html.escape(spec.task.kind)} task{split} · {self.cell('n_images', tag='span')} images · "
                 f"ensemble weights: {weights or 'equal'} · generated {html.escape(d['generated_at'])}</p>"
                 f"{notes}{headline}")

    def section_members(self, kind, members: dict) -> None:
        columns = kind.table_columns()
        head = "<tr><th>member</th>" + "".join(f"<th>{html.escape(h)}</th>" for _, h in columns) + "</tr>"
        rows = []
        for name in self.names:
            desc = members[name].description
            label = f"{_swatch(name, self.names)}{html.escape(name)}" + (
                f"<br><small>{html.escape(str(desc))}</small>" if desc else "")
            rows.append(f"<tr><td>{label}</td>"
                        + "".join(self.cell("members", name, *path) for path, _ in columns) + "</tr>")
        self.add(f"<h2>Metrics per member</h2><table>{head}{''.join(rows)}</table>")
        rates = [(path, h) for path, h in columns if path != ("failed",) and kind.is_rate(path)]
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

    def per_class_table(self, title: str, classes: list[str], key: str, fields: list[tuple[str, str]]) -> None:
        """A table per member of `fields` of each class under `key` of its metrics."""
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

    def threshold_curves(self, members: dict) -> None:
        """Precision and recall of every member against the score threshold (its metrics' `curve`)."""
        if any(members[n].get("curve") for n in self.names):
            self.add("<h2>Precision and recall against the score threshold</h2>"
                     "<p class=meta>Solid: precision; dashed: recall. Predictions scored below the threshold "
                     "are dropped (points), or a class counts as present at or above it (multilabel).</p>")
            self.figure("threshold_curves.png", _plot_threshold_curves(members, self.names),
                        "Precision and recall against the threshold")

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

    def section_samples(self, kind, evaluation: dict, truths: list[dict], members: dict) -> None:
        images = evaluation.images
        self.add("<h2>Samples</h2>")
        with_preds = [n for n in self.names if members[n].predictions is not None]
        if not images or not with_preds:
            self.add("<p class=meta>No images or predictions were given.</p>")
            return
        count = evaluation.samples
        chosen = [i for i, img in enumerate(images) if img is not None][:count]
        legend = " ".join(f"{_swatch(n, self.names)}{html.escape(n)}" for n in with_preds)
        self.add(f"<p class=meta><span class=swatch style='background:{TRUTH_COLOUR}'></span>ground truth · "
                 f"{legend}</p>")
        fig = _plot_samples(kind, [images[i] for i in chosen], [truths[i] for i in chosen],
                            {n: [members[n].predictions[i] for i in chosen] for n in with_preds}, self.names,
                            [evaluation.image_ids[i] for i in chosen] if evaluation.image_ids else None)
        self.figure("samples.png", fig, "Sample images: ground truth, then each member", photo=True)

    def section_definitions(self, kind) -> None:
        self.add(f"<h2>How the numbers are computed</h2><p>{html.escape(kind.definition)}</p>"
                 "<p class=meta>Failed answers count as empty predictions and are counted in “failed”. "
                 f"Numbers are rounded to {DECIMALS} decimals; metrics.json beside this file holds the same "
                 "numbers.</p>")


def _swatch(name: str, order: list[str]) -> str:
    return f"<span class=swatch style='background:{member_colour(name, order)}'></span>"


def slug(name: str) -> str:
    """`name` safe as part of a file name."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


# ---------------------------------------------------------------- plots


def new_figure(width: float, height: float):
    """A matplotlib figure on the Agg canvas (no display, no pyplot state)."""
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
    fig = new_figure(max(6, 1.2 * len(columns) * max(1, len(names)) / 2), 3.6)
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
    fig = new_figure(max(5, 1.3 * len(rows)), 3.4)
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
    fig = new_figure(6.5, 3.6)
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
    fig = new_figure(6.5, 3.8)
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


def _open_image(item):
    from PIL import Image

    img = Image.open(io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else item)
    img = img.convert("RGB")
    img.thumbnail((320, 320))
    return img


def _plot_samples(kind, images: list, truths: list[dict], predictions: dict[str, list], names: list[str],
                  ids: list[str] | None):
    from matplotlib.lines import Line2D

    columns = ["ground truth", *predictions]
    fig = new_figure(2.3 * len(columns), 2.45 * len(images) + 0.5)
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
            text = kind.draw(ax, label, colour, w, h, markers) if label is not None else "(failed)"
            if ids and col == 0:
                ax.set_ylabel(str(ids[row])[:10], fontsize=7)
            if text:
                title = (title + "\n" if title else "") + text
            ax.set_title(title, fontsize=8)
    if kind.draws_on_image:
        handles = [Line2D([], [], color=TRUTH_COLOUR, lw=2, label="ground truth")]
        handles += [Line2D([], [], color=member_colour(n, names), lw=2, label=n) for n in predictions]
        handles += kind.legend_handles(markers)
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.04 if kind.draws_on_image else 0, 1, 1))
    return fig
