"""The simulated teacher: a real HTTP server speaking OpenAI chat completions, for offline demos and tests.

It is a simulator, and says so in every answer's `model` field and in its name. It recognises the
images of a dataset with ground truth (`ground_truth.jsonl` beside the images, as raydar.demo
writes) by their content, whatever size or encoding they arrive in, and answers with the ground
truth through configurable label noise (misses, invented objects, jitter, swapped classes) and
latency, serving at most `max_concurrency` requests at once (others wait). Faults can be injected:
429 with Retry-After, 500, hangs past the client's timeout, malformed JSON, JSON wrapped in prose.
Every request is logged (model, prompt, which image, what was done) for tests to read, in process
(`SimulatedTeacher.log`) or over HTTP (`GET /_simulator/log`).

Few-shot requests (what the RAG detector sends) are used honestly, from their content alone. The
image the question is about is the *last* image of the request; every earlier image is an example,
and its label is the first text after it (the assistant turn that follows it, or inline text), read
in the teacher's coordinate convention. An example counts for a class when the simulator recognises
its image and at least half (and at least one) of the points it shows for that class lie within 5 %
of the image side of a true object of that class in that image's ground truth; a wrong or unreadable
label teaches nothing. Zero-shot the simulator has, on top of its base noise, an extra chance
`zero_shot_miss[class]` to miss and `zero_shot_flip[class]` to misname each object of a class (a
model that overlooks faint cells); each example that counts for the class multiplies both by
(1 - `example_gain`). So with `zero_shot_miss: {implicit: 0.4}` and `example_gain: 0.5`, three
good examples of implicit cells leave 0.4 x 0.125 = 0.05. The extra draws come from their own random
stream per image, so the base noise of an image is the same with and without examples, and the
measured difference is the examples' effect only. With no extra rates (the default) examples change
nothing.

    raydar teacher serve --ground-truth ~/.raydar/demo_cells/source --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import typing
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import orjson
import uvicorn
from fastapi import FastAPI
from PIL import Image

from raydar.signals import sigterm_as_interrupt
from raydar.sources import read_ground_truth
from raydar.spec import SimulatedTeacherSettings
from raydar.kinds import AnswerError, extract_json

FAULT_KINDS = ("rate_limit", "server_error", "hang", "malformed_json", "prose")
MODEL_NAME = "raydar-simulated-teacher"
_THUMB = 16  # side of the thumbnail images are recognised by
_MATCH_LIMIT = 0.08  # mean absolute thumbnail difference (0-1) above which an image is unknown
_EXAMPLE_MATCH = 0.05  # a shown example point this close (fraction of the side) to a true one is right


@dataclass
class Fault:
    """Inject `kind` into a request: for each image's first `per_image` requests, and/or at random."""

    kind: str
    probability: float = 0.0
    per_image: int = 0
    retry_after_s: float = 1.0  # for rate_limit
    hang_s: float = 3600.0  # for hang: longer than any client timeout

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; expected one of {', '.join(FAULT_KINDS)}")

    @classmethod
    def parse(cls, text: str) -> Fault:
        """`kind[:key=value,...]`, e.g. `rate_limit:probability=0.1,retry_after_s=2` or `prose:per_image=1`."""
        kind, _, rest = text.partition(":")
        kwargs = {}
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            kwargs[key.strip()] = int(value) if key.strip() == "per_image" else float(value)
        return cls(kind.strip(), **kwargs)


@dataclass
class _Entry:
    n: int
    time: float
    model: str
    prompt: str
    image: str | None  # ground-truth file name, or None for an image it does not know
    n_images: int
    fault: str | None
    status: int
    retry_after_s: float | None = None
    examples: list[str | None] = field(default_factory=list)  # example images recognised (None: unknown)
    credit: dict[str, int] = field(default_factory=dict)  # class -> examples that correctly showed it
    worker: int = field(default_factory=os.getpid)  # the process that answered


