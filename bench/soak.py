"""Soak: the ensembled demo endpoint held at concurrency 32 for minutes, its answers and its memory watched.

    python bench/soak.py                                    # 5 minutes, the tiny test student (one answer)
    python bench/soak.py --checkpoint ~/.raydar/demo_cells/train/latest --minutes 5   # after `make demo`

One Serve application (the fine-tuned member and the RAG member behind the ingress, as `make demo`
deploys them) on a local Ray; `--concurrency` closed-loop clients post demo images over HTTP on 127.0.0.1
for `--minutes`. Printed every `--every` seconds: requests answered and their statuses, p50 / p99 latency,
and the resident memory of each Serve replica. At the end: every status seen (targets: only 200 and 503),
p50 / p99 over the whole run, and each replica's memory growth from the first window after `--warm-up` to
the last (target < 5%). Exit code 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
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
TOKEN = "soak-token"
MEMORY_GROWTH_TARGET = 0.05


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="How long the load is held.")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warm-up", type=float, default=30.0, help="Seconds before memory is first measured.")
    parser.add_argument("--every", type=float, default=15.0, help="Seconds per printed window.")
    parser.add_argument("--images", type=int, default=60, help="Demo images (labelled, indexed, sent).")
    parser.add_argument("--checkpoint", default=None, help="A finetune checkpoint, run folder or train/latest; "
                        "default: the tiny test student, taught here to give one answer in the task's format.")
    parser.add_argument("--rag-latency", type=float, default=0.05, help="Seconds the simulated VLM takes.")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/raydar/bench"))
    args = parser.parse_args()

    folder = make_demo_cells(Path(args.cache) / f"serve-cells-{args.images}", n=args.images, size=224, seed=0)
    overrides = {"images.uri": str(folder), "images.generate": None, "teacher.simulated.latency_s": args.rag_latency}
    connect(num_cpus=4)
    with SimulatedTeacherProcess(load_spec(SPEC, overrides=overrides), str(folder)) as teacher_url:
        overrides["teacher.base_url"] = teacher_url
        return soak(args, folder, overrides)


def soak(args, folder: Path, overrides: dict) -> int:
    from ray import serve

    from serving.app import build_app

    spec = load_spec(SPEC, overrides=overrides)
    storage = StorageRoot(tempfile.mkdtemp(prefix="raydar-soak-"))
    label_images(spec, storage, progress=False)
    index_labels(spec, storage)
    checkpoint = args.checkpoint or teach_one_answer(
        [Image.open(folder / r["file"]).convert("RGB") for r in read_ground_truth(folder)[:2]],
        Path(storage.path) / "student" / "checkpoint_000001")
    token_file = Path(storage.path) / "token"
    token_file.write_text(TOKEN)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"spec": str(SPEC), "set": overrides, "storage": storage.uri, "adapters": {"demo": str(checkpoint)},
                         "token_env": "RAYDAR_SOAK_UNSET", "token_file": str(token_file), "max_new_tokens": 48}),
              name="soak", route_prefix="/")
    images = [(folder / r["file"]).read_bytes() for r in read_ground_truth(folder)]
    try:
        windows = asyncio.run(hold(f"http://127.0.0.1:{port}", images, args))
    finally:
        serve.shutdown()
    return report(windows, args)


async def hold(url: str, images: list[bytes], args) -> list[dict]:
    """The load for `args.minutes`, as windows of `args.every` seconds: statuses, latencies, replica memory."""
    client = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120,
                               limits=httpx.Limits(max_connections=args.concurrency + 8))
    started = time.monotonic()
    deadline = started + 60 * args.minutes
    window = {"statuses": collections.Counter(), "latencies": []}

    async def one_client(k: int) -> None:
        i = k
        while time.monotonic() < deadline:
            sent = time.monotonic()
            try:
                response = await client.post("/v1/detect", content=images[i % len(images)],
                                             headers={"Content-Type": "image/png"})
                window["statuses"][response.status_code] += 1
                if response.status_code == 200:
                    window["latencies"].append(time.monotonic() - sent)
            except httpx.HTTPError as e:  # no answer at all: counted, never hidden
                window["statuses"][type(e).__name__] += 1
            i += args.concurrency

    windows = []

    async def watch() -> None:
        nonlocal window
        while time.monotonic() < deadline:
            await asyncio.sleep(args.every)
            done, window = window, {"statuses": collections.Counter(), "latencies": []}
            done.update(at=time.monotonic() - started, memory=replica_memory())
            windows.append(done)
            show(done)

    await asyncio.gather(watch(), *[one_client(k) for k in range(args.concurrency)])
    await client.aclose()
    return windows


def replica_memory() -> dict[str, float]:
    """Resident memory (MiB) of each Serve replica process on this machine, by deployment."""
    found: dict[str, float] = {}
    for process in psutil.process_iter(["cmdline", "memory_info"]):
        title = " ".join(process.info["cmdline"] or [])
        if "ServeReplica:" in title and process.info["memory_info"]:
            # the title reads ServeReplica:<app>:<deployment>, with .<method> while it answers one
            deployment = title.split("ServeReplica:", 1)[1].split()[0].split(":")[-1].split(".")[0]
            found[deployment] = found.get(deployment, 0.0) + process.info["memory_info"].rss / 2**20
    return found


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return 1000 * values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def show(window: dict) -> None:
    memory = ", ".join(f"{name} {mib:.0f} MiB" for name, mib in sorted(window["memory"].items()))
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(window["statuses"].items(), key=str))
    print(f"  {window['at']:6.0f} s  {statuses:24s} p50 {quantile(window['latencies'], 0.5):7.0f} ms  "
          f"p99 {quantile(window['latencies'], 0.99):7.0f} ms  {memory}", flush=True)


def report(windows: list[dict], args) -> int:
    statuses = sum((w["statuses"] for w in windows), collections.Counter())
    latencies = [x for w in windows for x in w["latencies"]]
    warm = [w for w in windows if w["at"] >= args.warm_up]
    print(f"\nSoak: concurrency {args.concurrency} for {args.minutes:g} min, {os.cpu_count()} cores")
    print(f"answers: {dict(sorted(statuses.items(), key=str))}; {len(latencies) / (60 * args.minutes):.1f} req/s; "
          f"p50 {quantile(latencies, 0.5):.0f} ms, p99 {quantile(latencies, 0.99):.0f} ms")
    bad = {k: v for k, v in statuses.items() if k not in (200, 503)}
    ok = not bad
    print(f"answers other than 200 / 503: {sum(bad.values())} (target 0) {'' if not bad else bad}")
    if len(warm) >= 2:
        for name in sorted(warm[0]["memory"]):
            first, last = warm[0]["memory"][name], warm[-1]["memory"].get(name, 0.0)
            growth = last / first - 1 if first else float("inf")
            ok &= growth < MEMORY_GROWTH_TARGET
            print(f"replica memory {name}: {first:.0f} -> {last:.0f} MiB after warm-up, {100 * growth:+.1f}% "
                  f"(target < {100 * MEMORY_GROWTH_TARGET:.0f}%)")
        print(f"mean memory per window: {statistics.fmean(sum(w['memory'].values()) for w in warm):.0f} MiB")
    else:
        ok = False
        print("too short to measure memory after the warm-up")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
