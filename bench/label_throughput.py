"""Labelling throughput: raydar's Ray Data job vs the sequential loop the seed projects use, vs the bound.

    python bench/label_throughput.py                  # 2,000 demo images, 50 ms teacher, cap 64
    python bench/label_throughput.py --images 500     # quicker

Both sides ask the same simulated teacher (its own process, 50 ms per answer, at most 64 answers at
once) through the same `TeacherClient`. The bound is the lower of the teacher's capacity
(cap / latency) and what this machine's cores can decode, encode and parse per second (measured
here: the CPU one process spends per image on the client side, many requests in flight, divided into the
core count), and the script says which one binds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import queue
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster import StorageRoot, connect  # noqa: E402
from jobs.label import label_images  # noqa: E402
from raydar.demo import make_demo_cells  # noqa: E402
from raydar.images import prepare_image, teacher_payload  # noqa: E402
from raydar.sources import read_ground_truth  # noqa: E402
from raydar.spec import load_spec  # noqa: E402
from raydar.kinds import kind_of  # noqa: E402
from raydar.teacher.client import TeacherAnswer, TeacherClient  # noqa: E402
from raydar.teacher.launch import SimulatedTeacherProcess  # noqa: E402

SPEC = Path(__file__).resolve().parents[1] / "datasets" / "demo_cells.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--cap", type=int, default=64)
    parser.add_argument("--sequential-images", type=int, default=200, help="The loop is slow: time it on fewer.")
    parser.add_argument("--actors", type=int, default=1, help="Labelling actors (teacher.actors).")
    parser.add_argument("--simulator-workers", type=int, default=1,
                        help="Processes of the simulated teacher (teacher.simulated.workers): one answers about "
                        "1,000 requests/s on a fast core, so on many cores give it several, or it is the bound.")
    parser.add_argument("--plain-processes", type=int, default=0,
                        help="Also time N plain Python processes without Ray, each a share of the cap with the same "
                        "client: what a hand-written multi-process script gets on this machine (0: skip).")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/raydar/bench"))
    args = parser.parse_args()

    folder = make_demo_cells(Path(args.cache) / f"cells-{args.images}", n=args.images, size=224, seed=0)
    spec = load_spec(SPEC, overrides={
        "images.uri": str(folder), "images.generate": None,
        "teacher.concurrency": -(-args.cap // args.actors), "teacher.simulated.latency_s": args.latency,
        "teacher.simulated.max_concurrency": args.cap, "teacher.actors": args.actors,
        "teacher.simulated.workers": args.simulator_workers,
    })
    cores = os.cpu_count() or 1
    print(f"{args.images} demo images (224x224 PNG), simulated teacher {args.latency * 1000:.0f} ms, "
          f"cap {args.cap} ({args.simulator_workers} simulator process{'es' * (args.simulator_workers > 1)}), "
          f"{cores} cores", flush=True)

    capacity = args.cap / args.latency
    connect()
    simulator = SimulatedTeacherProcess(spec, str(folder))
    with simulator as base_url:  # one simulator for every side
        seq_rate = asyncio.run(sequential(spec, folder, base_url, args.sequential_images))
        print(f"  sequential loop: {seq_rate:.1f} images/s", flush=True)
        cpu_per_image = asyncio.run(client_cpu_per_image(spec, folder, base_url))
        print(f"  client CPU: {cpu_per_image * 1000:.1f} ms/image", flush=True)
        plain_rate = plain_processes(spec, folder, base_url, args.plain_processes, args.cap, args.images)
        if plain_rate:
            print(f"  {args.plain_processes} plain processes: {plain_rate:.1f} images/s", flush=True)
        print("  raydar...", flush=True)
        spec = spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"base_url": base_url})})
        with tempfile.TemporaryDirectory() as tmp:
            label_images(spec, StorageRoot(Path(tmp) / "warm"), limit=64, progress=False)  # worker processes
            _simulator(base_url, "reset", method="POST")
            simulator_cpu = _cpu_seconds(simulator.process.pid)
            start = time.perf_counter()
            result = label_images(spec, StorageRoot(Path(tmp) / "store"), progress=False)
            raydar_s = time.perf_counter() - start
            simulator_cpu = _cpu_seconds(simulator.process.pid) - simulator_cpu
        times = sorted(r["time"] for r in _simulator(base_url, "log")["requests"])
    assert result.ok_new == args.images, result.summary()
    cpu_rate = cores / cpu_per_image
    raydar_rate = args.images / raydar_s
    steady_rate = (len(times) - 1) / (times[-1] - times[0])


    bound, binding = min((capacity, "teacher capacity (cap / latency)"),
                         (cpu_rate, f"{cores} cores preparing, encoding, parsing"))
    actors = f"{args.actors} labelling actor{'s' * (args.actors > 1)}"
    rows = [
        (f"raydar, whole job incl. start-up ({actors})", raydar_rate),
        ("raydar, steady state (first to last teacher request)", steady_rate),
        ("sequential loop, same client", seq_rate),
        *([(f"{args.plain_processes} plain processes, same client, no Ray", plain_rate)] if plain_rate else []),
        (f"bound: {binding}", bound),
    ]
    print()
    for name, rate in rows:
        print(f"  {name:<52} {rate:8.1f} images/s")
    print(f"  (teacher capacity {capacity:.0f}/s; client CPU {cpu_per_image * 1000:.1f} ms/image -> "
          f"{cpu_rate:.0f}/s on {cores} cores; the simulator shares these cores here: it used "
          f"{simulator_cpu / args.images * 1000:.2f} ms of CPU per image in raydar's run)")
    print()
    print(f"raydar / sequential = {raydar_rate / seq_rate:.1f}x whole job, {steady_rate / seq_rate:.1f}x steady "
          "(target >= 25x)")
    print(f"raydar / bound      = {raydar_rate / bound:.0%} whole job, {steady_rate / bound:.0%} steady (target >= 70%)")
    if plain_rate:
        print(f"raydar / plain      = {raydar_rate / plain_rate:.0%} whole job, {steady_rate / plain_rate:.0%} steady "
              f"({args.plain_processes} processes without Ray)")
    first_request = times[0] - (time.time() - (time.perf_counter() - start))
    print(f"raydar wall time {raydar_s:.1f} s for {args.images} images; first teacher request after "
          f"{first_request:.1f} s (listing, planning, starting the actor pools)")


def plain_processes(spec, folder: Path, base_url: str, n: int, cap: int, images: int) -> float:
    """Images/s of `n` plain processes (spawned: this one runs Ray), each asking about its share of the
    images with `cap / n` requests in flight through the same client; 0.0 for n = 0. Timed from a barrier
    after each has warmed its connections, to the last answer."""
    if not n:
        return 0.0
    files = [r["file"] for r in read_ground_truth(folder)[:images]]
    context = multiprocessing.get_context("spawn")
    barrier, done = context.Barrier(n + 1), context.Queue()
    workers = [context.Process(target=_plain_worker, args=(spec, folder, base_url, files[i::n], -(-cap // n),
                                                          barrier, done)) for i in range(n)]
    for worker in workers:
        worker.start()
    try:
        barrier.wait(timeout=300)
        start = time.perf_counter()
        labelled = 0
        for _ in workers:
            while True:  # a worker that dies must not leave the bench waiting for ever
                try:
                    labelled += done.get(timeout=1)
                    break
                except queue.Empty:
                    if any(w.exitcode not in (None, 0) for w in workers):
                        raise RuntimeError("a plain process failed: its traceback is above") from None
        elapsed = time.perf_counter() - start
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
    assert labelled == len(files), f"{labelled} of {len(files)} labelled by the plain processes"
    return labelled / elapsed


def _plain_worker(spec, folder: Path, base_url: str, files: list[str], concurrency: int, barrier, done) -> None:
    async def run() -> int:
        teacher = spec.teacher.model_copy(update={"concurrency": concurrency})
        client = TeacherClient(teacher, kind_of(spec.task, spec.teacher.coordinates), base_url=base_url)

        await asyncio.gather(*[ask(client, spec, folder / name) for name in files[:concurrency]])  # warm up
        barrier.wait()
        ok = sum(a.ok for a in await asyncio.gather(*[ask(client, spec, folder / name) for name in files]))
        await client.close()
        return ok

    done.put(asyncio.run(run()))


def _cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by a process and its children (the simulator's worker processes)."""
    process = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])


