"""Serving load: the ensemble vs the fine-tuned member alone, and dynamic batching on vs off.

    python bench/serve_load.py                              # with the tiny test student (taught one answer)
    python bench/serve_load.py --checkpoint ~/.raydar/demo_cells/train/demo_cells-finetune --seconds 20

Four Serve applications side by side on one local Ray, behind the same ingress code and checks:
`/ensemble` (fine-tuned + RAG, fused), `/student` (the fine-tuned member alone, batching on),
`/student-nobatch` (batching off) and `/rag` (the RAG member alone). Closed-loop clients (each sends
its next request when the last is answered) at concurrency 1, 8 and 32 post demo images over HTTP on
127.0.0.1 for `--seconds` each; then the fine-tuned member alone through its deployment handle (no
proxy, no ingress), batching on and off. Printed: requests/s, p50/p99 latency, mean batch size and
the members' own p50 per point, and the machine's CPU per request (every process, this one included) with
the cores it kept busy; the ensemble's overhead at p50 over the student alone (target <= 15%),
over its slowest member, and over the slower of the two members served alone through the same
ingress; batching on/off throughput at concurrency 32 (target >= 2x), over HTTP and for the member
alone. The RAG member's VLM is the *simulated* teacher in its own process (`--rag-latency`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import psutil  # noqa: E402
from PIL import Image  # noqa: E402

from cluster import StorageRoot, connect  # noqa: E402
from jobs.index import index_labels  # noqa: E402
from jobs.label import label_images  # noqa: E402
from raydar.demo import make_demo_cells  # noqa: E402
from raydar.sources import read_ground_truth  # noqa: E402
from raydar.spec import load_spec  # noqa: E402
from raydar.teacher.launch import SimulatedTeacherProcess  # noqa: E402
from tests.conftest import teach_one_answer  # noqa: E402

SPEC = Path(__file__).resolve().parents[1] / "datasets" / "demo_cells.yaml"
TOKEN = "bench-token"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=60, help="Demo images (labelled, indexed, sent).")
    parser.add_argument("--checkpoint", default=None, help="A finetune checkpoint or run folder; default: the "
                        "tiny test student, taught here to give one answer in the task's format (~27 tokens).")
    parser.add_argument("--seconds", type=float, default=15.0, help="Load per application and concurrency.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=48, help="Longest student answer.")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--rag-latency", type=float, default=0.05, help="Seconds the simulated VLM takes.")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPU share of each student replica (three "
                        "applications each have one: at most 0.33 on one GPU).")
    parser.add_argument("--text-embedder", default=None, help="A local sentence-transformers folder for the "
                        "knowledge base's document vectors, instead of all-MiniLM-L6-v2 (the RAG member searches "
                        "by image; text vectors are only written when indexing).")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/raydar/bench"))
    args = parser.parse_args()

    folder = make_demo_cells(Path(args.cache) / f"serve-cells-{args.images}", n=args.images, size=224, seed=0)
    overrides = {"images.uri": str(folder), "images.generate": None, "teacher.simulated.latency_s": args.rag_latency}
    if args.text_embedder:
        overrides["knowledge_base.embedder"] = args.text_embedder
    connect(num_cpus=8)  # logical CPUs for placing the replicas; the machine's cores are what they are
    # The simulated VLM in a process of its own, as a real one would be: not sharing the load generator's GIL.
    with SimulatedTeacherProcess(load_spec(SPEC, overrides=overrides), str(folder)) as teacher_url:
        overrides["teacher.base_url"] = teacher_url
        run(args, folder, overrides)


def run(args, folder: Path, overrides: dict) -> None:
    spec = load_spec(SPEC, overrides=overrides)
    storage = StorageRoot(tempfile.mkdtemp(prefix="raydar-serve-bench-"))
    label_images(spec, storage, progress=False)
    index_labels(spec, storage)
    checkpoint = args.checkpoint or teach_one_answer(
        [Image.open(folder / r["file"]).convert("RGB") for r in read_ground_truth(folder)[:2]],
        Path(storage.path) / "student" / "checkpoint_000001")
    token_file = Path(storage.path) / "token"
    token_file.write_text(TOKEN)

    from ray import serve

    from serving.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = {
        "spec": str(SPEC), "set": overrides, "storage": storage.uri, "adapters": {"bench": str(checkpoint)},
        "token_env": "RAYDAR_BENCH_UNSET", "token_file": str(token_file), "max_new_tokens": args.max_new_tokens,
        "max_batch_size": args.max_batch_size, "request_timeout_s": 120, "member_timeout_s": 120,
        "ingress": {"max_ongoing_requests": 64, "max_queued_requests": 256, "num_cpus": 0.1},
        "finetuned": {"max_ongoing_requests": 2 * args.max_batch_size, "max_queued_requests": 256, "num_cpus": 1,
                      "num_gpus": args.num_gpus},
        "rag": {"max_ongoing_requests": 64, "max_queued_requests": 256, "num_cpus": 0.1},
    }
    apps = {
        "ensemble": {**base, "members": ["finetuned", "rag"]},
        "student": {**base, "members": ["finetuned"]},
        "rag": {**base, "members": ["rag"]},  # the other member alone: what the ensemble cannot beat
        "student-nobatch": {**base, "members": ["finetuned"], "batching": False},
    }
    for name, app_args in apps.items():
        serve.run(build_app(app_args), name=name, route_prefix=f"/{name}")

    images = [(folder / r["file"]).read_bytes() for r in read_ground_truth(folder)]
    url = f"http://127.0.0.1:{port}"
    results: dict[tuple[str, int], dict] = {}
    top = max(args.concurrency)
    for concurrency in args.concurrency:  # over HTTP, through the ingress, as clients see it
        for name in apps:
            if name == "student-nobatch" and concurrency != top:
                continue
            results[name, concurrency] = asyncio.run(closed_loop(http_sender(url, name), images, concurrency,
                                                                 args.seconds))
            show(name, concurrency, results[name, concurrency])
    # The member alone through its deployment handle: no proxy, no ingress, just the student and its batching.
    for name in ("student", "student-nobatch"):
        handle = serve.get_deployment_handle("FineTunedMember", app_name=name).options(
            multiplexed_model_id=str(checkpoint))
        for concurrency in args.concurrency:
            key = (f"{name.replace('student', 'member')} (handle)", concurrency)
            results[key] = asyncio.run(closed_loop(handle_sender(handle), images, concurrency, args.seconds))
            show(*key, results[key])
    serve.shutdown()
    report(results, args)


def http_sender(url: str, app: str):
    """Posts an image to an application's /v1/detect; returns (status, body)."""
    client = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300,
                               limits=httpx.Limits(max_connections=64))

    async def send(image: bytes) -> tuple[int, dict]:
        response = await client.post(f"/{app}/v1/detect", content=image, headers={"Content-Type": "image/png"})
        return response.status_code, response.json() if response.is_success else {}

    send.close = client.aclose
    return send


