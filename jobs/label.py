"""Label a dataset's images with its teacher, on Ray Data.

    raydar label --spec datasets/demo_cells.yaml
    ray job submit --working-dir . -- python -m jobs.label --spec datasets/demo_cells.yaml

Reads images from a folder or any pyarrow filesystem URI; decodes, applies EXIF orientation,
validates (a bad image becomes a failed row with its reason), resizes to `images.max_pixels` and
hashes them; asks the teacher with bounded concurrency per actor and one rate for the whole job;
writes labelled Parquet under `<storage>/<name>/labels/` with a manifest. Labels are cached by
(image sha256, teacher fingerprint): a re-run asks only for what is not stored yet. Teacher requests,
cache hits, failures and images/s are exported as Ray metrics (`raydar.telemetry`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import ray
from tqdm import tqdm

from cluster import StorageRoot, connect
from jobs.arguments import job_main, job_parser, spec_from_args
from raydar.images import ImageProblem, image_id, prepare_image, teacher_payload
from raydar.kinds import kind_of
from raydar.labels import LABEL_SCHEMA, LabelStore, answered_row
from raydar.signals import sigterm_as_interrupt
from raydar.sources import image_folder, list_files, read_bytes, resolve_source
from raydar.spec import DatasetSpec
from raydar.teacher.client import TeacherClient, teacher_fingerprint
from raydar.teacher.launch import SimulatedTeacherProcess
from raydar.teacher.ratelimit import RateLimiter
from raydar.telemetry import LabelMetrics, failure_reason


@job_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = spec_from_args(args)
    storage = StorageRoot(args.storage)
    if spec.images.uri and not args.from_feedback:
        image_folder(spec)  # a missing folder fails before Ray starts
    connect(args.address)
    if args.from_feedback:
        feedback = label_feedback(spec, storage, progress=not args.quiet)
        print(feedback.summary())
        return 0 if feedback.labelled is None or feedback.labelled.ok_total else 1
    result = label_images(spec, storage, limit=args.limit, progress=not args.quiet)
    print(result.summary())
    return 0 if result.ok_total or not result.images else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = job_parser("raydar label", __doc__)
    parser.add_argument("--limit", type=int, default=None, help="Label only the first N images (sorted by path).")
    parser.add_argument(
        "--from-feedback", action="store_true",
        help="Label what the serving endpoint collected instead: users' corrections become labelled rows, and the "
        "hard examples (the ensemble's members disagreed) go to the teacher.",
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------- the run


@dataclass
class LabelResult:
    dataset: str
    run_id: str
    fingerprint: str
    images: int = 0
    ok_new: int = 0
    cached: int = 0
    failed: int = 0
    gave_up: int = 0
    requests: int = 0
    failures: collections.Counter = field(default_factory=collections.Counter)
    duration_s: float = 0.0
    output: str = ""

    @property
    def ok_total(self) -> int:
        return self.ok_new + self.cached

    def summary(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in self.failures.most_common()) or "none"
        rate = self.images / self.duration_s if self.duration_s else 0.0
        return (
            f"{self.dataset}: {self.images} images -> {self.ok_total} labelled ({self.ok_new} new, "
            f"{self.cached} cached), {self.failed} failed ({reasons}), {self.gave_up} given up; "
            f"{self.requests} teacher requests in {self.duration_s:.1f} s ({rate:.1f} images/s) -> {self.output}"
        )

    def manifest(self, spec: DatasetSpec, started: float) -> dict:
        return {
            "dataset": self.dataset,
            "run_id": self.run_id,
            "started": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(),
            "duration_s": round(self.duration_s, 3),
            "teacher": {"kind": spec.teacher.kind, "model": spec.teacher.model, "fingerprint": self.fingerprint},
            "counts": {
                "images": self.images,
                "ok": self.ok_total,
                "ok_new": self.ok_new,
                "cached": self.cached,
                "failed": self.failed,
                "gave_up": self.gave_up,
                "teacher_requests": self.requests,
            },
            "failures": dict(self.failures),
            "output": self.output,
        }


def label_images(
    spec: DatasetSpec,
    storage: StorageRoot,
    *,
    limit: int | None = None,
    progress: bool = True,
    flush_rows: int = 256,
    flush_s: float = 2.0,
    source: str | None = None,
    only: set[str] | None = None,
) -> LabelResult:
    """Label every image of `spec` not yet labelled under its teacher fingerprint. Ray must be up.
    `source` labels the images of another folder or URI (the endpoint's kept images) into the same
    labels; `only` keeps the files of these names."""
    started = time.time()
    root = storage.child(spec.name)
    dataset_source = resolve_source(spec, root)
    source = source or dataset_source
    kind = kind_of(spec.task, spec.teacher.coordinates)
    fingerprint = teacher_fingerprint(spec.teacher, kind, spec.images.max_pixels)
    store = LabelStore(root.child("labels"))
    run_id = _new_run_id()
    result = LabelResult(spec.name, run_id, fingerprint)

    fs, paths, prefix = list_files(source, spec.images.extensions)
    paths = [p for p in paths if p.rsplit("/", 1)[-1] in only] if only is not None else paths
    paths = paths[:limit] if limit else paths
    if not paths:
        raise FileNotFoundError(f"{source}: no images with suffix {' '.join(spec.images.extensions)}")
    result.images = len(paths)
    index = store.cache_index(fingerprint)

    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts ok / failed / cached
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no plan and start-up chatter on the console
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": we know
    rows_per_block = block_rows(spec.teacher.concurrency, len(paths), spec.teacher.actors)
    n_blocks = -(-len(paths) // rows_per_block)
    with SimulatedTeacherProcess(spec, dataset_source) as base_url:  # a simulator answers from the dataset's truth
        limiter = RateLimiter(spec.teacher.rate_per_s) if spec.teacher.rate_per_s else None
        # The paths, not the bytes: each actor reads its own images (no read tasks, no image bytes through
        # the object store), on threads, so a slow filesystem does not stall its requests in flight.
        ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=n_blocks)
        ds = ds.map_batches(
            LabelImages,
            fn_constructor_kwargs={"spec": spec, "cache_index": index, "filesystem": fs, "uri_prefix": prefix,
                                   "base_url": base_url, "rate_limiter": limiter, "fingerprint": fingerprint,
                                   "run_id": run_id, "store": store, "flush_rows": flush_rows, "flush_s": flush_s},
            batch_size=rows_per_block,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(
                size=min(spec.teacher.actors, n_blocks), max_concurrent_calls_per_actor=BLOCKS_PER_ACTOR,
                max_tasks_in_flight_per_actor=BLOCKS_PER_ACTOR,
            ),
            num_cpus=0.5,
        )
        bar = tqdm(total=len(paths), desc=f"label {spec.name}", unit="img", disable=not progress, file=sys.stderr)
        metrics = LabelMetrics(spec.name, spec.teacher.model)  # the actors count; the driver sets images/s
        try:
            with sigterm_as_interrupt():  # `ray job stop` ends the run as Ctrl-C does
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):  # already in the log
                    result = _count(result, batch)
                    bar.update(batch.num_rows)
                    metrics.record_throughput(bar.n / (time.time() - started))
                    bar.set_postfix(ok=result.ok_total, failed=result.failed, cached=result.cached, refresh=False)
        finally:
            bar.close()
            if limiter is not None:
                limiter.shutdown()

    store.write_snapshot(fingerprint)
    result.output = root.uri_of("labels", "labels.parquet")
    result.duration_s = time.time() - started
    metrics.record_throughput(result.images / result.duration_s)
    store.write_manifest(result.manifest(spec, started))
    return result


# Each labelling actor holds two blocks of four rounds of its requests (`block_rows`): Ray Data is slow to hand
# an actor its next block, and with blocks of one round an actor with few requests sits idle between blocks
# (bench/RESULTS.md, label_throughput). Each answer reaches the log within `flush_s` of arriving (AnswerWriter).
ROUNDS_PER_BLOCK = 4
BLOCKS_PER_ACTOR = 2
MAX_BLOCK_ROWS = 256


def block_rows(concurrency: int, images: int, actors: int) -> int:
    """Rows per Ray Data block of paths: `ROUNDS_PER_BLOCK` rounds of an actor's `concurrency` requests, at
    most `MAX_BLOCK_ROWS`, and small enough that a small job still fills every actor's `BLOCKS_PER_ACTOR`."""
    return max(1, min(ROUNDS_PER_BLOCK * concurrency, MAX_BLOCK_ROWS, -(-images // (BLOCKS_PER_ACTOR * actors))))


FEEDBACK_MODEL = "user-feedback"  # teacher_model of a labelled row that a user's correction made


@dataclass
class FeedbackResult:
    dataset: str
    corrections: int = 0  # users' corrections in the labels
    new_corrections: int = 0
    hard_examples: int = 0  # sent to the teacher (cached ones cost nothing)
    labelled: LabelResult | None = None

    def summary(self) -> str:
        teacher = self.labelled.summary() if self.labelled else "no hard examples to label"
        return (f"{self.dataset} feedback: {self.corrections} corrections in the labels ({self.new_corrections} new), "
                f"{self.hard_examples} hard examples to the teacher; {teacher}")


def label_feedback(spec: DatasetSpec, storage: StorageRoot, *, progress: bool = True) -> FeedbackResult:
    """What the serving endpoint collected (`raydar.feedback`), made training data. Users' corrections become
    labelled rows under the teacher's fingerprint, newer than its answers, so they win in the snapshot the
    later stages read; hard examples without a correction go to the teacher. Ray must be up."""
    from raydar.feedback import FeedbackLog

    root = storage.child(spec.name)
    log = FeedbackLog(root.child("feedback"))
    kind = kind_of(spec.task, spec.teacher.coordinates)
    fingerprint = teacher_fingerprint(spec.teacher, kind, spec.images.max_pixels)
    store = LabelStore(root.child("labels"))
    result = FeedbackResult(spec.name)
    run_id = _new_run_id("feedback")
    recorded = store.read_log(fingerprint=fingerprint, columns=["image_id", "label", "teacher_model",
                                                                "teacher_fingerprint"])
    already = {(i, label) for i, label, model in zip(recorded["image_id"].to_pylist(), recorded["label"].to_pylist(),
                                                     recorded["teacher_model"].to_pylist()) if model == FEEDBACK_MODEL}
    rows = []
    corrections = {i: c for i, c in log.corrections().items() if c["image_file"]}
    for image, correction in corrections.items():
        label = json.dumps(kind.validate(correction["label"]))
        result.corrections += 1
        if (image, label) in already:
            continue
        prepared = prepare_image(log.root.read_bytes("images", correction["image_file"]), spec.images.max_pixels,
                                 spec.images.max_image_pixels)
        rows.append(answered_row(
            image_id=image, source_uri=log.root.uri_of("images", correction["image_file"]), width=prepared.width,
            height=prepared.height, split=spec.split.split_of(image), task=kind.name, label=label,
            teacher_model=FEEDBACK_MODEL, teacher_fingerprint=fingerprint, run_id=run_id,
            raw_answer=correction["comment"], attempts=0,
        ))
    result.new_corrections = len(rows)
    store.append(rows, run_id, 0)
    hard = {i: name for i, name in log.hard_examples().items() if i not in corrections}
    result.hard_examples = len(hard)
    if hard:
        result.labelled = label_images(spec, storage, source=log.images_uri(), only=set(hard.values()),
                                       progress=progress)
    else:
        store.write_snapshot(fingerprint)
    return result


def _new_run_id(what: str = "") -> str:
    """A run's id in the label log: when it started (UTC), what it was, and a random suffix."""
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return "-".join(filter(None, [started, what, uuid.uuid4().hex[:6]]))


def _count(result: LabelResult, batch: pa.Table) -> LabelResult:
    outcomes = batch["outcome"].to_pylist()
    c = collections.Counter(outcomes)
    result.ok_new += c["ok"]
    result.cached += c["cached"]
    result.failed += c["failed"]
    result.gave_up += c["gave_up"]
    result.requests += sum(batch["requests"].to_pylist())
    for outcome, error in zip(outcomes, batch["error"].to_pylist()):
        if outcome == "failed":
            result.failures[failure_reason(error)] += 1  # "cannot reach the teacher", not "... at http"
    return result


class AnswerWriter:
    """A labelling actor's answers, appended to the label log as they arrive: a row waits at most `seconds`
    (or until `rows` rows wait) before it is written in a part of its own, so a killed job loses the
    answers of its last seconds, not its blocks. Runs on the actor's event loop."""

    def __init__(self, store: LabelStore, part_prefix: str, rows: int, seconds: float) -> None:
        self.store, self.part_prefix, self.rows, self.seconds = store, part_prefix, rows, seconds
        self.pending: list[dict] = []
        self.seq = 0
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task | None = None

    def add(self, row: dict) -> None:
        """An answered row (ok, or failed with an image id): written within `seconds`."""
        self.pending.append(row)
        if len(self.pending) >= self.rows:
            self._timer = asyncio.ensure_future(self.flush())
        elif self._timer is None or self._timer.done():
            self._timer = asyncio.ensure_future(self._flush_after(self.seconds))

    async def _flush_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self.flush()

    async def flush(self) -> None:
        """Every waiting row, as one part of the log; a write that fails fails the job."""
        async with self._lock:
            rows, self.pending = self.pending, []
            if rows:
                await asyncio.to_thread(self.store.append, rows, self.part_prefix, self.seq)
                self.seq += 1


# ---------------------------------------------------------------- images and teacher


class LabelImages:
    """Per batch of paths: read (on threads), hash, decode, validate and resize each image (skipping the
    cached and the given up), then ask the teacher about all of them at once. One row out per path in."""

    def __init__(self, spec: DatasetSpec, cache_index, filesystem, uri_prefix: str, base_url: str | None,
                 rate_limiter, fingerprint: str, run_id: str, store: LabelStore, flush_rows: int,
                 flush_s: float) -> None:
        self.spec = spec
        self.index = cache_index
        self.fs = filesystem
        self.prefix = uri_prefix
        self.kind = kind_of(spec.task, spec.teacher.coordinates)
        self.base_url, self.rate_limiter = base_url, rate_limiter
        self.fingerprint, self.run_id = fingerprint, run_id
        self.client: TeacherClient | None = None
        self.metrics = LabelMetrics(spec.name, spec.teacher.model)
        self.store, self.flush_rows, self.flush_s = store, flush_rows, flush_s
        self.writer: AnswerWriter | None = None

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self.client is None:  # built on the actor's event loop, once
            self.client = TeacherClient(self.spec.teacher, self.kind, base_url=self.base_url,
                                        rate_limiter=self.rate_limiter)
            self.writer = AnswerWriter(self.store, f"{self.run_id}-{uuid.uuid4().hex[:8]}", self.flush_rows,
                                       self.flush_s)
        paths = batch["path"].to_pylist()
        contents = await asyncio.gather(*[asyncio.to_thread(self._read, path) for path in paths])
        rows = [self._prepare(data, path) for data, path in zip(contents, paths)]
        answers = await asyncio.gather(*[self._ask(row) for row in rows])
        await self.writer.flush()  # the block's rows are in the log before it is handed back
        for row in answers:
            self.metrics.record_image(row["outcome"], requests=row["requests"], latency_s=row["latency_s"],
                                      reason=row["error"])
        return pa.Table.from_pylist(answers, schema=_OUTPUT_SCHEMA)

    def _read(self, path: str, attempts: int = 5) -> bytes | FileNotFoundError:
        """The file's bytes (raydar.sources.read_bytes). A file gone since the listing is a failed row, not a
        failed job; any other error that is not transient (no credentials, a path this node cannot see)
        fails the job, loudly."""
        try:
            return read_bytes(path, self.fs, attempts=attempts)
        except FileNotFoundError as e:
            return e

    def _prepare(self, data: bytes | FileNotFoundError, path: str) -> dict:
        images = self.spec.images
        unreadable = isinstance(data, FileNotFoundError)  # no content, no image id: counted as failed, not logged
        row = {
            "image_id": "" if unreadable else image_id(data), "source_uri": self.prefix + path, "width": 0,
            "height": 0, "split": "",
            "task": self.kind.name, "label": None, "teacher_model": self.spec.teacher.model,
            "teacher_fingerprint": self.fingerprint, "raw_answer": "", "status": "failed", "error": "",
            "attempts": 0, "latency_s": 0.0, "labelled_at": dt.datetime.now(dt.timezone.utc), "run_id": self.run_id,
            "requests": 0, "outcome": "failed",
        }
        if unreadable:
            return {**row, "error": f"cannot read the file, gone since the listing: {data}"}
        row["split"] = self.spec.split.split_of(row["image_id"])
        entry = self.index.get(row["image_id"])
        if entry is not None and entry.ok:
            return {**row, "outcome": "cached", "status": ""}
        if entry is not None and entry.failed_runs >= self.spec.teacher.max_failed_runs:
            return {**row, "outcome": "gave_up", "status": ""}
        try:
            prepared = prepare_image(data, images.max_pixels, images.max_image_pixels)
        except ImageProblem as e:
            return {**row, "error": str(e)}
        payload, media_type = teacher_payload(data, prepared, self.spec.teacher.image_format)
        return {**row, "width": prepared.width, "height": prepared.height, "outcome": "todo",
                "_request": (payload, *prepared.image.size, media_type)}

    async def _ask(self, row: dict) -> dict:
        request = row.pop("_request", None)
        if request is None:
            if row["outcome"] == "failed" and row["image_id"]:  # a bad image is a failed row; an unreadable file
                self.writer.add(row)                             # (no image id) is only counted
            return row
        answer = await self.client.label(*request)
        row.update(raw_answer=answer.raw, attempts=answer.attempts, latency_s=answer.latency_s,
                   requests=answer.attempts, labelled_at=dt.datetime.now(dt.timezone.utc))
        if answer.ok:
            row.update(status="ok", label=json.dumps(answer.label), outcome="ok")
        else:
            row.update(error=answer.error, outcome="failed")
        self.writer.add(row)
        return row


_OUTPUT_SCHEMA = LABEL_SCHEMA.append(pa.field("outcome", pa.string())).append(pa.field("requests", pa.int32()))


if __name__ == "__main__":
    sys.exit(main())