class _GroundTruth:
    """Finds which known image a request carries: exactly, when it is the original file, else by a
    small thumbnail (a resized or re-encoded image)."""

    def __init__(self, folder: str | Path) -> None:
        self.records = read_ground_truth(folder)
        self.classes = sorted({p["label"] for r in self.records for p in r["label"].get("points", [])}) or ["object"]
        thumbs = []
        self._by_payload: dict[str, int | None] = {}
        for i, record in enumerate(self.records):
            data = (Path(folder) / record["file"]).read_bytes()
            self._by_payload[_payload_key(base64.b64encode(data).decode())] = i
            thumbs.append(_thumbnail(Image.open(io.BytesIO(data))))
        self.thumbs = np.stack(thumbs) if thumbs else np.zeros((0, _THUMB * _THUMB), np.float32)

    def find(self, payload: str) -> int | None:
        key = _payload_key(payload)
        if key not in self._by_payload:
            img = Image.open(io.BytesIO(base64.b64decode(payload)))
            distances = np.abs(self.thumbs - _thumbnail(img)).mean(axis=1)
            best = int(distances.argmin()) if len(distances) else -1
            self._by_payload[key] = best if best >= 0 and distances[best] < _MATCH_LIMIT else None
        return self._by_payload[key]


class _Slots:
    """At most `n` answers at once, in this process; counts the peak."""

    def __init__(self, n: int) -> None:
        self.semaphore = asyncio.Semaphore(n)
        self.in_flight = self.peak = 0

    async def __aenter__(self) -> None:
        await self.semaphore.acquire()
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)

    async def __aexit__(self, *exc) -> None:
        self.in_flight -= 1
        self.semaphore.release()


class _SharedSlots:
    """The same slots shared by forked worker processes. The semaphore is polled, so that a request waiting
    for a slot never blocks its worker's event loop (and a cancelled one holds nothing)."""

    def __init__(self, n: int, context) -> None:
        self.semaphore = context.BoundedSemaphore(n)
        self.counts = context.Array("i", 2)  # in flight, peak

    @property
    def peak(self) -> int:
        return self.counts[1]

    async def __aenter__(self) -> None:
        delay = 0.0005
        while not self.semaphore.acquire(block=False):
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.005)
        with self.counts.get_lock():
            self.counts[0] += 1
            self.counts[1] = max(self.counts[1], self.counts[0])

    async def __aexit__(self, *exc) -> None:
        with self.counts.get_lock():
            self.counts[0] -= 1
        self.semaphore.release()


class _Shared:
    """What the worker processes of one simulator share: the slots, and the request log as one JSON-lines
    file per worker in a temporary folder, merged in time order when read."""

    def __init__(self, max_concurrency: int) -> None:
        self.slots = _SharedSlots(max_concurrency, multiprocessing.get_context("fork"))
        self.log_dir = Path(tempfile.mkdtemp(prefix="raydar-simulator-log-"))

    def record(self, entry: _Entry) -> None:
        with open(self.log_dir / f"{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps(asdict(entry)) + "\n")

    def entries(self) -> list[dict]:
        rows = [json.loads(line) for path in self.log_dir.glob("*.jsonl") for line in path.read_text().splitlines()]
        rows.sort(key=lambda row: row["time"])
        for n, row in enumerate(rows):
            row["n"] = n
        return rows

    def reset(self) -> None:
        """Empty the log, and count the peak from now on."""
        for path in self.log_dir.glob("*.jsonl"):
            path.write_text("")
        with self.slots.counts.get_lock():
            self.slots.counts[1] = self.slots.counts[0]

    def close(self) -> None:
        shutil.rmtree(self.log_dir, ignore_errors=True)


def _listening_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)  # clients may connect as soon as the URL is known; they wait in the backlog
    return sock


def _payload_key(payload: str) -> str:
    return hashlib.sha1(payload.encode("ascii")).hexdigest()


def _thumbnail(img: Image.Image) -> np.ndarray:
    small = img.convert("L").resize((_THUMB, _THUMB), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32).reshape(-1) / 255.0


