"""The ingress of the detection endpoint: decode -> ask the members -> fuse -> answer.

`EnsembleIngress` checks the body (size, type, base64, JSON) and the image (format allowlist, pixel
count from the header before decoding), asks the members through their handles with a timeout each,
fuses their labels (`raydar.fusion`), logs the request for the feedback loop (`raydar.feedback`) and
answers. A member that fails or times out makes the answer *degraded* (it says which and why); the
request still succeeds. A member whose replica died is left out at once until its replacement answers
(`MemberHealth`), so no request waits for the replacement. The routes and the bearer token check are in
serving/api.py.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import json
import os
import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ray import serve

from raydar.spec import DatasetSpec
from serving.api import (
    ApiError,
    DetectRequest,
    DetectResponse,
    FeedbackRequest,
    FeedbackResponse,
    MemberResult,
    fastapi_app,
)
from serving.args import FeedbackSettings


@dataclass
class DecodedImage:
    """A request's image, checked: its bytes as sent, the payload the members get, and the adapter asked for."""

    data: bytes
    fmt: str
    image_id: str
    payload: bytes
    adapter: str | None


@serve.deployment(name="EnsembleIngress")
@serve.ingress()
class EnsembleIngress:
    """Checks, fans out to the members, fuses, logs and answers. One FastAPI app per replica."""

    def __init__(self, spec: dict, storage: str, settings: dict, finetuned=None, rag=None) -> None:
        from cluster import StorageRoot
        from raydar.feedback import FeedbackLog, FeedbackWriter
        from raydar.kinds import kind_of
        from raydar.telemetry import ServingMetrics

        # What detect() uses, imported here: raydar.fusion brings scipy and scikit-learn, which the replica
        # pays for before it is ready rather than the first request paying for it.
        from raydar import fusion  # noqa: F401

        self.spec = DatasetSpec.model_validate(spec)
        self.kind = kind_of(self.spec.task)
        self.settings = settings
        self.feedback_settings = FeedbackSettings.model_validate(settings["feedback"])
        self.max_image_pixels = settings["max_image_pixels"] or self.spec.images.max_image_pixels
        self.members = {name: handle for name, handle in (("finetuned", finetuned), ("rag", rag)) if handle}
        self.weights = {name: float(self.spec.serving.weights.get(name, 1.0)) for name in self.members}
        self.token = read_token(settings["token_env"], settings["token_file"])
        self.log = FeedbackLog(StorageRoot(storage).child(self.spec.name, "feedback"))
        self.feedback_writer = FeedbackWriter(self.log, rows=self.feedback_settings.flush_rows,
                                              seconds=self.feedback_settings.flush_s,
                                              keep_images=self.feedback_settings.keep_images)
        self.metrics = ServingMetrics(self.spec.name)
        self.stats = ReplicaStats(list(self.members))
        self.registry = AdapterRegistry(finetuned, max_age_s=settings["adapter_registry_max_age_s"]) \
            if finetuned else None
        self.health = MemberHealth({name: self._probe_call(name) for name in self.members},
                                   interval_s=settings["member_probe_interval_s"],
                                   timeout_s=settings["ready_probe_timeout_s"])
        self._handles: dict[str, Any] = {}
        self._counts: tuple[float, dict] = (0.0, {})

    def __serve_build_asgi_app__(self):
        return fastapi_app(self)

    async def detect(self, request) -> DetectResponse:
        start = time.perf_counter()
        image = await self.decode(request)
        results = await self.ask_members(image.payload, image.adapter)
        return self.answer(image, results, start)

    # ---------------------------------------------------------- decode
    async def decode(self, request) -> DecodedImage:
        """The request's image, read, checked and made ready for the members."""
        from raydar.images import teacher_payload

        data, adapter = await self.read_image(request)
        prepared, fmt = await asyncio.to_thread(self.check_image, data)
        payload, _ = teacher_payload(data, prepared, "auto")  # the original bytes unless a resize was needed
        return DecodedImage(data=data, fmt=fmt, image_id=prepared.image_id, payload=payload, adapter=adapter)

    async def read_image(self, request) -> tuple[bytes, str | None]:
        """The image's bytes and the adapter asked for, from multipart, JSON (base64) or a raw image body."""
        from starlette.formparsers import MultiPartException, MultiPartParser

        body = await _read_body(request, self.settings["max_request_bytes"])
        if not body:
            raise ApiError(400, "bad_request", "empty body: send the image (multipart field `image`, JSON "
                           "{\"image\": base64} or the image itself)")
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

    # ---------------------------------------------------------- ask the members
    async def ask_members(self, payload: bytes, adapter: str | None) -> dict[str, MemberResult]:
        """Each member's answer within member_timeout_s from now. RAG is asked first: the student's call
        may have to wait for the adapter registry."""
        if adapter and "finetuned" not in self.members:
            raise ApiError(404, "unknown_adapter", "this endpoint serves no fine-tuned member")
        start = time.perf_counter()
        timeout = self.settings["member_timeout_s"]
        rag = asyncio.ensure_future(self._ask("rag", lambda: self.members["rag"].detect.remote(payload), timeout)) \
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
        if self.health.is_down("finetuned"):
            return self.health.left_out("finetuned", start)
        try:
            adapter_name, uri = await self.registry.adapter_uri(adapter, timeout)
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - no registry in time, or its replica failing: the member is left out
            status = "timeout" if isinstance(e, asyncio.TimeoutError) else "failed"
            return MemberResult(status=status, error=f"adapter registry: {_reason(e, timeout)}", latency_ms=_ms(start))
        left = max(timeout - (time.perf_counter() - start), 0.001)
        result = await self._ask("finetuned", lambda: self._adapter_handle(uri).detect.remote(payload), left, start)
        result.adapter = adapter_name
        return result

    def _adapter_handle(self, uri: str):
        """One handle per adapter, made once: `options()` per request would set up routing state each time."""
        if uri not in self._handles:
            self._handles[uri] = self.members["finetuned"].options(multiplexed_model_id=uri)
        return self._handles[uri]

    async def _ask(self, name: str, call, timeout: float, start: float | None = None) -> MemberResult:
        """Member `name`'s answer to `call()` (a handle call) within `timeout`; at once a failed result when the
        member is known to have no live replica."""
        from ray.serve.exceptions import BackPressureError

        start = time.perf_counter() if start is None else start
        if self.health.is_down(name):
            return self.health.left_out(name, start)
        response = call()
        self.health.waiting[name].add(response)
        try:
            out = await await_or_cancel(response, timeout)
        except asyncio.TimeoutError as e:
            return MemberResult(status="timeout", error=_reason(e, self.settings["member_timeout_s"]),
                                latency_ms=_ms(start))
        except BackPressureError:
            return MemberResult(status="failed", error="overloaded: its queue is full", latency_ms=_ms(start))
        except Exception as e:  # a dead replica, the VLM failing, a bug: the member is left out, the request goes on
            if replica_unavailable(e):
                self.health.mark_down(name)
            if self.health.is_down(name):
                return self.health.left_out(name, start)
            return MemberResult(status="failed", error=_reason(e), latency_ms=_ms(start))
        finally:
            self.health.waiting[name].discard(response)
        status = "ok" if out.get("label") is not None else "failed"
        return MemberResult(status=status, label=out.get("label"), score=out.get("score"), error=out.get("error"),
                            latency_ms=_ms(start), model=out.get("model"), adapter_version=out.get("adapter_version"),
                            batch_size=out.get("batch_size"), examples=out.get("examples"), raw=out.get("raw"))

    # ---------------------------------------------------------- fuse and answer
    def fuse(self, labels: dict[str, dict]) -> tuple[dict, float | None]:
        """The fused label of the members that answered, and how much they agree (None with one)."""
        from raydar.fusion import agreement, fuse

        fused = fuse(self.spec.task, labels, self.weights, min_score=self.spec.serving.score_threshold)
        return fused, agreement(self.spec.task, labels) if len(labels) > 1 else None

    def answer(self, image: DecodedImage, results: dict[str, MemberResult], start: float) -> DetectResponse:
        """The response to a request the members answered (503 when none did), counted and logged."""
        labels = {name: r.label for name, r in results.items() if r.status == "ok"}
        failed = [name for name, r in results.items() if r.status != "ok"]
        request_id = uuid.uuid4().hex
        if not labels:
            self.stats.record(503, failed=failed)
            self.metrics.record_request([], failed=failed, latency_s=time.perf_counter() - start)
            raise ApiError(503, "unavailable", "no member answered: " + "; ".join(
                f"{name}: {r.error}" for name, r in results.items()))
        fused, together = self.fuse(labels)
        hard = together is not None and together < self.feedback_settings.hard_below
        response = DetectResponse(
            request_id=request_id, image_id=image.image_id, dataset=self.spec.name, task=self.kind.name,
            fused=fused, members=results, weights=self.weights, agreement=together, hard_example=hard,
            degraded=bool(failed), latency_ms=_ms(start))
        self.stats.record(200, failed=failed, agreement=together, hard=hard, latency_ms=response.latency_ms,
                          answered=list(labels))
        self.metrics.record_request(list(labels), failed=failed, agreement=together,
                                    latency_s=response.latency_ms / 1000)
        self.remember(response, image.data, image.fmt)
        return response

    # ---------------------------------------------------------- the feedback log
    def remember(self, response: DetectResponse, data: bytes, fmt: str) -> None:
        from raydar.feedback import now

        if not self.feedback_settings.enabled:
            return
        finetuned = response.members.get("finetuned")
        image_file = self.feedback_writer.keep(data, response.image_id, fmt)
        self.feedback_writer.add({
            "kind": "detection", "request_id": response.request_id, "image_id": response.image_id,
            "image_file": image_file, "at": now(), "dataset": self.spec.name, "task": self.kind.name,
            "members": json.dumps({n: r.label for n, r in response.members.items()}),
            "member_errors": json.dumps({n: r.error for n, r in response.members.items() if r.status != "ok"}),
            "fused": json.dumps(response.fused), "agreement": response.agreement, "hard": response.hard_example,
            "model": finetuned.model if finetuned else None,
            "adapter": f"{finetuned.adapter}@{finetuned.adapter_version}" if finetuned else None,
            "latency_s": response.latency_ms / 1000,
        })

    async def feedback(self, request) -> FeedbackResponse:
        from raydar.feedback import is_image_id, now
        from raydar.images import image_id as sha256_of
        from raydar.kinds import AnswerError

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
        if parsed.request_id is not None:
            answered = await self.feedback_writer.answered_image(parsed.request_id)
            if answered is None:
                raise ApiError(404, "unknown_request", f"request_id {parsed.request_id!r}: no such detection was "
                               "logged here; send the request_id /v1/detect returned, or none")
            if answered != parsed.image_id:
                raise ApiError(400, "bad_request", f"request_id {parsed.request_id!r} answered another image, "
                               "not image_id")
        if parsed.image is not None:
            data = _decode_base64(parsed.image, "image")
            if sha256_of(data) != parsed.image_id:
                raise ApiError(400, "bad_request", "image: its sha256 is not image_id")
            _, fmt = await asyncio.to_thread(self.check_image, data)
            image_file = await self.feedback_writer.keep_corrected(data, parsed.image_id, fmt)
        else:
            image_file = await self.feedback_writer.stored_image(parsed.image_id, self.settings["image_formats"])
            if image_file is None:
                raise ApiError(404, "unknown_image", f"image {parsed.image_id[:12]}… was not kept here: send it in "
                               "`image` (base64)")
        # corrections are rare and worth keeping at once
        await self.feedback_writer.write_now({
            "kind": "feedback", "request_id": parsed.request_id, "image_id": parsed.image_id,
            "image_file": image_file, "at": now(), "dataset": self.spec.name, "task": self.kind.name,
            "label": json.dumps(label), "comment": parsed.comment or ""})
        self.stats.feedback += 1
        counts = await self.counts(fresh=True)
        return FeedbackResponse(accepted=True, image_id=parsed.image_id,
                                training_samples=counts["corrections"] + counts["hard_examples"])

    async def counts(self, fresh: bool = False) -> dict:
        """The log's counts (every replica's rows), re-read at most every feedback_counts_max_age_s."""
        at, counts = self._counts
        if fresh or time.monotonic() - at > self.settings["feedback_counts_max_age_s"]:
            counts = await asyncio.to_thread(self.log.counts)
            self._counts = (time.monotonic(), counts)
        return counts

    # ---------------------------------------------------------- the other endpoints
    async def models(self) -> dict:
        """The members and their adapters; each member asked within member_timeout_s. The adapter registry
        last known stands in, after models_registry_wait_s, for a FineTunedMember with no live replica."""
        timeout = self.settings["member_timeout_s"]
        members: dict[str, dict] = {}
        if "finetuned" in self.members:
            known = self.registry.known
            try:  # a registry already known is worth at most models_registry_wait_s of waiting for a fresher one
                registry = await self.registry.fetch(
                    min(timeout, self.settings["models_registry_wait_s"]) if known else timeout)
            except Exception as e:  # noqa: BLE001 - no live replica
                registry = self.registry.known
                if not registry:
                    self.stats.record(503)
                    raise ApiError(503, "unavailable", f"finetuned: adapter registry: {_reason(e, timeout)}") from None
            members["finetuned"] = {"model": registry["model"], "default_adapter": registry["default"],
                                    "adapters": sorted(registry["adapters"]), "weight": self.weights["finetuned"]}
        if "rag" in self.members:
            try:
                described = await await_or_cancel(self.members["rag"].describe.remote(), timeout)
            except Exception as e:  # noqa: BLE001
                self.stats.record(503)
                raise ApiError(503, "unavailable", f"rag: {_reason(e, timeout)}") from None
            members["rag"] = {**described, "weight": self.weights["rag"]}
        return {"dataset": self.spec.name, "task": self.kind.name, "members": members,
                "score_threshold": self.spec.serving.score_threshold,
                "classes": list(getattr(self.spec.task, "ontology", {})) or list(getattr(self.spec.task, "targets", {}))}

    def _probe_call(self, name: str):
        """A cheap call of member `name` (its registry or its description), made when called."""
        handle = self.members[name]
        return handle.adapters.remote if name == "finetuned" else handle.describe.remote

    async def ready(self) -> tuple[bool, dict]:
        """Every member answers a cheap call within ready_probe_timeout_s (Serve routes only to live replicas)."""
        timeout = self.settings["ready_probe_timeout_s"]

        async def probe(name: str) -> str:
            try:
                await await_or_cancel(self._probe_call(name)(), timeout)
                return "ready"
            except Exception as e:
                return f"not ready: {_reason(e, timeout)}"

        states = dict(zip(self.members, await asyncio.gather(*[probe(n) for n in self.members])))
        return all(s == "ready" for s in states.values()), states

    async def stats_view(self) -> dict:
        counts = await self.counts()
        return {**self.stats.view(), "training_samples": {
            "hard_examples": counts.get("hard_examples", 0), "corrections": counts.get("corrections", 0),
            "images_logged": counts.get("images", 0), "detections_logged": counts.get("detections", 0)}}


