"""Scoring every detector on a held-out split against ground truth, and writing the report.

    result = evaluate(spec, storage, members=["base", "finetuned"], report=False)
    print(result.summary())

`Evaluation` is the contract between the two: what `evaluate` gathers (truths, each member's predictions
and metrics, the images, the training history) and what `raydar.report.write_report` draws. Beside the
report, `predictions.parquet` holds every member's answer per image with the reference label, so that
anyone can recompute the report's numbers (`Evaluation.predictions_table`).

Members: the untuned base student, the fine-tuned student (the run's best checkpoint), the RAG
detector (knowledge base + the teacher's VLM endpoint), their ensemble (fused as in serving, with
the spec's weights) and the teacher's own labels. Ground truth is `ground_truth.jsonl` beside the
images (raydar.sources.read_ground_truth). Without it the teacher's labels are the reference, the
teacher is not scored, and the report says so.

The two students run as Ray tasks side by side; the RAG detector's requests go out concurrently.
The report goes under `<storage>/<dataset>/report/`: report.html, metrics.json, PNGs (raydar.report).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc

from raydar.checkpoint import finetune_run_folder, run_history
from raydar.labels import LabelStore
from raydar.sources import read_bytes, read_ground_truth, resolve_source
from raydar.spec import DatasetSpec, SpecError
from raydar.teacher.launch import SimulatedTeacherProcess

MEMBERS = ("base", "finetuned", "rag", "ensemble", "teacher")
DESCRIPTIONS = {
    "base": "untuned base student",
    "finetuned": "fine-tuned student (LoRA)",
    "rag": "RAG: knowledge-base examples + VLM",
    "ensemble": "fused finetuned + rag",
    "teacher": "the teacher's labels",
}


@dataclass
class MemberEvaluation:
    """One member's answers on the evaluated images, in the images' order (None: a failed answer), and
    optionally its metrics (raydar.metrics.score's output; computed from the predictions when absent)."""

    predictions: list[dict | None] | None = None
    metrics: dict | None = None
    description: str = ""  # shown in the report's member table

    def __post_init__(self) -> None:
        if self.predictions is None and self.metrics is None:
            raise ValueError("a member evaluation needs predictions (a list) or metrics")


@dataclass
class Evaluation:
    """What the report shows. `truths` holds the reference label of each image; every list given beside it
    (each member's predictions, `images`, `image_ids`, `sizes`) has one entry per image, in the same order.
    Members appear in the report in the order of `members`."""

    truths: list[dict]
    members: dict[str, MemberEvaluation]
    split: str | None = None  # shown in the title
    images: list | None = None  # path, bytes or None per image: the samples grid draws them
    image_ids: list[str] | None = None  # captions in the samples grid
    sizes: list[tuple[int, int]] | None = None  # (width, height) per image: exact point distances
    history: list[dict] = field(default_factory=list)  # the training curve: {"step", "loss", "val_loss"?, ...}
    before_after: tuple[str, str] | None = None  # default: base vs finetuned when both are members
    samples: int = 6  # images in the samples grid
    notes: list[str] = field(default_factory=list)  # lines under the title

    def __post_init__(self) -> None:
        if not isinstance(self.truths, list):
            raise ValueError("Evaluation.truths must be a list of ground-truth labels, one per image")
        if not self.members:
            raise ValueError("Evaluation.members must map each member name to a MemberEvaluation (none given)")
        for name, member in self.members.items():
            if not isinstance(member, MemberEvaluation):
                raise ValueError(f"Evaluation.members[{name!r}] must be a MemberEvaluation, got {type(member).__name__}")
            if member.predictions is not None and len(member.predictions) != len(self.truths):
                raise ValueError(f"Evaluation.members[{name!r}].predictions has {len(member.predictions)} labels for "
                                 f"{len(self.truths)} truths; expected one per image in the same order")
        for key in ("images", "image_ids", "sizes"):
            given = getattr(self, key)
            if given is not None and len(given) != len(self.truths):
                raise ValueError(f"Evaluation.{key} has {len(given)} entries for {len(self.truths)} truths")
        if self.image_ids is not None and len(set(self.image_ids)) != len(self.image_ids):
            raise ValueError("Evaluation.image_ids must not repeat an image")
        if self.before_after is not None:
            missing = [m for m in self.before_after if m not in self.members]
            if len(self.before_after) != 2 or missing:
                raise ValueError(f"Evaluation.before_after must name two members of {sorted(self.members)}, "
                                 f"got {list(self.before_after)}")


    def predictions_table(self):
        """One row per (image, member) with a prediction: `image_id` (or the image's index when there are no
        ids), `member`, `prediction` (the label as JSON, null for a failed answer), `truth` (JSON), `width`
        and `height` (0 when unknown), in image order, members in their order."""
        import pyarrow as pa

        rows = []
        for name, member in self.members.items():
            if member.predictions is None:
                continue
            for i, (prediction, truth) in enumerate(zip(member.predictions, self.truths)):
                width, height = self.sizes[i] if self.sizes is not None else (0, 0)
                rows.append({"image_id": self.image_ids[i] if self.image_ids else str(i), "member": name,
                             "prediction": None if prediction is None else json.dumps(prediction),
                             "truth": json.dumps(truth), "width": int(width), "height": int(height)})
        return pa.Table.from_pylist(rows, schema=_predictions_schema())


PREDICTIONS_FILE = "predictions.parquet"  # beside metrics.json in the report folder


def _predictions_schema():
    import pyarrow as pa

    return pa.schema([("image_id", pa.string()), ("member", pa.string()), ("prediction", pa.string()),
                      ("truth", pa.string()), ("width", pa.int32()), ("height", pa.int32())])


@dataclass
class EvaluationResult:
    split: str
    images: int
    headline: dict[str, float | None]  # member -> its headline metric
    metric: str  # the headline metric's name, e.g. "f1"
    report: str | None
    reference: str  # "ground truth" or "teacher labels"
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"held-out {self.split} split, {self.images} images, against {self.reference}: {self.metric}"]
        for name, value in self.headline.items():
            lines.append(f"  {name:<10} {'n/a' if value is None else f'{value:.3f}'}   {DESCRIPTIONS.get(name, '')}")
        if self.report:
            lines.append(f"report: {self.report}")
        return "\n".join(lines)


