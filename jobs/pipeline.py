"""The main job: label -> index -> finetune -> evaluate -> deploy, on one dataset spec.

    raydar run --spec datasets/demo_cells.yaml
    ray job submit --working-dir . -- python -m jobs.pipeline --spec datasets/demo_cells.yaml

Each stage's inputs are hashed (the spec sections it reads, and what the stage before it wrote), and
a finished stage leaves `<storage>/<dataset>/pipeline/<stage>.json` with that key and its outputs.
A stage whose key matches a finished one is skipped, so a re-run after a crash continues where it
stopped, and a changed spec re-runs exactly the stages that read what changed: a new `student` re-runs
finetune and evaluate, a new `teacher` everything. Inside a stage the work is cached too: the label job
asks the teacher only about images it has no answer for, the index embeds only new rows, and a
finetune run (named after its key) resumes from its last checkpoint.

The deploy stage starts the Serve app (serving.app) on the cluster and checks it with one request. On
an embedded Ray the endpoint lives as long as this process: by default it keeps serving (Ctrl-C
stops it) when run from a terminal, and stops at the end otherwise (`--serve` / `--no-serve` to choose).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster import StorageRoot, connect
from cluster.connect import dashboard_url
from jobs.arguments import job_main, job_parser, spec_from_args
from raydar.checkpoint import run_name
from raydar.sources import image_folder, list_files, read_bytes, resolve, resolve_source
from raydar.spec import DatasetSpec
from raydar.teacher.launch import SimulatedTeacherProcess

STAGES = ("label", "index", "finetune", "evaluate", "deploy")


@job_main
def main(argv: list[str] | None = None) -> int:
    parser = job_parser("raydar run", __doc__)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"Comma-separated subset of {','.join(STAGES)}.")
    serve = parser.add_mutually_exclusive_group()
    serve.add_argument("--serve", dest="keep_serving", action="store_true", default=None,
                       help="Keep the endpoint up after the run until Ctrl-C.")
    serve.add_argument("--no-serve", dest="keep_serving", action="store_false",
                       help="Stop the endpoint when the run ends (an embedded Ray goes with it).")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the endpoint (deploy stage).")
    args = parser.parse_args(argv)
    spec = spec_from_args(args)
    storage = StorageRoot(args.storage)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        print(f"error: --stages: unknown {unknown}; expected some of {list(STAGES)}", file=sys.stderr)
        return 2
    if spec.images.uri:
        image_folder(spec)  # a missing folder fails before Ray starts
    embedded = not (args.address or os.environ.get("RAY_ADDRESS"))
    connect(args.address)
    keep_serving = args.keep_serving if args.keep_serving is not None else sys.stdout.isatty()
    result = run_pipeline(spec, storage, stages=stages, progress=not args.quiet, port=args.port,
                          overrides=dict(args.set))
    print(result.summary(), flush=True)
    if result.endpoint and keep_serving:
        print("serving; Ctrl-C stops it" + (" (the embedded Ray goes with it)" if embedded else ""), flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    result.close()
    return 0 if result.ok else 1


# ---------------------------------------------------------------- stages


@dataclass
class PipelineResult:
    spec: DatasetSpec
    storage: StorageRoot
    lines: list[str] = field(default_factory=list)
    outputs: dict[str, dict] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    endpoint: str | None = None
    token_file: str | None = None
    ok: bool = True
    seconds: float = 0.0
    _teacher: SimulatedTeacherProcess | None = None

    def summary(self) -> str:
        lines = [f"done in {self.seconds:.0f} s: ran {', '.join(self.ran) or 'nothing'}"
                 + (f"; skipped {', '.join(self.skipped)} (unchanged)" if self.skipped else "")]
        evaluation = self.outputs.get("evaluate")
        if evaluation:
            lines.append(f"held-out {evaluation['metric']} ({evaluation['images']} images, against "
                         f"{evaluation['reference']}):")
            lines += [f"  {name:<10} {'n/a' if v is None else f'{v:.3f}'}" for name, v in evaluation["headline"].items()]
            lines.append(f"report:      {evaluation['report']}")
        url = dashboard_url()
        if url:
            lines.append(f"dashboard:   {url}")
        if self.endpoint:
            lines.append(f"endpoint:    {self.endpoint}/v1/detect   (docs: {self.endpoint}/docs)")
            lines.append(f"try it:      curl -H \"Authorization: Bearer $(cat {self.token_file})\" "
                         f"-F image=@<an image> {self.endpoint}/v1/detect")
        lines.append(f"outputs:     {self.storage.uri_of(self.spec.name)}")
        return "\n".join(lines)

    def close(self) -> None:
        if self._teacher is not None:
            self._teacher.stop()
            self._teacher = None


def run_pipeline(spec: DatasetSpec, storage: StorageRoot, *, stages=STAGES, progress: bool = True,
                 port: int = 8000, overrides: dict | None = None) -> PipelineResult:
    """Run (or skip) each stage in order. Ray must be up. `overrides` are the `--set` values that made
    `spec` from its file; the deployed app reads the spec file with them."""
    started = time.time()
    root = storage.child(spec.name)
    result = PipelineResult(spec, storage)
    total = len(stages)
    source = resolve_source(spec, root)
    previous: dict[str, str] = {}  # stage -> its key, for the stages after it

    def step(n: int, stage: str, key: str, run, describe) -> dict:
        done = _finished(root, stage)
        if done and done["key"] == key and _outputs_exist(done["output"]):
            print(f"[{n}/{total}] {stage}: skipped, unchanged since {done['finished']} ({describe(done['output'])})",
                  flush=True)
            result.skipped.append(stage)
            output = done["output"]
        else:
            print(f"[{n}/{total}] {stage} ...", flush=True)
            tick = time.time()
            output = run()
            output["seconds"] = round(time.time() - tick, 1)
            root.write_json({"key": key, "output": output, "finished": time.strftime("%Y-%m-%d %H:%M:%S")},
                            "pipeline", f"{stage}.json")
            print(f"      {describe(output)} ({output['seconds']:.0f} s)", flush=True)
            result.ran.append(stage)
        previous[stage] = key
        result.outputs[stage] = output
        return output

    n = 0
    if "label" in stages:
        from jobs.label import label_images

        n += 1
        key = _key("label", spec.images, spec.task, spec.teacher, spec.split, _listing(source, spec))

        def label() -> dict:
            labelled = label_images(spec, storage, progress=progress)
            if not labelled.ok_total:
                raise SystemExit(f"label: no image was labelled; {labelled.summary()}")
            return {"summary": labelled.summary(), "labels": _file_digest(root, "labels", "labels.parquet")}

        step(n, "label", key, label, lambda o: o["summary"])
    labels_digest = _file_digest(root, "labels", "labels.parquet")

    if "index" in stages:
        from jobs.index import index_labels

        n += 1
        key = _key("index", labels_digest, spec.knowledge_base, spec.task)
        step(n, "index", key, lambda: {"summary": index_labels(spec, storage, progress=progress).summary()},
             lambda o: o["summary"])

    if "finetune" in stages:
        from jobs.finetune import finetune

        n += 1
        key = _key("finetune", labels_digest, spec.student, spec.task, spec.split)

        def train() -> dict:
            # Named after its inputs: a crashed run with the same inputs resumes from its last checkpoint.
            tuned = finetune(spec, storage, run_name=run_name(spec, key))
            checkpoint = tuned.best_checkpoint or tuned.checkpoint
            return {"summary": tuned.summary(), "checkpoint": checkpoint, "history": tuned.history,
                    "paths": [checkpoint]}

        step(n, "finetune", key, train, lambda o: o["summary"])

    checkpoint = result.outputs.get("finetune", {}).get("checkpoint") or _finished_output(root, "finetune", "checkpoint")
    if "evaluate" in stages:
        from raydar.evaluation import MEMBERS, evaluate

        n += 1
        members = [m for m in MEMBERS if checkpoint or m not in ("finetuned", "ensemble")]
        key = _key("evaluate", labels_digest, checkpoint, previous.get("index"), spec.serving, spec.teacher, spec.task,
                   members)

        def assess() -> dict:
            history = result.outputs.get("finetune", {}).get("history")
            scored = evaluate(spec, storage, checkpoint=checkpoint, members=members, history=history,
                              progress=progress)
            return {"report": scored.report, "metric": scored.metric, "headline": scored.headline,
                    "images": scored.images, "reference": scored.reference, "paths": [scored.report]}

        step(n, "evaluate", key, assess,
             lambda o: f"{o['metric']}: " + ", ".join(f"{m} {v:.3f}" for m, v in o["headline"].items() if v is not None))

    if "deploy" in stages:
        n += 1
        print(f"[{n}/{total}] deploy ...", flush=True)
        tick = time.time()
        deploy(spec, storage, result, checkpoint, source, port, overrides or {})
        print(f"      endpoint {result.endpoint} answered a test request ({time.time() - tick:.0f} s)", flush=True)
        result.ran.append("deploy")

    result.seconds = time.time() - started
    return result


def deploy(spec: DatasetSpec, storage: StorageRoot, result: PipelineResult, checkpoint: str | None, source: str,
           port: int, overrides: dict) -> None:
    """The Serve app with the fine-tuned adapter and the RAG member, checked with one real request."""
    import httpx
    from ray import serve

    from serving.app import build_app

    members = [m for m in spec.serving.members if m != "finetuned" or checkpoint]
    teacher = SimulatedTeacherProcess(spec, source)
    rag_url = teacher.start() if "rag" in members else None
    result._teacher = teacher
    token_file = _token_file(storage, spec)
    args = {"spec": spec.source_file, "set": overrides, "storage": storage.uri, "members": members,
            "token_file": token_file,
            "adapters": {"finetuned": checkpoint} if checkpoint else {}, "rag_base_url": rag_url}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=spec.name, route_prefix="/")
    result.endpoint = f"http://127.0.0.1:{port}"
    result.token_file = token_file
    probe = _a_test_image(storage, spec)
    token = Path(token_file).read_text().strip()
    response = httpx.post(f"{result.endpoint}/v1/detect", files={"image": ("probe.png", probe)},
                          headers={"Authorization": f"Bearer {token}"}, timeout=120)
    if response.status_code != 200:
        result.ok = False
        raise SystemExit(f"deploy: the endpoint answered {response.status_code}: {response.text[:300]}")


# ---------------------------------------------------------------- keys and manifests


def _key(stage: str, *inputs) -> str:
    def plain(value):
        return value.model_dump(mode="json") if hasattr(value, "model_dump") else value

    text = json.dumps([stage, *[plain(v) for v in inputs]], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _listing(source: str, spec: DatasetSpec) -> list:
    """Names, sizes and times of the images: a new, changed or removed image changes the label key."""
    from pyarrow import fs as pafs

    fs, paths, _ = list_files(source, spec.images.extensions)
    infos = fs.get_file_info(paths)
    return [(i.path, i.size, i.mtime_ns if i.type == pafs.FileType.File else None) for i in infos]


def _file_digest(root: StorageRoot, *parts: str) -> str | None:
    try:
        return hashlib.sha256(root.read_bytes(*parts)).hexdigest()
    except (FileNotFoundError, OSError):
        return None


def _finished(root: StorageRoot, stage: str) -> dict | None:
    try:
        return root.read_json("pipeline", f"{stage}.json")
    except (FileNotFoundError, OSError, ValueError):
        return None


def _finished_output(root: StorageRoot, stage: str, name: str):
    done = _finished(root, stage)
    return done["output"].get(name) if done else None


def _outputs_exist(output: dict) -> bool:
    """A stage whose outputs were deleted since is not finished."""
    for uri in output.get("paths", []):
        if not uri:
            return False
        fs, path = resolve(uri)
        from pyarrow import fs as pafs

        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return False
    return True


def _token_file(storage: StorageRoot, spec: DatasetSpec) -> str:
    """The endpoint's API token: $RAYDAR_SERVE_TOKEN if set, else a random one kept in a 0600 file."""
    folder = Path(os.path.expanduser("~/.raydar")) if not storage.is_local else storage.local_path()
    path = folder / "serve_token"
    token = os.environ.get("RAYDAR_SERVE_TOKEN")
    if token or not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write((token or secrets.token_urlsafe(24)) + "\n")
    return str(path)


def _a_test_image(storage: StorageRoot, spec: DatasetSpec) -> bytes:
    import pyarrow.compute as pc

    from raydar.labels import LabelStore

    rows = LabelStore(storage.child(spec.name, "labels")).read_labels()
    test = rows.filter(pc.equal(rows["split"], "test"))
    return read_bytes((test if test.num_rows else rows)["source_uri"][0].as_py())


if __name__ == "__main__":
    sys.exit(main())