class SimulatedTeacher:
    """The server. `start()` runs it on a background thread; `serve_forever()` in the foreground."""

    def __init__(
        self,
        ground_truth: str | Path,
        settings: SimulatedTeacherSettings | None = None,
        faults: list[Fault] | None = None,
        coordinates: str = "normalized",
        port: int = 0,
        known_models: list[str] | None = None,
    ) -> None:
        self.settings = settings or SimulatedTeacherSettings()
        self.faults = list(faults or [])
        if self.faults and self.settings.workers > 1:
            raise ValueError("faults are counted per image in one process: use one worker (workers=1) with faults")
        self.coordinates = coordinates
        self.known_models = known_models
        self.truth = _GroundTruth(ground_truth)
        self.log: list[_Entry] = []
        self._seen: dict[int, int] = {}
        self._rng = random.Random(self.settings.seed)
        self._sock = _listening_socket(self.settings.host, port, reuse_port=self.settings.workers > 1)
        self.port = self._sock.getsockname()[1]
        self.base_url = f"http://{self.settings.host}:{self.port}/v1"
        self._shared = _Shared(self.settings.max_concurrency) if self.settings.workers > 1 else None
        self._slots = self._shared.slots if self._shared is not None else _Slots(self.settings.max_concurrency)
        self.app = _ChatRoute(self._build_app(), self._chat_http)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # lifecycle ------------------------------------------------------------
    def start(self) -> SimulatedTeacher:
        if self._shared is not None:
            raise ValueError("several workers run from serve_forever (`raydar teacher serve --workers N`), not start()")
        self._server = self._make_server()
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the simulated teacher did not start")
            time.sleep(0.01)
        return self

    def serve_forever(self, ready=None) -> None:
        """Serve until interrupted: in this process, or in `settings.workers` forked processes sharing the
        port (one SO_REUSEPORT socket each, so the kernel spreads connections evenly over them), the
        concurrency slots and the log. `ready()` is called once every socket listens."""
        if self._shared is None:
            if ready is not None:
                ready()
            self._server = self._make_server()
            self._server.run(sockets=[self._sock])
            return
        context = multiprocessing.get_context("fork")  # the children share the loaded ground truth
        listening = context.Barrier(self.settings.workers + 1)
        workers = [context.Process(target=self._serve_worker, args=(i, listening))
                   for i in range(self.settings.workers)]
        try:
            with sigterm_as_interrupt():  # terminated: stop the workers below
                for worker in workers:
                    worker.start()
                listening.wait(timeout=60)  # a connection made earlier would stay with the first worker
                if ready is not None:
                    ready()
                gone = multiprocessing.connection.wait([w.sentinel for w in workers])  # when any one ends
            ended = next(w for w in workers if w.sentinel in gone)
            ended.join(timeout=5)
            raise RuntimeError(f"a worker of the simulated teacher ended (exit code {ended.exitcode})")
        except KeyboardInterrupt:
            pass
        finally:
            started = [w for w in workers if w.pid is not None]  # interrupted while forking: not all were
            try:
                for worker in started:
                    if worker.is_alive():
                        worker.terminate()  # uvicorn shuts down on SIGTERM
                for worker in started:
                    worker.join(timeout=10)
                    if worker.is_alive():
                        worker.kill()
            finally:
                self._shared.close()

    def _serve_worker(self, index: int, listening) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # uvicorn installs its own
        sock = self._sock if index == 0 else _listening_socket(self.settings.host, self.port, reuse_port=True)
        listening.wait(timeout=60)
        self._server = self._make_server()
        self._server.run(sockets=[sock])

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True  # hung requests are not waited for
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> SimulatedTeacher:
        return self if self._server is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def peak_concurrency(self) -> int:
        """The most answers served at once (across the workers, since their last reset)."""
        return self._slots.peak

    def reset_log(self) -> None:
        self.log.clear()
        self._seen.clear()

    def requests_for(self, image: str) -> list[_Entry]:
        return [e for e in self.log if e.image == image]

    def _make_server(self) -> uvicorn.Server:
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
            limit_concurrency=None,
            lifespan="off",
        )
        return uvicorn.Server(config)

    # the HTTP app -----------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="raydar simulated teacher (not a real model)")

        @app.get("/v1/models")
        async def models() -> dict:
            names = self.known_models or [MODEL_NAME]
            return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "raydar"} for m in names]}

        @app.get("/_simulator/log")
        async def read_log() -> dict:
            entries = self._shared.entries() if self._shared is not None else [asdict(e) for e in self.log]
            return {"requests": entries, "peak_concurrency": self.peak_concurrency}

        @app.post("/_simulator/reset")
        async def reset() -> dict:
            self.reset_log()
            if self._shared is not None:
                self._shared.reset()
            return {"ok": True}

        return app

    async def _chat_http(self, body: bytes) -> tuple[int, bytes, dict[str, str]]:
        status, answer, headers, entry = await self._chat(body)
        if entry is not None and self._shared is not None:
            self._shared.record(entry)
        return status, orjson.dumps(answer), headers

    async def _chat(self, body: bytes) -> tuple[int, dict, dict[str, str], _Entry | None]:
        """(status, JSON body, headers, log entry) for one chat-completions request body."""
        try:
            model, prompt, images, shots = _read_request(orjson.loads(body))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return *_error(400, f"bad request: {e}", "invalid_request_error"), None
        entry = _Entry(len(self.log), time.time(), model, prompt, None, len(images), None, 200)
        self.log.append(entry)
        if self.known_models is not None and model not in self.known_models:
            entry.status = 404
            return *_error(404, f"The model `{model}` does not exist", "model_not_found"), entry
        try:
            entry.examples, entry.credit = self._learn_from(shots)
            index = self.truth.find(images[-1]) if images else None  # the question is about the last image
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # not base64, not an image
            entry.status = 400
            return *_error(400, f"bad request: an image does not decode: {e}", "invalid_request_error"), entry
        entry.image = self.truth.records[index]["file"] if index is not None else None
        seen = self._seen.get(index, 0) if index is not None else None  # per-image faults: known images only
        if index is not None:
            self._seen[index] = seen + 1
        fault = self._pick_fault(seen)
        entry.fault = fault.kind if fault else None
        async with self._slots:
            if fault and fault.kind == "hang":
                await asyncio.sleep(fault.hang_s)
            await asyncio.sleep(self.settings.latency_s)
        if fault and fault.kind == "rate_limit":
            entry.status, entry.retry_after_s = 429, fault.retry_after_s
            return *_error(429, "Rate limit reached (simulated)", "rate_limit_exceeded",
                           {"retry-after": f"{fault.retry_after_s:g}"}), entry
        if fault and fault.kind == "server_error":
            entry.status = 500
            return *_error(500, "The server had an error (simulated)", "server_error"), entry
        answer = json.dumps(self._answer(index, entry.credit))
        if fault and fault.kind == "malformed_json":
            answer = answer[: max(1, len(answer) // 2)]  # cut off mid-way, as a truncated generation is
        elif fault and fault.kind == "prose":
            answer = f"Sure! Here is what I found in the image:\n```json\n{answer}\n```\nLet me know if you need more."
        return 200, _completion(model, answer), {}, entry

    def _pick_fault(self, seen: int | None) -> Fault | None:
        for fault in self.faults:
            if (seen is not None and seen < fault.per_image) or (
                fault.probability and self._rng.random() < fault.probability
            ):
                return fault
        return None

    def _learn_from(self, shots: list[tuple[str, str | None]]) -> tuple[list[str | None], dict[str, int]]:
        """Which example images it recognises, and per class how many examples showed that class right."""
        files: list[str | None] = []
        credit: dict[str, int] = {}
        for payload, answer in shots:
            index = self.truth.find(payload)
            files.append(self.truth.records[index]["file"] if index is not None else None)
            if index is None or answer is None:
                continue
            truth = self.truth.records[index]["label"].get("points", [])
            shown = self._read_points(answer, payload)
            for name in {label for label, _, _ in shown}:
                mine = [(x, y) for label, x, y in shown if label == name]
                true = [(p["x"], p["y"]) for p in truth if p["label"].lower() == name]
                right = sum(any(np.hypot(x - tx, y - ty) <= _EXAMPLE_MATCH for tx, ty in true) for x, y in mine)
                if right and 2 * right >= len(mine):
                    canonical = next(p["label"] for p in truth if p["label"].lower() == name)
                    credit[canonical] = credit.get(canonical, 0) + 1
        return files, credit

    def _read_points(self, answer: str, payload: str) -> list[tuple[str, float, float]]:
        """An example's label as shown in the request, normalised; [] when it is not a points answer."""
        try:
            value = extract_json(answer)
            items = value["points"] if isinstance(value, dict) else value
            if self.coordinates == "pixels":
                w, h = Image.open(io.BytesIO(base64.b64decode(payload))).size
            else:
                w = h = 1000.0 if self.coordinates == "per_mille" else 1.0
            return [(str(p["label"]).strip().lower(), float(p["x"]) / w, float(p["y"]) / h) for p in items]
        except (AnswerError, KeyError, TypeError, ValueError, OSError):
            return []

    def _answer(self, index: int | None, credit: dict[str, int] | None = None) -> dict:
        if index is None:
            return {"points": []}
        record = self.truth.records[index]
        label = record["label"]
        if "points" not in label:
            return label
        rng = random.Random(f"{self.settings.seed}-{record['file']}")
        zero_shot = random.Random(f"{self.settings.seed}-{record['file']}-zero-shot")  # its own stream
        classes = self.truth.classes
        s = self.settings
        credit = credit or {}
        points = []
        for p in label["points"]:
            if rng.random() < s.miss_rate:
                continue
            name = p["label"]
            if rng.random() < s.label_flip_rate and len(classes) > 1:
                name = rng.choice([c for c in classes if c != name])
            x = min(1.0, max(0.0, p["x"] + rng.gauss(0, s.jitter)))
            y = min(1.0, max(0.0, p["y"] + rng.gauss(0, s.jitter)))
            # the zero-shot weakness, lessened by examples; drawn whatever the rates, so that the draws of
            # an image are the same with and without examples
            u_miss, u_flip, u_pick = zero_shot.random(), zero_shot.random(), zero_shot.random()
            learnt = (1 - s.example_gain) ** credit.get(p["label"], 0)
            if u_miss < s.zero_shot_miss.get(p["label"], 0.0) * learnt:
                continue
            others = [c for c in classes if c != name]
            if name == p["label"] and others and u_flip < s.zero_shot_flip.get(p["label"], 0.0) * learnt:
                name = others[int(u_pick * len(others))]
            points.append((name, x, y))
        extra = np.random.default_rng(rng.randrange(2**32)).poisson(s.false_positives)
        for _ in range(int(extra)):
            points.append((rng.choice(classes), rng.uniform(0.05, 0.95), rng.uniform(0.05, 0.95)))
        w, h = record.get("width", 1), record.get("height", 1)
        return {"points": [{"label": n, **self._coords(x, y, w, h)} for n, x, y in points]}

    def _coords(self, x: float, y: float, w: int, h: int) -> dict:
        if self.coordinates == "per_mille":
            return {"x": round(x * 1000), "y": round(y * 1000)}
        if self.coordinates == "pixels":
            return {"x": round(x * w, 1), "y": round(y * h, 1)}
        return {"x": round(x, 4), "y": round(y, 4)}


def _read_request(body: dict) -> tuple[str, str, list[str], list[tuple[str, str | None]]]:
    """(model, all text, images, examples): the examples are the images before the last one, each with
    the first text that follows it (its label), or None."""
    model = body["model"]
    texts, images = [], []
    after: dict[int, str] = {}  # image index -> first text after it
    for message in body["messages"]:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            if part.get("type") == "text":
                texts.append(part["text"])
                if images and len(images) - 1 not in after:
                    after[len(images) - 1] = part["text"]
            elif part.get("type") == "image_url":
                url = part["image_url"]["url"]
                if not url.startswith("data:") or ";base64," not in url:
                    raise ValueError("images must be base64 data URLs")
                images.append(url.split(";base64,", 1)[1])
    shots = [(image, after.get(i)) for i, image in enumerate(images[:-1])]
    return model, "\n".join(texts), images, shots


def _completion(model: str, content: str) -> dict:
    return {
        "id": f"chatcmpl-sim-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": f"{model} ({MODEL_NAME})",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def _error(status: int, message: str, code: str, headers: dict | None = None) -> tuple[int, dict, dict[str, str]]:
    return status, {"error": {"message": message, "type": code, "code": code}}, headers or {}


class _ChatRoute:
    """POST /v1/chat/completions as a bare ASGI app in front of the FastAPI app that serves the rest. The
    framework's routing, middleware and response classes cost more CPU per request than the answer itself
    (py-spy: two thirds of 0.85 ms a request), and on a small machine the simulator's CPU is taken from the
    client it stands in front of."""

    PATH = "/v1/chat/completions"

    def __init__(self, app, handle) -> None:
        self.app, self.handle = app, handle

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != self.PATH:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            status, error, headers = _error(405, "Method Not Allowed", "method_not_allowed", {"allow": "POST"})
            await self._send(send, status, orjson.dumps(error), headers)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        await self._send(send, *await self.handle(b"".join(chunks)))

    @staticmethod
    async def _send(send, status: int, body: bytes, headers: dict[str, str]) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            *((name.encode(), value.encode()) for name, value in headers.items())]})
        await send({"type": "http.response.body", "body": body})