def evaluate(
    spec: DatasetSpec,
    storage,
    *,
    checkpoint: str | None = None,
    split: str = "test",
    members: list[str] | tuple[str, ...] = MEMBERS,
    report: bool = True,
    history: list[dict] | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Score `members` on the `split` images of `spec` under `storage` (a cluster.StorageRoot). Ray must be up."""
    from raydar.metrics import score

    unknown = sorted(set(members) - set(MEMBERS))
    if unknown:
        raise SpecError(f"--members: unknown {unknown}; expected a subset of {list(MEMBERS)}")
    started = time.time()
    root = storage.child(spec.name)
    rows = LabelStore(root.child("labels")).read_labels()
    rows = rows.filter(pc.equal(rows["split"], split))
    if rows.num_rows == 0:
        raise SpecError(f"{root.uri_of('labels')}: no labelled images in the {split} split; run `raydar label` first")
    source = resolve_source(spec, root)
    truth_by_id = _truth_by_id(source)
    ids = rows["image_id"].to_pylist()
    teacher = [json.loads(x) if status == "ok" else None
               for x, status in zip(rows["label"].to_pylist(), rows["status"].to_pylist())]
    if truth_by_id:
        keep = [i for i, image in enumerate(ids) if image in truth_by_id]
        reference = "ground truth"
    else:  # the teacher is the reference: only images it labelled, and it is not scored against itself
        keep = [i for i, label in enumerate(teacher) if label is not None]
        members = [m for m in members if m != "teacher"]
        reference = "teacher labels"
    ids = [ids[i] for i in keep]
    uris = [rows["source_uri"][i].as_py() for i in keep]
    teacher = [teacher[i] for i in keep]
    truths = [truth_by_id[i] for i in ids] if truth_by_id else teacher
    images = [read_bytes(uri) for uri in uris]
    sizes = [(rows["width"][i].as_py(), rows["height"][i].as_py()) for i in keep]

    predictions: dict[str, list[dict | None]] = {}
    wanted = set(members)
    if "ensemble" in wanted:
        wanted |= set(spec.serving.members)
    import ray

    detect_remote = ray.remote(num_cpus=1)(_detect_all)
    students = {}
    if "base" in wanted:
        students["base"] = detect_remote.remote(spec.model_dump_json(), spec.source_file, None, images)
    if "finetuned" in wanted:
        students["finetuned"] = detect_remote.remote(
            spec.model_dump_json(), spec.source_file, checkpoint or finetune_run_folder(spec, storage), images)
    if "rag" in wanted:
        predictions["rag"] = _detect_rag(spec, storage, source, images, progress)
    for name, ref in students.items():
        predictions[name] = [r["label"] for r in ray.get(ref)]
    if "ensemble" in wanted:
        predictions["ensemble"] = fuse_members(spec, [{m: predictions[m][i] for m in spec.serving.members}
                                                      for i in range(len(images))])
    if "teacher" in wanted:
        predictions["teacher"] = teacher

    order = [m for m in MEMBERS if m in members]
    scored = {m: score(spec.task, predictions[m], truths, sizes=sizes) for m in order}
    headline = {m: scored[m].get("headline", {}).get("value") for m in order}
    metric = next((scored[m]["headline"]["metric"] for m in order if "headline" in scored[m]), "score")
    report_path = None
    if report:
        evaluation = Evaluation(
            split=split, truths=truths, images=images, image_ids=ids, sizes=sizes,
            members={m: MemberEvaluation(predictions[m], scored[m], DESCRIPTIONS[m]) for m in order},
            history=history if history is not None else _saved_run_history(spec, storage, checkpoint),
            notes=[f"{len(ids)} held-out images ({split} split), scored against {reference}."],
        )
        report_path = write_report_to(root.child("report"), spec, evaluation)
    return EvaluationResult(split=split, images=len(ids), headline=headline, metric=metric, report=report_path,
                            reference=reference, metrics=scored, seconds=time.time() - started)


# ---------------------------------------------------------------- members


def _detect_all(spec_json: str, source_file: str | None, checkpoint: str | None, images: list[bytes]) -> list[dict]:
    """One student over all images, in batches (a Ray task of `evaluate`)."""
    from raydar.predict import StudentDetector

    if checkpoint is None:
        spec = DatasetSpec.model_validate({**json.loads(spec_json), "source_file": source_file})
        detector = StudentDetector.from_base(spec)
    else:
        detector = StudentDetector.from_checkpoint(checkpoint)
    out: list[dict] = []
    for start in range(0, len(images), 8):
        out.extend(detector.detect(images[start:start + 8]))
    return out


def _detect_rag(spec: DatasetSpec, storage, source: str, images: list[bytes], progress: bool) -> list:
    from tqdm import tqdm

    from raydar.rag import RagDetector

    async def run(url: str | None) -> list[dict | None]:
        # Examples from the training split only: a held-out image's neighbours must not be held-out answers.
        detector = RagDetector.from_spec(spec, storage, base_url=url,
                                         where={**spec.knowledge_base.where, "split": "train"})
        limit = asyncio.Semaphore(spec.teacher.concurrency)
        bar = tqdm(total=len(images), desc="evaluate: rag", disable=not progress)

        async def one(data: bytes) -> dict | None:
            async with limit:
                try:
                    return (await detector.detect(data))["label"]
                except Exception:  # a failed answer scores as empty, as for every member
                    return None
                finally:
                    bar.update()

        try:
            return list(await asyncio.gather(*(one(data) for data in images)))
        finally:
            bar.close()
            await detector.close()

    with SimulatedTeacherProcess(spec, source) as url:
        return asyncio.run(run(url))


def fuse_members(spec: DatasetSpec, per_image: list[dict[str, dict | None]]) -> list[dict | None]:
    """The ensemble's label per image, fused as serving fuses (members that failed are left out)."""
    from raydar.fusion import fuse

    out = []
    for results in per_image:
        present = {m: label for m, label in results.items() if label is not None}
        out.append(fuse(spec.task, present, spec.serving.weights, min_score=spec.serving.score_threshold)
                   if present else None)
    return out


# ---------------------------------------------------------------- inputs and outputs


def _truth_by_id(source: str) -> dict[str, dict]:
    """image id -> label from the ground truth beside the images; {} when there is none."""
    try:
        return {record["image_id"]: record["label"] for record in read_ground_truth(source)}
    except OSError:
        return {}


def _saved_run_history(spec: DatasetSpec, storage, checkpoint: str | None) -> list[dict]:
    """The training curve the finetune run saved with its checkpoints, if any."""
    try:
        return run_history(checkpoint or finetune_run_folder(spec, storage))
    except FileNotFoundError:
        return []


def write_report_to(folder, spec: DatasetSpec, evaluation: Evaluation) -> str:
    """report.html, its files and `predictions.parquet` in `folder` (a cluster.StorageRoot: local, or written
    locally then copied to a bucket)."""
    import pyarrow.parquet as pq

    from raydar.report import write_report

    def write(out: Path) -> Path:
        written = write_report(out, spec, evaluation)
        pq.write_table(evaluation.predictions_table(), out / PREDICTIONS_FILE)
        return written

    if folder.is_local:
        return str(write(Path(folder.path)))
    with tempfile.TemporaryDirectory() as tmp:
        written = write(Path(tmp))
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                folder.write_bytes(path.read_bytes(), str(path.relative_to(tmp)))
        return folder.uri_of(written.name)