class AdapterRegistry:
    """FineTunedMember's adapters ({"default", "adapters": {name: uri}, "model"}) as this ingress replica
    last saw them, asked again one call at a time, shared by every request."""

    def __init__(self, student, *, max_age_s: float) -> None:
        self.student = student  # FineTunedMember's handle
        self.max_age_s = max_age_s
        self.known: dict = {}
        self._known_at = 0.0
        self._call: asyncio.Future | None = None

    async def fetch(self, timeout: float) -> dict:
        """The registry asked again within `timeout`. Raises TimeoutError or the call's error when no replica
        answers (one that died, its replacement loading)."""
        # shielded: a request giving up does not cancel the call the next request will wait on
        return await asyncio.wait_for(asyncio.shield(self._refresh()), timeout)

    async def adapter_uri(self, name: str | None, timeout: float) -> tuple[str, str]:
        """(name, checkpoint URI) of an adapter. The registry known is used while it is under max_age_s old;
        an older one is still used when it names the adapter, and asked again in the background, so no
        request waits on the registry while FineTunedMember has no live replica. Only a name it does not
        know (or no registry yet) waits, up to `timeout`."""
        registry = self.known
        known = bool(registry) and (name is None or name in registry["adapters"])
        if known and time.monotonic() - self._known_at > self.max_age_s:
            self._refresh()
        if not known:
            registry = await self.fetch(timeout)
        name = name or registry["default"]
        if name not in registry["adapters"]:
            raise ApiError(404, "unknown_adapter", f"no adapter {name!r}; GET /v1/models lists "
                           f"{', '.join(sorted(registry['adapters']))}")
        return name, registry["adapters"][name]

    def _refresh(self) -> asyncio.Future:
        """The registry call in flight, started if none is."""
        if self._call is None or self._call.done():
            self._call = asyncio.ensure_future(self._ask())
            self._call.add_done_callback(retrieve_error_quietly)  # a failure shows on the request that next waits
        return self._call

    async def _ask(self) -> dict:
        registry = await self.student.adapters.remote()
        self.known, self._known_at = registry, time.monotonic()
        return registry