def handle_sender(handle):
    """Calls FineTunedMember.detect through a handle; its answer dressed as the endpoint's member result."""
    async def send(image: bytes) -> tuple[int, dict]:
        start = time.perf_counter()
        out = await handle.detect.remote(image)
        member = {"latency_ms": 1000 * (time.perf_counter() - start), "batch_size": out["batch_size"]}
        return 200, {"degraded": out["label"] is None, "members": {"finetuned": member}}

    async def close() -> None:
        return None

    send.close = close
    return send


def show(name: str, concurrency: int, r: dict) -> None:
    members = ", ".join(f"{m} {v:.0f} ms" for m, v in r["members"].items())
    print(f"  {name:24s} c={concurrency:<3d} {r['rps']:7.2f} req/s  p50 {r['p50']:7.1f} ms  p99 {r['p99']:7.1f} ms  "
          f"({r['n']} ok, {r['errors']} errors, {r['degraded']} degraded; mean batch {r['batch']:.1f}; "
          f"member p50 {members}; CPU {r['cpu_ms']:.0f} ms/request, {r['cores_busy']:.2f} cores busy)", flush=True)


async def closed_loop(send, images: list[bytes], concurrency: int, seconds: float) -> dict:
    """`concurrency` clients, each sending its next image as soon as the last is answered, for `seconds`."""
    latencies: list[float] = []
    batches: list[int] = []
    member_ms: dict[str, list[float]] = {}
    errors = degraded = 0
    for i in range(min(4, concurrency) * 2):  # warm up: workers, connections, the first batch
        await send(images[i % len(images)])

    async def client(k: int, deadline: float) -> None:
        nonlocal errors, degraded
        i = k
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            status, body = await send(images[i % len(images)])
            if status == 200:
                latencies.append(time.perf_counter() - start)
                degraded += body["degraded"]
                for name, member in body["members"].items():
                    member_ms.setdefault(name, []).append(member["latency_ms"])
                batches.append((body["members"].get("finetuned") or {}).get("batch_size") or 0)
            else:
                errors += 1
            i += concurrency

    cpu = _busy_cpu_s()
    start = time.perf_counter()
    await asyncio.gather(*[client(k, start + seconds) for k in range(concurrency)])
    wall = time.perf_counter() - start
    cpu = _busy_cpu_s() - cpu
    await send.close()
    latencies.sort()
    return {"n": len(latencies), "errors": errors, "degraded": degraded, "rps": len(latencies) / wall,
            "cpu_ms": 1000 * cpu / max(1, len(latencies)), "cores_busy": cpu / wall,
            "batch": statistics.fmean(batches) if batches else 0.0,
            "members": {name: statistics.median(ms) for name, ms in member_ms.items()},
            "p50": 1000 * statistics.median(latencies) if latencies else float("nan"),
            "p99": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")}


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (every process: Ray's, the replicas, the simulated VLM, this
    load generator), so a point's difference over its requests is what one request costs the machine."""
    t = psutil.cpu_times()
    return sum(getattr(t, field, 0.0) for field in ("user", "nice", "system", "irq", "softirq", "steal"))


def report(results: dict, args) -> None:
    cores = os.cpu_count() or 1
    print(f"\nServe load, {args.images} demo images (224x224 PNG), student max {args.max_new_tokens} new tokens, "
          f"batches of up to {args.max_batch_size}, RAG VLM simulated at {args.rag_latency * 1000:.0f} ms, "
          f"{cores} cores, {args.seconds:g} s per point\n")
    print(f"  {'what':24s} {'conc':>4s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'batch':>6s} "
          f"{'CPU ms/req':>10s} {'cores busy':>10s}  members' p50")
    for (name, concurrency), r in sorted(results.items(), key=lambda kv: (kv[0][0].endswith(")"), kv[0][1], kv[0][0])):
        members = ", ".join(f"{m} {v:.0f}" for m, v in r["members"].items())
        print(f"  {name:24s} {concurrency:4d} {r['rps']:8.2f} {r['p50']:8.1f} {r['p99']:8.1f} {r['batch']:6.1f} "
              f"{r['cpu_ms']:10.1f} {r['cores_busy']:10.2f}  {members}")
    print()
    for concurrency in args.concurrency:
        ensemble, alone = results.get(("ensemble", concurrency)), results.get(("student", concurrency))
        if ensemble and alone:
            slowest = max(ensemble["members"].values())
            print(f"ensemble over the student alone at p50, concurrency {concurrency:2d}: "
                  f"{100 * (ensemble['p50'] / alone['p50'] - 1):+.0f}% (target <= +15%); over its slowest member "
                  f"({slowest:.0f} ms): {100 * (ensemble['p50'] / slowest - 1):+.0f}%")
            # on a machine whose cores are all busy, a closed loop's latency follows this
            print(f"  CPU per request, machine-wide: ensemble {ensemble['cpu_ms']:.0f} ms, student alone "
                  f"{alone['cpu_ms']:.0f} ms ({ensemble['cpu_ms'] / alone['cpu_ms']:.2f}x); cores busy "
                  f"{ensemble['cores_busy']:.2f} and {alone['cores_busy']:.2f} of {cores}")
        rag = results.get(("rag", concurrency))
        if ensemble and alone and rag:  # an ensemble answers when its slower member does: its cost is the rest
            name, slower = max((("student", alone), ("rag", rag)), key=lambda kv: kv[1]["p50"])
            print(f"ensemble over the slower member served alone ({name}, p50 {slower['p50']:.0f} ms), "
                  f"concurrency {concurrency:2d}: {100 * (ensemble['p50'] / slower['p50'] - 1):+.0f}%")
    top = max(args.concurrency)
    for what, on, off in [("over HTTP", ("student", top), ("student-nobatch", top)),
                          ("member alone (handle)", ("member (handle)", top), ("member-nobatch (handle)", top))]:
        if on in results and off in results:
            a, b = results[on]["rps"], results[off]["rps"]
            print(f"dynamic batching at concurrency {top}, {what}: {a:.2f} vs {b:.2f} req/s = {a / b:.1f}x "
                  "(target >= 2x)")


if __name__ == "__main__":
    main()
