"""The detection endpoint on a real local Ray Serve, over real HTTP (httpx on 127.0.0.1).

One Serve application for the module (start-up is slow on 2 cores): the fine-tuned member is the tiny
test student (it always answers one point), the RAG member asks the *simulated* teacher (answers from
the demo's ground truth) with examples from a real Chroma knowledge base. Tests that break things (a
burst, a killed replica, a redeploy) come last.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import shutil
import statistics
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from PIL import Image

from cluster import StorageRoot, connect
from jobs.index import index_labels
from jobs.label import FEEDBACK_MODEL, label_feedback, label_images
from raydar.sources import read_ground_truth
from raydar.feedback import FeedbackLog
from raydar.labels import LabelStore
from raydar.metrics import score
from raydar.spec import load_spec
from serving.api import DetectResponse
from serving.app import build_app
from serving.args import ServeArgs
from serving.ingress import read_token
from tests.conftest import DEMO_SPEC, REPO, STUDENT_ANSWER, start_teacher

APP = "raydar"
TOKEN = "test-token-5f1c0a"
LABELLED = 30  # the first 30 demo images are labelled and in the knowledge base; the other 10 are new


class Served:
    def __init__(self, url, args, spec, storage, demo_folder, truth, v1) -> None:
        self.url, self.args, self.spec, self.storage = url, args, spec, storage
        self.demo_folder, self.truth, self.v1 = demo_folder, truth, v1

    def image(self, i: int) -> bytes:
        return (self.demo_folder / self.truth[i]["file"]).read_bytes()

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_folder, student_checkpoint):
    teacher = start_teacher(demo_folder, latency_s=0.01)  # the RAG member's VLM (a simulator)
    storage = StorageRoot(tmp_path_factory.mktemp("serving") / "store")
    overrides = {"images.uri": str(demo_folder), "images.generate": None, "teacher.base_url": teacher.base_url,
                 "teacher.timeout_s": 5, "teacher.backoff_s": 0.05,
                 "serving.weights": {"finetuned": 1.0, "rag": 1.0}}  # the fusion arithmetic below assumes equal weights
    spec = load_spec(DEMO_SPEC, overrides=overrides)
    connect(num_cpus=8)  # logical CPUs: room for a redeploy's surge replicas beside the running ones
    assert label_images(spec, storage, limit=LABELLED, progress=False).ok_new == LABELLED
    index_labels(spec, storage)
    token_file = tmp_path_factory.mktemp("secrets") / "token"
    token_file.write_text(TOKEN + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "spec": str(DEMO_SPEC), "set": overrides, "storage": storage.uri,
        "adapters": {"v1": str(student_checkpoint)}, "token_env": "RAYDAR_TEST_UNSET_TOKEN",
        "token_file": str(token_file), "max_request_bytes": 1_000_000, "max_image_pixels": 1_000_000,
        "request_timeout_s": 20, "member_timeout_s": 8, "max_new_tokens": 40, "batch_wait_timeout_s": 0.05,
        "feedback": {"flush_s": 0.3},
        "ingress": {"max_ongoing_requests": 4, "max_queued_requests": 4, "num_cpus": 0.5},
        "finetuned": {"max_ongoing_requests": 8, "max_queued_requests": 32, "num_cpus": 1},
        "rag": {"max_ongoing_requests": 16, "num_cpus": 0.5},
    }
    serve.run(build_app(args), name=APP, route_prefix="/")
    yield Served(f"http://127.0.0.1:{port}", args, spec, storage, demo_folder, read_ground_truth(demo_folder),
                 student_checkpoint)
    serve.shutdown()
    ray.shutdown()
    teacher.stop()


def detect(client: httpx.Client, data: bytes, **params) -> httpx.Response:
    return client.post("/v1/detect", files={"image": ("cells.png", data, "image/png")}, params=params)


# ---------------------------------------------------------------- answers


@pytest.mark.slow
def test_fused_results_on_demo_images(served):
    predictions, truths = [], []
    with served.client() as client:
        for i in range(4):
            response = detect(client, served.image(i))
            assert response.status_code == 200, response.text
            body = DetectResponse.model_validate(response.json())
            tuned, rag = body.members["finetuned"], body.members["rag"]
            assert (tuned.status, rag.status) == ("ok", "ok") and not body.degraded
            assert tuned.raw == STUDENT_ANSWER and tuned.adapter == "v1" and tuned.adapter_version.startswith("sha256:")
            assert tuned.model == "raydar-tiny-qwen2-vl" and rag.model == "raydar-simulated-teacher"
            assert rag.examples and body.image_id not in rag.examples  # the query is never its own example
            # Fusion: each member weighs 1; a point only RAG found has score 1.0 / 2, the student's lone point
            # (scored from its token probabilities, ~0.004) falls under the spec's 0.3 threshold.
            assert all(p["score"] == pytest.approx(0.5, abs=0.01) for p in body.fused["points"])
            assert len(body.fused["points"]) == len(rag.label["points"])
            assert body.agreement is not None and body.agreement < 0.5 and body.hard_example
            predictions.append(body.fused)
            truths.append(served.truth[i]["label"])
    # The fused answer is as good as the (simulated) RAG member's: the student added no wrong point.
    assert score(served.spec.task, predictions, truths)["detection"]["f1"] >= 0.8


@pytest.mark.slow
def test_json_base64_and_raw_bodies_answer_alike(served):
    data = served.image(5)
    with served.client() as client:
        by_json = client.post("/v1/detect", json={"image": base64.b64encode(data).decode(), "adapter": "v1"})
        by_data_url = client.post("/v1/detect", json={"image": "data:image/png;base64," + base64.b64encode(data).decode()})
        by_body = client.post("/v1/detect", content=data, headers={"Content-Type": "image/png"})
    fused = [r.json()["fused"] for r in (by_json, by_data_url, by_body)]
    assert all(r.status_code == 200 for r in (by_json, by_data_url, by_body))
    assert fused[0] == fused[1] == fused[2]
    assert by_json.json()["image_id"] == by_body.json()["image_id"]


@pytest.mark.slow
def test_concurrent_requests_are_batched(served):
    async def burst():
        async with httpx.AsyncClient(base_url=served.url, headers={"Authorization": f"Bearer {TOKEN}"},
                                     timeout=60) as client:
            return await asyncio.gather(*[client.post("/v1/detect", files={"image": ("c.png", served.image(i))})
                                          for i in range(4)])

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 4
    assert max(r.json()["members"]["finetuned"]["batch_size"] for r in responses) > 1


@pytest.mark.slow
def test_a_lone_request_starts_its_batch_at_once_and_a_busy_student_waits_to_fill_one(served):
    """With a batch wait of 3 s: a request that finds the student idle is answered well within it; requests
    arriving while it is busy wait for the batch to fill (here: until the burst is in)."""
    from ray import serve

    args = {**served.args, "members": ["finetuned"], "batch_wait_timeout_s": 3.0, "max_batch_size": 8}
    try:
        serve.run(build_app(args), name="slowfill", route_prefix="/slowfill")
        handle = serve.get_deployment_handle("FineTunedMember", app_name="slowfill")
        handle.detect.remote(served.image(0)).result(timeout_s=60)  # the adapter is loaded
        started = time.monotonic()
        lone = handle.detect.remote(served.image(1)).result(timeout_s=60)
        assert lone["batch_size"] == 1 and time.monotonic() - started < 2.0

        async def burst():
            first = handle.detect.remote(served.image(2))  # finds the student idle: a batch of 1, at once
            await asyncio.sleep(0.2)
            # together: the first of these may find it idle again, the others find it busy and wait
            rest = [handle.detect.remote(served.image(i)) for i in range(3, 8)]
            return await asyncio.gather(first, *rest)

        started = time.monotonic()
        answers = asyncio.run(burst())
        assert answers[0]["batch_size"] == 1
        assert max(a["batch_size"] for a in answers[1:]) >= 3, [a["batch_size"] for a in answers]
        assert time.monotonic() - started >= 2.5  # the busy student's batch waited to fill
    finally:
        serve.delete("slowfill")


@pytest.mark.slow
def test_requests_that_arrive_while_a_batch_runs_go_together_in_the_next_one(served):
    """No batch wait at all: the first of a burst finds the student idle and starts a batch at once; the rest
    arrive while it runs and wait for it to end, then go in one batch, not in small ones queued behind it.
    Each answer's batch_size says how many shared its batch, so the sum of 1 / batch_size counts the batches."""
    from ray import serve

    args = {**served.args, "members": ["finetuned"], "batch_wait_timeout_s": 0.0, "max_batch_size": 8}
    try:
        serve.run(build_app(args), name="nowait", route_prefix="/nowait")
        handle = serve.get_deployment_handle("FineTunedMember", app_name="nowait")
        handle.detect.remote(served.image(0)).result(timeout_s=60)  # the adapter is loaded

        async def burst():
            return await asyncio.gather(*[handle.detect.remote(served.image(i)) for i in range(1, 8)])

        sizes = [a["batch_size"] for a in asyncio.run(burst())]
        assert round(sum(1 / s for s in sizes)) <= 2, sizes
        assert max(sizes) >= 4, sizes
    finally:
        serve.delete("nowait")