# A field whose name carries its unit keeps the flag users know.
_FLAGS = {"latency_s": "--latency"}


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per field of SimulatedTeacherSettings, with the field's description and default: the model is
    the one source of both. A flag left out keeps the model's default (or the --settings value)."""
    for name, info in SimulatedTeacherSettings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        described = f"{info.description or name.replace('_', ' ').capitalize() + '.'} (default: {default})"
        described = described.replace("%", "%%")  # argparse formats help with %
        flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
        if typing.get_origin(info.annotation) is dict:
            parser.add_argument(flag, dest=name, action="append", type=_class_rate, metavar="CLASS=RATE",
                                default=argparse.SUPPRESS, help=described + " Repeatable.")
        else:
            parser.add_argument(flag, dest=name, type=info.annotation, default=argparse.SUPPRESS, help=described,
                                metavar=flag[2:].upper().replace("-", "_"))


def _settings_from_args(args: argparse.Namespace) -> SimulatedTeacherSettings:
    """--settings JSON (else the defaults), with the flags given on top; a ValidationError names a bad field."""
    given = {name: dict(value) if isinstance(value, list) else value for name, value in vars(args).items()
             if name in SimulatedTeacherSettings.model_fields}
    base = SimulatedTeacherSettings.model_validate_json(args.settings) if args.settings else SimulatedTeacherSettings()
    return SimulatedTeacherSettings.model_validate({**base.model_dump(), **given})


