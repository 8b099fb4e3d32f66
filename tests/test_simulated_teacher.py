"""The simulated teacher as users start it (`raydar teacher serve`), spoken to over real HTTP with the
official `openai` client and with httpx: the protocol, the noise, the faults and the request log."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from raydar.teacher.simulated import MODEL_NAME
from tests.conftest import ground_truth_files


@pytest.fixture
def served(demo_folder):
    """`raydar teacher serve` in its own process, with a fault on every image's first request."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "teacher", "serve", "--ground-truth", str(demo_folder), "--port", "0",
         "--latency", "0", "--miss-rate", "0", "--false-positives", "0", "--jitter", "0", "--label-flip-rate", "0",
         "--coordinates", "per_mille", "--fault", "rate_limit:per_image=1,retry_after_s=7"],
        stdout=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline()
    assert "simulated teacher (not a real model) listening on http://127.0.0.1:" in line
    yield line.rsplit(" ", 1)[1].strip()
    proc.terminate()
    proc.wait(timeout=10)


def _message(image: bytes, text: str = "Find every cell.") -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]


def test_openai_client_gets_ground_truth_after_a_429_with_retry_after(served, demo_folder):
    first = ground_truth_files(demo_folder)[0]
    image = (demo_folder / first).read_bytes()
    truth = json.loads((demo_folder / "ground_truth.jsonl").open().readline())["label"]["points"]

    raw = httpx.post(f"{served}/chat/completions", json={"model": "m", "messages": _message(image)})
    assert raw.status_code == 429 and raw.headers["retry-after"] == "7"

    client = openai.OpenAI(base_url=served, api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model="teacher-x", messages=_message(image, "second try"))
    assert MODEL_NAME in answer.model
    points = json.loads(answer.choices[0].message.content)["points"]  # no noise: exactly the truth, 0-1000
    assert [(p["label"], p["x"], p["y"]) for p in points] == [
        (p["label"], round(p["x"] * 1000), round(p["y"] * 1000)) for p in truth
    ]
    log = httpx.get(served.replace("/v1", "/_simulator/log")).json()["requests"]
    assert [(e["image"], e["status"], e["fault"]) for e in log] == [(first, 429, "rate_limit"), (first, 200, None)]
    assert log[1]["model"] == "teacher-x" and log[1]["prompt"] == "second try"
    assert [m.id for m in client.models.list()] == [MODEL_NAME]


def test_an_unknown_image_gets_an_empty_answer_and_bad_requests_a_400(served):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 200, 0)).save(buf, format="PNG")
    reply = httpx.post(f"{served}/chat/completions", json={"model": "m", "messages": _message(buf.getvalue())})
    assert reply.status_code == 200 and json.loads(reply.json()["choices"][0]["message"]["content"]) == {"points": []}
    bad = httpx.post(f"{served}/chat/completions", json={"model": "m", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]}]})
    assert bad.status_code == 400 and "base64" in bad.json()["error"]["message"]
    # the chat route is bare ASGI (no framework around it): it answers malformed bodies itself, as 400s
    not_an_image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}
    for body in (b"{not json", b"[1, 2]", b'{"model": "m", "messages": [{"role": "user", "content": [7]}]}',
                 json.dumps({"model": "m", "messages": [not_an_image]}).encode()):
        reply = httpx.post(f"{served}/chat/completions", content=body, headers={"content-type": "application/json"})
        assert reply.status_code == 400 and reply.json()["error"]["message"].startswith("bad request: "), body
    assert httpx.get(f"{served}/chat/completions").status_code == 405
    assert httpx.get(f"{served}/models").status_code == 200  # the server is still up