class ReplicaStats:
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


# ---------------------------------------------------------------- small parts of the above


def read_token(env: str, file: str | None) -> str:
    """The API token: the environment variable first, else the file (a mounted secret), never the config."""
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


async def await_or_cancel(response, timeout: float):
    """A member's answer within `timeout` s. A call that takes longer is cancelled (not left queued for a
    replica that is still starting) and raises TimeoutError."""
    async def answer():
        return await response

    try:
        return await asyncio.wait_for(answer(), timeout)
    except asyncio.TimeoutError:
        response.cancel()
        raise


def retrieve_error_quietly(call: asyncio.Future) -> None:
    """Retrieve a background call's error so asyncio does not log it as never retrieved."""
    if not call.cancelled():
        call.exception()


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


class MemberHealth:
    """Which members have a live replica, as this ingress saw last. A member whose replica died
    (`mark_down`) is left out of answers at once, and the calls still waiting on it are cancelled, instead of
    every request waiting for the replacement; a probe (`probes[name]()`, a cheap handle call) is sent every
    `interval_s` until the member answers one, and from then on it is asked again."""

    def __init__(self, probes: dict, *, interval_s: float, timeout_s: float) -> None:
        self.probes, self.interval_s, self.timeout_s = probes, interval_s, timeout_s
        self.down: dict[str, float] = {}  # member -> when it was seen without a live replica
        self.waiting: dict[str, set] = collections.defaultdict(set)  # member -> its calls in flight
        self._probing: dict[str, asyncio.Task] = {}

    def is_down(self, name: str) -> bool:
        return name in self.down

    def mark_down(self, name: str) -> None:
        if name in self.down:
            return
        self.down[name] = time.monotonic()
        for response in list(self.waiting[name]):
            response.cancel()
        self._probing[name] = asyncio.ensure_future(self._probe_until_up(name))

    def left_out(self, name: str, start: float) -> MemberResult:
        since = time.monotonic() - self.down.get(name, time.monotonic())
        return MemberResult(status="failed", error=f"replica unavailable: left out while its replacement starts "
                            f"({since:.1f} s so far)", latency_ms=_ms(start))

    async def _probe_until_up(self, name: str) -> None:
        while True:
            try:
                await await_or_cancel(self.probes[name](), self.timeout_s)
                break
            except Exception:  # noqa: BLE001 - not up yet, whatever the reason
                await asyncio.sleep(self.interval_s)
        self.down.pop(name, None)


def replica_unavailable(error: Exception) -> bool:
    """Whether a member's call failed because its replica is dead or unreachable (not the member's own error)."""
    cause = getattr(error, "cause", None) or error
    name, text = type(cause).__name__, str(cause)[:200]
    return "ActorDied" in name or "Unavailable" in name or "ActorDied" in text


def _reason(error: Exception, timeout: float | None = None) -> str:
    """One line on why a member failed: the original exception of a Ray task error, not its traceback;
    "no answer within `timeout` s" for a call that took longer."""
    if isinstance(error, asyncio.TimeoutError) and timeout is not None:
        return f"no answer within {timeout:g} s"
    cause = getattr(error, "cause", None) or error
    text = " ".join(str(cause).split()) or type(cause).__name__
    name = type(cause).__name__
    if replica_unavailable(error):
        return f"replica unavailable ({name})"
    return f"{name}: {text[:300]}"