def _class_rate(text: str) -> tuple[str, float]:
    name, sep, rate = text.partition("=")
    try:
        if not sep or not name.strip():
            raise ValueError
        return name.strip(), float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CLASS=RATE, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="raydar teacher serve", description="Run the simulated teacher.")
    parser.add_argument("--ground-truth", required=True, help="Folder with the images and ground_truth.jsonl.")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port.")
    parser.add_argument("--coordinates", default="normalized", choices=["normalized", "per_mille", "pixels"])
    parser.add_argument("--settings", default=None, metavar="JSON",
                        help="All the settings below as one JSON object (SimulatedTeacherSettings); the flags "
                        "override it.")
    _add_settings_flags(parser)
    parser.add_argument("--fault", action="append", default=[], metavar="KIND[:k=v,...]",
                        help=f"Inject a fault; kinds: {', '.join(FAULT_KINDS)}. Repeatable.")
    args = parser.parse_args(argv)
    try:
        settings = _settings_from_args(args)
    except ValueError as e:  # pydantic's ValidationError names the field
        parser.error(str(e))
    try:
        teacher = SimulatedTeacher(args.ground_truth, settings, [Fault.parse(f) for f in args.fault],
                                   coordinates=args.coordinates, port=args.port)
    except ValueError as e:
        parser.error(str(e))
    try:
        teacher.serve_forever(ready=lambda: print(f"simulated teacher (not a real model) listening on "
                                                  f"{teacher.base_url}", flush=True))
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
