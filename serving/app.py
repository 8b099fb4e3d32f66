"""The ensembled detection endpoint on Ray Serve: the fine-tuned student and the RAG detector behind one API.

    export RAYDAR_SERVE_TOKEN=$(openssl rand -hex 24)
    serve run serving/serve_config.yaml
    curl -H "Authorization: Bearer $RAYDAR_SERVE_TOKEN" -F image=@cell.png http://127.0.0.1:8000/v1/detect

`build_app(args)` (named by `import_path` in serve_config.yaml; nothing is built at import) validates
its args and binds three deployments:

- `FineTunedDetector`: the student (base + LoRA adapter + head) from finetune checkpoints, several
  adapters by name through model multiplexing, requests grouped by `@serve.batch`. The adapters are
  its `user_config`, so `serve deploy` with a new adapter reconfigures the running replicas in place.
- `RagDetector`: `raydar.rag.RagDetector`, a VLM shown the most similar labelled examples from the
  knowledge base.
- `EnsembleIngress`: the FastAPI ingress. It checks the caller (bearer token), the body (size, type,
  base64, JSON) and the image (format allowlist, pixel count from the header before decoding), asks
  the members through their handles with a timeout each, fuses their labels (`raydar.fusion`), logs
  the request for the feedback loop (`raydar.feedback`) and answers. A member that fails or times out
  makes the answer *degraded* (it says which and why); the request still succeeds.

Overload is refused, not queued forever: `max_ongoing_requests` and `max_queued_requests` bound each
deployment, and Serve answers 503 beyond them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import functools
import hmac
import json
import logging
import os
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from ray.serve import Application

from cluster.storage import default_root
from raydar.spec import DatasetSpec, SpecError, load_spec

log = logging.getLogger("ray.serve")

# ---------------------------------------------------------------- arguments


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeploymentLimits(_Args):
    """How much of the cluster a deployment takes, and how much work it accepts before refusing more."""

    replicas: int = Field(default=1, ge=1, description="Replicas of the deployment.")
    max_ongoing_requests: int = Field(default=16, ge=1, description="Requests a replica works on at once.")
    max_queued_requests: int = Field(
        default=64, ge=-1, description="Requests each caller queues for the deployment beyond that; more get 503. "
        "-1: unbounded (not for the ingress)."
    )
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per replica (the student on a GPU: 1, or a share).")


class FeedbackSettings(_Args):
    enabled: bool = Field(default=True, description="Log every answered request under <storage>/<name>/feedback/.")
    keep_images: bool = Field(default=True, description="Keep the images (content-addressed) so that hard examples "
                              "and corrections can go to the teacher; off keeps only their sha256.")
    hard_below: float = Field(default=0.5, ge=0, le=1, description="Members' agreement below this marks a hard "
                              "example (`raydar label --from-feedback` sends those to the teacher).")
    flush_rows: int = Field(default=64, ge=1, description="Rows per Parquet part.")
    flush_s: float = Field(default=2.0, gt=0, description="Longest a row waits before its part is written.")


class ServeArgs(_Args):
    """The args of `build_app` (the `args:` of serve_config.yaml)."""

    spec: str = Field(description="Dataset spec (YAML): task, fusion weights, knowledge base, teacher (the RAG VLM).")
    set: dict[str, Any] = Field(default_factory=dict, description="Spec overrides, as `raydar ... --set`.")
    storage: str | None = Field(default=None, description="Storage root (default $RAYDAR_STORAGE, else ~/.raydar): "
                                "the knowledge base and the feedback log live there.")
    members: list[Literal["finetuned", "rag"]] | None = Field(
        default=None, description="Members to serve; default the spec's `serving.members`.")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="Adapter name -> finetune checkpoint (folder, run folder or pyarrow URI), "
        "or `base` for the untuned base model. Names are what clients ask for (`adapter`).")
    default_adapter: str | None = Field(default=None, description="Adapter used when a request names none; "
                                        "default the first of `adapters`.")
    rag_base_url: str | None = Field(default=None, description="OpenAI-compatible endpoint of the RAG VLM; "
                                     "default the spec's teacher.base_url.")
    token_env: str = Field(default="RAYDAR_SERVE_TOKEN", description="Environment variable holding the API token.")
    token_file: str | None = Field(default=None, description="File holding the API token (a mounted secret); "
                                   "read when the variable is not set.")
    max_request_bytes: int = Field(default=20 * 2**20, gt=0, description="Larger request bodies get 413.")
    max_image_pixels: int | None = Field(default=None, gt=0, description="Images declaring more pixels get 413 "
                                         "before they are decoded; default the spec's images.max_image_pixels.")
    image_formats: list[Literal["png", "jpeg", "webp", "gif", "bmp", "tiff"]] = Field(
        default=["png", "jpeg", "webp"], description="Accepted image formats (by content, not name); others get 415.")
    request_timeout_s: float = Field(default=30.0, gt=0, description="A request taking longer gets 504.")
    member_timeout_s: float = Field(default=20.0, gt=0, description="A member answering later is left out "
                                    "(the answer is degraded).")
    batching: bool = Field(default=True, description="Group concurrent requests to the student into batches.")
    max_batch_size: int = Field(default=8, ge=1, description="Largest batch; more memory, more throughput.")
    batch_wait_timeout_s: float = Field(default=0.0, ge=0, description="Requests that find the student busy wait "
                                        "for its batch to end and go together in the next; this is how much longer "
                                        "that batch then waits to fill. A request that finds it idle starts at once.")
    max_new_tokens: int = Field(default=256, gt=0, description="Longest answer the student may generate.")
    device: str | None = Field(default=None, description="Torch device of the student; default cuda if present.")
    public_docs: bool = Field(default=True, description="Serve /docs and /openapi.json without the token "
                              "(they hold no data).")
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    ingress: DeploymentLimits = Field(default_factory=lambda: DeploymentLimits(
        max_ongoing_requests=32, max_queued_requests=64, num_cpus=0.5))
    finetuned: DeploymentLimits = Field(default_factory=DeploymentLimits)
    rag: DeploymentLimits = Field(default_factory=lambda: DeploymentLimits(
        max_ongoing_requests=32, num_cpus=0.5))
    max_surge_percent: int = Field(default=100, ge=0, le=100, description="Extra replicas during a rolling "
                                   "restart (a redeploy): old replicas answer until their replacements are ready.")

    @field_validator("adapters")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
                raise ValueError(f"adapter name {name!r}: use letters, digits, '-', '_' or '.', at most 64")
        return value

    @model_validator(mode="after")
    def _default_adapter(self) -> ServeArgs:
        if self.default_adapter is not None and self.default_adapter not in self.adapters:
            raise ValueError(f"default_adapter {self.default_adapter!r} is not one of adapters {sorted(self.adapters)}")
        if self.member_timeout_s > self.request_timeout_s:
            raise ValueError("member_timeout_s must not exceed request_timeout_s")
        return self


def build_app(args: dict) -> Application:
    """The Serve application for `args` (see ServeArgs); named by serve_config.yaml's import_path."""
    try:
        config = ServeArgs.model_validate(args)
    except ValidationError as e:
        problems = "\n".join(f"  {'.'.join(map(str, err['loc'])) or '(args)'}: {err['msg'].removeprefix('Value error, ')}"
                             for err in e.errors())
        raise ValueError(f"serving args: {e.error_count()} problem(s)\n{problems}") from None
    spec = load_spec(config.spec, overrides=config.set)
    members = config.members or list(spec.serving.members)
    if "finetuned" in members and not config.adapters:
        raise SpecError("serving args: the finetuned member needs `adapters` (name -> finetune checkpoint, or `base`)")
    spec_data = {**spec.model_dump(mode="json"), "source_file": spec.source_file}
    storage = config.storage or default_root()
    handles = {}
    if "finetuned" in members:
        handles["finetuned"] = FineTunedDetector.options(
            **_options(config.finetuned, config),
            user_config={"adapters": config.adapters, "default": config.default_adapter or next(iter(config.adapters))},
        ).bind(spec_data, batching=config.batching, max_batch_size=config.max_batch_size,
               batch_wait_timeout_s=config.batch_wait_timeout_s, max_new_tokens=config.max_new_tokens,
               device=config.device)
    if "rag" in members:
        handles["rag"] = RagMember.options(**_options(config.rag, config)).bind(
            spec_data, str(storage), config.rag_base_url)
    settings = config.model_dump(include={
        "token_env", "token_file", "max_request_bytes", "max_image_pixels", "image_formats", "request_timeout_s",
        "member_timeout_s", "public_docs", "feedback"})
    return EnsembleIngress.options(**_options(config.ingress, config)).bind(spec_data, str(storage), settings, **handles)