def _simulator(base_url: str, path: str, method: str = "GET") -> dict:
    request = urllib.request.Request(base_url.replace("/v1", "/_simulator/") + path, method=method)
    with urllib.request.urlopen(request) as response:
        return json.load(response)


async def client_cpu_per_image(spec, folder: Path, base_url: str, n: int = 400, rounds: int = 3) -> float:
    """CPU seconds this process spends per image to prepare, encode, send and parse (the client side),
    measured with many requests in flight, against a teacher running in another process. The least of
    `rounds` rounds: other work on the machine only ever adds to it (one round swung 2.4-3.8 ms here)."""
    kind = kind_of(spec.task, spec.teacher.coordinates)
    client = TeacherClient(spec.teacher, kind, base_url=base_url)
    records = read_ground_truth(folder)[:n]

    async def one(record):
        answer = await ask(client, spec, folder / record["file"])
        assert answer.ok, answer.error

    await asyncio.gather(*[one(r) for r in records[:32]])  # warm the connections
    per_image = []
    for _ in range(rounds):
        start = time.process_time()
        await asyncio.gather(*[one(r) for r in records])
        per_image.append((time.process_time() - start) / len(records))
    await client.close()
    return min(per_image)


async def sequential(spec, folder: Path, base_url: str, n: int) -> float:
    """How the seed projects label: one image after another, each waiting for its answer."""
    client = TeacherClient(spec.teacher, kind_of(spec.task, spec.teacher.coordinates), base_url=base_url)
    records = read_ground_truth(folder)[:n]
    start = time.perf_counter()
    for r in records:
        answer = await ask(client, spec, folder / r["file"])
        assert answer.ok, answer.error
    elapsed = time.perf_counter() - start
    await client.close()
    return len(records) / elapsed


async def ask(client: TeacherClient, spec, path: Path) -> TeacherAnswer:
    """What every side of the bench does per image, as the label job's actors do: read, prepare, ask."""
    data = path.read_bytes()
    prepared = prepare_image(data, spec.images.max_pixels, spec.images.max_image_pixels)
    payload, media_type = teacher_payload(data, prepared, spec.teacher.image_format)
    return await client.label(payload, *prepared.image.size, media_type)


if __name__ == "__main__":
    main()