# ---------------------------------------------------------------- the documented API and its guards


@pytest.mark.slow
def test_the_documented_api(served):
    with served.client(token=None) as anonymous:
        spec = anonymous.get("/openapi.json").json()  # docs are public: they hold no data
        assert anonymous.get("/docs").status_code == 200
    assert {"/v1/detect", "/v1/feedback", "/v1/models", "/v1/stats", "/healthz", "/readyz"} <= set(spec["paths"])
    body = spec["paths"]["/v1/detect"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert spec["paths"]["/v1/detect"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "DetectResponse" in spec["components"]["schemas"]
    with served.client() as client:
        models = client.get("/v1/models").json()
        assert models["task"] == "points" and models["members"]["finetuned"]["adapters"] == ["v1"]
        assert models["members"]["rag"]["knowledge_base_entries"] == LABELLED
        assert client.get("/readyz").json() == {"ready": True, "members": {"finetuned": "ready", "rag": "ready"}}


@pytest.mark.slow
def test_auth(served, monkeypatch, tmp_path):
    with served.client(token=None) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/readyz").status_code == 200
        for path in ("/v1/models", "/v1/stats"):
            response = anonymous.get(path)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert detect(anonymous, served.image(0)).status_code == 401
    with served.client(token=TOKEN + "x") as wrong:
        assert wrong.get("/v1/models").status_code == 401
        assert wrong.post("/v1/feedback", json={}).status_code == 401
    with served.client(token=TOKEN) as right:
        assert right.get("/v1/models").status_code == 200
    # the token: the environment variable first, else the secret file, never the config
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    monkeypatch.setenv("RAYDAR_TEST_TOKEN", "from-env")
    assert read_token("RAYDAR_TEST_TOKEN", str(secret)) == "from-env"
    monkeypatch.delenv("RAYDAR_TEST_TOKEN")
    assert read_token("RAYDAR_TEST_TOKEN", str(secret)) == "from-file"
    with pytest.raises(RuntimeError, match=r"set \$RAYDAR_TEST_TOKEN or the file"):
        read_token("RAYDAR_TEST_TOKEN", str(tmp_path / "missing"))


def _png(size: tuple[int, int], mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_every_bad_input_gets_its_status_and_the_replicas_stay_healthy(served):
    good = served.image(0)
    bomb = _png((1500, 1500))  # 2.25 M pixels in a few kB: over the 1 M limit, refused from its header
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")

    def chunks():
        for _ in range(12):
            yield b"\0" * 100_000

    cases = [
        ("body over the size limit", 413, "over the limit", dict(content=b"\x89PNG" + b"\0" * 1_200_000,
                                                                 headers={"Content-Type": "image/png"})),
        ("chunked body over the limit", 413, "over the limit", dict(content=chunks(),
                                                                    headers={"Content-Type": "image/png"})),
        ("decompression bomb", 413, "2,250,000 pixels", dict(files={"image": ("bomb.png", bomb)})),
        ("gif", 415, "gif images are not accepted", dict(files={"image": ("a.gif", gif.getvalue())})),
        ("not an image", 415, "not an image", dict(files={"image": ("a.png", b"hello, not an image")})),
        ("truncated png", 400, "truncated", dict(files={"image": ("a.png", good[: len(good) // 2])})),
        ("wrong content type", 415, "content type", dict(content=b"hello", headers={"Content-Type": "text/plain"})),
        ("malformed json", 400, "malformed JSON", dict(content=b'{"image": ', headers={"Content-Type": "application/json"})),
        ("bad base64", 400, "not valid base64", dict(json={"image": "not*base64!"})),
        ("missing field", 400, "image: Field required", dict(json={"adapter": "v1"})),
        ("a url to fetch", 400, "URLs are not fetched", dict(json={"image": "https://example.com/cell.png"})),
        ("a url field", 400, "URLs are not fetched", dict(json={"url": "https://example.com/cell.png"})),
        ("multipart without image", 400, "file field `image`", dict(files={"picture": ("a.png", good)})),
        ("unknown adapter", 404, "no adapter 'v9'", dict(files={"image": ("a.png", good)}, params={"adapter": "v9"})),
        ("empty image body", 400, "empty body", dict(content=b"", headers={"Content-Type": "image/png"})),
    ]
    with served.client() as client:
        for name, status, reason, request in cases:
            response = client.post("/v1/detect", **request)
            assert response.status_code == status, (name, response.text)
            assert reason in response.json()["error"]["message"], (name, response.text)
        feedback = client.post("/v1/feedback", json={"image_id": "abc", "label": {"points": []}})
        assert feedback.status_code == 400 and "sha256" in feedback.text
        assert client.get("/readyz").status_code == 200
        assert detect(client, good).status_code == 200  # every replica still answers
        stats = client.get("/v1/stats").json()
    assert stats["requests"]["by_status"]["413"] >= 3 and stats["requests"]["by_status"]["415"] >= 3


# ---------------------------------------------------------------- the feedback loop


@pytest.mark.slow
def test_feedback_rows_are_logged_and_become_training_data(served):
    new = list(range(LABELLED, LABELLED + 3))  # images the labels and the knowledge base do not hold yet
    with served.client() as client:
        answers = [detect(client, served.image(i)).json() for i in new]
        corrected = answers[0]
        truth = served.truth[new[0]]["label"]
        response = client.post("/v1/feedback", json={"image_id": corrected["image_id"], "label": truth,
                                                     "request_id": corrected["request_id"], "comment": "two missed"})
        assert response.status_code == 202, response.text
        assert response.json()["training_samples"] >= 3
        unknown = client.post("/v1/feedback", json={"image_id": "0" * 64, "label": truth})
        assert unknown.status_code == 404 and "send it in `image`" in unknown.text
        made_up = client.post("/v1/feedback", json={"image_id": corrected["image_id"], "label": truth,
                                                    "request_id": "f" * 32})
        assert made_up.status_code == 404 and made_up.json()["error"]["code"] == "unknown_request"
        another = client.post("/v1/feedback", json={"image_id": corrected["image_id"], "label": truth,
                                                   "request_id": answers[1]["request_id"]})
        assert another.status_code == 400 and "another image" in another.text
    log = FeedbackLog(served.storage.child("demo_cells", "feedback"))
    deadline = time.monotonic() + 10
    while {a["request_id"] for a in answers} - set(log.read()["request_id"].to_pylist()):
        assert time.monotonic() < deadline, "detection rows were not written"
        time.sleep(0.2)
    table = log.read().to_pylist()
    rows = {r["request_id"]: r for r in table if r["kind"] == "detection"}
    for answer in answers:
        row = rows[answer["request_id"]]
        assert row["image_id"] == answer["image_id"]
        assert json.loads(row["fused"]) == answer["fused"]
        assert json.loads(row["members"]) == {n: m["label"] for n, m in answer["members"].items()}
        assert row["hard"] is answer["hard_example"] is True
        assert row["adapter"] == f"v1@{answer['members']['finetuned']['adapter_version']}"
        assert log.root.read_bytes("images", row["image_file"]) == served.image(new[answers.index(answer)])
    [feedback] = [r for r in table if r["kind"] == "feedback"]
    assert feedback["request_id"] == corrected["request_id"] and feedback["comment"] == "two missed"
    assert json.loads(feedback["label"])["points"][0]["x"] == pytest.approx(truth["points"][0]["x"])

    result = label_feedback(served.spec, served.storage, progress=False)  # `raydar label --from-feedback`
    assert result.new_corrections == 1
    assert result.labelled.ok_new == 2  # the two uncorrected new images went to the teacher
    labels = {r["image_id"]: r for r in LabelStore(served.storage.child("demo_cells", "labels")).read_labels()
              .to_pylist()}
    assert all(a["image_id"] in labels for a in answers)
    mine = labels[corrected["image_id"]]
    assert mine["teacher_model"] == FEEDBACK_MODEL and len(json.loads(mine["label"])["points"]) == len(truth["points"])
    again = label_feedback(served.spec, served.storage, progress=False)
    assert again.new_corrections == 0 and again.labelled.ok_new == 0  # nothing twice


# ---------------------------------------------------------------- overload, failures, redeploys


@pytest.mark.slow
def test_a_burst_over_the_limits_gets_503_and_recovers(served):
    async def burst():
        async with httpx.AsyncClient(base_url=served.url, headers={"Authorization": f"Bearer {TOKEN}"},
                                     timeout=60, limits=httpx.Limits(max_connections=100)) as client:
            return await asyncio.gather(*[client.post("/v1/detect", files={"image": ("c.png", served.image(i % 8))})
                                          for i in range(40)])

    statuses = [r.status_code for r in asyncio.run(burst())]
    assert set(statuses) <= {200, 503} and statuses.count(503) >= 20 and statuses.count(200) >= 4, statuses
    with served.client() as client:
        assert client.get("/readyz").status_code == 200
        assert detect(client, served.image(1)).status_code == 200


class Load:
    """Closed-loop load from `clients` threads until stopped: (sent, answered, status, body) of every request."""

    def __init__(self, served: Served, clients: int = 2) -> None:
        self.served, self.answers, self.stop = served, [], threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(k,)) for k in range(clients)]

    def _run(self, k: int) -> None:
        with self.served.client() as client:
            i = k
            while not self.stop.is_set():
                sent = time.monotonic()
                response = detect(client, self.served.image(i % 8))
                self.answers.append((sent, time.monotonic(), response.status_code,
                                     response.json() if response.status_code == 200 else response.text))
                i += 1

    def wait_for(self, answered, what: str, timeout_s: float = 90) -> float:
        """When the first answer meeting `answered(sent, status, body)` came back; fails after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            times = [t for sent, t, s, b in list(self.answers) if answered(sent, s, b)]
            if times:
                return min(times)
            time.sleep(0.2)
        raise AssertionError(f"no {what} within {timeout_s} s: {[(s, b) for *_, s, b in self.answers][-5:]}")

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


@pytest.mark.slow
def test_a_member_killed_under_load_degrades_answers_and_the_endpoint_keeps_answering(served):
    from ray import serve

    def student_ok(status, body) -> bool:
        return status == 200 and body["members"]["finetuned"]["status"] == "ok" and not body["degraded"]

    with Load(served) as load:
        load.wait_for(lambda t, s, b: student_ok(s, b), "answer from the student")
        [replica] = [a for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].startswith(f"SERVE_REPLICA::{APP}#FineTunedMember#")]
        killed = time.monotonic()
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
        # The ingress's adapter registry (kept 2 s) goes stale while the student has no live replica:
        # /v1/models falls back on the last one known rather than waiting for the replacement.
        time.sleep(2.5)
        with served.client() as client:
            models = client.get("/v1/models")
        assert models.status_code == 200 and models.json()["members"]["finetuned"]["adapters"] == ["v1"], models.text
        assert models.elapsed.total_seconds() < 5, models.elapsed  # at most 2 s waiting for a fresher registry
        # A replacement needs seconds to load the model, so a student answer to a request sent half a
        # second after the kill comes from the replacement, not from the replica being killed.
        back = load.wait_for(lambda sent, s, b: sent > killed + 0.5 and student_ok(s, b),
                             "answer from the student's replacement")
        time.sleep(2)  # requests sent once the replacement has answered
    assert all(s == 200 for *_, s, _ in load.answers), [(s, b) for *_, s, b in load.answers if s != 200]
    # No request waits on the dead member longer than member_timeout_s, the adapter registry included.
    slowest = max(t - sent for sent, t, *_ in load.answers)
    assert slowest < served.args["member_timeout_s"] + 4, slowest
    after = [b for _, t, _, b in load.answers if t > killed]
    degraded = [b for b in after if b["degraded"]]
    # On a quiet machine the replacement can be up before any request needs it, and then no answer needs to
    # be degraded at all. Every answer is a 200 either way, and any degraded one must be RAG's alone.
    assert degraded or all(b["members"]["finetuned"]["status"] == "ok" for b in after), after
    for b in degraded:  # the student left out: the answer is RAG's alone, each point backed by all the weight left
        assert b["members"]["finetuned"]["status"] in ("failed", "timeout") and b["members"]["rag"]["status"] == "ok"
        assert len(b["fused"]["points"]) == len(b["members"]["rag"]["label"]["points"])
        assert all(p["score"] == 1.0 for p in b["fused"]["points"])
    # While the student has no live replica the ingress answers at once without it: a request sent during
    # the outage takes no more than a second longer than the usual answer, not the replacement's start-up.
    usual = statistics.median(t - sent for sent, t, *_ in load.answers if t < killed)
    outage = [round(t - sent, 2) for sent, t, *_ in load.answers if killed + 0.5 < sent and t < back]
    assert outage and all(latency <= usual + 1.0 for latency in outage), (usual, outage)
    # Requests still in flight when the replacement first answered may come back degraded later (they
    # waited on the dead replica); every request sent after that goes to the replacement.
    later = [(s, b) for sent, _, s, b in load.answers if sent > back]
    assert later and all(student_ok(s, b) for s, b in later), later
    assert serve.status().applications[APP].status == "RUNNING"


def version(checkpoint: Path) -> str:
    return "sha256:" + hashlib.sha256((checkpoint / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()[:12]


def _new_adapter_version(checkpoint: Path, folder: Path) -> Path:
    """A copy of the checkpoint with its LoRA B weights scaled by 1.01: another adapter version, same answers."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoint, folder)
    weights = folder / "adapter" / "adapter_model.safetensors"
    tensors = {k: v * 1.01 if "lora_B" in k else v for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    return folder


@pytest.mark.slow
def test_a_new_adapter_is_deployed_while_the_endpoint_keeps_answering(served, tmp_path):
    from ray import serve

    v2 = _new_adapter_version(served.v1, tmp_path / "v2")
    args = {**served.args, "adapters": {"v1": str(served.v1), "v2": str(v2)}, "default_adapter": "v2"}
    with Load(served) as load:
        load.wait_for(lambda t, status, body: status == 200, "answer before the redeploy")
        started = time.monotonic()
        serve.run(build_app(args), name=APP, route_prefix="/")  # a rolling update; old replicas serve until then
        deployed = time.monotonic()
        time.sleep(3)
    assert load.answers and all(s == 200 for *_, s, _ in load.answers), [s for *_, s, _ in load.answers]
    during = [b for _, t, _, b in load.answers if started <= t <= deployed]
    assert during, "no request was answered during the redeploy"
    assert all(b["members"]["finetuned"]["status"] == "ok" for b in during)
    before = [b["members"]["finetuned"] for _, t, _, b in load.answers if t < started]
    last = load.answers[-1][3]["members"]["finetuned"]
    assert before[0]["adapter"] == "v1" and before[0]["adapter_version"] == version(served.v1)
    assert last["adapter"] == "v2" and last["adapter_version"] == version(v2) != version(served.v1)
    with served.client() as client:
        assert client.get("/v1/models").json()["members"]["finetuned"]["adapters"] == ["v1", "v2"]
        assert detect(client, served.image(0), adapter="v1").json()["members"]["finetuned"]["adapter"] == "v1"


@pytest.mark.slow
def test_a_redeploy_without_room_for_surge_replicas_replaces_in_place_and_answers_every_request(served):
    """The student asks for more CPUs than are free beside its running replica: a rolling restart would wait
    forever for room; the builder replaces it in place instead, and the ensemble answers without it meanwhile."""
    from ray import serve

    free = ray.available_resources().get("CPU", 0.0)
    bigger = {**served.args, "finetuned": {**served.args["finetuned"], "num_cpus": free + 0.5}}
    assert free + 0.5 <= ray.cluster_resources()["CPU"] - 1  # it fits once the old replica is gone
    try:
        with Load(served) as load:
            load.wait_for(lambda t, status, body: status == 200, "answer before the redeploy")
            started = time.monotonic()
            serve.run(build_app(bigger), name=APP, route_prefix="/", blocking=False)
            deadline = time.monotonic() + 180
            while serve.status().applications[APP].status != "RUNNING" or time.monotonic() < started + 2:
                assert time.monotonic() < deadline, serve.status().applications[APP]
                time.sleep(0.5)
            deployed = time.monotonic()
            back = load.wait_for(lambda sent, s, b: sent > deployed and s == 200 and not b["degraded"],
                                 "an answer from both members after the redeploy")
        assert all(s == 200 for *_, s, _ in load.answers), [(s, b) for *_, s, b in load.answers if s != 200]
        assert deployed - started < 120 and back
        during = [b for _, t, _, b in load.answers if started <= t <= deployed]
        assert during and all(b["members"]["rag"]["status"] == "ok" for b in during)
    finally:
        serve.run(build_app(served.args), name=APP, route_prefix="/")  # back as the other tests expect it


# ---------------------------------------------------------------- configuration


def test_the_shipped_serve_config_is_valid():
    config = yaml.safe_load((REPO / "serving" / "serve_config.yaml").read_text())
    [app] = config["applications"]
    assert app["import_path"] == "serving.app:build_app"
    args = ServeArgs.model_validate(app["args"])
    assert args.default_adapter in args.adapters
    assert config["http_options"]["host"] == "127.0.0.1"


@pytest.mark.parametrize(("args", "message"), [
    ({"spec": "x.yaml", "batching": "sometimes"}, "batching"),
    ({"spec": "x.yaml", "adapters": {"v1": "/a"}, "default_adapter": "v2"}, "default_adapter 'v2' is not one of"),
    ({"spec": "x.yaml", "tokens": "abc"}, "tokens: Extra inputs are not permitted"),
    ({"spec": "x.yaml", "member_timeout_s": 60, "request_timeout_s": 30}, "must not exceed"),
], ids=["bad-type", "unknown-default", "unknown-field", "timeouts"])
def test_bad_args_are_refused_naming_the_field(args, message):
    with pytest.raises(ValueError, match=message):
        build_app(args)


@pytest.mark.slow
def test_detections_served_and_member_disagreement_reach_prometheus(served):
    """The endpoint's own metrics (ray.util.metrics) as the node's Prometheus endpoint exports them."""
    from prometheus_client.parser import text_string_to_metric_families

    with served.client() as client:
        assert detect(client, served.image(0)).status_code == 200
    port = ray.nodes()[0]["MetricsExportPort"]

    def samples(name: str, **tags) -> float:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in tags.items()))

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the agent exports what the replicas recorded every few seconds
        served_total = samples("ray_raydar_detections_served_total", dataset="demo_cells", member="fused")
        compared = samples("ray_raydar_member_disagreement_count", dataset="demo_cells")
        if served_total >= 1 and compared >= 1:
            break
        time.sleep(1)
    assert served_total >= 1 and compared >= 1, (served_total, compared)