def _options(limits: DeploymentLimits, config: ServeArgs) -> dict:
    return {
        "num_replicas": limits.replicas,
        "max_ongoing_requests": limits.max_ongoing_requests,
        "max_queued_requests": limits.max_queued_requests,
        "ray_actor_options": {"num_cpus": limits.num_cpus, "num_gpus": limits.num_gpus},
        "max_surge_percent": config.max_surge_percent,
    }


def _spec(data: dict) -> DatasetSpec:
    return DatasetSpec.model_validate(data)


# ---------------------------------------------------------------- the members


class AdapterConfig(_Args):
    """FineTunedDetector's user_config: which adapters it serves. Changing it reconfigures live replicas."""

    adapters: dict[str, str] = Field(min_length=1)
    default: str

    @model_validator(mode="after")
    def _default_known(self) -> AdapterConfig:
        if self.default not in self.adapters:
            raise ValueError(f"default adapter {self.default!r} is not one of {sorted(self.adapters)}")
        return self


@serve.deployment(name="FineTunedDetector")
class FineTunedDetector:
    """The fine-tuned student. The ingress picks the adapter by name; the multiplexed model id is the
    adapter's checkpoint URI, so a name can be pointed at a new version without serving a stale one."""

    def __init__(self, spec: dict, *, batching: bool, max_batch_size: int, batch_wait_timeout_s: float,
                 max_new_tokens: int, device: str | None) -> None:
        self.spec = _spec(spec)
        self.batching = batching
        self.max_new_tokens = max_new_tokens
        self.device = device
        self.config: AdapterConfig | None = None
        self._one_at_a_time = asyncio.Lock()  # without batching the model still runs one request at a time
        # The model answers on one thread: torch on several threads of a pool gives each its own OpenMP
        # team, and with more teams' threads than cores libgomp stops spinning between ops (slower steps).
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._detect_batch.set_max_batch_size(max_batch_size)
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._in_flight = 0  # requests inside a batch, queued or running
        self._batch_ended = asyncio.Event()  # set (and replaced) when a batch ends

    async def reconfigure(self, config: dict) -> None:
        """New adapters: the new default is loaded before it is switched to, so no request waits for it."""
        new = AdapterConfig.model_validate(config)
        await self.load(new.adapters[new.default])
        self.config = new

    @serve.multiplexed(max_num_models_per_replica=3)  # adapters kept loaded per replica; the least used goes
    async def load(self, uri: str):
        from raydar.predict import StudentDetector

        # Built on a thread that then ends (not a pool's, which would live on with an OpenMP team of its own),
        # while the model thread goes on answering with the adapters already loaded.
        if uri == "base":
            return await _on_a_passing_thread(StudentDetector.from_base, self.spec, device=self.device,
                                              max_new_tokens=self.max_new_tokens)
        return await _on_a_passing_thread(StudentDetector.from_checkpoint, uri, device=self.device,
                                          max_new_tokens=self.max_new_tokens)

    async def adapters(self) -> dict:
        """{"default": name, "adapters": {name: uri}}: what the ingress maps adapter names with."""
        return {"default": self.config.default, "adapters": dict(self.config.adapters), "model": self.spec.student.base_model}

    async def detect(self, image: bytes) -> dict:
        uri = serve.get_multiplexed_model_id() or self.config.adapters[self.config.default]
        if self.batching:
            # Serve closes a batch `batch_wait_timeout_s` after its first request, even while the model is
            # still busy with the last one; the closed batches then queue for the model, each small. So a
            # request that finds the model busy waits here for the running batch to end, and all that waited
            # enter the next batch together (up to max_batch_size): the model takes in, each time it is
            # free, everything that arrived while it ran. A request that finds it idle starts a batch at once.
            busy = bool(self._in_flight)
            if busy:
                await self._batch_ended.wait()
            self._detect_batch.set_batch_wait_timeout_s(self.batch_wait_timeout_s if busy else 0.0)
            self._in_flight += 1
            try:
                return await self._detect_batch(uri, image)
            finally:
                self._in_flight -= 1
                if not self._in_flight:  # none left in a batch (one cancelled before it ran): nothing to wait for
                    self._end_of_batch()
        async with self._one_at_a_time:
            return (await self._run(uri, [image]))[0]

    def _end_of_batch(self) -> None:
        """Let the requests that waited for the running batch go, together, into the next one."""
        ended, self._batch_ended = self._batch_ended, asyncio.Event()
        ended.set()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _detect_batch(self, uris: list[str], images: list[bytes]) -> list[dict]:
        results: list[dict] = [{}] * len(images)
        try:
            for uri in dict.fromkeys(uris):  # one adapter per group
                rows = [i for i, u in enumerate(uris) if u == uri]
                for i, result in zip(rows, await self._run(uri, [images[i] for i in rows])):
                    results[i] = result
        finally:
            self._end_of_batch()
        return results

    async def _run(self, uri: str, images: list[bytes]) -> list[dict]:
        try:
            detector = await self.load(uri)
        except Exception as e:  # a broken checkpoint fails its requests, not the replica
            return [{"label": None, "raw": "", "error": f"adapter {uri} does not load: {e}"} for _ in images]
        results = await asyncio.get_running_loop().run_in_executor(self._model_thread, detector.detect, images)
        return [{**r, "model": detector.model, "adapter_version": detector.adapter_version, "batch_size": len(images)}
                for r in results]


