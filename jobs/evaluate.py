"""Evaluate every detector on the held-out split against ground truth, and write the report.

    raydar evaluate --spec datasets/demo_cells.yaml
    ray job submit --working-dir . -- python -m jobs.evaluate --spec datasets/demo_cells.yaml

Members: the untuned base student, the fine-tuned student (the run's best checkpoint), the RAG
detector (knowledge base + the teacher's VLM endpoint), their ensemble (fused as in serving, with
the spec's weights) and the teacher's own labels. Ground truth is `ground_truth.jsonl` beside the
images (the demo writes one; any dataset may: one JSON object per line with `image_id` or `file`,
and `label` in the task's schema). Without it the teacher's labels are the reference, the teacher
is not scored, and the report says so.

The two students run as Ray tasks side by side; the RAG detector's requests go out concurrently.
Outputs under `<storage>/<dataset>/report/`: report.html, metrics.json, PNGs (raydar.report).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc
import ray

from cluster import StorageRoot, connect
from cluster.storage import resolve
from jobs.label import add_common_arguments, resolve_source, spec_from_args, teacher_endpoint
from raydar.demo import GROUND_TRUTH_FILE
from raydar.labels import LabelStore
from raydar.spec import DatasetSpec, SpecError

MEMBERS = ("base", "finetuned", "rag", "ensemble", "teacher")
DESCRIPTIONS = {
    "base": "untuned base student",
    "finetuned": "fine-tuned student (LoRA)",
    "rag": "RAG: knowledge-base examples + VLM",
    "ensemble": "fused finetuned + rag",
    "teacher": "the teacher's labels",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raydar evaluate", description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--checkpoint", default=None,
                        help="Fine-tuned checkpoint or run folder (default: the spec's finetune run under storage).")
    parser.add_argument("--split", default="test", choices=["test", "val", "train"])
    parser.add_argument("--members", default=",".join(MEMBERS), help=f"Comma-separated subset of {','.join(MEMBERS)}.")
    args = parser.parse_args(argv)
    spec = spec_from_args(args)
    storage = StorageRoot(args.storage)
    connect(args.address)
    try:
        result = evaluate(spec, storage, checkpoint=args.checkpoint, split=args.split,
                          members=[m.strip() for m in args.members.split(",") if m.strip()],
                          progress=not args.quiet)
    except (SpecError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


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
    storage: StorageRoot,
    *,
    checkpoint: str | None = None,
    split: str = "test",
    members: list[str] | tuple[str, ...] = MEMBERS,
    report: bool = True,
    history: list[dict] | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Score `members` on the `split` images. Ray must be up."""
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
    truth_by_id = read_ground_truth(source)
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
    images = _read_images(uris)
    sizes = [(rows["width"][i].as_py(), rows["height"][i].as_py()) for i in keep]

    predictions: dict[str, list[dict | None]] = {}
    wanted = set(members)
    if "ensemble" in wanted:
        wanted |= set(spec.serving.members)
    students = {}
    if "base" in wanted:
        students["base"] = _detect_remote.remote(spec.model_dump_json(), spec.source_file, None, images)
    if "finetuned" in wanted:
        students["finetuned"] = _detect_remote.remote(
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
        evaluation = {
            "split": split, "truths": truths, "images": images, "image_ids": ids, "sizes": [list(s) for s in sizes],
            "members": {m: {"predictions": predictions[m], "metrics": scored[m], "description": DESCRIPTIONS[m]}
                        for m in order},
            "history": history if history is not None else _run_history(spec, storage, checkpoint),
            "notes": [f"{len(ids)} held-out images ({split} split), scored against {reference}."],
        }
        report_path = write_report_to(root.child("report"), spec, evaluation)
    return EvaluationResult(split=split, images=len(ids), headline=headline, metric=metric, report=report_path,
                            reference=reference, metrics=scored, seconds=time.time() - started)


# ---------------------------------------------------------------- members


@ray.remote(num_cpus=1)
def _detect_remote(spec_json: str, source_file: str | None, checkpoint: str | None, images: list[bytes]) -> list[dict]:
    """One student over all images, in batches, on a Ray worker."""
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


def _detect_rag(spec: DatasetSpec, storage: StorageRoot, source: str, images: list[bytes], progress: bool) -> list:
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

    with teacher_endpoint(spec, source) as url:
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


def read_ground_truth(source: str) -> dict[str, dict]:
    """image id -> label, from `ground_truth.jsonl` (GROUND_TRUTH_FILE) beside the images; {} when there is none."""
    fs, path = resolve(source)
    name = f"{path.rstrip('/')}/{GROUND_TRUTH_FILE}"
    try:
        with fs.open_input_stream(name) as f:
            text = f.read().decode()
    except (FileNotFoundError, OSError):
        return {}
    from raydar.images import image_id

    truths = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = record.get("image_id")
            if key is None:
                with fs.open_input_stream(f"{path.rstrip('/')}/{record['file']}") as f:
                    key = image_id(f.read())
            truths[key] = record["label"]
        except (ValueError, KeyError) as e:
            raise SpecError(f"{name}:{n}: expected JSON with `label` and `image_id` or `file` ({e})") from None
    return truths


def _read_images(uris: list[str]) -> list[bytes]:
    out = []
    for uri in uris:
        fs, path = resolve(uri)
        with fs.open_input_stream(path) as f:
            out.append(f.read())
    return out


def default_run_name(spec: DatasetSpec) -> str:
    """The run `raydar finetune` writes without --run-name, and the one evaluation then reads."""
    return f"{spec.name}-finetune"


def finetune_run_folder(spec: DatasetSpec, storage: StorageRoot, run_name: str | None = None) -> str:
    """Where `raydar finetune` leaves the spec's run (its checkpoints)."""
    root = storage.child(spec.name)
    name = run_name or default_run_name(spec)
    if not root.exists("train", name):
        raise FileNotFoundError(f"{root.uri_of('train', name)}: no finetune run; run `raydar finetune --spec "
                                f"{spec.source_file}` first, or pass --checkpoint")
    return root.uri_of("train", name)


def _run_history(spec: DatasetSpec, storage: StorageRoot, checkpoint: str | None) -> list[dict]:
    """The training curve the finetune run saved with its checkpoints (history.json), if any."""
    try:
        folder = checkpoint or finetune_run_folder(spec, storage)
    except FileNotFoundError:
        return []
    fs, path = resolve(folder)
    from pyarrow.fs import FileSelector

    try:
        found = [i.path for i in fs.get_file_info(FileSelector(path, recursive=True)) if i.path.endswith("history.json")]
    except (FileNotFoundError, OSError):
        return []
    if not found:
        return []
    with fs.open_input_stream(max(found)) as f:  # checkpoint_<timestamp> sorts by time: the latest
        return json.loads(f.read())


def write_report_to(folder: StorageRoot, spec: DatasetSpec, evaluation: dict) -> str:
    """report.html and its files in `folder` (local, or written locally then copied to a bucket)."""
    from raydar.report import write_report

    if folder.is_local:
        return str(write_report(folder.path, spec, evaluation))
    with tempfile.TemporaryDirectory() as tmp:
        written = write_report(tmp, spec, evaluation)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                folder.write_bytes(path.read_bytes(), str(path.relative_to(tmp)))
        return folder.uri_of(written.name)


if __name__ == "__main__":
    sys.exit(main())