@pytest.mark.parametrize("kind", ["server_error", "malformed_json", "prose", "hang"])
def test_each_fault_looks_as_it_would_from_a_real_endpoint(demo_folder, kind):
    from raydar.spec import SimulatedTeacherSettings
    from raydar.teacher.simulated import Fault, SimulatedTeacher

    image = (demo_folder / ground_truth_files(demo_folder)[0]).read_bytes()
    with SimulatedTeacher(demo_folder, SimulatedTeacherSettings(latency_s=0), [Fault(kind, per_image=1, hang_s=5)]) as sim:
        start = time.monotonic()
        try:
            reply = httpx.post(f"{sim.base_url}/chat/completions", json={"model": "m", "messages": _message(image)},
                               timeout=1.0)
        except httpx.ReadTimeout:
            reply = None
        elapsed = time.monotonic() - start
        again = httpx.post(f"{sim.base_url}/chat/completions", json={"model": "m", "messages": _message(image)})
    if kind == "hang":
        assert reply is None and elapsed >= 1.0
    elif kind == "server_error":
        assert reply.status_code == 500
    else:
        content = reply.json()["choices"][0]["message"]["content"]
        if kind == "malformed_json":
            with pytest.raises(json.JSONDecodeError):
                json.loads(content)
        else:
            assert content.startswith("Sure!") and "```json" in content
    assert json.loads(again.json()["choices"][0]["message"]["content"])["points"]  # the next request is clean


def test_several_workers_share_the_port_the_concurrency_cap_and_the_log(demo_folder):
    """`--workers 3`: the answers are the same, the cap of 4 holds across the processes (12 requests of
    0.3 s take three rounds), the log merges every worker's requests in time order, and stopping ends
    every worker."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "teacher", "serve", "--ground-truth", str(demo_folder), "--port", "0",
         "--latency", "0.3", "--max-concurrency", "4", "--workers", "3", "--miss-rate", "0", "--false-positives",
         "0", "--jitter", "0", "--label-flip-rate", "0"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        url = proc.stdout.readline().rsplit(" ", 1)[1].strip()
        files = ground_truth_files(demo_folder)[:12]
        truth = {json.loads(line)["file"]: json.loads(line)["label"]["points"]
                 for line in (demo_folder / "ground_truth.jsonl").open()}

        async def ask(name: str) -> httpx.Response:
            async with httpx.AsyncClient(timeout=30) as client:  # a connection each: the workers share them out
                return await client.post(f"{url}/chat/completions",
                                         json={"model": "m", "messages": _message((demo_folder / name).read_bytes())})

        async def ask_all() -> list[httpx.Response]:
            return await asyncio.gather(*[ask(name) for name in files])

        asyncio.run(ask_all())  # every worker up and warm
        httpx.post(url.replace("/v1", "/_simulator/reset"))
        start = time.perf_counter()
        answers = asyncio.run(ask_all())
        elapsed = time.perf_counter() - start
        for name, answer in zip(files, answers):
            points = json.loads(answer.json()["choices"][0]["message"]["content"])["points"]
            assert [(p["label"], p["x"], p["y"]) for p in points] == [
                (p["label"], round(p["x"], 4), round(p["y"], 4)) for p in truth[name]]
        assert elapsed >= 0.85, f"12 requests, 4 slots of 0.3 s: three rounds, not {elapsed:.2f} s"
        log = httpx.get(url.replace("/v1", "/_simulator/log")).json()
        assert sorted(e["image"] for e in log["requests"]) == sorted(files)
        assert log["peak_concurrency"] == 4  # counted since the reset, across the workers
        times = [e["time"] for e in log["requests"]]
        assert times == sorted(times)
        workers = {e["worker"] for e in log["requests"]}
        assert len(workers) > 1 and proc.pid not in workers  # a socket each: the connections spread
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_worker_that_dies_ends_the_server_with_an_error(demo_folder):
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "teacher", "serve", "--ground-truth", str(demo_folder), "--port", "0",
         "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        proc.stdout.readline()
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        deadline = time.monotonic() + 30
        while len(children.read_text().split()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(int(children.read_text().split()[0]), signal.SIGKILL)
        assert proc.wait(timeout=30) != 0  # not a server answering on half its workers as if all were well
        assert "a worker of the simulated teacher ended (exit code -9)" in proc.stderr.read()
    finally:
        proc.kill()


def test_faults_need_a_single_worker(demo_folder):
    result = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "teacher", "serve", "--ground-truth", str(demo_folder), "--port", "0",
         "--workers", "2", "--fault", "prose:per_image=1"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2 and "use one worker (workers=1) with faults" in result.stderr