async def _on_a_passing_thread(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` on a thread of its own, which ends when it returns."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args, **kwargs))
    finally:
        executor.shutdown(wait=False)  # the thread exits once the load is done


@serve.deployment(name="RagDetector")
class RagMember:
    """raydar.rag.RagDetector: the knowledge base's most similar labelled examples in a VLM's prompt."""

    def __init__(self, spec: dict, storage: str, base_url: str | None) -> None:
        from cluster import StorageRoot
        from raydar.rag import RagDetector

        self.spec = _spec(spec)
        self.detector = RagDetector.from_spec(self.spec, StorageRoot(storage), base_url=base_url)

    async def detect(self, image: bytes) -> dict:
        result = await self.detector.detect(image)
        return {**result, "model": self.spec.teacher.model}

    async def describe(self) -> dict:
        return {"model": self.spec.teacher.model, "examples_per_prompt": self.detector.k,
                "knowledge_base_entries": await asyncio.to_thread(self.detector.kb.count)}

    def __del__(self) -> None:
        """Serve calls this when the replica stops: close the knowledge base (and its local snapshot copy)."""
        detector = getattr(self, "detector", None)
        if detector is not None:
            detector.kb.close()


# ---------------------------------------------------------------- the API's documents


class ApiError(Exception):
    """An answer other than 200, with a code a program can read and a reason a person can."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class DetectRequest(BaseModel):
    """POST /v1/detect with a JSON body. (Or send the image as multipart field `image`, or as the raw body
    with an image/* content type.)"""

    model_config = ConfigDict(extra="forbid")
    image: str = Field(description="The image's bytes in base64 (a data: URL with base64 also works). URLs are "
                       "never fetched.")
    adapter: str | None = Field(default=None, description="Adapter name (GET /v1/models); default the default one.")


class MemberResult(BaseModel):
    status: Literal["ok", "failed", "timeout"]
    label: dict | None = Field(default=None, description="The member's label in the task's schema.")
    score: float | None = Field(default=None, description="The member's confidence in its whole answer, if it has one.")
    error: str | None = None
    latency_ms: float
    model: str | None = None
    adapter: str | None = None
    adapter_version: str | None = None
    batch_size: int | None = Field(default=None, description="Images the student answered together with this one.")
    examples: list[str] | None = Field(default=None, description="RAG: image ids of the examples in its prompt.")
    raw: str | None = Field(default=None, description="The member's answer as generated.")


class DetectResponse(BaseModel):
    request_id: str
    image_id: str = Field(description="sha256 of the image's bytes; send it back with /v1/feedback.")
    dataset: str
    task: str
    fused: dict = Field(description="The ensemble's label, in the task's schema (points and boxes carry a score: "
                        "the weighted share of the members that found them).")
    members: dict[str, MemberResult]
    weights: dict[str, float]
    agreement: float | None = Field(description="How much the members agree, 0-1; null with one member answering.")
    hard_example: bool = Field(description="The members disagreed: the image goes to the teacher for a label.")
    degraded: bool = Field(description="A member failed or timed out; `members` says which and why.")
    latency_ms: float


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_id: str = Field(description="The image_id /v1/detect returned.")
    label: dict = Field(description="The correct label, in the task's schema.")
    request_id: str | None = None
    comment: str | None = Field(default=None, max_length=2000)
    image: str | None = Field(default=None, description="The image in base64, needed only if the endpoint did not "
                              "keep it (feedback.keep_images off).")


class FeedbackResponse(BaseModel):
    accepted: bool
    image_id: str
    training_samples: int = Field(description="Corrections and hard examples collected so far.")


_DETECT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
                "image": {"type": "string", "format": "binary"}, "adapter": {"type": "string"}}}},
            "application/json": {"schema": DetectRequest.model_json_schema()},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_ERRORS = {status: {"description": text, "content": {"application/json": {"example": {
    "error": {"code": code, "message": text}}}}} for status, code, text in [
        (400, "bad_request", "Malformed JSON, base64 or multipart, or a corrupt image; the message says which."),
        (401, "unauthorized", "Missing or wrong bearer token."),
        (404, "unknown_adapter", "No adapter of that name."),
        (413, "too_large", "The body is over the size limit, or the image declares more pixels than allowed."),
        (415, "unsupported_media_type", "Not an accepted image format or content type."),
        (503, "unavailable", "Overloaded (Serve's queue is full), or no member answered."),
        (504, "timeout", "The request took longer than the request timeout."),
    ]}


# ---------------------------------------------------------------- the ingress


@serve.deployment(name="EnsembleIngress")
@serve.ingress()
class EnsembleIngress:
    """Checks, fans out to the members, fuses, logs and answers. One FastAPI app per replica."""

    def __init__(self, spec: dict, storage: str, settings: dict, finetuned=None, rag=None) -> None:
        from cluster import StorageRoot
        from raydar.feedback import FeedbackBuffer, FeedbackLog
        from raydar.tasks import task_kind
        from raydar.telemetry import ServingMetrics

        # What detect() uses, imported now: raydar.fusion brings scipy and scikit-learn (1.2-1.7 s), which the
        # replica pays before it is ready rather than the first request paying it.
        from raydar import fusion  # noqa: F401

        self.spec = _spec(spec)
        self.kind = task_kind(self.spec.task)
        self.settings = settings
        self.feedback_settings = FeedbackSettings.model_validate(settings["feedback"])
        self.max_image_pixels = settings["max_image_pixels"] or self.spec.images.max_image_pixels
        self.members = {name: handle for name, handle in (("finetuned", finetuned), ("rag", rag)) if handle}
        self.weights = {name: float(self.spec.serving.weights.get(name, 1.0)) for name in self.members}
        self.token = _read_token(settings["token_env"], settings["token_file"])
        self.log = FeedbackLog(StorageRoot(storage).child(self.spec.name, "feedback"))
        self.buffer = FeedbackBuffer(rows=self.feedback_settings.flush_rows, seconds=self.feedback_settings.flush_s)
        self.pending_images: dict[str, tuple[bytes, str]] = {}
        self._flush_lock = asyncio.Lock()
        self._flusher: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.metrics = ServingMetrics(self.spec.name)
        self.stats = _Stats(list(self.members))
        self._adapters: tuple[float, dict] = (0.0, {})
        self._registry_call: asyncio.Future | None = None
        self._handles: dict[str, Any] = {}
        self._counts: tuple[float, dict] = (0.0, {})

    def __serve_build_asgi_app__(self):
        return _api(self)

    # ---------------------------------------------------------- decode
    async def read_image(self, request) -> tuple[bytes, str | None]:
        """The image's bytes and the adapter asked for, from multipart, JSON (base64) or a raw image body."""
        from starlette.formparsers import MultiPartException, MultiPartParser

        body = await _read_body(request, self.settings["max_request_bytes"])
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        adapter = request.query_params.get("adapter")
        if content_type == "multipart/form-data":
            async def stream():
                yield body

            try:
                form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=8).parse()
            except MultiPartException as e:
                raise ApiError(400, "bad_request", f"malformed multipart body: {e.message}") from None
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "bad_request", "the multipart body needs a file field `image`")
            data = await upload.read()
            adapter = form.get("adapter") or adapter
            return data, adapter if isinstance(adapter, str) else None
        if content_type == "application/json":
            try:
                value = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(400, "bad_request", f"malformed JSON: {e}") from None
            if isinstance(value, dict) and {"url", "image_url"} & set(value):
                raise ApiError(400, "bad_request", "URLs are not fetched: send the image's bytes in `image` (base64)")
            try:
                parsed = DetectRequest.model_validate(value)
            except ValidationError as e:
                raise ApiError(400, "bad_request", "invalid JSON body: " + _validation_message(e)) from None
            return _decode_base64(parsed.image, "image"), parsed.adapter or adapter
        if content_type.startswith("image/"):
            return body, adapter
        raise ApiError(415, "unsupported_media_type", f"content type {content_type or '(none)'!r}: send "
                       "multipart/form-data (field `image`), application/json ({\"image\": base64}) or image/*")

    def check_image(self, data: bytes):
        """The format by content against the allowlist (415), the pixel count from the header (413) before
        the pixels are decoded, then the decode itself (400): raydar.images' checks."""
        from raydar.images import ImageProblem, prepare_image, sniff_format

        allowed = self.settings["image_formats"]
        fmt = sniff_format(data)
        if fmt is None:
            raise ApiError(415, "unsupported_media_type", f"not an image of an accepted format ({', '.join(allowed)})")
        if fmt not in allowed:
            raise ApiError(415, "unsupported_media_type", f"{fmt} images are not accepted; send {', '.join(allowed)}")
        try:
            return prepare_image(data, self.spec.images.max_pixels, self.max_image_pixels), fmt
        except ImageProblem as e:
            status = {"too_large": 413, "not_an_image": 415}.get(e.reason, 400)
            code = {413: "too_large", 415: "unsupported_media_type"}.get(status, "bad_request")
            raise ApiError(status, code, f"image: {e}") from None

    # ---------------------------------------------------------- predict
    async def registry(self, timeout: float) -> dict:
        """FineTunedDetector's {"default", "adapters", "model"}, asked again within `timeout`. Raises
        TimeoutError or the call's error when no replica answers (one that died, its replacement loading)."""
        # shielded: a request giving up does not cancel the call the next request will wait on
        return await asyncio.wait_for(asyncio.shield(self._refresh_registry()), timeout)

    def _refresh_registry(self) -> asyncio.Future:
        """The registry call in flight, started if none is: one at a time, shared by every request."""
        if self._registry_call is None or self._registry_call.done():
            self._registry_call = asyncio.ensure_future(self._fetch_registry())
            self._registry_call.add_done_callback(_quietly)  # a failure shows on the request that next waits
        return self._registry_call

    async def _fetch_registry(self) -> dict:
        registry = await self.members["finetuned"].adapters.remote()
        self._adapters = (time.monotonic(), registry)
        return registry

    async def adapter_uri(self, name: str | None, timeout: float) -> tuple[str, str]:
        """(name, checkpoint URI) of an adapter. The registry known is used while it is under 2 s old; an
        older one is still used when it names the adapter, and asked again in the background, so no request
        waits on the registry while FineTunedDetector has no live replica. Only a name it does not know
        (or no registry yet) waits, up to `timeout`."""
        at, registry = self._adapters
        known = bool(registry) and (name is None or name in registry["adapters"])
        if known and time.monotonic() - at > 2.0:
            self._refresh_registry()
        if not known:
            registry = await self.registry(timeout)
        name = name or registry["default"]
        if name not in registry["adapters"]:
            raise ApiError(404, "unknown_adapter", f"no adapter {name!r}; GET /v1/models lists "
                           f"{', '.join(sorted(registry['adapters']))}")
        return name, registry["adapters"][name]

    def _adapter_handle(self, uri: str):
        """One handle per adapter, made once: `options()` per request would set up routing state each time."""
        if uri not in self._handles:
            self._handles[uri] = self.members["finetuned"].options(multiplexed_model_id=uri)
        return self._handles[uri]

    async def ask_members(self, payload: bytes, adapter: str | None) -> dict[str, MemberResult]:
        """Each member's answer within member_timeout_s from now. RAG is asked first: the student's call
        may have to wait for the adapter registry."""
        if adapter and "finetuned" not in self.members:
            raise ApiError(404, "unknown_adapter", "this endpoint serves no fine-tuned member")
        start = time.perf_counter()
        timeout = self.settings["member_timeout_s"]
        rag = asyncio.ensure_future(self._ask(self.members["rag"].detect.remote(payload), timeout)) \
            if "rag" in self.members else None
        results = {}
        if "finetuned" in self.members:
            try:
                results["finetuned"] = await self._ask_student(payload, adapter, timeout, start)
            except ApiError:
                if rag:
                    rag.cancel()
                raise
        if rag:
            results["rag"] = await rag
        return results

    async def _ask_student(self, payload: bytes, adapter: str | None, timeout: float, start: float) -> MemberResult:
        try:
            adapter_name, uri = await self.adapter_uri(adapter, timeout)
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - no registry in time, or its replica failing: the member is left out
            status = "timeout" if isinstance(e, asyncio.TimeoutError) else "failed"
            return MemberResult(status=status, error=f"adapter registry: {_reason(e, timeout)}", latency_ms=_ms(start))
        left = max(timeout - (time.perf_counter() - start), 0.001)
        result = await self._ask(self._adapter_handle(uri).detect.remote(payload), left, start)
        result.adapter = adapter_name
        return result

    async def _ask(self, response, timeout: float, start: float | None = None) -> MemberResult:
        from ray.serve.exceptions import BackPressureError

        start = time.perf_counter() if start is None else start
        try:
            out = await _within(response, timeout)
        except asyncio.TimeoutError as e:
            return MemberResult(status="timeout", error=_reason(e, self.settings["member_timeout_s"]),
                                latency_ms=_ms(start))
        except BackPressureError:
            return MemberResult(status="failed", error="overloaded: its queue is full", latency_ms=_ms(start))
        except Exception as e:  # a dead replica, the VLM failing, a bug: the member is left out, the request goes on
            return MemberResult(status="failed", error=_reason(e), latency_ms=_ms(start))
        status = "ok" if out.get("label") is not None else "failed"
        return MemberResult(status=status, label=out.get("label"), score=out.get("score"), error=out.get("error"),
                            latency_ms=_ms(start), model=out.get("model"), adapter_version=out.get("adapter_version"),
                            batch_size=out.get("batch_size"), examples=out.get("examples"), raw=out.get("raw"))

    async def detect(self, request) -> DetectResponse:
        from raydar.fusion import agreement, fuse
        from raydar.images import teacher_payload

        start = time.perf_counter()
        data, adapter = await self.read_image(request)
        prepared, fmt = await asyncio.to_thread(self.check_image, data)
        payload, _ = teacher_payload(data, prepared, "auto")  # the original bytes unless a resize was needed
        results = await self.ask_members(payload, adapter)
        labels = {name: r.label for name, r in results.items() if r.status == "ok"}
        failed = [name for name, r in results.items() if r.status != "ok"]
        request_id = uuid.uuid4().hex
        if not labels:
            self.stats.record(503, failed=failed)
            self.metrics.record_request([], failed=failed, latency_s=time.perf_counter() - start)
            raise ApiError(503, "unavailable", "no member answered: " + "; ".join(
                f"{name}: {r.error}" for name, r in results.items()))
        fused = fuse(self.spec.task, labels, self.weights, min_score=self.spec.serving.score_threshold)
        together = agreement(self.spec.task, labels) if len(labels) > 1 else None
        hard = together is not None and together < self.feedback_settings.hard_below
        response = DetectResponse(
            request_id=request_id, image_id=prepared.image_id, dataset=self.spec.name, task=self.kind.name,
            fused=fused, members=results, weights=self.weights, agreement=together, hard_example=hard,
            degraded=bool(failed), latency_ms=_ms(start))
        self.stats.record(200, failed=failed, agreement=together, hard=hard, latency_ms=response.latency_ms,
                          answered=list(labels))
        self.metrics.record_request(list(labels), failed=failed, agreement=together,
                                    latency_s=response.latency_ms / 1000)
        self.remember(response, data, fmt)
        return response

    # ---------------------------------------------------------- the feedback log
    def remember(self, response: DetectResponse, data: bytes, fmt: str) -> None:
        from raydar.feedback import now

        if not self.feedback_settings.enabled:
            return
        finetuned = response.members.get("finetuned")
        image_file = self._keep(data, response.image_id, fmt)
        self.buffer.add({
            "kind": "detection", "request_id": response.request_id, "image_id": response.image_id,
            "image_file": image_file, "at": now(), "dataset": self.spec.name, "task": self.kind.name,
            "members": json.dumps({n: r.label for n, r in response.members.items()}),
            "member_errors": json.dumps({n: r.error for n, r in response.members.items() if r.status != "ok"}),
            "fused": json.dumps(response.fused), "agreement": response.agreement, "hard": response.hard_example,
            "model": finetuned.model if finetuned else None,
            "adapter": f"{finetuned.adapter}@{finetuned.adapter_version}" if finetuned else None,
            "latency_s": response.latency_ms / 1000,
        })
        self._flush_soon()

    def _keep(self, data: bytes, image_id: str, fmt: str) -> str:
        from raydar.feedback import image_file_name

        if not self.feedback_settings.keep_images:
            return ""
        self.pending_images.setdefault(image_id, (data, fmt))
        return image_file_name(image_id, fmt)

    def _flush_soon(self) -> None:
        if self.buffer.due() or len(self.pending_images) >= self.feedback_settings.flush_rows:
            self._background(self.flush())
        elif self._flusher is None or self._flusher.done():
            self._flusher = self._background(self._flush_later())

    def _background(self, coroutine) -> asyncio.Task:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)  # held until done: the event loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)
        return task

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.feedback_settings.flush_s)
        await self.flush()

    async def flush(self) -> None:
        """Images first, then the rows naming them, each part written atomically; on failure kept for later."""
        async with self._flush_lock:
            images, self.pending_images = self.pending_images, {}
            rows, seq = self.buffer.take()
            try:
                for image_id, (data, fmt) in images.items():
                    await asyncio.to_thread(self.log.keep_image, data, image_id, fmt)
                if rows:
                    await asyncio.to_thread(self.log.append, rows, self.buffer.writer, seq)
            except Exception as e:
                log.warning("feedback log: write failed, will retry: %s", e)
                self.pending_images = {**images, **self.pending_images}
                self.buffer.give_back(rows)

    async def feedback(self, request) -> FeedbackResponse:
        from raydar.feedback import is_image_id, now
        from raydar.images import image_id as sha256_of
        from raydar.tasks import AnswerError

        body = await _read_body(request, self.settings["max_request_bytes"])
        try:
            parsed = FeedbackRequest.model_validate(json.loads(body))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, "bad_request", f"malformed JSON: {e}") from None
        except ValidationError as e:
            raise ApiError(400, "bad_request", "invalid feedback: " + _validation_message(e)) from None
        if not is_image_id(parsed.image_id):
            raise ApiError(400, "bad_request", "image_id: expected the 64-hex-digit sha256 /v1/detect returned")
        try:
            label = self.kind.validate(parsed.label)
        except AnswerError as e:
            raise ApiError(400, "bad_request", f"label: not a valid {self.kind.name} label: {e}") from None
        if parsed.image is not None:
            data = _decode_base64(parsed.image, "image")
            if sha256_of(data) != parsed.image_id:
                raise ApiError(400, "bad_request", "image: its sha256 is not image_id")
            _, fmt = await asyncio.to_thread(self.check_image, data)
            image_file = self._keep(data, parsed.image_id, fmt) or await asyncio.to_thread(
                self.log.keep_image, data, parsed.image_id, fmt)
        else:
            image_file = await self._stored_image(parsed.image_id)
            if image_file is None:
                raise ApiError(404, "unknown_image", f"image {parsed.image_id[:12]}… was not kept here: send it in "
                               "`image` (base64)")
        self.buffer.add({"kind": "feedback", "request_id": parsed.request_id, "image_id": parsed.image_id,
                         "image_file": image_file, "at": now(), "dataset": self.spec.name, "task": self.kind.name,
                         "label": json.dumps(label), "comment": parsed.comment or ""})
        await self.flush()  # corrections are rare and worth keeping at once
        self.stats.feedback += 1
        counts = await self.counts(fresh=True)
        return FeedbackResponse(accepted=True, image_id=parsed.image_id,
                                training_samples=counts["corrections"] + counts["hard_examples"])

    async def _stored_image(self, image_id: str) -> str | None:
        from raydar.feedback import image_file_name

        if image_id in self.pending_images:
            return image_file_name(image_id, self.pending_images[image_id][1])
        return await asyncio.to_thread(self.log.image_file, image_id, self.settings["image_formats"])

    async def counts(self, fresh: bool = False) -> dict:
        """The log's counts (every replica's rows), re-read at most every 5 s."""
        at, counts = self._counts
        if fresh or time.monotonic() - at > 5.0:
            counts = await asyncio.to_thread(self.log.counts)
            self._counts = (time.monotonic(), counts)
        return counts

    # ---------------------------------------------------------- the other endpoints
    async def models(self) -> dict:
        """The members and their adapters; each member asked within member_timeout_s. The adapter registry
        last known stands in, after 2 s, for a FineTunedDetector with no live replica."""
        timeout = self.settings["member_timeout_s"]
        members: dict[str, dict] = {}
        if "finetuned" in self.members:
            try:  # a registry already known is worth at most 2 s of waiting for a fresher one
                registry = await self.registry(min(timeout, 2.0) if self._adapters[1] else timeout)
            except Exception as e:  # noqa: BLE001 - no live replica
                registry = self._adapters[1]
                if not registry:
                    self.stats.record(503)
                    raise ApiError(503, "unavailable", f"finetuned: adapter registry: {_reason(e, timeout)}") from None
            members["finetuned"] = {"model": registry["model"], "default_adapter": registry["default"],
                                    "adapters": sorted(registry["adapters"]), "weight": self.weights["finetuned"]}
        if "rag" in self.members:
            try:
                described = await _within(self.members["rag"].describe.remote(), timeout)
            except Exception as e:  # noqa: BLE001
                self.stats.record(503)
                raise ApiError(503, "unavailable", f"rag: {_reason(e, timeout)}") from None
            members["rag"] = {**described, "weight": self.weights["rag"]}
        return {"dataset": self.spec.name, "task": self.kind.name, "members": members,
                "score_threshold": self.spec.serving.score_threshold,
                "classes": list(getattr(self.spec.task, "ontology", {})) or list(getattr(self.spec.task, "targets", {}))}

    async def ready(self) -> tuple[bool, dict]:
        """Every member answers a cheap call within 2 s (Serve routes only to live replicas)."""
        async def probe(name: str) -> str:
            call = self.members[name].adapters.remote() if name == "finetuned" else self.members[name].describe.remote()
            try:
                await _within(call, 2.0)
                return "ready"
            except Exception as e:
                return f"not ready: {_reason(e, 2.0)}"

        states = dict(zip(self.members, await asyncio.gather(*[probe(n) for n in self.members])))
        return all(s == "ready" for s in states.values()), states

    async def stats_view(self) -> dict:
        counts = await self.counts()
        return {**self.stats.view(), "training_samples": {
            "hard_examples": counts.get("hard_examples", 0), "corrections": counts.get("corrections", 0),
            "images_logged": counts.get("images", 0), "detections_logged": counts.get("detections", 0)}}


class _Stats:
    """This replica's counters since it started (the feedback log holds every replica's rows)."""

    def __init__(self, members: list[str]) -> None:
        self.started = time.time()
        self.by_status: collections.Counter = collections.Counter()
        self.answered: collections.Counter = collections.Counter()
        self.failed: collections.Counter = collections.Counter()
        self.degraded = 0
        self.hard = 0
        self.feedback = 0
        self.agreements: collections.deque = collections.deque(maxlen=1000)
        self.latencies: collections.deque = collections.deque(maxlen=1000)
        self.members = members

    def record(self, status: int, *, failed=(), answered=(), agreement=None, hard=False, latency_ms=None) -> None:
        self.by_status[status] += 1
        self.answered.update(answered)
        self.failed.update(failed)
        self.degraded += bool(failed) and status == 200
        self.hard += hard
        if agreement is not None:
            self.agreements.append(agreement)
        if latency_ms is not None:
            self.latencies.append(latency_ms)

    def view(self) -> dict:
        latencies = sorted(self.latencies)

        def quantile(q: float) -> float | None:
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else None

        return {
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "requests": {"total": sum(self.by_status.values()), "by_status": {str(k): v for k, v in
                                                                              sorted(self.by_status.items())},
                         "degraded": self.degraded, "hard_examples": self.hard, "feedback": self.feedback},
            "members": {m: {"answered": self.answered[m], "failed": self.failed[m]} for m in self.members},
            "agreement": {"mean": round(statistics.fmean(self.agreements), 4) if self.agreements else None,
                          "requests": len(self.agreements)},
            "latency_ms": {"p50": quantile(0.5), "p99": quantile(0.99)},
        }


def _api(ingress: EnsembleIngress):
    """The FastAPI app of one ingress replica: routes, auth, the error format."""
    @asynccontextmanager
    async def lifespan(_):
        yield
        await ingress.flush()  # rows still buffered reach the log when the replica stops

    public = ingress.settings["public_docs"]
    app = FastAPI(
        lifespan=lifespan,
        title=f"raydar detection endpoint: {ingress.spec.name}",
        description="The fine-tuned student and the RAG-augmented VLM, fused. Every route but /healthz and "
        "/readyz needs `Authorization: Bearer <token>`.",
        version="1",
        docs_url="/docs" if public else None, openapi_url="/openapi.json" if public else None, redoc_url=None,
    )
    bearer = HTTPBearer(auto_error=False, description="The API token (serving args token_env / token_file).")

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials if credentials and credentials.scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(given.encode(), ingress.token.encode()):
            ingress.stats.record(401)
            raise ApiError(401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        if e.status not in (401, 503):  # those are counted where they happen
            ingress.stats.record(e.status)
        return JSONResponse({"error": {"code": e.code, "message": e.message}}, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        ingress.stats.record(400)
        return JSONResponse({"error": {"code": "bad_request", "message": str(e)}}, status_code=400)

    protected = [Depends(authorised)]

    @app.get("/healthz", summary="Liveness: the ingress runs.")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: every member answers.", responses={503: _ERRORS[503]})
    async def readyz() -> JSONResponse:
        ok, members = await ingress.ready()
        return JSONResponse({"ready": ok, "members": members}, status_code=200 if ok else 503)

    @app.post("/v1/detect", response_model=DetectResponse, dependencies=protected, openapi_extra=_DETECT_BODY,
              summary="Detect in one image: the fused result and each member's.", responses=_ERRORS)
    async def detect(request: Request) -> DetectResponse:
        timeout = ingress.settings["request_timeout_s"]
        try:
            return await asyncio.wait_for(ingress.detect(request), timeout)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"no answer within {timeout:g} s") from None

    @app.post("/v1/feedback", response_model=FeedbackResponse, status_code=202, dependencies=protected,
              summary="A user's correction of a result; it becomes training data.",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": FeedbackRequest.model_json_schema()}}}},
              responses={k: _ERRORS[k] for k in (400, 401, 413)})
    async def feedback(request: Request) -> FeedbackResponse:
        return await ingress.feedback(request)

    @app.get("/v1/models", dependencies=protected, summary="The members, their models and adapters, the weights.")
    async def models() -> dict:
        return await ingress.models()

    @app.get("/v1/stats", dependencies=protected,
             summary="Requests, member failures and agreement (this replica); training samples collected (all).")
    async def stats() -> dict:
        return await ingress.stats_view()

    return app


# ---------------------------------------------------------------- small parts of the above


def _read_token(env: str, file: str | None) -> str:
    token = os.environ.get(env, "").strip()
    if not token and file:
        path = Path(file).expanduser()
        token = path.read_text().strip() if path.is_file() else ""
    if not token:
        where = f"${env}" + (f" or the file {file}" if file else "")
        raise RuntimeError(f"the detection endpoint needs an API token: set {where} (the token itself is never "
                           "read from the serving config)")
    return token


async def _read_body(request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over `limit` (by its header, else while read)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "bad_request", f"Content-Length is not a number: {declared!r}") from None
        if size > limit:
            raise ApiError(413, "too_large", f"the body is {size:,} bytes, over the limit of {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"the body is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _decode_base64(text: str, field: str) -> bytes:
    if text.startswith(("http://", "https://", "ftp://", "file:")):
        raise ApiError(400, "bad_request", f"{field}: URLs are not fetched; send the image's bytes in base64")
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ApiError(400, "bad_request", f"{field}: a data URL must be data:<type>;base64,<bytes>")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "bad_request", f"{field}: not valid base64: {e}") from None
    if not data:
        raise ApiError(400, "bad_request", f"{field}: empty")
    return data


def _validation_message(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors())


async def _within(response, timeout: float):
    """A member's answer within `timeout` s. A call that takes longer is cancelled (not left queued for a
    replica that is still starting) and raises TimeoutError."""
    async def answer():
        return await response

    try:
        return await asyncio.wait_for(answer(), timeout)
    except asyncio.TimeoutError:
        response.cancel()
        raise


def _quietly(call: asyncio.Future) -> None:
    """Retrieve a background call's error so asyncio does not log it as never retrieved."""
    if not call.cancelled():
        call.exception()


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


def _reason(error: Exception, timeout: float | None = None) -> str:
    """One line on why a member failed: the original exception of a Ray task error, not its traceback;
    "no answer within `timeout` s" for a call that took longer."""
    if isinstance(error, asyncio.TimeoutError) and timeout is not None:
        return f"no answer within {timeout:g} s"
    cause = getattr(error, "cause", None) or error
    text = " ".join(str(cause).split()) or type(cause).__name__
    name = type(cause).__name__
    if "ActorDied" in name or "Unavailable" in name or "ActorDied" in text[:200]:
        return f"replica unavailable ({name})"
    return f"{name}: {text[:300]}"
